"""The layout builders: causal, local (sliding window), global tokens, BigBird, butterfly, from a block mask or
from any mask_mod. Each returns a BlockSparseLayout on the requested device, built with vectorised ops."""

from __future__ import annotations

import torch
from torch import Tensor

from ._blocks import RULE_UNBOUNDED, _classify
from ._checks import _check_int, _check_mask_mod, _grid, _leading_4d, _window_pair
from .layout import BlockSparseLayout
from .mask_mods import MaskMod, causal_mask_mod, global_tokens_mask_mod, sliding_window_mask_mod


def _token_ranges(seqlen_q, seqlen_k, block_q, block_k, device):
    """First and last valid token of every block: q_first, q_last (n_q, 1); kv_first, kv_last (1, n_kv)."""
    q_first = torch.arange(0, seqlen_q, block_q, device=device).view(-1, 1)
    kv_first = torch.arange(0, seqlen_k, block_k, device=device).view(1, -1)
    q_last = (q_first + block_q - 1).clamp(max=seqlen_q - 1)
    return q_first, q_last, kv_first, (kv_first + block_k - 1).clamp(max=seqlen_k - 1)


def _block_indices(seqlen_q, seqlen_k, block_q, block_k, device):
    """Query-block indices (n_q, 1) and key-block indices (1, n_kv)."""
    rows = torch.arange(-(-seqlen_q // block_q), device=device).view(-1, 1)
    return rows, torch.arange(-(-seqlen_k // block_k), device=device).view(1, -1)


def causal(seqlen_q: int, seqlen_k: int | None = None, block_size=128, device=None) -> BlockSparseLayout:
    """Bottom-right aligned causal layout: query i sees key j iff j <= i + seqlen_k - seqlen_q.

    Blocks on the diagonal are partial (mask_mod = causal_mask_mod), blocks below it full.
    """
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    q_first, q_last, kv_first, kv_last = _token_ranges(seqlen_q, seqlen_k, block_q, block_k, device)
    diagonal = seqlen_k - seqlen_q
    any_attended, all_attended = kv_first <= q_last + diagonal, kv_last <= q_first + diagonal
    return BlockSparseLayout.from_block_masks(all_attended, any_attended, seqlen_q, seqlen_k, block_size,
                                              causal_mask_mod(seqlen_q, seqlen_k), (RULE_UNBOUNDED, 0, 0))


def local(window, seqlen_q: int, seqlen_k: int | None = None, block_size=128, device=None) -> BlockSparseLayout:
    """Sliding window, in TOKENS: query i sees key j iff -left <= j - (i + seqlen_k - seqlen_q) <= right.

    window: int w (|i - j| <= w when seqlen_q == seqlen_k) or a (left, right) pair; (w, 0) is a
    causal sliding window, the same as `local(w, ...) & causal(...)`. Blocks wholly inside the
    band are full, blocks it crosses are partial (mask_mod = sliding_window_mask_mod).
    """
    left, right = _window_pair(window)
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    q_first, q_last, kv_first, kv_last = _token_ranges(seqlen_q, seqlen_k, block_q, block_k, device)
    # Over a block, j - i - diagonal takes every integer between these two bounds.
    diagonal = seqlen_k - seqlen_q
    nearest, farthest = kv_first - q_last - diagonal, kv_last - q_first - diagonal
    any_attended = (nearest <= right) & (farthest >= -left)
    all_attended = (nearest >= -left) & (farthest <= right)
    return BlockSparseLayout.from_block_masks(all_attended, any_attended, seqlen_q, seqlen_k, block_size,
                                              sliding_window_mask_mod((left, right), seqlen_q, seqlen_k),
                                              (left, right, 0))


def global_tokens(n: int, seqlen_q: int, seqlen_k: int | None = None, block_size=128, device=None) -> BlockSparseLayout:
    """The first n queries attend every key and the first n keys are attended by every query.

    Combine with a window: `local(256, s) | global_tokens(64, s)`. mask_mod = global_tokens_mask_mod(n).
    """
    n = _check_int("n", n, 0)
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    q_first, q_last, kv_first, kv_last = _token_ranges(seqlen_q, seqlen_k, block_q, block_k, device)
    any_attended, all_attended = (q_first < n) | (kv_first < n), (q_last < n) | (kv_last < n)
    return BlockSparseLayout.from_block_masks(all_attended, any_attended, seqlen_q, seqlen_k, block_size,
                                              global_tokens_mask_mod(n), (None, None, n))


def bigbird(window: int, n_global: int, n_random: int, seqlen_q: int, seqlen_k: int | None = None,
            block_size=128, nheads: int = 1, seed: int = 0, device=None) -> BlockSparseLayout:
    """BigBird (ITC) at block level, all kept blocks full; counts are in BLOCKS.

    Query block I keeps key block J if |I - J| <= window, or I < n_global or J < n_global (global
    block rows and columns), plus n_random key blocks per query-block row drawn uniformly among
    those not kept already (fewer if fewer remain). With nheads > 1 each head draws its own;
    the draw is from a torch.Generator on `device` seeded with seed (so CPU and CUDA differ).
    Block indices are top-left aligned: I and J count from the start of each sequence.
    """
    window, n_global = _check_int("window", window, 0), _check_int("n_global", n_global, 0)
    n_random, nheads = _check_int("n_random", n_random, 0), _check_int("nheads", nheads, 1)
    seed = _check_int("seed", seed, 0)
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    rows, cols = _block_indices(seqlen_q, seqlen_k, block_q, block_k, device)
    fixed = ((rows - cols).abs() <= window) | (rows < n_global) | (cols < n_global)
    generator = torch.Generator(device=rows.device).manual_seed(seed)
    scores = torch.rand((nheads, *fixed.shape), generator=generator, device=rows.device).masked_fill(fixed, -1.0)
    drawn = scores.topk(min(n_random, fixed.shape[1]), dim=-1)
    random = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, drawn.indices, drawn.values >= 0)
    return BlockSparseLayout.from_block_masks(fixed | random, None, seqlen_q, seqlen_k, block_size)


def butterfly(seqlen_q: int, seqlen_k: int | None = None, block_size=128, device=None) -> BlockSparseLayout:
    """Flat butterfly at block level (Pixelated Butterfly, used by the FlashAttention paper).

    Query block I keeps key block J iff I == J or I XOR J is a power of two: the union of the
    log2(n) butterfly factors (strides 1, 2, 4, ...) plus the diagonal. All kept blocks are full;
    about (1 + log2 n) / n of the grid.
    """
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    rows, cols = _block_indices(seqlen_q, seqlen_k, block_q, block_k, device)
    difference = rows ^ cols
    kept = (difference & (difference - 1)) == 0  # 0 (the diagonal) or a single bit
    return BlockSparseLayout.from_block_masks(kept, None, seqlen_q, seqlen_k, block_size)


def from_dense(block_mask: Tensor, seqlen_q: int, seqlen_k: int | None = None, block_size=128) -> BlockSparseLayout:
    """A block-level layout from bool block_mask ([B,] [H,] n_q_blocks, n_kv_blocks); a 3-D mask is (H, ...).

    Every kept block is full (the kernel masks the ragged sequence ends itself); mask_mod is None.
    Built on block_mask's device.
    """
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    _leading_4d(block_mask, "block_mask", -(-seqlen_q // block_q), -(-seqlen_k // block_k))
    return BlockSparseLayout.from_block_masks(block_mask, None, seqlen_q, seqlen_k, block_size)


def from_mask_mod(mask_mod: MaskMod, seqlen_q: int, seqlen_k: int | None = None, block_size=128,
                  batch: int = 1, nheads: int = 1, device=None) -> BlockSparseLayout:
    """A layout from an element predicate mask_mod(b, h, q_idx, kv_idx) -> bool tensor, like
    FlexAttention's create_block_mask.

    mask_mod must broadcast: it is called with int64 index tensors of shapes (P, 1, 1) for b and
    h, (P, block_q, 1) for q_idx and (P, 1, block_k) for kv_idx, over chunks of P blocks (to bound
    memory), and with all indices in range. A block is full if mask_mod is True on all its valid
    elements, partial if on some, skipped if on none. b runs over range(batch), h over
    range(nheads): pass batch=1 / nheads=1 when mask_mod does not depend on them (shared layout). A mask_mod that
    gives b = -1 (h = -1: the last row of any tensor it indexes) another mask than b = 0 (h = 0) is recorded in depends_on, and such a layout is refused
    for q with more than one batch row (head).
    The layout keeps mask_mod for its partial blocks.
    """
    _check_mask_mod("mask_mod", mask_mod)
    batch, nheads = _check_int("batch", batch, 1), _check_int("nheads", nheads, 1)
    seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
    every_block = torch.ones(batch, nheads, -(-seqlen_q // block_q), -(-seqlen_k // block_k), dtype=torch.bool,
                             device=device)
    shared = [name for name, size in (("batch", batch), ("nheads", nheads)) if size == 1]
    any_attended, all_attended, depends_on = _classify(mask_mod, every_block, seqlen_q, seqlen_k, block_q, block_k,
                                                       shared)
    return BlockSparseLayout.from_block_masks(all_attended, any_attended, seqlen_q, seqlen_k, block_size, mask_mod,
                                              depends_on=depends_on)
