"""The GPU tools' host-side logic, on made-up timings: tools/ship_tuning.py's bucket merge and
tools/compile_census.py's summary (the tools themselves need a CUDA GPU)."""

import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compile_census  # noqa: E402
import ship_tuning  # noqa: E402


class _Kernel:
    keys = ["SEQ_Q_BUCKET", "SEQ_K_BUCKET", "HEAD_DIM"]


A, B, C = (triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=3) for m in (128, 64, 32))


def test_length_buckets_share_a_config_within_the_tolerance_only():
    kernel = _Kernel()
    timings = {(kernel, "bf16", 512, 512, 64): {A: 1.00, B: 1.01, C: 2.0},
               (kernel, "bf16", 1024, 1024, 64): {A: 1.05, B: 1.00, C: 2.0},
               (kernel, "bf16", 4096, 4096, 64): {A: 1.00, B: 1.015, C: float("inf")},  # C did not fit
               (kernel, "bf16", 512, 512, 128): {A: 1.00, B: 1.50, C: 1.2}}  # another head dim: its own group
    merged = ship_tuning.merge(timings, 0.02)
    assert {key[2:]: config for key, (config, _) in merged.items()} == {
        (512, 512, 64): B, (1024, 1024, 64): B, (4096, 4096, 64): B, (512, 512, 128): A}
    assert round(merged[(kernel, "bf16", 4096, 4096, 64)][1], 3) == 1.015
    unmerged = ship_tuning.merge(timings, 0.0)  # each bucket keeps its own best
    assert {key[2:]: config for key, (config, _) in unmerged.items()} == {
        (512, 512, 64): A, (1024, 1024, 64): B, (4096, 4096, 64): A, (512, 512, 128): A}
    assert all(slower == 1.0 for _, slower in unmerged.values())


def test_the_census_names_what_tells_variants_apart():
    variants = [{"kernel": "_attn_fwd", "seconds": 2.0, "num_warps": 4, "num_stages": 3,
                 "constants": {"DROPOUT": True, "HAS_KPM": True}, "specialised": {"SEQ_Q": "tt.divisibility=16"}},
                {"kernel": "_attn_fwd", "seconds": 1.5, "num_warps": 4, "num_stages": 3,
                 "constants": {"DROPOUT": False, "HAS_KPM": True}, "specialised": {}},
                {"kernel": "_attn_bwd_dq", "seconds": 3.0, "num_warps": 8, "num_stages": 2,
                 "constants": {"DROPOUT": True}, "specialised": {}}]
    table = compile_census.summary(variants)
    assert table["_attn_fwd"] == {"variants": 2, "seconds": 3.5,
                                  "differ": {"DROPOUT": ["False", "True"], "SEQ_Q": ["-", "tt.divisibility=16"]}}
    assert table["_attn_bwd_dq"] == {"variants": 1, "seconds": 3.0, "differ": {}}
