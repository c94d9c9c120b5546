"""The typed records handed from the public functions to the kernels' host code.

AttentionArgs holds everything one attention call passes besides q, k, v; KernelLayout is a block-sparse layout as
the kernels read it (layouts.BlockSparseLayout.kernel_tensors builds it). Both travel with named fields from
interface.py through the autograd Function to the launchers; only the torch custom ops (ops.py), whose schemas
take flat tensors and scalars, see them flattened.
"""

from typing import NamedTuple

from torch import Tensor


class KernelLayout(NamedTuple):
    """What the block-sparse kernels read, every tensor int32 and contiguous. B, H: the layout's batch and heads
    (1 when shared); n_q, n_kv: its query and key blocks. See BlockSparseLayout.kernel_tensors for how partial and
    full blocks are classified."""

    kv_num_blocks: Tensor       # (B, H, n_q): partial key blocks of each query block
    kv_indices: Tensor          # (B, H, n_q, n_kv): their indices, the first kv_num_blocks of each row
    full_kv_num_blocks: Tensor  # (B, H, n_q): full key blocks (no element mask) of each query block
    full_kv_indices: Tensor     # (B, H, n_q, n_kv)
    q_num_blocks: Tensor        # (B, H, n_kv): partial query blocks of each key block (the dK/dV kernel's lists)
    q_indices: Tensor           # (B, H, n_kv, n_q)
    full_q_num_blocks: Tensor   # (B, H, n_kv)
    full_q_indices: Tensor      # (B, H, n_kv, n_q)
    q_order: Tensor             # (B, H, n_q): query blocks by descending work, the order programs start them
    k_order: Tensor             # (B, H, n_kv): key blocks likewise, for the dK/dV kernel
    q_major: Tensor             # (1,): 1 where query-block programs go block-major (common._tile)
    k_major: Tensor             # (1,): the same for key-block programs
    tile_index: Tensor          # (B, H, n_q, n_kv): each partial block's element mask in tiles, -1 for none; or empty
    tiles: Tensor               # (P, block_q, ceil(block_k / 32)): element masks, 32 keys per word; or empty
    rule: Tensor                # (3,): an element rule (left, right, n_global) evaluated inline; or empty


class AttentionArgs(NamedTuple):
    """One attention call's arguments besides q, k, v. Dense calls leave the varlen and block-sparse fields at
    their defaults; packed (varlen) calls pass cu_seqlens_q / cu_seqlens_k, and max_seqlen_* are then the longest
    sequences (else the tensors' seqlens)."""

    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    key_padding_mask: Tensor | None = None     # (batch, seqlen_k) bool, True = attend
    query_padding_mask: Tensor | None = None   # (batch, seqlen_q) bool; forward only (padding rows get lse +inf)
    alibi_slopes: Tensor | None = None         # (nheads,) or (batch, nheads) fp32
    seed: Tensor | None = None                 # (1,) int64 Philox seed, with dropout
    window_left: int = -1                      # -1: unbounded
    window_right: int = -1                     # 0 with causal; -1: unbounded
    dropout_p: float = 0.0
    layout: KernelLayout | None = None         # block-sparse; None: dense
    layout_block_q: int = 0                    # the layout's block sizes (0 when dense)
    layout_block_k: int = 0
    deterministic: bool = False                # never sum dQ with atomics (settings._ATOMIC_DQ)
