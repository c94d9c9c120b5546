"""Exact attention (FlashAttention-2) in Triton: forward, backward, launchers, custom ops.

Layout: q, k, v are (batch, seqlen, nheads, headdim) with any strides, or packed (total_tokens,
nheads, headdim) with cu_seqlens offsets (varlen); k and v may have nheads_q / group heads
(GQA/MQA). The forward tiles K/V through on-chip memory with an online softmax in fp32 and writes
only the output and the log-sum-exp (LSE, natural log, fp32). The backward recomputes the
probabilities from Q, K and the LSE.

Masking is aligned bottom-right: with diag = seqlen_k - seqlen_q, query i sees key j iff
i + diag - left <= j <= i + diag + right (causal: right = 0; -1: unbounded) and j is not padding.
Key blocks outside that band are skipped; blocks inside it need no element mask. A row that sees no
key outputs 0 and has LSE = +inf (as flash-attn), so that exp(s - lse) = 0 in the backward without
a special case. Optional: ALiBi bias, dropout (Philox, regenerated in the backward from the same
counters), key and query padding masks.

Read top to bottom: configs, jit helpers, forward, backward, launchers, custom ops with autograd.
"""

import math
import operator
import os

import torch
import triton
import triton.language as tl

# HF_FLASH_AUTOTUNE=0 skips the config search and takes the first config that fits: no tuning
# time on the first call of each shape bucket, at some cost in speed (the test suite uses it).
AUTOTUNE = os.environ.get("HF_FLASH_AUTOTUNE", "1") not in ("", "0")
# The backward's dQ: "dropout" (default) sums it in the dK/dV kernel with fp32 atomics when dropout is on, so the
# keep mask is drawn once instead of twice, as in FlashAttention-2 (H200, p = 0.1: 5-11% faster backward; without
# dropout atomics gain nothing); "0" always a dQ kernel of its own (two launches), "1" atomics always.
# deterministic=True, or torch.use_deterministic_algorithms(True), keeps the dQ kernel whatever this says.
# A private override for tests and tools (tools/), not a user setting: call reset_tuning() after changing it.
_ATOMIC_DQ = "dropout"
# The dK/dV kernel's tile orientation (QK_ROWS, a tuned parameter; see _bwd_dkdv_inner): (keys, queries) or, like
# the forward, (queries, keys). H200, B4 N4096 d64 p = 0.1: (queries, keys) 0.84-0.85x the backward time, since the
# dropout mask is then drawn in place; but 1.15x at d128 with dropout and 1.05-1.24x on every shape without dropout.
# So "dropout" (default): with dropout the tuner times both orientations, without it only (keys, queries);
# "0" never (queries, keys); "1" only (queries, keys); "tune" both always. Private, like _ATOMIC_DQ.
_DKDV_ROWS = "dropout"
# The interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors for testing. It is read at import time
# because triton.jit chooses between compiling and interpreting when it decorates. A tl.constexpr, so that jit
# functions may read it as a global (host code reads it as a bool through bool()).
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

LOG2E = tl.constexpr(1.4426950408889634)
DRAW_LEVELS = tl.constexpr(16384)  # dropout draws are 14-bit: p is quantised up to a multiple of 1 / DRAW_LEVELS
MAX_HEADDIM = 256


# --------------------------------------------------------------------------------------------
# Autotuning. Few configs, pruned by head dim and dtype, keyed on power-of-two length buckets so a
# new sequence length rarely triggers a new search.
# --------------------------------------------------------------------------------------------

def _configs(candidates, maxnreg=None):
    """(BLOCK_M, BLOCK_N, warps, stages) tuples, or with a fifth item, the dK/dV kernel's QK_ROWS; maxnreg caps
    the registers per thread."""
    if INTERPRET:  # small configs, never timed: the interpreter is slow and autotuning it means nothing
        if maxnreg:
            return []
        extras = dict.fromkeys(c[4:] for c in candidates)  # () or each QK_ROWS value
        candidates = [(m, n, 4, 1, *e) for e in extras for m, n in ((64, 32), (32, 32), (16, 16))]
    return [triton.Config({**({"QK_ROWS": c[4]} if len(c) > 4 else {}), "BLOCK_M": c[0], "BLOCK_N": c[1]},
                          num_warps=c[2], num_stages=c[3], maxnreg=maxnreg) for c in candidates]


def _prune(configs, named_args, **kwargs):
    """Keep only tiles that fit registers and shared memory for this row width (head dim x dtype)."""
    args = {**named_args, **kwargs}
    row_bytes = args["Q"].element_size() * args["BLOCK_D"]
    orientation = {}  # the dK/dV kernel's QK_ROWS, as _DKDV_ROWS asks
    if "QK_ROWS" in configs[0].kwargs:
        orientation = {"QK_ROWS": _DKDV_ROWS == "1"}  # and for the fallback tile below
        both = _DKDV_ROWS == "tune" or (_DKDV_ROWS == "dropout" and bool(args.get("DROPOUT")))
        if not both:
            configs = [c for c in configs if c.kwargs["QK_ROWS"] == orientation["QK_ROWS"]]
    if not (args.get("DROPOUT") and args["BLOCK_D"] == 64 and args["Q"].element_size() == 2):  # see _FWD_CONFIGS
        configs = [c for c in configs if not c.maxnreg]
    kept = configs
    if row_bytes > 256:  # beyond fp16/bf16 headdim 128 or fp32 headdim 64
        max_tile = 128 * 64 if row_bytes <= 512 else 64 * 32
        # (queries, keys) dK/dV tiles also keep P and dS transposed in shared memory: half the tile
        tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * (2 if c.kwargs.get("QK_ROWS") else 1)
        kept = [c for c in configs if tile(c) <= max_tile and c.num_stages <= 2]
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    if args.get("SPARSE"):  # a kernel tile must lie inside one layout block
        fits = [c for c in kept if c.kwargs["BLOCK_M"] <= args["LAYOUT_BQ"] and c.kwargs["BLOCK_N"] <= args["LAYOUT_BK"]]
        kept = fits or [triton.Config({**orientation, "BLOCK_M": min(64, args["LAYOUT_BQ"]),
                                       "BLOCK_N": min(32, args["LAYOUT_BK"])}, num_warps=4, num_stages=2)]
    return kept if AUTOTUNE and not INTERPRET else kept[:1]


_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
    (64, 128, 4, 3),  # GPT-2 small's 4K step (B2 H12 d64 causal, dropout): 4% faster than any other (H200)
]) + _configs([(64, 64, 4, 3)], maxnreg=128)
# The capped tile is a candidate only with dropout at head dims 33-64 in fp16/bf16 (BLOCK_D 64). There the mask's
# work takes the 64 x 64 tile from 128 to 136 registers per thread (149 before _drop_pairs and the mul.wide Philox),
# so 3 programs fit an SM instead of 4; capped at 128 it keeps 4 and does not spill (Triton 3.6, sm_90; H200 d64 4K
# forward with dropout, before those two: 1.854 / 1.014 ms against 1.910 / 1.047 uncapped, full / causal; after
# them the tuner chose it for 1 of 8 d64 rows in two runs of bench_dropout_cost.py).
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _mm(x, INTERPRET: tl.constexpr):
    # The interpreter's tl.dot multiplies the raw bit patterns of bf16 operands: upcast there.
    if INTERPRET:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter truncates fp32 -> bf16, which biases every rounded probability downwards;
    # round to nearest even there, as the GPU does.
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _pin_fp32(x, INTERPRET: tl.constexpr):
    """x, through an identity LLVM cannot see into. Put after tl.where(c, x, 0.0) when x is cast to fp16/bf16
    next, it keeps the select on the fp32 values: LLVM otherwise moves it past the cast, where each pair of values
    costs an unpack, two selects and a repack (PRMT, SEL, SEL, PRMT) instead of two FSEL (Triton 3.6, sm_90)."""
    if INTERPRET:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= n_rows (if checked) and the padded head dim."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _tile(n_blocks, MAJOR, REVERSE: tl.constexpr, SPARSE: tl.constexpr):
    """(rank of the block along the sequence, batch * nheads index) of this program.

    The grid is 1-D because CUDA caps grid axis 1 at 65535, below batch * nheads for large batches
    of short sequences. Head-major: consecutive programs share a head, so its K/V stay in L2. With
    REVERSE (dense causal, where later query blocks do more work) the heaviest blocks start first.
    Block-sparse kernels rank blocks by work (_sparse_tile) and go block-major (consecutive programs
    take the same rank in every head) when the layout says so (MAJOR, kernel_tensors' q/k_major): when
    a few rows are far longer than the rest (global tokens), so that those of every head start in the
    first wave instead of one head's at a time, the last head's in the last wave.
    """
    pid = tl.program_id(0)
    block, head = pid % n_blocks, pid // n_blocks
    if SPARSE:
        if tl.load(MAJOR) != 0:
            n_heads = tl.num_programs(0) // n_blocks
            block, head = pid // n_heads, pid % n_heads
    elif REVERSE:
        block = n_blocks - 1 - block
    return block, head


@triton.jit
def _n_tiles(seqlen, BLOCK: tl.constexpr, SPARSE: tl.constexpr, LAYOUT_BLOCK: tl.constexpr):
    """Tiles along the sequence; block-sparse: every layout block's, the last one's too (see _launch_rows)."""
    if SPARSE:
        return tl.cdiv(seqlen, LAYOUT_BLOCK) * (LAYOUT_BLOCK // BLOCK)
    else:
        return tl.cdiv(seqlen, BLOCK)


@triton.jit
def _sparse_tile(rank, ORDER, ly_bh, seqlen, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                 SPARSE: tl.constexpr):
    """The kernel tile that runs at `rank`. Block-sparse: a tile of the rank-th layout block by descending
    work (kernel_tensors' q_order / k_order; a layout block holds LAYOUT_BLOCK // BLOCK kernel tiles), so
    that long rows never start in the last wave."""
    if SPARSE:
        return (tl.load(ORDER + ly_bh * tl.cdiv(seqlen, LAYOUT_BLOCK) + rank // (LAYOUT_BLOCK // BLOCK))
                * (LAYOUT_BLOCK // BLOCK) + rank % (LAYOUT_BLOCK // BLOCK))
    else:
        return rank


@triton.jit
def _seq_bounds(CU_SEQLENS, off_b, SEQ, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence off_b: packed (varlen) sequences read them from cu_seqlens."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + off_b)
        return start.to(tl.int64), tl.load(CU_SEQLENS + off_b + 1) - start
    else:
        return 0, SEQ + 0


@triton.jit
def _visible(rows, cols, seq_k, diag, win_left, win_right, kpm_base,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr):
    """Element mask of query rows x key cols (2-D broadcastable index tensors).

    Key j is visible from query i iff j < seqlen_k, i + diag - left <= j <= i + diag + right (each
    side only when bounded; causal is right = 0), and key j is not padding.
    """
    keep = cols < seq_k
    if HAS_RIGHT:
        keep = keep & (cols <= rows + diag + win_right)
    if HAS_LEFT:
        keep = keep & (cols >= rows + diag - win_left)
    if HAS_KPM:
        keep = keep & (tl.load(kpm_base + cols, mask=cols < seq_k, other=0) != 0)
    return keep


@triton.jit
def _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """-slope * log2(e) of this (batch, head), so that the bias adds to scores in log2 units."""
    if HAS_ALIBI:
        return -tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E
    else:
        return 0.0


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def _alibi(rows, cols, diag, slope2):
    # flash-attn's ALiBi: -slope * |i + diag - j|, here in log2 units (slope2 = -slope * log2 e).
    return slope2 * tl.abs(rows + diag - cols).to(tl.float32)


@triton.jit
def _philox_words(seed, rng_rows, groups):
    """The four words of the Philox-4x32 calls (7 rounds) with counters (group, row), shape (rows, groups).
    The counter goes in as a row and a column vector, so the first Philox round works on vectors."""
    rows = rng_rows.to(tl.int64)
    if INTERPRET:  # the interpreter has no PTX: tl.philox gives the same words (tests check it on the GPU)
        return tl.philox(seed, groups.to(tl.uint32)[None, :], (rows >> 32).to(tl.uint32)[:, None],
                         rows.to(tl.uint32)[:, None], 0, 7)
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = groups.to(tl.uint32)[None, :]
    c1 = (rows >> 32).to(tl.uint32)[:, None]
    c2 = rows.to(tl.uint32)[:, None]
    c3 = tl.full((1, 1), 0, tl.uint32)
    # tl.philox's rounds (its multipliers and key increments), but each product's high and low words come from
    # one mul.wide (one IMAD.WIDE), where ptxas made an IMAD.HI and an IMAD of most (docs/design.md, section 5).
    for _ in tl.static_range(7):
        hb, lb = tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$1, $0}, t; }",
                                           "=r,=r,r", [c2], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        ha, la = tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$1, $0}, t; }",
                                           "=r,=r,r", [c0], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        c0 = hb ^ c1 ^ k0
        c2 = ha ^ c3 ^ k1
        c1 = lb
        c3 = la
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _keep_threshold(dropout_p):
    """T = 4 t: an element is kept when its 14-bit draw is >= t, i.e. when the 16-bit lane that holds the draw
    in its high 14 bits is >= T (see _dropout_keep)."""
    return tl.minimum(tl.math.ceil(dropout_p * DRAW_LEVELS), DRAW_LEVELS - 1).to(tl.uint32) * (65536 // DRAW_LEVELS)


@triton.jit
def _dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Philox keep mask of the (BLOCK_M query rows, BLOCK_N keys from start_n) tile.

    One Philox-4x32 call (7 rounds, as in FlashAttention-2) yields 4 words of 4 draws of 14 bits each. Draw
    j = 2 * h + e of a word is the high 14 bits of 16-bit lane e of the word (h = 0) or of the word rotated left
    by 8 bits (h = 1): of bytes (high:low) 1:0, 3:2, 0:3 and 2:1 for j = 0..3 (_word_keep). The call with counter
    (g, row), where row = bh * SEQ_Q + i, serves the 16 keys 64 * (g // 4) + 8 * n + 2 * (g % 4) + e of that
    row, n = 2 * w + h for draw j of word w. That is how a tensor-core accumulator is spread over threads (key
    pairs 2c, 2c + 1, repeating every 8 keys), so each draw is made by the thread that holds its element; a
    shuffle through shared memory instead costs twice as much per element on the H100 (docs/design.md, section 5). And a
    key pair's two draws are the two lanes of one 32-bit word, so the forward tests and applies them two at a
    time on the fp16/bf16 P (_drop_pairs). Tiles of any size see the same mask, so the forward, both backward
    kernels and dropout_mask() agree; a 32- or 16-key tile computes its span's call and uses half or a quarter.
    An element is kept when its draw >= t = min(ceil(p * 16384), 16383), i.e. when its 16-bit lane >= 4 t: p is
    quantised up to t / 16384 (the host passes the kernels that quantised p, quantised_dropout_p). Every
    draw is uniform on 14 bits, so each flag is kept with probability exactly 1 - t / 16384; two draws that
    share a byte (the low byte of one lane is the high byte of another) are correlated by ~0.2% (p = 0.1),
    through the ~1/256 chance that the shared byte decides (computed exactly: 0.17%). Sixteen draws per call
    instead of eight halve the Philox work per element. Outside _drop_pairs the tests are integer compares in
    place in the 32-bit word; an int-to-float conversion runs at a quarter of the ALU rate.
    """
    t = _keep_threshold(dropout_p)
    if BLOCK_N >= 64:
        w0, w1, w2, w3 = _philox_words(seed, rng_rows, start_n // 16 + tl.arange(0, BLOCK_N // 16))
        keep = tl.join(tl.join(_word_keep(w0, t), _word_keep(w1, t)),
                       tl.join(_word_keep(w2, t), _word_keep(w3, t)))
        # (row, g // 4, g % 4, e, n % 2, w % 2, w // 2) -> key order (g // 4, w // 2, w % 2, n % 2, g % 4, e)
        keep = tl.permute(tl.reshape(keep, (BLOCK_M, BLOCK_N // 64, 4, 2, 2, 2, 2)), (0, 1, 6, 5, 4, 2, 3))
    else:  # part of a 64-key span: its call, and the words that hold this tile's keys
        w0, w1, w2, w3 = _philox_words(seed, rng_rows, start_n // 64 * 4 + tl.arange(0, 4))
        if BLOCK_N == 32:  # words 0, 1 or 2, 3
            second = (start_n // 32) % 2 == 1
            keep = tl.join(_word_keep(tl.where(second, w2, w0), t), _word_keep(tl.where(second, w3, w1), t))
            keep = tl.permute(keep, (0, 4, 3, 1, 2))  # (row, g, e, n % 2, w % 2) -> key order (w % 2, n % 2, g, e)
        else:  # 16 keys: one word
            quarter = (start_n // 16) % 4
            word = tl.where(quarter == 0, w0, tl.where(quarter == 1, w1, tl.where(quarter == 2, w2, w3)))
            keep = tl.permute(_word_keep(word, t), (0, 3, 1, 2))  # (row, g, e, n % 2) -> key order (n % 2, g, e)
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def _pair_words(seed, rng_rows, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) uint32, BLOCK_N >= 64: for each score, a word whose bits 0-13 and 16-29 are its key
    pair's two draws (see _dropout_keep; _drop_pairs ignores bits 14-15 and 30-31). A draw is the high 14 bits of
    a 16-bit lane of the Philox word w (h = 0) or of w rotated left by 8 (h = 1), so the pair's word is w rotated
    right by 2 or left by 6: one funnel shift."""
    w0, w1, w2, w3 = _philox_words(seed, rng_rows, start_n // 16 + tl.arange(0, BLOCK_N // 16))
    x = tl.join(tl.join(tl.join(_rotl(w0, 30), _rotl(w0, 6)), tl.join(_rotl(w1, 30), _rotl(w1, 6))),
                tl.join(tl.join(_rotl(w2, 30), _rotl(w2, 6)), tl.join(_rotl(w3, 30), _rotl(w3, 6))))  # (row, g, h, w%2, w//2)
    x = tl.join(x, x)  # both scores of a pair get the word: (row, g, h, w % 2, w // 2, e)
    # -> key order (g // 4, w // 2, w % 2, h, g % 4, e), as _dropout_keep
    x = tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_N // 64, 4, 2, 2, 2, 2)), (0, 1, 5, 4, 3, 2, 6))
    return tl.reshape(x, (BLOCK_M, BLOCK_N))


@triton.jit
def _drop_pairs(p16, words, t):
    """p16 (fp16 or bf16 P) with _dropout_keep's dropped scores zeroed, two scores per instruction.

    words: _pair_words; t = _keep_threshold. With bits 14-15 and 30-31 cleared, the two 14-bit draws are finite
    fp16 bit patterns, which order as their integers do, so one packed fp16 compare against t / 4 gives both
    lanes' masks (0xFFFF or 0), and one AND applies them to the pair: three instructions per pair, where a
    compare and a select per score on fp32 P cost four and more."""
    t2 = tl.full(words.shape, 0, tl.uint32) + ((t >> 2) | (t << 14))
    return tl.inline_asm_elementwise(
        "{ .reg .b32 m; and.b32 m, $2, 0x3FFF3FFF; set.ge.u32.f16x2 m, m, $4; and.b32 $0, $1, m; }",
        "=r,r,r,r,r,r", [p16, words, t2], dtype=p16.dtype, is_pure=True, pack=2)


@triton.jit
def _dropout_keep_t(seed, rng_rows, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """_dropout_keep's flags as (BLOCK_N keys, BLOCK_M rows), for the dK/dV kernel's transposed tiles.

    There a thread holds keys r and r + 8 of its warp's 16, so the 16 draws of one Philox call (spread over 64
    keys) belong to four warps: something must cross threads through shared memory. Moving the flags one by one
    (tl.trans of _dropout_keep) took a round trip per join and made dropout cost the backward several times what
    it costs the forward. Here the raw Philox words cross instead, by tl.gather: per query a thread fetches the one
    word that serves both its keys k and k + 8, and takes each element's draw with a byte permute (_lane16).
    A gather's source keeps its own layout whatever its reader wants. Through a plain broadcast Triton gave the
    words the readers' layout, replicated 8x, and recomputed every Philox call eight times (Triton 3.6 did so
    even through an asm move not marked pure: dropout then cost the H200 backward +180% instead of +100%).
    """
    # Small tiles flip the flags one by one (see _BWD_DKDV_TILES: a gather needs as many words as threads).
    # if / else, not an early return: the compiler builds both paths.
    if BLOCK_N < 64 or (BLOCK_N // 16) * BLOCK_M < 128:
        keep_t = tl.trans(_dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_M, BLOCK_N))
    else:
        w0, w1, w2, w3 = _philox_words(seed, rng_rows, start_n // 16 + tl.arange(0, BLOCK_N // 16))
        # the call's words as columns 4 * g + 2 * (w % 2) + w // 2 of one (rows, BLOCK_N / 4) tensor
        words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_M, BLOCK_N // 4))
        # key k: call g = 4 * (k // 64) + (k % 8) // 2, word w = (k % 64) // 16, draw j = 2 * ((k // 8) % 2) + k % 2.
        # Keys k and k + 8 share g and w and one thread holds both: gather for k // 8 even, then broadcast.
        half = tl.arange(0, BLOCK_N // 2)
        k_even = 16 * (half // 8) + half % 8
        w = (k_even % 64) // 16
        col = 4 * (4 * (k_even // 64) + (k_even % 8) // 2) + 2 * (w % 2) + w // 2
        word = tl.gather(tl.trans(words), tl.broadcast_to(col[:, None], (BLOCK_N // 2, BLOCK_M)), 0)
        word = tl.broadcast_to(tl.reshape(word, (BLOCK_N // 16, 1, 8, BLOCK_M)), (BLOCK_N // 16, 2, 8, BLOCK_M))
        word = tl.reshape(word, (BLOCK_N, BLOCK_M))
        k = tl.arange(0, BLOCK_N)
        j = (2 * ((k // 8) % 2) + k % 2)[:, None]
        keep_t = _lane16(word, j, INTERPRET) >= _keep_threshold(dropout_p)
    return keep_t


@triton.jit
def _lane16(word, j, INTERPRET: tl.constexpr):
    """The 16-bit lane that holds draw j of a Philox word (_word_keep): its bytes lo(j) (low) and lo(j) + 1 mod 4
    (high), where lo(0..3) = 0, 2, 3, 1."""
    lo = (0x1320 >> (4 * j)) & 0xF
    if INTERPRET:
        wide = word.to(tl.uint64) | (word.to(tl.uint64) << 32)
        return ((wide >> (8 * lo).to(tl.uint64)) & 0xFFFF).to(tl.uint32)
    else:  # one byte permute: bytes lo and (lo + 1) % 4 of the word, then two zero bytes (byte 4 of the 0 operand)
        sel = (lo | (((lo + 1) % 4) << 4) | 0x4400).to(tl.uint32)
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $2;", "=r,r,r", [word.to(tl.uint32), sel],
                                         dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _rotl(word, n: tl.constexpr):
    """word (uint32) rotated left by n bits: one funnel shift."""
    return (word << n) | (word >> (32 - n))


@triton.jit
def _word_keep(word, t):
    """Keep flags of a Philox word's four draws (see _dropout_keep), shape (..., 2, 2): [..., e, h] is draw
    j = 2 * h + e, in lane e of the word (h = 0) or of the word rotated left by 8 (h = 1); t = _keep_threshold."""
    word = word.to(tl.uint32, bitcast=True)
    rot = _rotl(word, 8)  # a high lane is compared in place: its low 16 bits cannot carry a compare with t << 16
    return tl.join(tl.join((word & 0xFFFF) >= t, word >= (t << 16)), tl.join((rot & 0xFFFF) >= t, rot >= (t << 16)))


@triton.jit
def _block_start(it, idx_ptr, SPARSE: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First token of the tile that loop position `it` (a multiple of BLOCK) visits.

    Dense loops walk a token range, so that is `it` itself. Block-sparse loops walk a layout's index
    list instead: position it // BLOCK is the (it // BLOCK) % (LAYOUT_BLOCK // BLOCK)-th kernel tile of
    listed layout block (it // BLOCK) // (LAYOUT_BLOCK // BLOCK). This is the only difference between
    the dense and the block-sparse loops.
    """
    if SPARSE:
        tiles_per_block: tl.constexpr = LAYOUT_BLOCK // BLOCK
        j = it // BLOCK
        return tl.load(idx_ptr + j // tiles_per_block) * LAYOUT_BLOCK + (j % tiles_per_block) * BLOCK
    else:
        return it


@triton.jit
def _tile_keep(TILES, tile, rows, cols, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """Element mask of a partial layout block, bit-packed along keys (32 per int32 word).

    tile < 0 marks a block that is partial only because of causality or the ragged end: all bits set.
    rows and cols are broadcastable 2-D token indices.
    """
    words: tl.constexpr = (LAYOUT_BK + 31) // 32
    base = TILES + tl.maximum(tile, 0).to(tl.int64) * (LAYOUT_BQ * words)
    bits = tl.load(base + (rows % LAYOUT_BQ) * words + (cols % LAYOUT_BK) // 32)
    return (tile < 0) | (((bits >> (cols % LAYOUT_BK % 32)) & 1) != 0)


@triton.jit
def _rule_keep(RULE, rows, cols, diag):
    """A layout's element rule (left, right, n_global) evaluated inline: key j - i - diag in [-left, right], or
    query or key among the first n_global tokens (layouts.BlockSparseLayout.element_rule)."""
    return _rule_visits(RULE, rows, rows, cols, cols, diag)  # a 1 x 1 box per element


@triton.jit
def _rule_visits(RULE, row_lo, row_hi, col_lo, col_hi, diag):
    """Whether the rule keeps any element of queries [row_lo, row_hi] x keys [col_lo, col_hi]: their offsets
    span [col_lo - row_hi, col_hi - row_lo] - diag."""
    n_global = tl.load(RULE + 2)
    return (((col_hi - row_lo - diag >= -tl.load(RULE)) & (col_lo - row_hi - diag <= tl.load(RULE + 1)))
            | (row_lo < n_global) | (col_lo < n_global))


@triton.jit
def _rule_trim(lo, hi, idx_ptr, RULE, fixed_lo, fixed_hi, diag, KEYS: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
               BLOCK: tl.constexpr):
    """Narrows a loop over partial layout blocks, [lo, hi), by the tiles at either end that the rule masks whole
    (_rule_visits false): in a window, the far side of its edge block and the part of the diagonal block above
    the diagonal. Such a tile would be computed to zeros. Only the ends are trimmed, before the loop: a branch
    around a tile's work inside the loop stops Triton from pipelining its loads (Triton 3.6). KEYS: the loop
    walks key tiles and [fixed_lo, fixed_hi] are the program's queries (forward, dQ); else the reverse (dK/dV)."""
    for end in tl.static_range(2):
        going = lo < hi
        for _ in tl.static_range(LAYOUT_BLOCK // BLOCK):
            if end == 0:
                it = lo
            else:
                it = hi - BLOCK
            # clamped into the listed blocks: once lo meets hi the load is unused but must stay in bounds
            start = _block_start(tl.maximum(tl.minimum(it, hi - BLOCK), 0), idx_ptr, True, LAYOUT_BLOCK, BLOCK)
            if KEYS:
                visits = _rule_visits(RULE, fixed_lo, fixed_hi, start, start + BLOCK - 1, diag)
            else:
                visits = _rule_visits(RULE, start, start + BLOCK - 1, fixed_lo, fixed_hi, diag)
            going = going & (lo < hi) & (visits == 0)
            if end == 0:
                lo = tl.where(going, lo + BLOCK, lo)
            else:
                hi = tl.where(going, hi - BLOCK, hi)
    return lo, hi


@triton.jit
def _keep(rows, cols, seq_k, diag, win_left, win_right, kpm_base, tile_addr, TILES, RULE,
          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, HAS_TILES: tl.constexpr,
          HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """The element mask of a partial tile, for every kernel and orientation: _visible, then (block-sparse) the
    layout block's element mask at tile_addr (_tile_keep) and the mask_mod rule (_rule_keep). rows and cols are
    2-D broadcastable index tensors, (queries, 1) x (1, keys) or transposed."""
    keep = _visible(rows, cols, seq_k, diag, win_left, win_right, kpm_base, HAS_LEFT, HAS_RIGHT, HAS_KPM)
    if HAS_TILES:
        keep = keep & _tile_keep(TILES, tl.load(tile_addr), rows, cols, LAYOUT_BQ, LAYOUT_BK)
    if HAS_RULE:
        keep = keep & _rule_keep(RULE, rows, cols, diag)
    return keep


@triton.jit
def _key_blocks(first_row, seq_q, seq_k, diag, win_left, win_right, K_RANGE, off_b,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a query block as lo <= full_lo <= full_hi <= hi.

    [full_lo, full_hi) holds whole key blocks that every row of the query block sees entirely: they
    need no element mask. [lo, full_lo) and [full_hi, hi) straddle a window edge, the ragged last
    block or padding, and are masked. Blocks outside [lo, hi) are skipped, not just masked. With a
    key padding mask (any pattern) every block in [k_lo, k_hi) is masked.
    """
    last_row = tl.minimum(first_row + BLOCK_M, seq_q) - 1
    lo = seq_k * 0
    hi = seq_k
    full_lo = lo
    full_hi = seq_k // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_row + diag + win_right + 1)
        full_hi = tl.minimum(full_hi, tl.maximum(first_row + diag + win_right + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_LEFT:
        lo = tl.maximum(first_row + diag - win_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_row + diag - win_left, 0), BLOCK_N) * BLOCK_N
    if HAS_KPM:  # [first, last + 1) of the attended keys of this batch row
        lo = tl.maximum(lo, tl.load(K_RANGE + 2 * off_b) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, tl.load(K_RANGE + 2 * off_b + 1))
        full_lo = lo
        full_hi = lo
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(start_n, seq_q, diag, win_left, win_right,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range of a key block, split like _key_blocks: [full_lo, full_hi) see all of its keys.

    Query rows past seqlen_q need no mask here (they load as q = 0 with lse = +inf, so p = 0).
    """
    lo = seq_q * 0
    hi = seq_q
    full_lo = lo
    full_hi = seq_q
    if HAS_RIGHT:
        lo = tl.maximum(start_n - diag - win_right, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - win_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N - diag + win_left)
        full_hi = tl.maximum(start_n - diag + win_left + 1, 0) // BLOCK_M * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               lo, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
               slope2, seed, rng_rows, SEQ_K, dropout_p, idx_ptr, tile_ptr, TILES, RULE,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
               SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
               LAYOUT_BK: tl.constexpr):
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, tl.min(rows, 0), tl.max(rows, 0), diag, True, LAYOUT_BK, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BK, BLOCK_N), BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        if MASK or HAS_ALIBI:
            qk = qk * qk_scale
            if HAS_ALIBI:
                qk += _alibi(rows[:, None], cols[None, :], diag, slope2)
            if MASK:
                keep = _keep(rows[:, None], cols[None, :], seq_k, diag, win_left, win_right, kpm_base,
                             tile_ptr + start_n // LAYOUT_BK, TILES, RULE, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                             HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead of -inf
            # so that exp2 gives 0 rather than NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            qk = qk - m_sub[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            qk = qk * qk_scale - m_sub[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        if DROPOUT and not INTERPRET and BLOCK_N >= 64 and v.dtype.primitive_bitwidth == 16:
            p = _drop_pairs(p.to(v.dtype), _pair_words(seed, rng_rows, start_n, rows.shape[0], BLOCK_N),
                            _keep_threshold(dropout_p))
        else:
            if DROPOUT:
                p = _pin_fp32(tl.where(_dropout_keep(seed, rng_rows, start_n, dropout_p, rows.shape[0], BLOCK_N),
                                       p, 0.0), INTERPRET)
            p = _cast(p, v.dtype, INTERPRET)
        acc = tl.dot(_mm(p, INTERPRET), _mm(v, INTERPRET), acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE, do_bench=_time_config)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, KPM, K_RANGE, QPM, ALIBI, SEED,
              LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh, stride_od,
              stride_lb, stride_lh, stride_kpm, stride_qpm, stride_ab, stride_ah,
              NHEADS, GROUP, SEQ_Q, SEQ_K, qk_scale, win_left, win_right, dropout_p,
              SEQ_Q_BUCKET, SEQ_K_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
              HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
              SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
              LAYOUT_BK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(_n_tiles(SEQ_Q, BLOCK_M, SPARSE, LAYOUT_BQ), MAJOR, HAS_RIGHT, SPARSE)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    start_m = _sparse_tile(start_m, ORDER, off_b * ly_sb + off_h * ly_sh, SEQ_Q, LAYOUT_BQ, BLOCK_M, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    first_row = start_m * BLOCK_M
    if first_row >= seq_q:  # a packed sequence shorter than max_seqlen_q
        return
    q_base = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
    k_base = K + off_b * stride_kb + k_start * stride_kn + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vn + (off_h // GROUP) * stride_vh
    o_base = O + off_b * stride_ob + q_start * stride_om + off_h * stride_oh

    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)

    diag = seq_k - seq_q
    kpm_base = KPM + off_b * stride_kpm
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = off_bh.to(tl.int64) * SEQ_Q + rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:
        # This query block's row of the layout: its partial key blocks (element-masked), then its
        # full ones (masked only for key padding). BLOCK_M divides LAYOUT_BQ, so the row is unique.
        n_kv_blocks = tl.cdiv(SEQ_K, LAYOUT_BK)
        ly_row = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_Q, LAYOUT_BQ) + first_row // LAYOUT_BQ
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   0, tl.load(LY_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag,
                                   qk_scale, win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                                   LY_IDX + ly_row * n_kv_blocks, TILE_IDX + ly_row * n_kv_blocks, TILES, RULE,
                                   True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET,
                                   True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   0, tl.load(LY_FULL_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag,
                                   qk_scale, win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                                   LY_FULL_IDX + ly_row * n_kv_blocks, TILE_IDX, TILES, RULE,
                                   HAS_KPM, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET,
                                   True, False, False, LAYOUT_BQ, LAYOUT_BK)
    else:
        lo, full_lo, full_hi, hi = _key_blocks(first_row, seq_q, seq_k, diag, win_left, win_right, K_RANGE, off_b,
                                               HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N)
        if HAS_LEFT:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                       lo, full_lo, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                       kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                       True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                       HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   full_lo, full_hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                   kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                   False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   full_hi, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                   kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                   True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)

    empty = l_i == 0.0  # the row sees no key
    if HAS_QPM:  # a padding query: output 0, lse +inf, so the backward gives it zero gradient
        empty = empty | (tl.load(QPM + off_b * stride_qpm + rows, mask=rows < seq_q, other=0) == 0)
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)
    acc = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])  # the one division, at the end
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + q_start + rows, lse, mask=rows < seq_q)
    o_ptrs = o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, INTERPRET), mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Backward: two launches. First dQ (one program per query block), which also computes and stores
# delta = rowsum(dO * O) - dLSE for its rows; then dK/dV (one program per key block, looping over the
# query heads of its KV group, so no atomics), which reads delta. Each recomputes P (and the dropout
# mask). With ATOMIC_DQ (by default when dropout is on), the dQ kernel only stores delta and zeroes an
# fp32 dQ buffer, and the dK/dV kernel adds each key block's dS K into it with atomics, as FlashAttention-2
# does (P and the dropout mask are computed once; the sum's order, hence its rounding, varies).
#
# Query rows past seqlen_q load as q = 0, dO = 0, LSE = +inf, so their probabilities are exactly 0
# and need no mask. Key rows past seqlen_k only touch dK/dV rows that are never stored, but in dQ
# they must be masked like in the forward. With dropout, dS = P * (dropped(dP) / (1 - p) - delta).
# --------------------------------------------------------------------------------------------

@triton.jit
def _q_axis(x, QK_ROWS: tl.constexpr):
    """A vector over the dK/dV tile's queries, broadcast along its keys: a column of a (queries, keys) tile
    (QK_ROWS), else a row of a (keys, queries) tile."""
    if QK_ROWS:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _k_axis(x, QK_ROWS: tl.constexpr):
    """A vector over the dK/dV tile's keys, broadcast along its queries (see _q_axis)."""
    if QK_ROWS:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _trans_if(x, TRANSPOSE: tl.constexpr):
    if TRANSPOSE:
        x = tl.trans(x)
    return x


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_dqm, stride_dqd, sm_scale,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    lo, hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale, win_left, win_right, key_kept,
                    slope2, seed, rng_base, SEQ_K, dropout_p, idx_ptr, tile_ptr, tile_stride, TILES, RULE,
                    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                    SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                    LAYOUT_BK: tl.constexpr, ATOMIC_DQ: tl.constexpr, QK_ROWS: tl.constexpr):
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, start_n, start_n + cols.shape[0] - 1, diag, False, LAYOUT_BQ,
                            BLOCK_M)
    for it in range(lo, hi, BLOCK_M):
        # QK_ROWS: the tile is (queries, keys) as in the forward, so the dropout mask is _dropout_keep's, drawn where
        # each thread holds its elements, and P and dS enter dV and dK transposed (a shared-memory MMA operand).
        # Else (keys, queries): dV and dK need no transposes, and the mask is drawn transposed (_dropout_keep_t).
        start_m = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BQ, BLOCK_M), BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(lse_base + rows, mask=rows < seq_q, other=float("inf")) * LOG2E
        if QK_ROWS:
            s = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION) * qk_scale
        else:
            s = tl.dot(_mm(k, INTERPRET), _mm(tl.trans(q), INTERPRET), input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += _alibi(_q_axis(rows, QK_ROWS), _k_axis(cols, QK_ROWS), diag, slope2)
        p = tl.math.exp2(s - _q_axis(lse2, QK_ROWS))
        if MASK:
            keep = _keep(_q_axis(rows, QK_ROWS), _k_axis(cols, QK_ROWS), seq_k, diag, win_left, win_right, 0,
                         tile_ptr + start_m // LAYOUT_BQ * tile_stride, TILES, RULE, HAS_LEFT, HAS_RIGHT, False,
                         HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
            p = tl.where(keep, p, 0.0)
        if HAS_KPM or (ATOMIC_DQ and not MASK):
            # Keys past seqlen_k load as k = 0, so s = 0 and p = exp2(-lse) there, which overflows fp16 when lse is
            # very negative. Their dK/dV rows are never stored, but the atomic dQ += dS K crosses rows: inf * 0 = NaN.
            p = tl.where(_k_axis(key_kept, QK_ROWS), p, 0.0)
        do = _load_rows(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
        if QK_ROWS:
            dp = tl.dot(_mm(do, INTERPRET), _mm(tl.trans(v), INTERPRET), input_precision=PRECISION)
        else:
            dp = tl.dot(_mm(v, INTERPRET), _mm(tl.trans(do), INTERPRET), input_precision=PRECISION)
        if DROPOUT:
            # dV sums the kept P unscaled (the caller scales dV by 1 / (1 - p) once); dP's scale rides the FMA below.
            if QK_ROWS:
                kept = _dropout_keep(seed, rng_base + rows, start_n, dropout_p, BLOCK_M, cols.shape[0])
            else:
                kept = _dropout_keep_t(seed, rng_base + rows, start_n, dropout_p, BLOCK_M, cols.shape[0], INTERPRET)
            p_drop = _pin_fp32(tl.where(kept, p, 0.0), INTERPRET)
            dp = tl.where(kept, dp, 0.0) * inv_keep
        else:
            p_drop = p
        dv = tl.dot(_mm(_trans_if(_cast(p_drop, do.dtype, INTERPRET), QK_ROWS), INTERPRET), _mm(do, INTERPRET), dv,
                    input_precision=PRECISION)
        delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        ds = _cast(p * (dp - _q_axis(delta, QK_ROWS)), q.dtype, INTERPRET)
        dk = tl.dot(_mm(_trans_if(ds, QK_ROWS), INTERPRET), _mm(q, INTERPRET), dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # this key block's share of dQ for these query rows, summed in fp32 across key blocks
            dq = tl.dot(_mm(_trans_if(ds, not QK_ROWS), INTERPRET), _mm(k, INTERPRET), input_precision=PRECISION)
            dq = dq * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                          mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


# ATOMIC_DQ adds a matmul and atomics: tuned apart, and tuning runs' sums into DQ are reset before the real launch
@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY + ["ATOMIC_DQ"], prune_configs_by=_PRUNE,
                 do_bench=_time_config, reset_to_zero=["DQ"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DQ, CU_Q, CU_K, KPM, ALIBI, SEED,
                   LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_dob, stride_dom, stride_doh, stride_dod,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                   stride_lb, stride_lh, stride_kpm, stride_ab, stride_ah,
                   NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, win_left, win_right, dropout_p,
                   SEQ_Q_BUCKET, SEQ_K_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                   SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                   LAYOUT_BK: tl.constexpr, ATOMIC_DQ: tl.constexpr, QK_ROWS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block_n, off_bhk = _tile(_n_tiles(SEQ_K, BLOCK_N, SPARSE, LAYOUT_BK), MAJOR, False, SPARSE)
    nheads_kv = NHEADS // GROUP
    off_b = (off_bhk // nheads_kv).to(tl.int64)
    off_hk = (off_bhk % nheads_kv).to(tl.int64)
    # the order of the group's first head (any permutation of the key blocks is correct)
    block_n = _sparse_tile(block_n, ORDER, off_b * ly_sb + off_hk * GROUP * ly_sh, SEQ_K, LAYOUT_BK, BLOCK_N, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    start_n = block_n * BLOCK_N
    if start_n >= seq_k:
        return

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh
                   + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh
                   + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    key_kept = cols < seq_k
    if HAS_KPM:
        key_kept = tl.load(KPM + off_b * stride_kpm + cols, mask=cols < seq_k, other=0) != 0
    seed = _dropout_seed(SEED, DROPOUT)

    diag = seq_k - seq_q
    lo, full_lo, full_hi, hi = _query_blocks(start_n, seq_q, diag, win_left, win_right,
                                             HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * NHEADS + off_h
        q_base = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
        do_base = DO + off_b * stride_dob + q_start * stride_dom + off_h * stride_doh
        lse_base = LSE + off_b * stride_lb + off_h * stride_lh + q_start
        delta_base = Delta + off_b * stride_lb + off_h * stride_lh + q_start
        dq_base = DQ + off_b * stride_dqb + q_start * stride_dqm + off_h * stride_dqh
        slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
        rng_base = off_bh * SEQ_Q
        if SPARSE:
            # This key block's column of the layout (transposed lists): partial query blocks, then full.
            n_q_blocks = tl.cdiv(SEQ_Q, LAYOUT_BQ)
            ly_col = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_K, LAYOUT_BK) + start_n // LAYOUT_BK
            tile_col = TILE_IDX + (off_b * ly_sb + off_h * ly_sh) * n_q_blocks * tl.cdiv(SEQ_K, LAYOUT_BK) \
                + start_n // LAYOUT_BK
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     0, tl.load(LY_NUM + ly_col) * LAYOUT_BQ, offs_m, start_n, cols, offs_d, seq_q,
                                     seq_k, diag, qk_scale, win_left, win_right, key_kept, slope2, seed, rng_base,
                                     SEQ_K, dropout_p, LY_IDX + ly_col * n_q_blocks, tile_col,
                                     tl.cdiv(SEQ_K, LAYOUT_BK), TILES, RULE,
                                     True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK, ATOMIC_DQ, QK_ROWS)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     0, tl.load(LY_FULL_NUM + ly_col) * LAYOUT_BQ, offs_m, start_n, cols, offs_d,
                                     seq_q, seq_k, diag, qk_scale, win_left, win_right, key_kept, slope2, seed,
                                     rng_base, SEQ_K, dropout_p, LY_FULL_IDX + ly_col * n_q_blocks, tile_col, 0, TILES, RULE,
                                     False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     True, False, False, LAYOUT_BQ, LAYOUT_BK, ATOMIC_DQ, QK_ROWS)
        else:
            if HAS_RIGHT:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                         dq_base, stride_dqm, stride_dqd, sm_scale,
                                         stride_qm, stride_qd, stride_dom, stride_dod,
                                         lo, full_lo, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                         win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                         LY_IDX, TILE_IDX, 0, TILES, RULE,
                                         True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                         False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     full_lo, full_hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                     win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                     LY_IDX, TILE_IDX, 0, TILES, RULE,
                                     False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)
            if HAS_LEFT:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                         dq_base, stride_dqm, stride_dqd, sm_scale,
                                         stride_qm, stride_qd, stride_dom, stride_dod,
                                         full_hi, hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                         win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                         LY_IDX, TILE_IDX, 0, TILES, RULE,
                                         True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                         False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)

    mask = (cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    dk *= sm_scale
    if DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    tl.store(DK + off_b * stride_dkb + k_start * stride_dkn + off_hk * stride_dkh
             + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, _cast(dk, DK.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(DV + off_b * stride_dvb + k_start * stride_dvn + off_hk * stride_dvh
             + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, _cast(dv, DV.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                  slope2, seed, rng_rows, SEQ_K, dropout_p, idx_ptr, tile_ptr, TILES, RULE,
                  MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                  SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                  LAYOUT_BK: tl.constexpr):
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, tl.min(rows, 0), tl.max(rows, 0), diag, True, LAYOUT_BK, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BK, BLOCK_N), BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        s = qk * qk_scale
        if HAS_ALIBI:
            s += _alibi(rows[:, None], cols[None, :], diag, slope2)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            keep = _keep(rows[:, None], cols[None, :], seq_k, diag, win_left, win_right, kpm_base,
                         tile_ptr + start_n // LAYOUT_BK, TILES, RULE, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                         HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(_mm(do, INTERPRET), _mm(tl.trans(v), INTERPRET), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rng_rows, start_n, dropout_p, rows.shape[0], BLOCK_N), dp, 0.0) \
                * inv_keep
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_mm(_cast(ds, k.dtype, INTERPRET), INTERPRET), _mm(k, INTERPRET), dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY + ["DELTA_ONLY"], prune_configs_by=_PRUNE,
                 do_bench=_time_config)
@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DLSE, Delta, DQ, CU_Q, CU_K, KPM, K_RANGE, ALIBI, SEED,
                 LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
                 stride_qb, stride_qm, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_ob, stride_om, stride_oh, stride_od,
                 stride_dob, stride_dom, stride_doh, stride_dod,
                 stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                 stride_lb, stride_lh, stride_kpm, stride_ab, stride_ah,
                 NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, win_left, win_right, dropout_p,
                 SEQ_Q_BUCKET, SEQ_K_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                 LAYOUT_BK: tl.constexpr, HAS_DLSE: tl.constexpr, DELTA_ONLY: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(_n_tiles(SEQ_Q, BLOCK_M, SPARSE, LAYOUT_BQ), MAJOR, HAS_RIGHT, SPARSE)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    start_m = _sparse_tile(start_m, ORDER, off_b * ly_sb + off_h * ly_sh, SEQ_Q, LAYOUT_BQ, BLOCK_M, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    first_row = start_m * BLOCK_M
    if first_row >= seq_q:
        return
    k_base = K + off_b * stride_kb + k_start * stride_kn + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vn + (off_h // GROUP) * stride_vh

    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_b * stride_qb + (q_start + rows[:, None]) * stride_qm + off_h * stride_qh
                   + offs_d[None, :] * stride_qd, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + (q_start + rows[:, None]) * stride_dom + off_h * stride_doh
                    + offs_d[None, :] * stride_dod, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    o = _load_rows(O + off_b * stride_ob + (q_start + rows[:, None]) * stride_om + off_h * stride_oh
                   + offs_d[None, :] * stride_od, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    lse_ptrs = off_b * stride_lb + off_h * stride_lh + q_start + rows
    lse2 = tl.load(LSE + lse_ptrs, mask=rows < seq_q, other=float("inf")) * LOG2E
    # delta = rowsum(dO * O) - dLSE (d lse_i / d s_ij = p_ij folds into it), stored for the dK/dV kernel,
    # which runs after this one: computed here rather than in a kernel of its own, to save a launch.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_ptrs, mask=rows < seq_q, other=0.0)
    tl.store(Delta + lse_ptrs, delta, mask=rows < seq_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DELTA_ONLY:  # ATOMIC_DQ: only delta, and zeros in the fp32 buffer the dK/dV kernel adds dQ into
        tl.store(DQ + off_b * stride_dqb + (q_start + rows[:, None]) * stride_dqm + off_h * stride_dqh
                 + offs_d[None, :] * stride_dqd, dq, mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
        return

    diag = seq_k - seq_q
    kpm_base = KPM + off_b * stride_kpm
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = off_bh.to(tl.int64) * SEQ_Q + rows
    if SPARSE:  # as in the forward: the partial, then the full key blocks of this query block's layout row
        n_kv_blocks = tl.cdiv(SEQ_K, LAYOUT_BK)
        ly_row = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_Q, LAYOUT_BQ) + first_row // LAYOUT_BQ
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           0, tl.load(LY_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag, qk_scale,
                           win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                           LY_IDX + ly_row * n_kv_blocks, TILE_IDX + ly_row * n_kv_blocks, TILES, RULE,
                           True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           0, tl.load(LY_FULL_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag, qk_scale,
                           win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                           LY_FULL_IDX + ly_row * n_kv_blocks, TILE_IDX, TILES, RULE,
                           HAS_KPM, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, True, False, False, LAYOUT_BQ, LAYOUT_BK)
    else:
        lo, full_lo, full_hi, hi = _key_blocks(first_row, seq_q, seq_k, diag, win_left, win_right, K_RANGE, off_b,
                                               HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N)
        if HAS_LEFT:
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               lo, full_lo, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                               slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                               True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                               HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           full_lo, full_hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                           slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                           False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           full_hi, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                           slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                           True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + (q_start + rows[:, None]) * stride_dqm + off_h * stride_dqh
             + offs_d[None, :] * stride_dqd, _cast(dq, DQ.dtype.element_ty, INTERPRET),
             mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_mask_kernel(SEED, OUT, SEQ_Q, SEQ_K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         TRANSPOSED: tl.constexpr, INTERPRET: tl.constexpr):
    """The keep mask as int8 (batch * heads * SEQ_Q, SEQ_K); TRANSPOSED draws it as the dK/dV kernel does."""
    start_m, off_bh = _tile(tl.cdiv(SEQ_Q, BLOCK_M), SEED, False, False)  # dense order (MAJOR unread)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_rows = off_bh.to(tl.int64) * SEQ_Q + rows  # as in the attention kernels
    seed = tl.load(SEED)
    for start_n in range(0, SEQ_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if TRANSPOSED:
            keep_t = _dropout_keep_t(seed, rng_rows, start_n, dropout_p, BLOCK_M, BLOCK_N, INTERPRET)
            tl.store(OUT + rng_rows[None, :] * SEQ_K + cols[:, None], keep_t.to(tl.int8),
                     mask=(rows[None, :] < SEQ_Q) & (cols[:, None] < SEQ_K))
        else:
            keep = _dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_M, BLOCK_N)
            tl.store(OUT + rng_rows[:, None] * SEQ_K + cols[None, :], keep.to(tl.int8),
                     mask=(rows[:, None] < SEQ_Q) & (cols[None, :] < SEQ_K))


# --------------------------------------------------------------------------------------------
# Launchers. Dense tensors are (batch, seqlen, nheads, headdim); packed (varlen) ones are
# (total, nheads, headdim) and are viewed as one batch row whose batch stride is never used.
# --------------------------------------------------------------------------------------------

# (kernel, q dtype, tune-key values) -> the Config the autotuner chose for them.
_CHOSEN = {}
# launch key -> (compiled kernel's launcher, function, packed metadata, its (BLOCK_M, BLOCK_N)), see _launch.
_COMPILED = {}
# kernel -> (getter of its non-autotuned arguments from the kwargs, number of leading pointer arguments)
_SIGNATURES = {}
def _meta(kernel):
    """The names of the kernel's autotuned parameters (BLOCK_M, BLOCK_N; QK_ROWS too for dK/dV), last in its
    signature, in signature order."""
    return kernel.arg_names[-len(kernel.configs[0].kwargs):]


_driver = None


def _launch(kernel, rows, block, programs, **kwargs):
    """kernel[grid](**kwargs) on the 1-D grid of cdiv(rows, BLOCK) * programs programs, where BLOCK is the
    config's `block` ("BLOCK_M" or "BLOCK_N"); by a short path after the first call with the same launch key.

    Triton's launch path binds the ~70 arguments by name and specialises each, and the autotuner
    rebuilds dicts of them: ~60 us of host time per launch on an H100 host, more than short and
    block-sparse kernels take on the GPU. What Triton compiles for a call depends on the constexprs,
    the integers (it specialises on divisibility by 16 and on == 1), and the dtype and 16-byte
    alignment of each pointer. The launch key holds all of these (the integers by value; pointer dtypes
    as q's dtype, because every other pointer's dtype is fixed by the callers: int32 lengths and layouts,
    bool masks, fp32 lse and slopes, int64 seed), so the cached kernel is the one Triton would pick, and
    the call goes straight to its C launcher. Pointers go in as integer addresses: given a tensor, the
    launcher would call data_ptr() and query the driver (cuPointerGetAttribute) for each of ~20 pointers.
    """
    global _driver
    key, addresses, scalars = _launch_key(kernel, kwargs)
    entry = _COMPILED.get(key)
    if entry is not None and not _launch_hooks():
        run, function, metadata, meta, size = entry
        grid_x = (rows + size - 1) // size * programs
        run(grid_x, 1, 1, _driver.get_current_stream(_driver.get_current_device()), function, metadata, None, None,
            None, *addresses, *scalars, *meta)
        return
    grid = lambda cfg: (triton.cdiv(rows, cfg[block]) * programs,)
    tune_key = (kernel, kwargs["Q"].dtype, *(kwargs[name] for name in kernel.keys))
    config = _CHOSEN.get(tune_key)
    if config is None:
        compiled = kernel[grid](**kwargs)
        config = kernel.best_config
        _CHOSEN[tune_key] = config
    else:
        compiled = kernel.fn.run(grid=grid, warmup=False, **kwargs, **config.all_kwargs())
    if not INTERPRET:  # the interpreter has no compiled kernel
        if len(_COMPILED) > 4096:  # many distinct lengths (e.g. padded to the batch's longest): start over
            _COMPILED.clear()
        _driver = triton.runtime.driver.active
        _COMPILED[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                          tuple(config.kwargs[name] for name in _meta(kernel)), config.kwargs[block])


def reset_tuning():
    """Forget the autotuned configs and cached launches: the next call of each shape tunes again.

    The tuning key holds lengths, head dim, block sizes and feature flags, not a block-sparse layout's
    contents, so every layout with the same key runs with the config tuned on the first one. A model
    uses one layout and is tuned on it; a benchmark that compares layouts in one process calls this
    between them (each layout then gets what it would get in a process of its own)."""
    _CHOSEN.clear()
    _COMPILED.clear()
    for kernel in (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv):
        kernel.cache.clear()  # the autotuner's own choices, keyed the same way


def _launch_key(kernel, kwargs):
    """(launch key, pointer addresses, the other non-autotuned arguments in signature order), see _launch."""
    signature = _SIGNATURES.get(kernel)
    if signature is None:  # every kernel takes its pointers first (disabled ones get a dummy tensor)
        names = kernel.arg_names[:-len(_meta(kernel))]
        n_ptr = next(i for i, name in enumerate(names) if not isinstance(kwargs[name], torch.Tensor))
        signature = _SIGNATURES[kernel] = (operator.itemgetter(*names), n_ptr)
    getter, n_ptr = signature
    values = getter(kwargs)
    addresses = [p.data_ptr() for p in values[:n_ptr]]
    scalars = values[n_ptr:]
    return (kernel, kwargs["Q"].dtype, scalars, *[a % 16 for a in addresses]), addresses, scalars


def _launch_hooks():
    """Whether a profiler (e.g. proton) has launch hooks registered: then launches take Triton's own path.
    (A chain of hooks, empty by default, in Triton >= 3.5; None or a function before.)"""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _bucket(n):
    """The power of two >= max(n, 16). (triton.next_power_of_2 is a jit-wrapped function: ~10 us per call.)"""
    return 1 << (max(n, 16) - 1).bit_length()


def _as_4d(x, varlen):
    """A (batch, seqlen, nheads, headdim) view and its strides; packed tensors get batch stride 0."""
    if not varlen:
        return x, x.stride()
    return x.unsqueeze(0), (0, *x.stride())


def draw_dropout_seed(device):
    """The Philox seed for one attention call, drawn from torch's generator for `device` (so that
    torch.manual_seed reproduces it and activation checkpointing, which restores the RNG state,
    replays the same mask). Stays on the device: no host sync, no graph break."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, dropout_p):
    """Keep mask (batch, nheads, seqlen_q, seqlen_k) bool that the kernels apply for `seed`.
    For tests. For packed sequences, seqlen_* are max_seqlen_* and indices are local to each sequence."""
    out = torch.empty((batch, nheads, seqlen_q, seqlen_k), device=seed.device, dtype=torch.int8)
    if out.numel():
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, 64) * batch * nheads,)](
            seed, out, seqlen_q, seqlen_k, quantised_dropout_p(dropout_p), BLOCK_M=64, BLOCK_N=64,
            TRANSPOSED=False, INTERPRET=bool(INTERPRET))
    return out.bool()


def check_dropout_p(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def quantised_dropout_p(dropout_p):
    """The dropout probability the kernels apply: p rounded up to a multiple of 1 / 16384, at most 16383 / 16384
    (the draws are 14-bit, see _dropout_keep). It is what they are given, exactly representable in fp32, so the
    keep test (_keep_threshold) and the 1 / (1 - p) scale of kept values agree: the expectation is unbiased for
    every p, also near 1, where 1 / (1 - p) for the unquantised p would be far off (0.61x at p = 0.9999)."""
    check_dropout_p(dropout_p)
    levels = DRAW_LEVELS.value
    return min(math.ceil(dropout_p * levels), levels - 1) / levels


def kept_probability(dropout_p):
    """The exact probability that the kernels keep an element, 1 - quantised_dropout_p(p); kept values are scaled
    by its inverse."""
    return 1.0 - quantised_dropout_p(dropout_p)


def _key_range(key_padding_mask):
    """(batch, 2) int32 [first, last + 1) of the attended keys of each batch row (empty: [0, 0)),
    computed on the device so the kernels can skip the padding blocks without a host sync."""
    kpm = key_padding_mask
    idx = torch.arange(kpm.shape[1], device=kpm.device, dtype=torch.int32)
    first = torch.where(kpm, idx, kpm.shape[1]).amin(1)
    last = torch.where(kpm, idx + 1, 0).amax(1)
    return torch.stack([torch.minimum(first, last), last], 1).to(torch.int32).contiguous()


def _layout_args(q, layout_tensors, layout_block_q, layout_block_k):
    """Block-sparse arguments: (for the forward and dQ: key blocks of each query block; for dK/dV: query
    blocks of each key block). layout_tensors is BlockSparseLayout.kernel_tensors()[0], or empty (dense)."""
    if not layout_tensors:
        dummy = dict(LY_NUM=q, LY_IDX=q, LY_FULL_NUM=q, LY_FULL_IDX=q, TILE_IDX=q, TILES=q, RULE=q, ORDER=q, MAJOR=q,
                     ly_sb=0, ly_sh=0, SPARSE=False, HAS_TILES=False, HAS_RULE=False, LAYOUT_BQ=0, LAYOUT_BK=0)
        return dummy, dummy
    (kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx, q_order, k_order, q_major,
     k_major, tile_index, tiles, rule) = layout_tensors
    batch, heads = kv_num.shape[:2]  # 1 when the layout is shared (broadcast) over that dim
    common = dict(TILE_IDX=tile_index, TILES=tiles, RULE=rule, ly_sb=heads if batch > 1 else 0,
                  ly_sh=1 if heads > 1 else 0, SPARSE=True, HAS_TILES=tiles.numel() > 0, HAS_RULE=rule.numel() > 0,
                  LAYOUT_BQ=layout_block_q, LAYOUT_BK=layout_block_k)
    return (dict(LY_NUM=kv_num, LY_IDX=kv_idx, LY_FULL_NUM=full_kv_num, LY_FULL_IDX=full_kv_idx, ORDER=q_order,
                 MAJOR=q_major, **common),
            dict(LY_NUM=q_num, LY_IDX=q_idx, LY_FULL_NUM=full_q_num, LY_FULL_IDX=full_q_idx, ORDER=k_order,
                 MAJOR=k_major, **common))


def _launch_rows(seqlen, layout_block):
    """Rows the grid covers: block-sparse kernels start a program for every kernel tile of every layout
    block, the last (partial) one's too, because the layout's order maps ranks to whole layout blocks."""
    return -(-seqlen // layout_block) * layout_block if layout_block else seqlen


def _features(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, alibi_slopes, seed,
              softmax_scale, window_left, window_right, dropout_p):
    """Kernel arguments shared by the forward and both backward kernels."""
    varlen = cu_seqlens_q is not None
    nheads, head_dim = q.shape[-2], q.shape[-1]
    seq_q = max_seqlen_q if varlen else q.shape[1]
    seq_k = max_seqlen_k if varlen else k.shape[1]
    dummy = q  # for pointers a disabled feature never reads
    alibi = alibi_slopes
    alibi_strides = (0, 0)
    if alibi is not None:
        alibi_strides = (alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0))
    kpm = key_padding_mask
    # lse and delta: (batch, nheads, seqlen_q), or (nheads, total_q) for packed sequences
    lse_strides = (0, q.shape[0]) if varlen else (nheads * seq_q, seq_q)
    ptrs = dict(CU_Q=cu_seqlens_q if varlen else dummy, CU_K=cu_seqlens_k if varlen else dummy,
                KPM=kpm if kpm is not None else dummy,
                K_RANGE=_key_range(kpm) if kpm is not None else dummy,
                ALIBI=alibi if alibi is not None else dummy, SEED=seed if seed is not None else dummy)
    args = dict(
        stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_kpm=kpm.stride(0) if kpm is not None else 0,
        stride_ab=alibi_strides[0], stride_ah=alibi_strides[1],
        NHEADS=nheads, GROUP=nheads // k.shape[-2], SEQ_Q=seq_q, SEQ_K=seq_k,
        qk_scale=softmax_scale * LOG2E.value, win_left=window_left, win_right=window_right,
        dropout_p=quantised_dropout_p(dropout_p),
        SEQ_Q_BUCKET=_bucket(seq_q), SEQ_K_BUCKET=_bucket(seq_k),
        HEAD_DIM=head_dim, BLOCK_D=_bucket(head_dim), IS_VARLEN=varlen,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_KPM=kpm is not None,
        HAS_ALIBI=alibi is not None, DROPOUT=dropout_p > 0.0,
        # fp32 inputs get true fp32 dots: tf32 would be ~1e-3 off, far from PyTorch's fp32 result.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=bool(INTERPRET),
    )
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    return ptrs, args, batch


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask,
                      query_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                      layout_tensors=(), layout_block_q=0, layout_block_k=0, deterministic=False, features=None):
    """Returns out (shape of q, contiguous) and lse: (batch, nheads, seqlen_q), or (nheads, total_q) packed.
    features: _features() of these arguments, when the caller already has them (the eager path keeps them
    for the backward)."""
    varlen = cu_seqlens_q is not None
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    nheads = q.shape[-2]
    lse_shape = (nheads, q.shape[0]) if varlen else (q.shape[0], nheads, q.shape[1])
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0:  # no keys at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    ptrs, args, batch = features or _features(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              key_padding_mask, alibi_slopes, seed, softmax_scale, window_left,
                                              window_right, dropout_p)
    qpm = query_padding_mask
    (q4, qs), (k4, ks), (v4, vs), (o4, os_) = (_as_4d(t, varlen) for t in (q, k, v, out))
    layout_kv, _ = _layout_args(q, layout_tensors, layout_block_q, layout_block_k)
    _launch(_attn_fwd, _launch_rows(args["SEQ_Q"], layout_block_q), "BLOCK_M", batch * nheads,
            Q=q4, K=k4, V=v4, O=o4, LSE=lse, **ptrs, **layout_kv, QPM=qpm if qpm is not None else q,
            stride_qpm=qpm.stride(0) if qpm is not None else 0, HAS_QPM=qpm is not None,
            **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("o", os_), **args)
    return out, lse


_STRIDE_NAMES = {name: tuple(f"stride_{name}{axis}" for axis in ("b", "m" if name in ("q", "o", "do", "dq") else "n", "h", "d"))
                 for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}


def _strides(name, strides):
    return dict(zip(_STRIDE_NAMES[name], strides))


def attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       key_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                       layout_tensors=(), layout_block_q=0, layout_block_k=0, deterministic=False, features=None):
    """Returns dq, dk, dv (contiguous, in the input dtypes). dlse may be None. features: as in attention_forward.
    deterministic: never sum dQ with atomics (see _ATOMIC_DQ); torch.use_deterministic_algorithms(True) too."""
    varlen = cu_seqlens_q is not None
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    ptrs, args, batch = features or _features(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              key_padding_mask, alibi_slopes, seed, softmax_scale, window_left,
                                              window_right, dropout_p)
    nheads, nheads_kv = q.shape[-2], k.shape[-2]
    (q4, qs), (k4, ks), (v4, vs), (o4, os_), (do4, dos) = (_as_4d(t, varlen) for t in (q, k, v, out, dout))
    (dq4, dqs), (dk4, dks), (dv4, dvs) = (_as_4d(t, varlen) for t in (dq, dk, dv))

    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    scales = dict(sm_scale=softmax_scale)
    kv_ptrs = {name: ptrs[name] for name in ("CU_Q", "CU_K", "KPM", "ALIBI", "SEED")}
    layout_kv, layout_q = _layout_args(q, layout_tensors, layout_block_q, layout_block_k)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    # Atomics only where measured (rows up to 256 bytes: head dim 128 in 16 bits): beyond, the dK/dV kernel's fp32
    # dQ tile does not fit shared memory next to its other buffers in the first 64 x 64 candidate (Triton 3.6).
    atomic = not deterministic and q.element_size() * args["BLOCK_D"] <= 256 and (
        _ATOMIC_DQ == "1" or (_ATOMIC_DQ == "dropout" and dropout_p > 0.0))
    # dQ first, which also stores delta for the dK/dV kernel; with atomics only delta, and the dK/dV kernel
    # adds each key block's dQ into an fp32 buffer that this launch zeroes (the dropout mask is then drawn once)
    delta = torch.empty_like(lse)
    if atomic:
        dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dq_acc4, dq_accs = _as_4d(dq_acc, varlen)
    else:
        dq_acc4, dq_accs = _no_buffer(q.device), (0, 0, 0, 0)
    _launch(_attn_bwd_dq, _launch_rows(args["SEQ_Q"], layout_block_q), "BLOCK_M", batch * nheads,
            Q=q4, K=k4, V=v4, O=o4, DO=do4, LSE=lse, DLSE=dlse if dlse is not None else lse, Delta=delta,
            DQ=dq_acc4 if atomic else dq4, **kv_ptrs, **layout_kv, K_RANGE=ptrs["K_RANGE"], HAS_DLSE=dlse is not None,
            DELTA_ONLY=atomic, **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("o", os_),
            **_strides("do", dos), **_strides("dq", dq_accs if atomic else dqs), **scales, **args)
    _launch(_attn_bwd_dkdv, _launch_rows(args["SEQ_K"], layout_block_k), "BLOCK_N", batch * nheads_kv,
            Q=q4, K=k4, V=v4, DO=do4, LSE=lse, Delta=delta, DK=dk4, DV=dv4, DQ=dq_acc4, **kv_ptrs, **layout_q,
            **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("do", dos),
            **_strides("dk", dks), **_strides("dv", dvs), **_strides("dq", dq_accs), ATOMIC_DQ=atomic, **scales, **args)
    if atomic:
        dq.copy_(dq_acc)
    return dq, dk, dv


_NO_BUFFER = {}


def _no_buffer(device):
    """A one-element fp32 tensor on device, private to this module, for the dK/dV kernel's DQ when it does not
    accumulate dQ (never read then; the tuner zeroes it)."""
    buffer = _NO_BUFFER.get(device)
    if buffer is None:
        buffer = _NO_BUFFER[device] = torch.zeros(1, device=device, dtype=torch.float32)
    return buffer


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with autograd registered, so the same
# function works eagerly, compiled and under activation checkpointing.
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_flash::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                     key_padding_mask: torch.Tensor | None, query_padding_mask: torch.Tensor | None,
                     alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None, softmax_scale: float,
                     window_left: int, window_right: int, dropout_p: float, layout_tensors: list[torch.Tensor],
                     layout_block_q: int, layout_block_k: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask,
                             query_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                             layout_tensors, layout_block_q, layout_block_k)


@attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, *args):
    lse_shape = (q.shape[-2], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("hf_flash::attention_bwd", mutates_args=())
def attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                     key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                     seed: torch.Tensor | None, softmax_scale: float, window_left: int, window_right: int,
                     dropout_p: float, layout_tensors: list[torch.Tensor], layout_block_q: int,
                     layout_block_k: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              key_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                              layout_tensors, layout_block_q, layout_block_k, deterministic)


@attention_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, _query_padding_mask,
     alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p, layout_tensors, layout_block_q,
     layout_block_k, deterministic) = inputs
    out, lse = output
    # Padding queries need nothing here: their lse is +inf, so the backward gives them zero gradient.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, alibi_slopes, seed,
                          *layout_tensors)
    ctx.config = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, dropout_p,
                  layout_block_q, layout_block_k, deterministic)
    ctx.n_inputs = len(inputs)


def _backward(ctx, dout, dlse, backward_fn=attention_bwd_op, **extra):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, alibi_slopes, seed, *layout = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, dropout_p, layout_block_q, layout_block_k,
     deterministic) = ctx.config
    if dout is None:  # only the lse was used (the eager path does not materialise zero gradients)
        dout = torch.zeros_like(out)
    dq, dk, dv = backward_fn(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, key_padding_mask, alibi_slopes, seed, softmax_scale,
                             window_left, window_right, dropout_p, layout,
                             layout_block_q, layout_block_k, deterministic, **extra)
    # Inputs after q, k, v get no gradient; the custom op wants the layout list's as a list of the same length.
    grads = [None] * (ctx.n_inputs - 3)
    if backward_fn is attention_bwd_op:
        grads[-4] = [None] * len(layout)
    return dq, dk, dv, *grads


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher, which costs ~100 us of host time
    per call in eager mode (more than the kernels themselves at short lengths). The arguments after
    q, k, v come as one tuple: apply() inspects each argument it is given, ~1 us apiece. The kernel
    arguments derived from the inputs (_features) are computed once and reused by the backward."""

    @staticmethod
    def forward(ctx, q, k, v, rest):
        # An unused lse gets dlse = None instead of a tensor of zeros: no fill kernel, no dlse read.
        ctx.set_materialize_grads(False)
        # rest: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, (query_padding_mask,)
        # alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p, (layout...)
        ctx.features = _features(q, k, *rest[:5], *rest[6:12]) if q.numel() and k.numel() else None
        inputs = (q, k, v, *rest)
        out, lse = attention_forward(*inputs, features=ctx.features)
        _setup_context(ctx, inputs, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, *_ = _backward(ctx, dout, dlse, backward_fn=attention_backward, features=ctx.features)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not pass for differentiable ones
            q, k, v = ctx.saved_tensors[:3]
            dq, dk, dv = _FirstOrderOnly.apply(dq, dk, dv, q, k, v, dout, dlse)
        return dq, dk, dv, None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients of a create_graph=True backward, raising if anything differentiates through them.

    The backward kernels are not differentiable: without this, a double backward (a gradient penalty) would
    treat dq, dk, dv as constants and silently drop the second-order term. Raising only when the second
    backward reaches them keeps create_graph=True usable for losses that do not differentiate through attention."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *what_they_depend_on):
        # the inputs they are functions of (q, k, v, dout, dlse) link them into the graph
        return dq, dk, dv

    @staticmethod
    def backward(ctx, *grads_of_grads):
        raise RuntimeError(
            "hf_flash attention is differentiable once: its backward (dq, dk, dv) has no gradient of its own, so a "
            "double backward through it (e.g. a gradient penalty with autograd.grad(..., create_graph=True)) is not "
            "supported. Use attn_implementation=\"eager\" (or \"sdpa\"), or hf_flash.attention_reference, for "
            "that loss.")


def run_attention(*inputs):
    """(out, lse) = run_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    key_padding_mask, query_padding_mask, alibi_slopes, seed, softmax_scale, window_left,
    window_right, dropout_p, layout_tensors, layout_block_q, layout_block_k, deterministic): the custom op under
    torch.compile, a plain autograd.Function eagerly. layout_tensors is [] for dense attention."""
    if torch.compiler.is_compiling():
        return attention_fwd_op(*inputs)
    q, k, v, *rest = inputs
    return _EagerAttention.apply(q, k, v, rest)
