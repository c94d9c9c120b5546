"""Public attention functions: argument checks and documentation in front of the Triton kernels."""

import math

import torch

from .kernels import attention as _kernels

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, _, nheads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have the batch size of q ({batch}), got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v must have the headdim of q ({head_dim}), got {k.shape[3]}")
    if head_dim > _kernels.MAX_HEADDIM or head_dim < 1:
        raise ValueError(f"headdim must be between 1 and {_kernels.MAX_HEADDIM}, got {head_dim}")
    nheads_kv = k.shape[2]
    if nheads_kv < 1 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k and v ({nheads_kv})")
    if q.device.type == "cpu" and not _kernels.INTERPRET:
        raise ValueError(
            "q, k, v are on the CPU: the hf_flash kernels run on CUDA GPUs (move the tensors with .cuda()), "
            "or on the CPU under Triton's interpreter for testing (set TRITON_INTERPRET=1 before importing "
            "hf_flash; slow)")


def _check_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _reject_unsupported(dropout_p, window_size, alibi_slopes, key_padding_mask):
    # These arrive with the kernel-features work; until then they are refused, never ignored.
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p} is not supported yet; only dropout_p=0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size={tuple(window_size)} is not supported yet; only (-1, -1)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported yet; pass None")
    if key_padding_mask is not None:
        raise NotImplementedError("key_padding_mask is not supported yet; pass None")


def flash_attn_func(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, window_size=(-1, -1),
                    alibi_slopes=None, key_padding_mask=None, deterministic=False, return_lse=False):
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
        dropout_p, window_size, alibi_slopes, key_padding_mask: not supported yet; any value other
            than the default raises NotImplementedError.
        deterministic: accepted for flash-attn compatibility; the backward is always deterministic
            (dK/dV are reduced over query heads inside one program, never with atomics).
        return_lse: also return the log-sum-exp of the scaled scores, (batch, nheads, seqlen_q)
            float32 (natural log). It is differentiable.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q, contiguous. With return_lse, (out, lse).
        Gradients flow to q, k, v in their dtypes.

    Runs on CUDA GPUs that Triton supports (compute capability 8.0+ for bfloat16), or on CPU
    tensors under TRITON_INTERPRET=1 (slow; for tests).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _reject_unsupported(dropout_p, window_size, alibi_slopes, key_padding_mask)
    out, lse = _kernels.attention_fwd_op(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
