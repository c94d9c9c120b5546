"""Argument checks shared by the layout builders and BlockSparseLayout: each error names the argument."""

import numbers

import torch
from torch import Tensor


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _block_pair(block_size):
    """block_size as (block_q, block_k): an int, or a pair of ints, each a power of two >= 16."""
    pair = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(pair) != 2:
        raise ValueError(f"block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
    for size in pair:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def _grid(seqlen_q, seqlen_k, block_size):
    """Checked (seqlen_q, seqlen_k, block_q, block_k); seqlen_k defaults to seqlen_q."""
    seqlen_q = _check_int("seqlen_q", seqlen_q, 1)
    seqlen_k = seqlen_q if seqlen_k is None else _check_int("seqlen_k", seqlen_k, 1)
    return (seqlen_q, seqlen_k, *_block_pair(block_size))


def _window_pair(window):
    """window as (left, right) tokens, each >= 0."""
    pair = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    if len(pair) != 2:
        raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}")
    return _check_int("window", pair[0], 0), _check_int("window", pair[1], 0)


def _check_mask_mod(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be a callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")


def _leading_4d(mask, name, n_rows, n_cols):
    """A bool (n_rows, n_cols), (H, ...) or (B, H, ...) block mask as a 4-D (B, H, n_rows, n_cols) view."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if not 2 <= mask.dim() <= 4 or tuple(mask.shape[-2:]) != (n_rows, n_cols):
        raise ValueError(f"{name} must have shape ([batch,] [nheads,] {n_rows}, {n_cols}) "
                         f"(n_q_blocks, n_kv_blocks), got {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
