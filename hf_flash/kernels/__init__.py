"""Exact attention (FlashAttention-2) in Triton: kernels, their launchers and the torch custom ops (no transformers).

Layout: q, k, v are (batch, seqlen, nheads, headdim) with any strides, or packed (total_tokens, nheads, headdim)
with cu_seqlens offsets (varlen); k and v may have nheads_q / group heads (GQA/MQA). The forward tiles K/V
through on-chip memory with an online softmax in fp32 and writes only the output and the log-sum-exp (LSE,
natural log, fp32). The backward recomputes the probabilities from Q, K and the LSE.

Masking is aligned bottom-right: with diag = seqlen_k - seqlen_q, query i sees key j iff
i + diag - left <= j <= i + diag + right (causal: right = 0; -1: unbounded) and j is not padding. Key blocks
outside that band are skipped; blocks inside it need no element mask. A row that sees no key outputs 0 and has
LSE = +inf (as flash-attn), so that exp(s - lse) = 0 in the backward without a special case. Optional: ALiBi
bias, dropout (Philox, regenerated in the backward from the same counters), key and query padding masks.

The modules, in the order they build on each other:
    settings       environment settings and the private switches
    tuning         the autotuner's candidate tiles, pruning and timing
    common         jit helpers: interpreter-safe casts, row loads, tile order
    masking        jit helpers: element masks, ALiBi, block-sparse tiles and rules, loop bounds
    dropout        Philox keep masks (jit) and the host functions that describe them
    forward        the forward kernel
    backward_dq    the dQ kernel (and delta)
    backward_dkdv  the dK/dV kernel
    args           AttentionArgs and KernelLayout, the typed records the wrappers hand to the launchers
    choices        which tile config a call runs with (search, shipped table, rule), the one-time notices
    ahead          compiles started ahead of the launch that needs them, on worker threads
    launch         kernel arguments, the launch cache, attention_forward / attention_backward
    ops            the custom ops with autograd, and run_attention
"""

from .settings import INTERPRET, MAX_HEADDIM
from .dropout import draw_dropout_seed, dropout_mask
from .ops import attention_bwd_op, attention_fwd_op, run_attention

__all__ = ["INTERPRET", "MAX_HEADDIM", "attention_bwd_op", "attention_fwd_op", "draw_dropout_seed", "dropout_mask",
           "run_attention"]
