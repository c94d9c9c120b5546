"""mask_mod helpers: pure (b, h, q_idx, kv_idx) -> bool functions, evaluated by broadcasting (FlexAttention's
convention), and the combinators and builders' element predicates."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import _check_int, _check_mask_mod, _grid, _window_pair

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


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


def _combined(mask_mods, attend_all, word):
    """The mask_mod that ANDs (attend_all: True, an empty list attends everything) or ORs mask_mods."""
    for fn in mask_mods:
        _check_mask_mod("mask_mods", fn)

    def mask_mod(b, h, q_idx, kv_idx):
        out = torch.full((), attend_all, dtype=torch.bool, device=q_idx.device)
        for fn in mask_mods:
            attended = _call_mask_mod(fn, b, h, q_idx, kv_idx)
            out = out & attended if attend_all else out | attended
        return out

    return _named(mask_mod, f"{word}({', '.join(map(_name, mask_mods))})")


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """An element is attended iff every mask_mod attends it (no mask_mods: everything)."""
    return _combined(mask_mods, True, "and")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """An element is attended iff some mask_mod attends it (no mask_mods: nothing)."""
    return _combined(mask_mods, False, "or")


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
