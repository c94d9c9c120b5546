"""Block-sparse attention layouts: which (query-block, key-block) tiles the kernels visit.

A `BlockSparseLayout` is the CSR description the block-sparse kernels read (FlexAttention's
BlockMask convention), plus an optional element-level `mask_mod` applied inside partial blocks.
The builders below return layouts that compose with `|` and `&`:

    local(256, 4096) | global_tokens(64, 4096)      # sliding window ±256 tokens + 64 global tokens
    local(256, 16384) & causal(16384)               # causal sliding window of 256 tokens
    from_mask_mod(lambda b, h, q, kv: (q // 512) == (kv // 512), 4096)   # any element predicate

Pure PyTorch: everything is built on the requested device with vectorised ops (no Python loop
over blocks), so a layout is cheap enough to build per batch.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import torch
from torch import Tensor

from .kernels.args import KernelLayout

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Elements per mask_mod call when classifying blocks: bounds the memory of the int64 index
# arithmetic a mask_mod does (a few 32 MiB temporaries) while keeping the number of calls small.
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _block_pair(block_size):
    """block_size as (block_q, block_k): an int, or a pair of ints, each a power of two >= 16."""
    pair = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(pair) != 2:
        raise ValueError(f"block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
    for size in pair:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def _grid(seqlen_q, seqlen_k, block_size):
    """Checked (seqlen_q, seqlen_k, block_q, block_k); seqlen_k defaults to seqlen_q."""
    seqlen_q = _check_int("seqlen_q", seqlen_q, 1)
    seqlen_k = seqlen_q if seqlen_k is None else _check_int("seqlen_k", seqlen_k, 1)
    return (seqlen_q, seqlen_k, *_block_pair(block_size))


def _window_pair(window):
    """window as (left, right) tokens, each >= 0."""
    pair = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    if len(pair) != 2:
        raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}")
    return _check_int("window", pair[0], 0), _check_int("window", pair[1], 0)


def _check_mask_mod(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be a callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")


def _leading_4d(mask, name, n_rows, n_cols):
    """A bool (n_rows, n_cols), (H, ...) or (B, H, ...) block mask as a 4-D (B, H, n_rows, n_cols) view."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if not 2 <= mask.dim() <= 4 or tuple(mask.shape[-2:]) != (n_rows, n_cols):
        raise ValueError(f"{name} must have shape ([batch,] [nheads,] {n_rows}, {n_cols}) "
                         f"(n_q_blocks, n_kv_blocks), got {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


# ---------------------------------------------------------------------------------------------
# mask_mod helpers: pure (b, h, q_idx, kv_idx) -> bool functions, evaluated by broadcasting
# ---------------------------------------------------------------------------------------------

def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _name(fn):
    return getattr(fn, "__name__", type(fn).__name__)


def _call_mask_mod(fn, b, h, q_idx, kv_idx):
    out = torch.as_tensor(fn(b, h, q_idx, kv_idx), device=q_idx.device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod {_name(fn)} must return a bool tensor, got {out.dtype}")
    return out


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """An element is attended iff every mask_mod attends it (no mask_mods: everything)."""
    for fn in mask_mods:
        _check_mask_mod("mask_mods", fn)

    def mask_mod(b, h, q_idx, kv_idx):
        out = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for fn in mask_mods:
            out = out & _call_mask_mod(fn, b, h, q_idx, kv_idx)
        return out

    return _named(mask_mod, f"and({', '.join(map(_name, mask_mods))})")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """An element is attended iff some mask_mod attends it (no mask_mods: nothing)."""
    for fn in mask_mods:
        _check_mask_mod("mask_mods", fn)

    def mask_mod(b, h, q_idx, kv_idx):
        out = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for fn in mask_mods:
            out = out | _call_mask_mod(fn, b, h, q_idx, kv_idx)
        return out

    return _named(mask_mod, f"or({', '.join(map(_name, mask_mods))})")


def causal_mask_mod(seqlen_q: int, seqlen_k: int | None = None) -> MaskMod:
    """Bottom-right aligned causal mask: query i sees key j iff j <= i + seqlen_k - seqlen_q."""
    seqlen_q, seqlen_k, _, _ = _grid(seqlen_q, seqlen_k, 128)
    diagonal = seqlen_k - seqlen_q
    return _named(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + diagonal, "causal")


def sliding_window_mask_mod(window, seqlen_q: int, seqlen_k: int | None = None) -> MaskMod:
    """Query i sees key j iff -left <= j - (i + seqlen_k - seqlen_q) <= right (tokens).

    window is an int (left = right = window: |i - j| <= window when seqlen_q == seqlen_k) or a
    (left, right) pair, as flash-attn's window_size; (w, 0) is a causal sliding window.
    """
    left, right = _window_pair(window)
    seqlen_q, seqlen_k, _, _ = _grid(seqlen_q, seqlen_k, 128)
    diagonal = seqlen_k - seqlen_q

    def mask_mod(b, h, q_idx, kv_idx):
        distance = kv_idx - (q_idx + diagonal)
        return (distance >= -left) & (distance <= right)

    return _named(mask_mod, f"sliding_window(±{left})" if left == right else f"sliding_window(-{left}, +{right})")


def global_tokens_mask_mod(n: int) -> MaskMod:
    """The first n queries see every key, and the first n keys are seen by every query."""
    n = _check_int("n", n, 0)
    return _named(lambda b, h, q_idx, kv_idx: (q_idx < n) | (kv_idx < n), f"global_tokens({n})")


# ---------------------------------------------------------------------------------------------
# Dense <-> CSR
# ---------------------------------------------------------------------------------------------

def _to_csr(dense):
    """bool (..., n) -> (num int32 (...), indices int32 (..., n)).

    A stable descending sort puts the kept indices first, in increasing order, followed by the
    others (also increasing): each row is a permutation, so padding entries are valid block
    indices that a kernel may prefetch safely.
    """
    num = dense.sum(-1, dtype=torch.int32)
    indices = dense.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num.contiguous(), indices.contiguous()


def _from_csr(num, indices, n):
    """The inverse of _to_csr: bool (..., n), reading only the first num entries of each row."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < num.unsqueeze(-1)
    # Entries past num go to a spare column n, so whatever padding a row holds cannot collide.
    columns = torch.where(valid, indices.long(), n)
    dense = torch.zeros(*num.shape, n + 1, dtype=torch.bool, device=indices.device)
    return dense.scatter_(-1, columns, True)[..., :n]


def _tiles(mask_mod, blocks, seqlen_q, seqlen_k, block_q, block_k):
    """Evaluate mask_mod on the elements of some blocks, in chunks of P blocks to bound memory.

    blocks: int64 (N, 4) rows of (b, h, q_block, kv_block). Yields (chunk (P, 4), attended (P,
    block_q, block_k), valid (P, block_q, block_k)), valid marking q_idx < seqlen_q, kv_idx <
    seqlen_k. mask_mod is called with (P, 1, 1) b and h, (P, block_q, 1) q_idx, (P, 1, block_k) kv_idx.
    """
    q_offsets = torch.arange(block_q, device=blocks.device).view(1, block_q, 1)
    kv_offsets = torch.arange(block_k, device=blocks.device).view(1, 1, block_k)
    per_chunk = max(1, _CHUNK_ELEMENTS // (block_q * block_k))
    for start in range(0, blocks.shape[0], per_chunk):
        chunk = blocks[start:start + per_chunk]
        b, h, i, j = (chunk[:, d].view(-1, 1, 1) for d in range(4))
        q_idx, kv_idx = i * block_q + q_offsets, j * block_k + kv_offsets
        valid = (q_idx < seqlen_q) & (kv_idx < seqlen_k)
        # Padding rows/columns of the ragged last block are clamped into range, so mask_mods that
        # index tensors (document ids, ...) never read out of bounds; `valid` discards them.
        attended = _call_mask_mod(mask_mod, b, h, q_idx.clamp(max=seqlen_q - 1), kv_idx.clamp(max=seqlen_k - 1))
        yield chunk, attended.expand(chunk.shape[0], block_q, block_k), valid


def _classify(mask_mod, candidates, seqlen_q, seqlen_k, block_q, block_k, shared=()):
    """Whether some / every valid element of each candidate block is attended by mask_mod.

    candidates: bool (B, H, n_q_blocks, n_kv_blocks). Returns (any, all), bool of the same shape,
    both False outside the candidates, and the names among `shared` ("batch", "nheads": dims of size 1) that
    mask_mod depends on: it is also called with b = -1 (h = -1) on every element, and answers differently. The
    probe is -1, not 1, because mask_mods index tensors with b and h (document ids of shape (1, seqlen), ...): -1 is
    in range for any such tensor (its last row, the same row when there is one), where index 1 of a one-row CUDA
    tensor is a device-side assert that no except can catch, and leaves the process's CUDA context unusable.
    """
    any_attended, all_attended = torch.zeros_like(candidates), torch.zeros_like(candidates)
    probes = {name: axis for axis, name in enumerate(("batch", "nheads")) if name in shared}
    depends = []
    for chunk, attended, valid in _tiles(mask_mod, candidates.nonzero(), seqlen_q, seqlen_k, block_q, block_k):
        position = tuple(chunk.T)
        any_attended[position] = (attended & valid).flatten(1).any(1)
        all_attended[position] = (attended | ~valid).flatten(1).all(1)
        for name, axis in list(probes.items()):
            moved = chunk.clone()
            moved[:, axis] = -1
            try:
                (_, other, _), = _tiles(mask_mod, moved, seqlen_q, seqlen_k, block_q, block_k)
            except (IndexError, RuntimeError):
                other = attended
            if ((other != attended) & valid).any():
                depends.append(name)
                del probes[name]
    return any_attended, all_attended, tuple(sorted(depends))


def _check_broadcast(layout, other):
    """A layout whose mask_mod depends on a dim it shares (depends_on) holds index 0's mask only: it must not be
    broadcast against a layout with that dim real."""
    for name in layout.depends_on:
        size = other.shape[0 if name == "batch" else 1]
        if size > 1:
            letter = "b" if name == "batch" else "h"
            raise ValueError(f"a layout built with {name}=1 whose mask_mod depends on {letter} cannot be combined "
                             f"with one of {name} {size}: build it with {name}={size}")


class _LayoutMaskMod:
    """A layout's element mask as a mask_mod: block kept and (block full or layout.mask_mod).

    This is what `|` and `&` combine, so that a block-level layout (mask_mod None: every element
    of a kept block) composes exactly with an element-level one.
    """

    def __init__(self, layout):
        # One gather per call: 0 skipped, 1 partial, 2 full, flattened over (B, H, n_q, n_kv).
        self.classes = (layout.to_dense().to(torch.int8) + layout.to_dense("full").to(torch.int8)).flatten()
        self.shape = layout.shape
        self.mask_mod = layout.mask_mod
        self.block_q, self.block_k = layout.block_q, layout.block_k
        self.__name__ = _name(layout.mask_mod) if layout.mask_mod is not None else "blocks"

    def __call__(self, b, h, q_idx, kv_idx):
        batch, heads, n_q, n_kv = self.shape
        # A broadcast (size-1) batch or head dim answers for every b or h, through index 0.
        b = b if batch > 1 else b * 0
        h = h if heads > 1 else h * 0
        block = ((b * heads + h) * n_q + q_idx // self.block_q) * n_kv + kv_idx // self.block_k
        classes = self.classes.to(q_idx.device)[block]
        if self.mask_mod is None:
            return classes > 0
        return (classes == 2) | ((classes == 1) & _call_mask_mod(self.mask_mod, b, h, q_idx, kv_idx))


# ---------------------------------------------------------------------------------------------
# Element rules: window | global-token masks the kernels can evaluate without tiles
# ---------------------------------------------------------------------------------------------

RULE_UNBOUNDED = 2**30  # an open window side (causal: left unbounded)


def _combine_rules(a, b, union):
    """The element_rule of a | b or a & b, or None when the result is not of the window | global form.

    A rule only has to be exact inside partial blocks. A layout without mask_mod attends its kept blocks
    whole, so a partial block of the union/intersection with it has the other side's mask: its rule. A
    builder's rule is False outside the blocks it keeps, so the union of two rules is exact everywhere.
    """
    if a.mask_mod is None or b.mask_mod is None:
        return (b if a.mask_mod is None else a).element_rule
    if a.element_rule is None or b.element_rule is None:
        return None
    (la, ra, ga), (lb, rb, gb) = a.element_rule, b.element_rule
    windows = [(l, r) for l, r in ((la, ra), (lb, rb)) if l is not None]
    if union:  # windows all contain offset 0, so their union is the widest one
        left, right = (max(w[0] for w in windows), max(w[1] for w in windows)) if windows else (None, None)
        return (left, right, max(ga, gb))
    if not windows:
        return (None, None, min(ga, gb))
    if ga or gb:  # global tokens intersected with a window leave the form
        return None
    if len(windows) == 1:  # the side without a window (and without global tokens) attends nothing
        return (None, None, 0)
    return (min(la, lb), min(ra, rb), 0)


# ---------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------

_CSR_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
               "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@dataclasses.dataclass(eq=False, repr=False)
class BlockSparseLayout:
    """Which (query-block, key-block) tiles attention visits, as CSR lists (FlexAttention's BlockMask).

    Shapes: B (batch) and H (heads) are each 1 (shared, broadcast) or the real size;
    n_q_blocks = ceil(seqlen_q / block_q), n_kv_blocks = ceil(seqlen_k / block_k).

    - kv_num_blocks       int32 (B, H, n_q_blocks)               PARTIAL blocks of each query-block row
    - kv_indices          int32 (B, H, n_q_blocks, n_kv_blocks)  their key-block indices
    - full_kv_num_blocks  int32 (B, H, n_q_blocks)               FULL blocks of each row
    - full_kv_indices     int32 (B, H, n_q_blocks, n_kv_blocks)
    - q_num_blocks, q_indices, full_q_num_blocks, full_q_indices: the same, transposed
      ((B, H, n_kv_blocks), (B, H, n_kv_blocks, n_q_blocks)): the query blocks of each key
      block, for the dK/dV backward.

    Conventions:
    - Disjoint, as in FlexAttention: a kept block is either partial (in kv_*/q_*) or full (in
      full_kv_*/full_q_*), never both. The kernel visits both lists; it applies the element mask
      only in partial blocks.
    - The first num entries of an indices row are the kept block indices in increasing order;
      the rest is padding (the remaining indices, so every row is a permutation).
    - FULL means every element inside the valid range (q_idx < seqlen_q, kv_idx < seqlen_k) is
      attended. The kernel always masks the sequence ends itself, so a ragged last block can be
      full; a block is partial only because of the element mask.
    - Element (b, h, q_idx, kv_idx) is attended iff its block is full, or its block is partial
      and mask_mod(b, h, q_idx, kv_idx) is True. mask_mod None means "every element of a kept
      block" (block-level layouts: bigbird, butterfly, from_dense). b and h run over this
      layout's B and H (0 for a broadcast dim).
    - block_size is an int, or a (block_q, block_k) pair when they differ; powers of two >= 16.

    Build layouts with the module's builders or `from_block_masks`, not field by field.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor
    seqlen_q: int
    seqlen_k: int
    block_size: int | tuple[int, int] = 128
    mask_mod: MaskMod | None = None
    # The same element mask as arithmetic the kernels evaluate inline, when mask_mod is built from the
    # sliding-window, causal and global-token predicates (builders set it, `|` / `&` via _combine_rules):
    # (left, right, n_global) = (j - i - diag in [-left, right]) | (i < n_global) | (j < n_global),
    # left/right None meaning "no window term" and RULE_UNBOUNDED an open side. None: use tiles of mask_mod.
    element_rule: tuple | None = None
    # The dims of size 1 ("batch", "nheads") that mask_mod depends on (from_mask_mod finds them): the layout then
    # holds the mask of b = 0 (h = 0) only, and block_sparse_attn_func refuses q with more batch rows (heads).
    depends_on: tuple = ()

    def __post_init__(self):
        # kernel_tensors() results per is_causal. A plain attribute, not __dict__.setdefault: Dynamo
        # traces attribute and dict updates, but not calls on an instance's __dict__.
        self._kernel_tensors = {}
        self.seqlen_q, self.seqlen_k, block_q, block_k = _grid(self.seqlen_q, self.seqlen_k, self.block_size)
        self.block_size = block_q if block_q == block_k else (block_q, block_k)
        if self.mask_mod is not None:
            _check_mask_mod("mask_mod", self.mask_mod)
        for name in _CSR_FIELDS:
            tensor = getattr(self, name)
            if not isinstance(tensor, Tensor) or tensor.dtype != torch.int32:
                got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
                raise TypeError(f"{name} must be an int32 tensor, got {got}")
        n_q, n_kv = self.n_q_blocks, self.n_kv_blocks
        leading = tuple(self.kv_num_blocks.shape[:2])
        for prefix, rows, cols in (("kv", n_q, n_kv), ("full_kv", n_q, n_kv), ("q", n_kv, n_q), ("full_q", n_kv, n_q)):
            shapes = {f"{prefix}_num_blocks": (*leading, rows), f"{prefix}_indices": (*leading, rows, cols)}
            for name, shape in shapes.items():
                tensor = getattr(self, name)
                if tuple(tensor.shape) != shape or tensor.device != self.kv_num_blocks.device:
                    raise ValueError(f"{name} must have shape {shape} on {self.kv_num_blocks.device}, "
                                     f"got {tuple(tensor.shape)} on {tensor.device}")

    @classmethod
    def from_block_masks(cls, full: Tensor, partial: Tensor | None, seqlen_q: int, seqlen_k: int | None = None,
                         block_size=128, mask_mod: MaskMod | None = None,
                         element_rule: tuple | None = None, depends_on: tuple = ()) -> BlockSparseLayout:
        """A layout from dense bool block masks of shape ([B,] [H,] n_q_blocks, n_kv_blocks).

        full: the full blocks; partial: the partial ones (None: none), where a block also in full
        counts as full, so passing all kept blocks is fine. A 3-D mask is (H, ...); the two masks
        broadcast against each other. Built on full's device.
        """
        seqlen_q, seqlen_k, block_q, block_k = _grid(seqlen_q, seqlen_k, block_size)
        n_q, n_kv = -(-seqlen_q // block_q), -(-seqlen_k // block_k)
        full = _leading_4d(full, "full", n_q, n_kv)
        partial = torch.zeros_like(full) if partial is None else _leading_4d(partial, "partial", n_q, n_kv)
        full, partial = torch.broadcast_tensors(full, partial.to(full.device))
        partial = partial & ~full
        kv, full_kv = _to_csr(partial), _to_csr(full)
        q, full_q = _to_csr(partial.transpose(-1, -2)), _to_csr(full.transpose(-1, -2))
        return cls(*kv, *full_kv, *q, *full_q, seqlen_q, seqlen_k, (block_q, block_k), mask_mod,
                   element_rule if mask_mod is not None else None, depends_on if mask_mod is not None else ())

    # -- shape ----------------------------------------------------------------------------------

    @property
    def block_q(self) -> int:
        return self.block_size if isinstance(self.block_size, int) else self.block_size[0]

    @property
    def block_k(self) -> int:
        return self.block_size if isinstance(self.block_size, int) else self.block_size[1]

    @property
    def n_q_blocks(self) -> int:
        return -(-self.seqlen_q // self.block_q)

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.seqlen_k // self.block_k)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, n_q_blocks, n_kv_blocks); B or H is 1 when shared."""
        return (*self.kv_num_blocks.shape, self.n_kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    # -- views ----------------------------------------------------------------------------------

    def to_dense(self, which: str = "kept") -> Tensor:
        """bool (B, H, n_q_blocks, n_kv_blocks): the "kept" (full or partial), "full" or "partial" blocks."""
        if which not in ("kept", "full", "partial"):
            raise ValueError(f"which must be 'kept', 'full' or 'partial', got {which!r}")
        n_kv = self.n_kv_blocks
        full = _from_csr(self.full_kv_num_blocks, self.full_kv_indices, n_kv)
        if which == "full":
            return full
        partial = _from_csr(self.kv_num_blocks, self.kv_indices, n_kv)
        return partial if which == "partial" else partial | full

    def to_dense_elements(self) -> Tensor:
        """bool (B, H, seqlen_q, seqlen_k): the elements attended (kept blocks ∩ mask_mod in partial ones).

        Materialises the whole matrix: for tests, references and small sizes.
        """
        def expand(blocks):
            blocks = blocks.repeat_interleave(self.block_q, -2).repeat_interleave(self.block_k, -1)
            return blocks[..., :self.seqlen_q, :self.seqlen_k]

        kept = expand(self.to_dense())
        if self.mask_mod is None:
            return kept
        batch, heads, _, _ = self.shape
        arange = lambda n: torch.arange(n, device=self.device)  # noqa: E731
        attended = _call_mask_mod(self.mask_mod, arange(batch).view(-1, 1, 1, 1), arange(heads).view(1, -1, 1, 1),
                                  arange(self.seqlen_q).view(1, 1, -1, 1), arange(self.seqlen_k).view(1, 1, 1, -1))
        return kept & (expand(self.to_dense("full")) | attended)

    def partial_block_masks(self) -> tuple[Tensor, Tensor]:
        """The element masks of the partial blocks only, for a kernel that loads one tile per partial block.

        Returns (tile_index int32 (B, H, n_q_blocks, n_kv_blocks): the tile of each partial block,
        -1 elsewhere; tiles bool (P, block_q, block_k), in the (b, h, q_block, kv_block) order of
        the partial blocks). Elements past the sequence ends are False. A few MB where dense
        element masks would take seqlen_q x seqlen_k per (b, h).
        """
        partial = self.to_dense("partial")
        blocks = partial.nonzero()
        tile_index = torch.full(partial.shape, -1, dtype=torch.int32, device=self.device)
        tile_index[tuple(blocks.T)] = torch.arange(blocks.shape[0], dtype=torch.int32, device=self.device)
        mask_mod = self.mask_mod or (lambda b, h, q_idx, kv_idx: torch.ones((), dtype=torch.bool, device=q_idx.device))
        tiles = [attended & valid for _, attended, valid in
                 _tiles(mask_mod, blocks, self.seqlen_q, self.seqlen_k, self.block_q, self.block_k)]
        empty = torch.zeros(0, self.block_q, self.block_k, dtype=torch.bool, device=self.device)
        return tile_index, torch.cat([empty, *tiles])

    def kernel_tensors(self, is_causal: bool = False) -> tuple[KernelLayout, int, int]:
        """What the block-sparse kernels read, built once per `is_causal` and cached on the layout.

        Returns (KernelLayout(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
        q_indices, full_q_num_blocks, full_q_indices, q_order, k_order, q_major, k_major, tile_index, tiles, rule),
        block_q, block_k) where, unlike the layout's own lists, blocks that are full but cross the causal diagonal
        (with is_causal) or hold the ragged end of the keys are listed as partial, and blocks wholly above the
        diagonal are dropped: the kernels mask causality and sequence ends only in partial blocks.
        tile_index (B, H, n_q_blocks, n_kv_blocks) int32 points partial blocks that carry a mask_mod to
        their element mask in tiles (P, block_q, ceil(block_k / 32)) int32, bit j of word w being key
        w * 32 + j of the block; -1 elsewhere. Both are empty when the layout has no mask_mod or has an
        element_rule, which goes to rule as int32 (left, right, n_global) for the kernels to evaluate inline
        (else rule is empty).
        q_order (B, H, n_q_blocks) and k_order (B, H, n_kv_blocks) int32 list the query (key) blocks by their
        number of kept blocks, longest first: the order in which the kernels start them, so that the longest
        rows (columns) never start in the last wave. q_major and k_major (1,) int32: 1 where the kernels
        should start the same rank of every head together (block-major), see kernels.common._tile.
        """
        # Keyed on what they are built from, the tensors' version counters included: a layout whose tensors
        # were changed in place (or whose mask_mod was replaced) after a call rebuilds them instead of running
        # stale block lists.
        key = (tuple(getattr(self, name)._version for name in _CSR_FIELDS), self.mask_mod, self.element_rule)
        cache = self._kernel_tensors
        if cache.get(bool(is_causal), (None,))[0] != key:
            kept, full = self.to_dense(), self.to_dense("full")
            if is_causal:  # the causal builder's block classes: partial on the diagonal, full below it
                diagonal = causal(self.seqlen_q, self.seqlen_k, self.block_size, self.device)
                kept, full = kept & diagonal.to_dense(), full & diagonal.to_dense("full")
            if self.seqlen_k % self.block_k:
                full = full.clone()
                full[..., -1] = False
            plan = BlockSparseLayout.from_block_masks(full, kept, self.seqlen_q, self.seqlen_k, self.block_size)
            lists = [getattr(plan, name) for name in _CSR_FIELDS]
            lengths = [lists[0] + lists[2], lists[4] + lists[6]]  # kept blocks per query row, per key column
            # stable: equal lengths keep their natural order (neighbouring blocks share K/V in L2)
            orders = [torch.sort(n, dim=-1, descending=True, stable=True).indices.to(torch.int32) for n in lengths]
            # Block-major when the longest row is over 3x the mean: global tokens (ratio 5 at 4K, 18 at 16K),
            # not causal (2), windows or butterfly (1), where head-major's L2 reuse wins. On the GPU, no sync.
            majors = [(n.amax() > 3 * n.float().mean()).to(torch.int32).reshape(1) for n in lengths]
            rule = torch.zeros(0, dtype=torch.int32, device=self.device)
            if self.mask_mod is None or self.element_rule is not None:
                tile_index = tiles = torch.zeros(0, dtype=torch.int32, device=self.device)
                if self.element_rule is not None:
                    left, right, n_global = self.element_rule
                    # No window term: an interval no offset reaches. Unbounded: wider than any sequence.
                    left, right = (-RULE_UNBOUNDED, -RULE_UNBOUNDED) if left is None else (left, right)
                    rule = torch.tensor([left, right, n_global], dtype=torch.int32, device=self.device)
            else:
                tile_index, masks = self.partial_block_masks()
                words = -(-self.block_k // 32)
                masks = torch.nn.functional.pad(masks, (0, words * 32 - self.block_k))
                bits = masks.view(*masks.shape[:2], words, 32).to(torch.int64) << torch.arange(32, device=self.device)
                packed = bits.sum(-1)
                tiles = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
            tensors = KernelLayout(*(t.contiguous() for t in (*lists, *orders, *majors, tile_index, tiles, rule)))
            cache[bool(is_causal)] = (key, (tensors, self.block_q, self.block_k))
        return cache[bool(is_causal)][1]

    @property
    def density(self) -> float:
        """Fraction of the n_q_blocks x n_kv_blocks block grid that is kept (causal: about 0.5)."""
        kept = self.kv_num_blocks.sum(dtype=torch.int64) + self.full_kv_num_blocks.sum(dtype=torch.int64)
        return kept.item() / (self.kv_num_blocks.numel() * self.n_kv_blocks)

    def to(self, device) -> BlockSparseLayout:
        """The same layout with its tensors on device (mask_mod is kept as is)."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in _CSR_FIELDS})

    def __repr__(self):
        batch, heads, n_q, n_kv = self.shape
        full = self.full_kv_num_blocks.sum(dtype=torch.int64).item() / (batch * heads * n_q * n_kv)
        return (f"BlockSparseLayout(seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, block_size={self.block_size}, "
                f"blocks={n_q}x{n_kv}, batch={'shared' if batch == 1 else batch}, "
                f"heads={'shared' if heads == 1 else f'{heads} (per head)'}, density={self.density:.3f} "
                f"(full {full:.3f}), mask_mod={None if self.mask_mod is None else _name(self.mask_mod)}, "
                f"device={self.device})")

    # -- algebra --------------------------------------------------------------------------------

    def _combine(self, other, union):
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        for name in ("seqlen_q", "seqlen_k", "block_size", "device"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"layouts must share {name}, got {getattr(self, name)} and {getattr(other, name)}")
        try:
            torch.broadcast_shapes(self.shape, other.shape)
        except RuntimeError:
            raise ValueError(f"layout shapes {self.shape} and {other.shape} do not broadcast") from None
        _check_broadcast(self, other)
        _check_broadcast(other, self)
        kept_a, full_a = self.to_dense(), self.to_dense("full")
        kept_b, full_b = other.to_dense(), other.to_dense("full")
        kept = kept_a | kept_b if union else kept_a & kept_b
        full = full_a | full_b if union else full_a & full_b
        if self.mask_mod is None and other.mask_mod is None:
            # Without a mask_mod a kept block is attended whole, so every kept block of the result is full.
            return BlockSparseLayout.from_block_masks(kept, None, self.seqlen_q, self.seqlen_k, self.block_size)
        combine = or_masks if union else and_masks
        mask_mod = combine(_LayoutMaskMod(self), _LayoutMaskMod(other))
        rule = _combine_rules(self, other, union)
        # A block partial on one side and full or absent on the other keeps its class exactly; one
        # partial on both sides may turn full (union) or empty (intersection): evaluate only those.
        both_partial = (kept_a & ~full_a) & (kept_b & ~full_b)
        any_attended, all_attended, _ = _classify(mask_mod, both_partial, self.seqlen_q, self.seqlen_k,
                                                  self.block_q, self.block_k)
        kept = kept & ~(both_partial & ~any_attended)
        full = full | all_attended
        if union and rule is not None and (self.mask_mod is None) != (other.mask_mod is None):
            # The plain side's blocks are full in the union, but kernel_tensors makes the last key column partial
            # when seqlen_k is ragged, and the kernels apply the rule inside partial blocks: where the plain side
            # keeps such a block the rule would hide keys it attends. Tiles from mask_mod describe it exactly.
            plain_kept = kept_a if self.mask_mod is None else kept_b
            if self.seqlen_k % self.block_k and plain_kept[..., -1].any():
                rule = None
        return BlockSparseLayout.from_block_masks(full, kept, self.seqlen_q, self.seqlen_k, self.block_size, mask_mod,
                                                  rule, tuple(sorted({*self.depends_on, *other.depends_on})))

    def __or__(self, other):
        """Union: an element is attended if either layout attends it."""
        return self._combine(other, union=True)

    def __and__(self, other):
        """Intersection: an element is attended if both layouts attend it."""
        return self._combine(other, union=False)

    # -- pictures -------------------------------------------------------------------------------

    def _codes(self, batch, head):
        """int (n_q_blocks, n_kv_blocks) of one (batch, head): 0 empty, 1 partial, 2 full."""
        batches, heads, _, _ = self.shape
        if not -batches <= batch < batches:
            raise ValueError(f"batch must be in [0, {batches}), got {batch}")
        if not -heads <= head < heads:
            raise ValueError(f"head must be in [0, {heads}), got {head}")
        return (self.to_dense()[batch, head].long() + self.to_dense("full")[batch, head].long()).cpu()

    def picture(self, max_blocks: int = 64, batch: int = 0, head: int = 0) -> str:
        """The block grid of one (batch, head) as text: '█' full, '░' partial, '·' empty.

        Grids wider or taller than max_blocks are shown in cells of c x c blocks: '█' if all are
        full, '·' if all are empty, '░' otherwise.
        """
        max_blocks = _check_int("max_blocks", max_blocks, 1)
        codes = self._codes(batch, head)
        n_q, n_kv = codes.shape
        cell = -(-max(n_q, n_kv) // max_blocks)
        rows, cols = -(-n_q // cell), -(-n_kv // cell)

        def per_cell(values):
            padded = torch.zeros(rows * cell, cols * cell, dtype=torch.long)
            padded[:n_q, :n_kv] = values
            return padded.view(rows, cell, cols, cell).sum((1, 3))

        blocks, full, kept = per_cell(torch.ones_like(codes)), per_cell(codes == 2), per_cell(codes > 0)
        chars = [["█" if f == n else "·" if k == 0 else "░" for n, f, k in zip(*row)]
                 for row in zip(blocks.tolist(), full.tolist(), kept.tolist())]
        scale = f", 1 char = {cell}x{cell} blocks" if cell > 1 else ""
        legend = "█ full, ░ partial or mixed, · empty" if cell > 1 else "█ full, ░ partial, · empty"
        header = (f"{n_q}x{n_kv} blocks of {self.block_q}x{self.block_k} (batch {batch}, head {head}), "
                  f"density {self.density:.3f}{scale}; {legend}")
        return "\n".join([header, *("".join(row) for row in chars)])

    def show(self, max_blocks: int = 64, batch: int = 0, head: int = 0) -> None:
        """Print `picture(max_blocks, batch, head)`."""
        print(self.picture(max_blocks, batch, head))

    def save_png(self, path, batch: int = 0, head: int = 0) -> None:
        """Save the block grid of one (batch, head) as an image (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.colors import ListedColormap
        except ImportError as error:
            raise ImportError("save_png needs matplotlib: pip install matplotlib") from error
        codes = self._codes(batch, head)
        figure, axes = plt.subplots(figsize=(6, 6 * codes.shape[0] / codes.shape[1] + 0.5))
        axes.imshow(codes.numpy(), cmap=ListedColormap(["white", "#9ecae1", "#08519c"]), vmin=0, vmax=2,
                    interpolation="nearest")
        axes.set(xlabel=f"key block ({self.block_k} tokens)", ylabel=f"query block ({self.block_q} tokens)",
                 title=f"batch {batch}, head {head}: density {self.density:.3f} (dark: full, light: partial)")
        figure.savefig(path, bbox_inches="tight", dpi=150)
        plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

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


__all__ = [
    "BlockSparseLayout", "MaskMod",
    "causal", "local", "global_tokens", "bigbird", "butterfly", "from_dense", "from_mask_mod",
    "and_masks", "or_masks", "causal_mask_mod", "sliding_window_mask_mod", "global_tokens_mask_mod",
]
