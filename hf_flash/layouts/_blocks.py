"""Block-level machinery behind BlockSparseLayout: dense <-> CSR lists, classifying blocks with a mask_mod, the
element mask of a layout as a mask_mod (what `|` and `&` combine), and the window | global element rules."""

import torch

from .mask_mods import _call_mask_mod, _name

# Elements per mask_mod call when classifying blocks: bounds the memory of the int64 index
# arithmetic a mask_mod does (a few 32 MiB temporaries) while keeping the number of calls small.
_CHUNK_ELEMENTS = 1 << 22


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
