"""Public attention functions (dense, packed, block-sparse): argument checks and documentation in front of the
Triton kernels."""

import math

import torch

from .kernels import settings as _kernel_settings
from .kernels.args import AttentionArgs
from .kernels.dropout import check_dropout_p, draw_dropout_seed
from .kernels.ops import run_attention
from .layouts import BlockSparseLayout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q, k, v, ndim):
    layout = "(batch, seqlen, nheads, headdim)" if ndim == 4 else "(total_tokens, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    nheads, head_dim = q.shape[-2:]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k and v must have the headdim of q ({head_dim}), got {k.shape[-1]}")
    if head_dim > _kernel_settings.MAX_HEADDIM or head_dim < 1:
        raise ValueError(f"headdim must be between 1 and {_kernel_settings.MAX_HEADDIM}, got {head_dim}")
    nheads_kv = k.shape[-2]
    if nheads_kv < 1 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k and v ({nheads_kv})")
    if q.device.type == "cpu" and not _kernel_settings.INTERPRET:
        raise ValueError(
            "q, k, v are on the CPU: the hf_flash kernels run on CUDA GPUs (move the tensors with .cuda()), "
            "or on the CPU under Triton's interpreter for testing (set TRITON_INTERPRET=1 before importing "
            "hf_flash; slow)")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q, k, v are on {q.device}: the hf_flash kernels run on CUDA GPUs (move the tensors "
                         f"with .cuda())")


def _check_options(q, batch, causal, softmax_scale, dropout_p, window_size, alibi_slopes):
    """Validates the options shared by the dense and packed functions; returns (scale, left, right)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    check_dropout_p(dropout_p)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    left, right = window_size
    if causal:
        right = 0
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("alibi_slopes must be a float32 tensor of shape (nheads,) or (batch, nheads)")
        if alibi_slopes.shape not in ((q.shape[-2],), (batch, q.shape[-2])):
            raise ValueError(f"alibi_slopes must have shape ({q.shape[-2]},) or ({batch}, {q.shape[-2]}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on {q.device}, got {alibi_slopes.device}")
    return float(softmax_scale), left, right


def _nonnegative_scale(q, scale):
    """(q, scale) with scale >= 0: scale * q k^T = |scale| * (-q) k^T, exactly (negation only flips a sign bit).
    The kernels take the running row max on unscaled scores wherever no element is masked, which is only right
    for scale >= 0; autograd carries the gradient through the negation."""
    return (q.neg(), -scale) if scale < 0 else (q, scale)


def _check_padding_mask(name, mask, batch, seqlen, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = attend), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != (batch, seqlen):
        raise ValueError(f"{name} must have shape (batch, seqlen) = ({batch}, {seqlen}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def _check_cu_seqlens(name, cu_seqlens, total, max_seqlen, max_name, device):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (batch + 1,), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu_seqlens.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return cu_seqlens.contiguous()
    # One host sync per call; a wrong cu_seqlens would otherwise read out of bounds in the kernels.
    lengths = cu_seqlens.diff()
    bad = torch.stack([cu_seqlens[0] != 0, cu_seqlens[-1] != total, (lengths < 0).any(), (lengths > max_seqlen).any()])
    first_bad = bad.tolist()
    if first_bad[0] or first_bad[1]:
        raise ValueError(f"{name} must start at 0 and end at the number of tokens ({total}), "
                         f"got {cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}")
    if first_bad[2]:
        raise ValueError(f"{name} must be non-decreasing")
    if first_bad[3]:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} "
                         f"({lengths.max().item()})")
    return cu_seqlens.contiguous()


def flash_attn_func(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, window_size=(-1, -1),
                    alibi_slopes=None, key_padding_mask=None, query_padding_mask=None, deterministic=False,
                    return_lse=False):
    """Exact softmax attention, computed tile by tile without materialising the score matrix.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32, any strides (a
            transposed view of a (batch, nheads, seqlen, headdim) tensor is used without a copy).
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype and device as q. nheads must be a
            multiple of nheads_kv (GQA/MQA: query head h uses key/value head h // (nheads // nheads_kv)).
        causal: mask so that query i attends to keys j <= i + seqlen_k - seqlen_q, i.e. aligned to
            the bottom-right corner. For seqlen_q = 2, seqlen_k = 5 (1 = attend):
                1 1 1 1 0
                1 1 1 1 1
            For seqlen_q = 5, seqlen_k = 2:
                0 0
                0 0
                0 0
                1 0
                1 1
            A row that attends to no key outputs 0 (and its lse is +inf).
        softmax_scale: scale of q @ k^T before the softmax; default 1 / sqrt(headdim).
        dropout_p: dropout probability on the attention probabilities (pass 0.0 in evaluation). The
            mask comes from Philox seeded by torch's generator: torch.manual_seed reproduces it and
            activation checkpointing replays it.
        window_size: (left, right) sliding window: query i attends to keys
            j in [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 = unbounded.
            causal sets right = 0. Key blocks outside the window are skipped, not computed.
        alibi_slopes: float32 (nheads,) or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j|
            to the scaled scores.
        key_padding_mask: (batch, seqlen_k) bool, True = attend; any pattern (right or left padding).
        query_padding_mask: (batch, seqlen_q) bool, True = real query. Rows that are False output 0,
            lse +inf, and get zero gradient.
        deterministic: the backward gives bit-identical gradients for the same inputs (dK/dV are
            reduced over query heads inside one program, dQ in its own kernel, never with atomics).
            Without it, a call with dropout (head dim <= 128; <= 64 in fp32) sums dQ with fp32
            atomics, as FlashAttention-2 does (the mask is then drawn once: a 5-11% faster
            backward), so dQ's rounding varies from run to run.
            torch.use_deterministic_algorithms(True) has the same effect.
        return_lse: also return the log-sum-exp of the scaled scores (bias included, before dropout),
            (batch, nheads, seqlen_q) float32, natural log. It is differentiable.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q, contiguous. With return_lse, (out, lse).
        Gradients flow to q, k, v in their dtypes.

    Runs on CUDA GPUs that Triton supports (compute capability 8.0+ for bfloat16), or on CPU
    tensors under TRITON_INTERPRET=1 (slow; for tests).
    """
    _check_qkv(q, k, v, ndim=4)
    batch = q.shape[0]
    scale, left, right = _check_options(q, batch, causal, softmax_scale, dropout_p, window_size, alibi_slopes)
    q, scale = _nonnegative_scale(q, scale)
    key_padding_mask = _check_padding_mask("key_padding_mask", key_padding_mask, batch, k.shape[1], q.device)
    query_padding_mask = _check_padding_mask("query_padding_mask", query_padding_mask, batch, q.shape[1], q.device)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    args = AttentionArgs(q.shape[1], k.shape[1], scale, key_padding_mask=key_padding_mask,
                         query_padding_mask=query_padding_mask, alibi_slopes=alibi_slopes, seed=seed,
                         window_left=left, window_right=right, dropout_p=float(dropout_p),
                         deterministic=bool(deterministic))
    out, lse = run_attention(q, k, v, args)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           softmax_scale=None, dropout_p=0.0, window_size=(-1, -1), alibi_slopes=None,
                           deterministic=False, return_lse=False):
    """Attention over packed variable-length sequences (no padding tokens at all).

    Arguments:
        q: (total_q, nheads, headdim): the query tokens of every sequence, one after the other.
        k, v: (total_k, nheads_kv, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), on q's device: sequence b holds rows
            cu_seqlens[b]:cu_seqlens[b + 1]. Must start at 0, be non-decreasing and end at total.
            Lengths 0 and 1 are allowed.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sequence (sizes the launch grid).
        causal, softmax_scale, dropout_p, window_size, alibi_slopes, deterministic: as in
            flash_attn_func, applied to each sequence on its own (causal is bottom-right aligned per
            sequence: query i of sequence b sees keys j <= i + len_k[b] - len_q[b]).
        return_lse: also return lse, (nheads, total_q) float32.

    Returns:
        out: (total_q, nheads, headdim); with return_lse, (out, lse).
    """
    _check_qkv(q, k, v, ndim=3)
    cu_seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    batch = cu_seqlens_q.numel() - 1
    scale, left, right = _check_options(q, batch, causal, softmax_scale, dropout_p, window_size, alibi_slopes)
    q, scale = _nonnegative_scale(q, scale)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    args = AttentionArgs(max_seqlen_q, max_seqlen_k, scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         alibi_slopes=alibi_slopes, seed=seed, window_left=left, window_right=right,
                         dropout_p=float(dropout_p), deterministic=bool(deterministic))
    out, lse = run_attention(q, k, v, args)
    return (out, lse) if return_lse else out


def _check_layout(layout, q, k):
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a hf_flash.BlockSparseLayout (see hf_flash.layouts), got {type(layout).__name__}")
    if (layout.seqlen_q, layout.seqlen_k) != (q.shape[1], k.shape[1]):
        raise ValueError(f"layout is for seqlen_q={layout.seqlen_q}, seqlen_k={layout.seqlen_k}, but q and k have "
                         f"{q.shape[1]} and {k.shape[1]} tokens")
    if layout.device != q.device:
        raise ValueError(f"layout must be on {q.device} (layout.to(device)), got {layout.device}")
    batch, heads = layout.shape[:2]
    for name, letter, size in (("batch", "b", q.shape[0]), ("nheads", "h", q.shape[2])):
        if name in layout.depends_on and size > 1:
            raise ValueError(f"layout was built with {name}=1, but its mask_mod depends on {letter}: it holds the "
                             f"mask of {letter} = 0 only, and q has {size}. Build it with "
                             f"layouts.from_mask_mod(..., {name}={size})")
    if batch not in (1, q.shape[0]) or heads not in (1, q.shape[2]):
        raise ValueError(f"layout has batch {batch} and heads {heads}; they must be 1 (shared) or those of q "
                         f"({q.shape[0]}, {q.shape[2]})")


def block_sparse_attn_func(q, k, v, layout, *, causal=False, softmax_scale=None, dropout_p=0.0,
                           key_padding_mask=None, deterministic=False, return_lse=False):
    """Exact attention restricted to the blocks a BlockSparseLayout keeps; the others are skipped.

    Arguments:
        q, k, v: as in flash_attn_func ((batch, seqlen, nheads, headdim), GQA allowed).
        layout: hf_flash.BlockSparseLayout for (seqlen_q, seqlen_k) on q's device, shared (batch
            and heads 1) or per batch row / per query head. Query i attends key j iff the layout
            attends (i, j) (its block is full, or partial and its mask_mod holds) and any other mask
            below allows it. The forward and dQ visit only the kept key blocks of each query block,
            dK/dV only the kept query blocks of each key block; element masks are applied only in
            partial blocks. Build it once and reuse it: its kernel lists are cached on it.
        causal: also apply the bottom-right aligned causal mask (as flash_attn_func); blocks above
            the diagonal are skipped even when the layout keeps them.
        softmax_scale, dropout_p, key_padding_mask, deterministic, return_lse: as in flash_attn_func.
    A row that attends no key outputs 0, with lse +inf and zero gradient.

    Returns:
        out: (batch, seqlen_q, nheads, headdim); with return_lse, (out, lse (batch, nheads, seqlen_q)).
    """
    _check_qkv(q, k, v, ndim=4)
    _check_layout(layout, q, k)
    batch = q.shape[0]
    scale, left, right = _check_options(q, batch, causal, softmax_scale, dropout_p, (-1, -1), None)
    q, scale = _nonnegative_scale(q, scale)
    key_padding_mask = _check_padding_mask("key_padding_mask", key_padding_mask, batch, k.shape[1], q.device)
    kernel_layout, block_q, block_k = layout.kernel_tensors(causal)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    args = AttentionArgs(q.shape[1], k.shape[1], scale, key_padding_mask=key_padding_mask, seed=seed,
                         window_left=left, window_right=right, dropout_p=float(dropout_p), layout=kernel_layout,
                         layout_block_q=block_q, layout_block_k=block_k, deterministic=bool(deterministic))
    out, lse = run_attention(q, k, v, args)
    return (out, lse) if return_lse else out
