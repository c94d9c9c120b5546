"""The autotuner's search space: candidate tiles per kernel, their pruning, the tuning key, and the timing.

Few configs, pruned by head dim, dtype, dropout and layout block (_prune), keyed on power-of-two length buckets so
a new sequence length rarely triggers a new search. _time_config is how the tuner times one candidate.
"""

import torch
import triton

from . import settings


def _configs(candidates, maxnreg=None):
    """(BLOCK_M, BLOCK_N, warps, stages) tuples, or with a fifth item, the dK/dV kernel's QK_ROWS; maxnreg caps
    the registers per thread."""
    if settings.INTERPRET:  # small configs, never timed: the interpreter is slow and autotuning it means nothing
        if maxnreg:
            return []
        extras = dict.fromkeys(c[4:] for c in candidates)  # () or each QK_ROWS value
        candidates = [(m, n, 4, 1, *e) for e in extras for m, n in ((64, 32), (32, 32), (16, 16))]
    return [triton.Config({**({"QK_ROWS": c[4]} if len(c) > 4 else {}), "BLOCK_M": c[0], "BLOCK_N": c[1]},
                          num_warps=c[2], num_stages=c[3], maxnreg=maxnreg) for c in candidates]


def _prune(configs, named_args, **kwargs):
    """The candidates that fit registers and shared memory for this row width (head dim x dtype), best first where
    measured: with nothing timed (choices.choose), the first one runs."""
    args = {**named_args, **kwargs}
    row_bytes = args["Q"].element_size() * args["BLOCK_D"]
    orientation = {}  # the dK/dV kernel's QK_ROWS, as settings._DKDV_ROWS asks
    if "QK_ROWS" in configs[0].kwargs:
        orientation = {"QK_ROWS": settings._DKDV_ROWS == "1"}  # and for the fallback tile below
        both = settings._DKDV_ROWS == "tune" or (settings._DKDV_ROWS == "dropout" and bool(args.get("DROPOUT")))
        if not both:
            configs = [c for c in configs if c.kwargs["QK_ROWS"] == orientation["QK_ROWS"]]
    if not (args.get("DROPOUT") and args["BLOCK_D"] == 64 and args["Q"].element_size() == 2):  # see _FWD_CONFIGS
        configs = [c for c in configs if not c.maxnreg]
    kept = configs
    # (queries, keys) dK/dV tiles also keep P and dS transposed in shared memory: half the tile
    tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * (2 if c.kwargs.get("QK_ROWS") else 1)
    if args["Q"].element_size() == 4:  # see _FP32_TILE
        kept = sorted((c for c in configs if tile(c) <= _FP32_TILE and c.num_stages <= 2), key=lambda c: -c.num_warps)
        kept = kept or [min(configs, key=tile)]
    elif row_bytes > 256:  # fp16/bf16 beyond head dim 128
        max_tile = 128 * 64 if row_bytes <= 512 else 64 * 32
        kept = [c for c in configs if tile(c) <= max_tile and c.num_stages <= 2]
        kept = kept or [min(configs, key=tile)]
    if args.get("SPARSE"):  # a kernel tile must lie inside one layout block
        fits = [c for c in kept if c.kwargs["BLOCK_M"] <= args["LAYOUT_BQ"] and c.kwargs["BLOCK_N"] <= args["LAYOUT_BK"]]
        kept = fits or [triton.Config({**orientation, "BLOCK_M": min(64, args["LAYOUT_BQ"]),
                                       "BLOCK_N": min(32, args["LAYOUT_BK"])}, num_warps=4, num_stages=2)]
    return kept


_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
    (64, 128, 4, 3),  # GPT-2 small's 4K step (B2 H12 d64 causal, dropout): 4% faster than any other (H200)
    (64, 32, 8, 2),  # the fp32 tile (_FP32_TILE)
]) + _configs([(64, 64, 4, 3)], maxnreg=128)
# fp32 inputs get true-fp32 dots (PRECISION "ieee"), which run on FMAs with every operand tile in registers: larger
# tiles spill kilobytes per thread and take tens of seconds to compile. Triton 3.6, sm_90, static (the forward
# 128 x 64 w4 s3 at d64: 2,528 B of stack, 27k instructions; the dK/dV 64 x 64 w4 s2 at d128: 21,928 B, 48 s to
# compile on a 2-core CPU). So fp32 takes tiles of at most 64 x 32 elements, most warps first: forward 64 x 32 w8
# (no spill at d64, 608 B at d128, 9,344 B at d256 where w4 spills 1,744 B), dQ and dK/dV 32 x 32 w8 (0-888 B,
# against 10-17 KB for 64 x 16 and 16 x 64 w4 at d256). Rule picks for d32-d128: forward, dQ and dK/dV compile in
# ~5 s in all at d64 and ~9 s at d128, against ~37 s and ~78 s for the tiles taken before.
_FP32_TILE = 64 * 32
# The capped tile is a candidate only with dropout at head dims 33-64 in fp16/bf16 (BLOCK_D 64). There the mask's
# work takes the 64 x 64 tile to 136 registers per thread, so 3 programs fit an SM instead of 4; capped at 128 it
# keeps 4 and does not spill (Triton 3.6, sm_90). Whether that wins depends on the shape: the tuner chose it for
# 1 of 8 d64 rows of benchmarks/bench_dropout_cost.py on the H200 (docs/design.md, section 5).
_BWD_DKDV_TILES = [  # BLOCK_M walks queries, BLOCK_N is the resident K/V tile; QK_ROWS: see _bwd_dkdv_inner
    (32, 128, 4, 3, False), (64, 128, 8, 3, False), (32, 64, 4, 3, False), (64, 64, 4, 2, False),
    (16, 64, 4, 2, False), (32, 32, 8, 2, False),
    # (queries, keys) tiles need BLOCK_M >= 64, the MMA's M, and spill at 64 x 128 (Triton 3.6, static)
    (64, 64, 4, 2, True), (128, 64, 8, 2, True), (64, 32, 4, 2, True),
]
# _dropout_keep_t gathers Philox words from 64 keys and 128 words on (BLOCK_N / 16 * BLOCK_M); Triton 3.6 cannot
# compile a gather from fewer words than the block has threads, so such a tile must not gather.
assert all(n < 64 or n // 16 * m < 128 or n // 16 * m >= 32 * w for m, n, w, _, rows in _BWD_DKDV_TILES if not rows)
_BWD_DKDV_CONFIGS = _configs(_BWD_DKDV_TILES)
_BWD_DQ_CONFIGS = _configs([  # BLOCK_M is the resident Q tile, BLOCK_N walks keys
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 2), (32, 32, 8, 2),
])
_TUNE_KEY = ["SEQ_Q_BUCKET", "SEQ_K_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN", "HAS_KPM", "HAS_ALIBI",
             "DROPOUT", "SPARSE", "HAS_TILES", "HAS_RULE", "LAYOUT_BQ", "LAYOUT_BK"]
_PRUNE = {"early_config_prune": _prune}


def _time_config(kernel_call, quantiles):
    """How the autotuner times one config: GPU time only, from a CUDA graph of repeated launches.

    Triton's default times each launch between two events after an L2 flush, so it also counts the host
    latency of its own launch path (~60 us), as long as a short block-sparse kernel: the choice between
    configs of such kernels was noise (one layout measured 0.26 and 0.47 ms backward in two tunings).
    The capture is thread-local (other threads' CUDA calls stay legal) and uses the low-level calls, since
    torch.cuda.graph() would empty the allocator's cache on every config. Returns [median, p20, p80] ms
    (the autotuner keeps the config with the least median)."""
    stream, caller = torch.cuda.Stream(), torch.cuda.current_stream()
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        kernel_call()  # compiles; a config that does not fit raises here, before any capture
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            kernel_call()
        end.record()
        end.synchronize()
        launches = max(1, min(100, int(5.0 / max(start.elapsed_time(end) / 3, 1e-3))))  # ~5 ms per replay
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for _ in range(launches):
                kernel_call()
        finally:
            graph.capture_end()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / launches)
    caller.wait_stream(stream)
    times.sort()
    return [times[len(times) // 2], times[2], times[8]]
