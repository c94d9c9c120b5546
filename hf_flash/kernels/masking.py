"""Which keys a query sees, as jit helpers: element masks, ALiBi, block-sparse tiles and rules, loop bounds.

Masking is aligned bottom-right: with diag = seqlen_k - seqlen_q, query i sees key j iff
i + diag - left <= j <= i + diag + right (causal: right = 0; -1: unbounded) and j is not padding.
_key_blocks and _query_blocks split a program's loop into blocks that need the element mask (_keep) and blocks
that need none; block-sparse loops add the layout's partial-block bit masks (_tile_keep) or its inline rule
(_rule_keep, with _rule_trim narrowing the loop by the tiles the rule masks whole).
"""

import triton
import triton.language as tl

from .common import LOG2E, _block_start


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
def _alibi(rows, cols, diag, slope2):
    # flash-attn's ALiBi: -slope * |i + diag - j|, here in log2 units (slope2 = -slope * log2 e).
    return slope2 * tl.abs(rows + diag - cols).to(tl.float32)



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
