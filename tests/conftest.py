"""Test setup: without a GPU the Triton kernels run under the interpreter, on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before hf_flash is
imported, which is why it is set here at conftest import time.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
# One config per kernel instead of a search: the search compiles every candidate for every new
# shape, which would dominate the suite's time. test_every_config_is_exact covers the others.
os.environ.setdefault("HF_FLASH_AUTOTUNE", "0")

DEVICE = "cuda" if ON_GPU else "cpu"

# Added to 2x PyTorch's own error, relative to the reference's magnitude: a few units in the last
# place, for cases where PyTorch happens to be exact (e.g. a single key) or at fp32 round-off.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close_2x(ours, ref, pt, name):
    """flash-attn's rule: our error against the fp64 reference <= 2 x PyTorch's same-dtype error + floor."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    pt_err = (pt.double() - ref).abs().max().item() if ref.numel() else 0.0
    floor = FLOOR[pt.dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= 2 * pt_err + floor, f"{name}: max error {err:.3e} > 2 x PyTorch's {pt_err:.3e} + {floor:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
