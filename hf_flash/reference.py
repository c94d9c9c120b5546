"""Plain-PyTorch attention with the kernels' semantics: the test oracle and the CPU fallback.

It materialises the (seqlen_q, seqlen_k) score matrix, so it is only for short sequences.
"""

import math

import torch


def causal_mask(seqlen_q, seqlen_k, device=None):
    """Bottom-right aligned causal mask, (seqlen_q, seqlen_k) bool, True = attend."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None):
    """Attention computed in the dtype of its inputs (pass float64 tensors for a reference).

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim).
    Returns out (batch, seqlen_q, nheads, headdim) and lse (batch, nheads, seqlen_q); rows that
    attend to no key give out = 0 and lse = +inf, like the kernels.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        mask = causal_mask(q.shape[1], k.shape[1], q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        has_key = mask.any(-1)[:, None]  # (seqlen_q, 1)
        scores = torch.where(has_key, scores, 0.0)  # keep softmax finite on empty rows
    else:
        has_key = torch.tensor(k.shape[1] > 0, device=q.device)
    probs = torch.softmax(scores, dim=-1) * has_key
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    lse = torch.where(has_key.squeeze(-1), torch.logsumexp(scores, dim=-1), float("inf"))
    return out, lse
