"""BlockSparseLayout: the CSR lists the block-sparse kernels read, an optional element-level mask_mod, and how
layouts combine, draw and hand themselves to the kernels."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..kernels.args import KernelLayout
from ._blocks import (RULE_UNBOUNDED, _LayoutMaskMod, _check_broadcast, _classify, _combine_rules, _from_csr, _tiles,
                      _to_csr)
from ._checks import _check_int, _check_mask_mod, _grid, _leading_4d
from .mask_mods import MaskMod, _call_mask_mod, _name, and_masks, or_masks


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
                from .builders import causal  # the builders build layouts: imported here, not at the top

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
