"""Attention dropout: Philox keep masks drawn inside the kernels, and the host functions that describe them.

Every kernel regenerates the same mask from (seed, row, key) counters, so nothing is stored between the forward
and the backward: _dropout_keep in (queries, keys) tiles, _dropout_keep_t in the dK/dV kernel's (keys, queries)
tiles, _pair_words / _drop_pairs for the forward's packed fp16/bf16 P. dropout_mask() draws the same mask into
a tensor for tests; quantised_dropout_p and kept_probability say which p the kernels apply (docs/design.md,
section 5).
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import settings
from .common import _tile
from .settings import INTERPRET

DRAW_LEVELS = tl.constexpr(16384)  # dropout draws are 14-bit: p is quantised up to a multiple of 1 / DRAW_LEVELS


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0



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
    kernels and dropout_mask() agree. A 16- or 32-key tile makes one call per element and takes each flag with a
    byte permute (_lane16), as _dropout_keep_t does: joining and permuting its calls' flags as the 64-key tile does
    went wrong on the H200 (Triton 3.6) in loops that also mask keys, while the interpreter gave the right flags.
    16 keys: wrong flags (fp16/bf16 block-sparse, layout block 16, key padding). 32 keys, the forward's tile at
    head dims above 128: the pipelined kernel faulted (misaligned address or illegal memory access; fp16/bf16,
    head dim 160 or 192, GQA, causal, key padding), not with num_stages=1 or under compute-sanitizer
    (tests/test_random.py, GPU_REGRESSIONS). In loops without masking the compiler merges a thread's calls, and
    these tiles cost what the joined flags did (H200, B2 H16 N2048, d160-256, p = 0.1: forward and backward within
    1%); in loops that mask keys it makes every element's call (static, Triton 3.6, sm_90: 1013 instructions per
    iteration of the 64 x 32 forward at d192 against 556 with the joins, 1195 against 503 for the 128 x 32 dQ tile
    at d64; the d192 causal bf16 forward 6% slower).
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
    else:  # 16 or 32 keys, a quarter or half of each of 4 calls' words: drawn element by element (see above)
        k = start_n % 64 + tl.arange(0, BLOCK_N)  # this tile's keys in their 64-key span
        w0, w1, w2, w3 = _philox_words(seed, rng_rows, start_n // 64 * 4 + (k % 8) // 2)
        w = (k // 16)[None, :]
        word = tl.where(w == 0, w0, tl.where(w == 1, w1, tl.where(w == 2, w2, w3)))
        keep = _lane16(word, (2 * ((k // 8) % 2) + k % 2)[None, :], INTERPRET) >= t
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
        # Triton launches on the current device: make seed's current (see launch._launch)
        with torch.cuda.device(seed.device) if seed.device.type == "cuda" else contextlib.nullcontext():
            _dropout_mask_kernel[(triton.cdiv(seqlen_q, 64) * batch * nheads,)](
                seed, out, seqlen_q, seqlen_k, quantised_dropout_p(dropout_p), BLOCK_M=64, BLOCK_N=64,
                TRANSPOSED=False, INTERPRET=bool(settings.INTERPRET))
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
