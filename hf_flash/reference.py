"""Plain-PyTorch attention with the kernels' semantics: the test oracle and the CPU fallback.

It materialises the (seqlen_q, seqlen_k) score matrix, so it is only for short sequences. It
computes in the dtype of its inputs: float64 inputs give the reference, fp16/bf16/fp32 inputs give
PyTorch's own error in that dtype.

Query i and key j are compared on the bottom-right aligned diagonal, diag = seqlen_k - seqlen_q
(the last query lines up with the last key). A row that sees no key outputs 0 and has lse = +inf,
with zero (finite) gradients.
"""

import math

import torch

from .kernels.dropout import kept_probability


def visibility_mask(seqlen_q, seqlen_k, *, causal=False, window_size=(-1, -1), key_padding_mask=None,
                    query_padding_mask=None, device=None):
    """Which keys each query sees: (batch or 1, 1, seqlen_q, seqlen_k) bool, True = attend.

    window_size = (left, right) keeps keys i + diag - left <= j <= i + diag + right, -1 leaving
    that side unbounded; causal is right = 0 (with a window it takes the tighter bound, which is
    always 0). key_padding_mask (batch, seqlen_k) and query_padding_mask (batch, seqlen_q) are bool,
    True = real token; a padded query sees nothing.
    """
    left, right = window_size
    if causal:
        right = 0
    diagonal = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= cols >= diagonal - left
    if right >= 0:
        mask &= cols <= diagonal + right
    mask = mask[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(device)
    if query_padding_mask is not None:
        mask = mask & query_padding_mask[:, None, :, None].to(device)
    return mask


def causal_mask(seqlen_q, seqlen_k, device=None):
    """Bottom-right aligned causal mask, (seqlen_q, seqlen_k) bool, True = attend."""
    return visibility_mask(seqlen_q, seqlen_k, causal=True, device=device)[0, 0]


def alibi_bias(alibi_slopes, seqlen_q, seqlen_k):
    """-slope[b, h] * |i + diag - j|: (batch or 1, nheads, seqlen_q, seqlen_k), dtype of the slopes.

    alibi_slopes: (nheads,) or (batch, nheads).
    """
    device = alibi_slopes.device
    diagonal = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    distance = (diagonal - torch.arange(seqlen_k, device=device)[None, :]).abs()
    slopes = alibi_slopes.reshape(-1, alibi_slopes.shape[-1])  # (batch or 1, nheads)
    return -slopes[:, :, None, None] * distance


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                        key_padding_mask=None, query_padding_mask=None, dropout_p=0.0, dropout_mask=None,
                        attn_mask=None):
    """Attention computed in the dtype of its inputs (pass float64 tensors for a reference).

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim), nheads a
    multiple of nheads_kv (query head h uses kv head h // (nheads // nheads_kv)).
    causal, window_size, key_padding_mask (batch, seqlen_k), query_padding_mask (batch, seqlen_q):
        which keys a query sees, see visibility_mask.
    alibi_slopes: (nheads,) or (batch, nheads); adds -slope * |i + diag - j| to the scaled scores.
    dropout_mask: (batch, nheads, seqlen_q, seqlen_k) bool keep mask, applied to the normalised
        probabilities with kept ones scaled by 1 / kept_probability(dropout_p), as the kernels do (1 - p, with p
        quantised up to 14 bits); required when dropout_p > 0.
    attn_mask: bool, broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = attend: any further
        element mask (a block-sparse layout's `to_dense_elements()`), combined with the others.
    Returns out (batch, seqlen_q, nheads, headdim) and lse (batch, nheads, seqlen_q), the
    log-sum-exp of the scaled, biased scores before dropout; rows that see no key give out = 0 and
    lse = +inf.
    """
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("dropout_p > 0 needs the dropout_mask the kernel used")
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if alibi_slopes is not None:
        # the bias is formed in float32 (float64 for a float64 reference), then added in q's dtype
        slopes = alibi_slopes.to(device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
        scores = scores + alibi_bias(slopes, seqlen_q, seqlen_k).to(scores.dtype)
    mask = visibility_mask(seqlen_q, seqlen_k, causal=causal, window_size=window_size,
                           key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                           device=q.device)
    if attn_mask is not None:
        mask = mask & attn_mask.to(q.device)
    has_key = mask.any(-1, keepdim=True)  # (batch or 1, 1, seqlen_q, 1)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = torch.where(has_key, scores, 0.0)  # keep softmax and its gradient finite on empty rows
    probs = torch.softmax(scores, dim=-1) * has_key
    lse = torch.where(has_key.squeeze(-1), torch.logsumexp(scores, dim=-1), float("inf"))
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(q.device) / kept_probability(dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out, lse


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, softmax_scale=None,
                               window_size=(-1, -1), alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """attention_reference on packed sequences, each attended on its own.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_kv, headdim); cu_seqlens_q,
    cu_seqlens_k: (batch + 1,) cumulative lengths starting at 0. Sequence b is rows
    cu_seqlens[b]:cu_seqlens[b + 1], with its own bottom-right diagonal len_k[b] - len_q[b].
    alibi_slopes: (nheads,) or (batch, nheads). dropout_mask: (batch, nheads, max_seqlen_q,
    max_seqlen_k) bool, element (b, h, i, j) at indices local to sequence b.
    Returns out (total_q, nheads, headdim) and lse (nheads, total_q).
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [q.new_zeros(0, q.shape[1], v.shape[2])]
    lses = [q.new_zeros(q.shape[1], 0)]
    for b in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[b:b + 2], bounds_k[b:b + 2]
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        keep = None if dropout_mask is None else dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0]
        out, lse = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal,
                                       softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=slopes,
                                       dropout_p=dropout_p, dropout_mask=keep)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)
