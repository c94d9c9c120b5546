"""Triton kernels, their launchers and the torch custom ops that wrap them (no transformers here)."""

from .attention import (INTERPRET, MAX_HEADDIM, attention_bwd_op, attention_fwd_op, draw_dropout_seed, dropout_mask,
                        run_attention)

__all__ = ["INTERPRET", "MAX_HEADDIM", "attention_bwd_op", "attention_fwd_op", "draw_dropout_seed", "dropout_mask",
           "run_attention"]
