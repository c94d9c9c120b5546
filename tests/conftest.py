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


def assert_close_2x(ours, ref, pt, name, norm="max"):
    """flash-attn's rule: our error against the fp64 reference <= 2 x PyTorch's same-dtype error + floor.

    norm="max" (kernel outputs) compares the largest elementwise errors. norm="rms" compares root-mean-square
    errors, for whole-model gradients in fp16/bf16: there every parameter's error is the sum of many
    rounding errors of layers both sides share, and the maximum over a few dozen entries of such noise
    swings by more than 2x between two equally accurate runs.
    """
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ref = ref.double()
    reduce = (lambda e: e.abs().max().item()) if norm == "max" else (lambda e: e.square().mean().sqrt().item())
    err = reduce(ours.double() - ref) if ref.numel() else 0.0
    pt_err = reduce(pt.double() - ref) if ref.numel() else 0.0
    floor = FLOOR[pt.dtype] * max(1.0, reduce(ref) if ref.numel() else 0.0)
    assert err <= 2 * pt_err + floor, f"{name}: max error {err:.3e} > 2 x PyTorch's {pt_err:.3e} + {floor:.1e}"


def assert_compiled_matches(loss_fn, inputs, loss_atol, grad_atol):
    """torch.compile(loss_fn, fullgraph=True) (which raises on any graph break) gives eager's loss and
    input gradients. Inductor on the GPU; aot_eager on the CPU, where the kernels are interpreted."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_loss = loss_fn(*inputs)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=loss_atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=grad_atol)


def fresh_tuning(monkeypatch):
    """Forget the tuned configs and cached launches, for this test only: its calls tune again (e.g. after a
    monkeypatched candidate list or orientation). Returns the three tuned kernels."""
    import hf_flash.kernels as kernels
    monkeypatch.setattr(kernels.launch, "_CHOSEN", {})
    monkeypatch.setattr(kernels.launch, "_COMPILED", {})
    tuned = (kernels.forward._attn_fwd, kernels.backward_dq._attn_bwd_dq, kernels.backward_dkdv._attn_bwd_dkdv)
    for kernel in tuned:
        monkeypatch.setattr(kernel, "cache", {})
    return tuned


def candidate_indices():
    """range over the longest of the tuned kernels' candidate lists: the index one_candidate_each takes."""
    import hf_flash.kernels as kernels
    return range(max(len(kernels.tuning._FWD_CONFIGS), len(kernels.tuning._BWD_DKDV_CONFIGS),
                     len(kernels.tuning._BWD_DQ_CONFIGS)))


def one_candidate_each(monkeypatch, index, block_d, dtype, **features):
    """Makes each tuned kernel run its index-th candidate (modulo their number) for this row width (block_d) and
    these features (tuning._prune's arguments), starting from no tuned configs and timing nothing. The others stay
    behind it, for the case where it does not fit the GPU's shared memory: then the next one runs, as for a user
    (launch._run_fitting)."""
    import hf_flash.kernels as kernels
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", False)
    monkeypatch.setattr(kernels.choices, "_table", lambda arch: {})
    for kernel in fresh_tuning(monkeypatch):
        configs = kernels.tuning._prune(kernel.configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d,
                                        **features)
        pinned = configs[index % len(configs)]
        monkeypatch.setattr(kernel, "configs", [pinned, *(c for c in kernel.configs if c is not pinned)])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
