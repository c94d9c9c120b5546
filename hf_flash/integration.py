"""Registers the kernels with transformers: `import hf_flash` makes "hf_triton" and "hf_triton_sparse" valid
values of `attn_implementation` for every model that dispatches through `ALL_ATTENTION_FUNCTIONS`.

Each name goes into two registries:
- AttentionInterface: the function each attention layer calls, `fn(module, query, key, value, attention_mask,
  dropout=, scaling=, **kwargs)` with q/k/v as (batch, heads, seq, dim); it returns ((batch, seq, heads, dim), None).
- AttentionMaskInterface: the function a model calls once per forward to build `attention_mask` for its layers.
  For a name missing here transformers' mask helpers return None, and BERT / GPT-2 padding would be lost.

The attention_mask a layer receives, and how it is applied exactly:
- None: no padding. Causal if `is_causal` (else `module.is_causal`) says so, bottom-right aligned, so KV-cache
  decoding works; `sliding_window` as in transformers' masks.
- (batch, kv_len) bool or 0/1 ints: key padding, any pattern (left or right). `hf_triton_mask` returns this for
  the plain causal and bidirectional patterns, so nothing of size q_len x kv_len is built for BERT, RoBERTa,
  GPT-2 or Llama-style models.
- (batch or 1, 1 or heads, q_len, kv_len), bool or additive float: transformers' own mask, which `hf_triton_mask`
  builds for every other pattern (sliding windows, packed sequences, static caches, custom overlays) and which a
  user may pass. It is split into key padding + causal / sliding window (+ packed sequences from
  `position_ids`) and the split is checked element by element against the mask; a mask that does not split
  raises ValueError rather than being approximated.
`cu_seq_lens_q` / `cu_seq_lens_k` (DataCollatorWithFlattening) run packed sequences through the varlen kernel.

Determinism follows transformers' flash-attention switches: a `deterministic` keyword, else the environment
variable FLASH_ATTENTION_DETERMINISTIC=1 (or torch.use_deterministic_algorithms(True)). Without them, a training
call with dropout sums dQ with atomics (faster; its rounding varies from run to run), as flash-attn does.
"""

import os
import warnings
import weakref
from functools import lru_cache
from typing import NamedTuple

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function, prepare_padding_mask,
                                        sdpa_mask)

from . import ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION, layouts
from .interface import block_sparse_attn_func, flash_attn_func, flash_attn_varlen_func
from .kernels import settings as _kernel_settings
from .kernels.dropout import kept_probability
from .reference import attention_reference, varlen_attention_reference, visibility_mask

# Semantics-changing arguments other attention functions accept and the kernels do not have: refuse, never drop.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "head_mask", "score_mod", "cache")

_TRY_EAGER = "load the model with attn_implementation=\"eager\" (or \"sdpa\") for this"


class _Plan(NamedTuple):
    """What the kernels run: a dense call (cu_seqlens_q None) or a packed varlen call."""
    causal: bool
    window: tuple
    key_padding: torch.Tensor | None = None  # (batch, n_keys) bool, True = attend
    n_keys: int | None = None                # keys to keep: a static cache's empty trailing slots are dropped
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


# ---------------------------------------------------------------------------------------------
# AttentionMaskInterface entry
# ---------------------------------------------------------------------------------------------

def hf_triton_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                   attention_mask=None, **kwargs):
    """The cheapest mask from which `hf_triton_attention_forward` recovers transformers' mask exactly.

    The plain causal and bidirectional patterns give the (batch, kv_length) key-padding mask, or None without
    padding: the layer's causality is re-applied by the kernel. Causal needs the queries to end where the keys end
    (the kernel's bottom-right alignment), true for training, prefill and decoding with a dynamic cache. Every
    other pattern is transformers' 4-D bool mask (as `sdpa` gets it), decomposed exactly by the attention function.
    """
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    aligned = mask_function is bidirectional_mask_function or (
        isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length)
    if plain and aligned:
        if attention_mask is None:
            return None
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        # No padding at all is cheaper as None; but that is a branch on a tensor's value, which torch.compile
        # (fullgraph) cannot trace: compiled, the kernels get the all-True mask, with the same result.
        return padding if torch.compiler.is_compiling() or not bool(padding.all()) else None
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


# ---------------------------------------------------------------------------------------------
# From attention_mask (+ position_ids, cu_seq_lens_*) to a plan
# ---------------------------------------------------------------------------------------------

def _window(causal, sliding_window):
    """transformers' sliding windows as (left, right): causal keeps the last `sliding_window` keys
    (q - w < k <= q), bidirectional keeps |q - k| <= w (masking_utils' two overlays)."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _allowed_from_4d(mask, batch, q_len, k_len):
    """A 4-D bool or additive mask as (batch, q_len, k_len) bool, True = attend."""
    if mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (q_len, k_len):
        raise ValueError(f"attention_mask must have shape (batch or 1, 1 or heads, q_len, kv_len) = "
                         f"({batch}, 1, {q_len}, {k_len}), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        # transformers masks with finfo(dtype).min (or -inf); anything else is a bias, not a mask.
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            raise ValueError("attention_mask holds additive values other than 0 and -inf / finfo.min (a bias such "
                             f"as ALiBi or T5's); hf_triton only applies masks: {_TRY_EAGER} model")
    else:
        raise TypeError(f"a 4-D attention_mask must be bool or floating point, got {mask.dtype}")
    if mask.shape[1] != 1 and not (allowed == allowed[:, :1]).all():
        raise ValueError(f"attention_mask differs between heads; hf_triton applies one mask to all heads: "
                         f"{_TRY_EAGER} model")
    return allowed[:, 0].expand(batch, q_len, k_len)


def _packed_segments(position_ids, batch, seqlen):
    """Sequences packed along each row, as transformers finds them: a new one wherever the position does not
    go up by exactly 1. Returns (segment id per token, (batch, seqlen); cu_seqlens over the flattened rows)."""
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions.diff(dim=1) != 1
    starts = starts.flatten()
    cu_seqlens = torch.cat([starts.nonzero().flatten(), starts.new_tensor([starts.numel()], dtype=torch.long)])
    return starts.cumsum(0).view(batch, seqlen), cu_seqlens.to(torch.int32)


def _plan_from_4d(allowed, causal, sliding_window, position_ids):
    batch, q_len, k_len = allowed.shape
    attended = allowed.any(dim=1)  # keys that no query sees act as padding
    columns = attended.any(dim=0).nonzero()
    # A static cache holds empty slots after the last real key: drop them, so that the last query lines up with
    # the last key as causal attention in the kernels assumes.
    n_keys = int(columns.max()) + 1 if columns.numel() else k_len
    allowed, attended = allowed[..., :n_keys], attended[:, :n_keys]
    for is_causal in (causal, not causal):
        window = _window(is_causal, sliding_window)
        expected = visibility_mask(q_len, n_keys, causal=is_causal, window_size=window, key_padding_mask=attended,
                                   device=allowed.device)[:, 0]
        if torch.equal(expected.expand_as(allowed), allowed):
            return _Plan(is_causal, window, None if attended.all() else attended, n_keys)
    if position_ids is not None and position_ids.shape[-1] == q_len == n_keys == k_len:
        segment, cu_seqlens = _packed_segments(position_ids, batch, q_len)
        same_segment = segment[:, :, None] == segment[:, None, :]
        for is_causal in (causal, not causal):
            window = _window(is_causal, sliding_window)
            expected = visibility_mask(q_len, q_len, causal=is_causal, window_size=window, device=allowed.device)
            if torch.equal(expected[:, 0] & same_segment, allowed):
                longest = int(cu_seqlens.diff().max())
                return _Plan(is_causal, window, None, n_keys, cu_seqlens, cu_seqlens, longest, longest)
    raise ValueError(
        f"hf_triton cannot apply this attention_mask exactly: it is not key padding combined with "
        f"{'causal' if causal else 'bidirectional'} attention (sliding_window={sliding_window}), nor packed sequences "
        f"given by position_ids (e.g. a custom or per-query mask); {_TRY_EAGER} model")


# The same 4-D mask object reaches every layer of a forward: decompose it once.
_last_decomposition = None


def _plan_from_4d_cached(mask, batch, q_len, k_len, causal, sliding_window, position_ids):
    global _last_decomposition
    # Inference tensors have no version counter (and cannot change outside inference mode).
    version = 0 if mask.is_inference() else mask._version
    key = (version, batch, q_len, k_len, causal, sliding_window)
    if _last_decomposition is not None:
        mask_ref, positions_ref, last_key, plan = _last_decomposition
        if mask_ref() is mask and last_key == key and (
                position_ids is None if positions_ref is None else positions_ref() is position_ids):
            return plan
    plan = _plan_from_4d(_allowed_from_4d(mask, batch, q_len, k_len), causal, sliding_window, position_ids)
    _last_decomposition = (weakref.ref(mask), None if position_ids is None else weakref.ref(position_ids), key, plan)
    return plan


def _plan(attention_mask, batch, q_len, k_len, causal, sliding_window, kwargs):
    position_ids = kwargs.get("position_ids")
    if attention_mask is None:
        plan = _Plan(causal, _window(causal, sliding_window))
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__} (a mask "
                        f"built for another attn_implementation?)")
    elif attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, k_len):
            raise ValueError(f"a 2-D attention_mask is key padding and must have shape (batch, kv_len) = "
                             f"({batch}, {k_len}), got {tuple(attention_mask.shape)}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"a 2-D attention_mask must be bool or integer (1 = attend), got {attention_mask.dtype}")
        key_padding = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        plan = _Plan(causal, _window(causal, sliding_window), key_padding)
    elif attention_mask.dim() == 4:
        plan = _plan_from_4d_cached(attention_mask, batch, q_len, k_len, causal, sliding_window, position_ids)
    else:
        raise ValueError(f"attention_mask must be None, (batch, kv_len) or (batch, 1, q_len, kv_len), "
                         f"got shape {tuple(attention_mask.shape)}")

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return plan
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together")
    if plan.key_padding is not None:
        raise ValueError("cu_seq_lens_q / cu_seq_lens_k (packed sequences) and a padding attention_mask were both "
                         "given; packed batches have no padding, pass one or the other")
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if plan.cu_seqlens_q is not None and not torch.equal(plan.cu_seqlens_q, cu_q):
        raise ValueError("cu_seq_lens_q disagrees with the sequences packed in attention_mask / position_ids")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
    max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
    return plan._replace(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


# ---------------------------------------------------------------------------------------------
# Running a plan: the Triton kernels, or plain PyTorch where they cannot run
# ---------------------------------------------------------------------------------------------

_warned_fallback = False


def _runs_kernels(device):
    """CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    global _warned_fallback
    if device.type == "cuda" or (device.type == "cpu" and _kernel_settings.INTERPRET):
        return True
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"hf_triton runs its Triton kernels on CUDA GPUs; {device.type} tensors fall back to plain "
                      f"PyTorch attention (exact, but it materialises the seq_q x seq_k scores: slower and more "
                      f"memory). Move the model to a GPU, or set TRITON_INTERPRET=1 before importing hf_flash to "
                      f"run the kernels on the CPU (slow; for tests).", RuntimeWarning, stacklevel=3)
    return False


def _keep_mask(dropout_p, batch, heads, q_len, k_len, device):
    # the kernels' keep probability, which attention_reference's scale assumes
    return torch.rand(batch, heads, q_len, k_len, device=device) < kept_probability(dropout_p)


def _deterministic(kwargs):
    """transformers' flash-attention convention: the `deterministic` keyword, else FLASH_ATTENTION_DETERMINISTIC."""
    deterministic = kwargs.get("deterministic")
    return os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1" if deterministic is None else bool(deterministic)


def _run(q, k, v, plan, scale, dropout_p, deterministic):
    """q, k, v: (batch, seq, heads, dim) views. Returns (batch, seq_q, heads, dim)."""
    batch, q_len, heads = q.shape[:3]
    common = dict(causal=plan.causal, softmax_scale=scale, window_size=plan.window)
    kernels = _runs_kernels(q.device)
    if plan.cu_seqlens_q is None:
        if kernels:
            return flash_attn_func(q, k, v, dropout_p=dropout_p, key_padding_mask=plan.key_padding,
                                   deterministic=deterministic, **common)
        keep = _keep_mask(dropout_p, batch, heads, q_len, k.shape[1], q.device) if dropout_p > 0 else None
        return attention_reference(q, k, v, key_padding_mask=plan.key_padding, dropout_p=dropout_p,
                                   dropout_mask=keep, **common)[0]
    # Packed: the batch rows are concatenated (a view when batch is 1, as packed batches usually are).
    q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    args = (q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k)
    if kernels:
        out = flash_attn_varlen_func(*args, plan.max_seqlen_q, plan.max_seqlen_k, dropout_p=dropout_p,
                                     deterministic=deterministic, **common)
    else:
        n_seqs = plan.cu_seqlens_q.numel() - 1
        keep = (_keep_mask(dropout_p, n_seqs, heads, plan.max_seqlen_q, plan.max_seqlen_k, q.device)
                if dropout_p > 0 else None)
        out = varlen_attention_reference(*args, dropout_p=dropout_p, dropout_mask=keep, **common)[0]
    return out.view(batch, q_len, *out.shape[1:])


def _check_call(module, kwargs):
    if kwargs.get("output_attentions"):
        raise ValueError("hf_triton never materialises the attention weights, so it cannot return them "
                         "(output_attentions=True); load the model with attn_implementation=\"eager\" to get them")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"hf_triton does not support `{name}` (passed by "
                                      f"{type(module).__name__}); {_TRY_EAGER} model")


def _prepare(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, kwargs):
    """Shared by both entries: checks, autocast, head-dim padding, the mask plan, (batch, seq, heads, dim) views.

    Returns (q, k, v, plan, scale, dropout_p, v_head_dim)."""
    _check_call(module, kwargs)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) if t.dtype == torch.float32 else t for t in (query, key, value))
    head_dim, v_head_dim = query.shape[-1], value.shape[-1]
    if v_head_dim != head_dim:
        # e.g. MLA. The kernels take one head dim: zero columns (in v, or in q and k) leave the result exact.
        scaling = head_dim ** -0.5 if scaling is None else scaling
        width = max(head_dim, v_head_dim)
        query, key, value = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (query, key, value))

    batch, _, q_len, _ = query.shape
    plan = _plan(attention_mask, batch, q_len, key.shape[2], causal, sliding_window, kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if plan.n_keys is not None and plan.n_keys < k.shape[1]:
        k, v = k[:, :plan.n_keys], v[:, :plan.n_keys]
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    return q, k, v, plan, None if scaling is None else float(scaling), dropout_p, v_head_dim


def _drop_head_padding(out, v_head_dim):
    """The output without the zero columns _prepare added (a view costs host time: only when there are some)."""
    return out if out.shape[-1] == v_head_dim else out[..., :v_head_dim]


def hf_triton_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                is_causal=None, sliding_window=None, **kwargs):
    """AttentionInterface entry for "hf_triton".

    query: (batch, heads, seq_q, dim); key, value: (batch, kv_heads, seq_k, dim) (GQA/MQA run natively, without
    repeating k/v). attention_mask: see the module docstring. dropout applies only while `module.training`.
    scaling: the softmax scale (GPT-2 folds scale_attn_by_inverse_layer_idx into it); None = 1/sqrt(dim).
    Returns (attn_output (batch, seq_q, heads, dim), None).

    fp32 q/k/v under autocast are cast to the autocast dtype, as transformers' flash path does; outside autocast
    fp32 runs in fp32.
    """
    q, k, v, plan, scale, dropout_p, v_head_dim = _prepare(module, query, key, value, attention_mask, dropout, scaling,
                                                           is_causal, sliding_window, kwargs)
    out = _run(q, k, v, plan, scale, dropout_p, _deterministic(kwargs))
    return _drop_head_padding(out, v_head_dim), None


# ---------------------------------------------------------------------------------------------
# "hf_triton_sparse": the layout comes from config.hf_flash_sparsity
# ---------------------------------------------------------------------------------------------

SPARSITY_CONFIG_KEY = "hf_flash_sparsity"

# Counts are in blocks; "local" is BigBird without random blocks.
_SPARSITY_FIELDS = {
    "bigbird": {"block": 128, "window": 1, "global": 1, "random": 1, "seed": 0},
    "local": {"block": 128, "window": 1, "global": 0},
    "butterfly": {"block": 128},
}


def check_sparsity(sparsity):
    """Validates a `config.hf_flash_sparsity` dict and returns it with defaults filled in.

    {"pattern": "bigbird", "block": 128, "window": 3, "global": 1, "random": 2, "seed": 0}: query block I keeps key
    blocks J with |I - J| <= window, the first `global` block rows and columns, and `random` more per row.
    {"pattern": "local", "block", "window", "global"}: the same without random blocks.
    {"pattern": "butterfly", "block"}: the flat butterfly. Counts are in blocks; block is a power of two >= 16.
    """
    if not isinstance(sparsity, dict):
        raise TypeError(f"config.{SPARSITY_CONFIG_KEY} must be a dict such as {{'pattern': 'bigbird', 'block': 128, "
                        f"'window': 3, 'global': 1, 'random': 2}}, got {type(sparsity).__name__}")
    pattern = sparsity.get("pattern")
    if pattern not in _SPARSITY_FIELDS:
        raise ValueError(f"config.{SPARSITY_CONFIG_KEY}['pattern'] must be one of {sorted(_SPARSITY_FIELDS)}, "
                         f"got {pattern!r}")
    fields = _SPARSITY_FIELDS[pattern]
    unknown = sorted(set(sparsity) - set(fields) - {"pattern"})
    if unknown:
        raise ValueError(f"config.{SPARSITY_CONFIG_KEY} has keys {unknown} that pattern {pattern!r} does not use; "
                         f"it takes {sorted(fields)}")
    checked = {"pattern": pattern, **fields}
    for name in fields:
        value = sparsity.get(name, fields[name])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.{SPARSITY_CONFIG_KEY}['{name}'] must be an int >= 0, got {value!r}")
        checked[name] = value
    if checked["block"] < 16 or checked["block"] & (checked["block"] - 1):
        raise ValueError(f"config.{SPARSITY_CONFIG_KEY}['block'] must be a power of two >= 16, got {checked['block']}")
    return checked


@lru_cache(maxsize=64)
def _cached_layout(items, seqlen_q, seqlen_k, device):
    spec = dict(items)
    device = torch.device(device)
    size = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k, block_size=spec["block"], device=device)
    if spec["pattern"] == "butterfly":
        layout = layouts.butterfly(**size)
    else:
        layout = layouts.bigbird(spec["window"], spec["global"], spec.get("random", 0), seed=spec.get("seed", 0),
                                 **size)
    return layout


def sparsity_layout(sparsity, seqlen_q, seqlen_k, device):
    """The BlockSparseLayout that `config.hf_flash_sparsity` describes for these lengths, built on `device` and
    cached per (sparsity, lengths, device). Decoders apply causality on top, in the kernel."""
    checked = check_sparsity(sparsity)
    return _cached_layout(tuple(sorted(checked.items())), int(seqlen_q), int(seqlen_k), str(torch.device(device)))


def hf_triton_sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                       is_causal=None, sliding_window=None, **kwargs):
    """AttentionInterface entry for "hf_triton_sparse": block-sparse attention with the layout that
    `config.hf_flash_sparsity` describes (built per sequence length and device, and cached), intersected
    with the causal mask for decoders, and with key padding from the attention mask.

    Arguments and return as hf_triton_attention_forward. Self-attention over the whole sequence only: packed
    sequences, sliding windows and KV-cache decoding (seq_q != seq_k) raise, since the layout is defined on
    the square of one sequence's blocks.
    """
    config = getattr(module, "config", None)
    if getattr(config, SPARSITY_CONFIG_KEY, None) is None:
        raise ValueError(f"attn_implementation=\"{SPARSE_ATTN_IMPLEMENTATION}\" needs the layout in the model config, "
                         f"e.g. config.{SPARSITY_CONFIG_KEY} = {{'pattern': 'bigbird', 'block': 128, 'window': 3, "
                         f"'global': 1, 'random': 2}} (saved and loaded with the config)")
    q, k, v, plan, scale, dropout_p, v_head_dim = _prepare(module, query, key, value, attention_mask, dropout, scaling,
                                                           is_causal, sliding_window, kwargs)
    unsupported = ("packed sequences (cu_seq_lens / position_ids restarts)" if plan.cu_seqlens_q is not None else
                   "a sliding window" if plan.window[0] >= 0 else
                   f"seq_q ({q.shape[1]}) != seq_k ({k.shape[1]}) (KV-cache decoding or cross-attention)"
                   if q.shape[1] != k.shape[1] else None)
    if unsupported:
        raise NotImplementedError(f"attn_implementation=\"{SPARSE_ATTN_IMPLEMENTATION}\" does not support {unsupported}; "
                                  f"use \"{ATTN_IMPLEMENTATION}\" (dense) for this call")
    layout = sparsity_layout(getattr(config, SPARSITY_CONFIG_KEY), q.shape[1], k.shape[1], q.device)
    if _runs_kernels(q.device):
        out = block_sparse_attn_func(q, k, v, layout, causal=plan.causal, softmax_scale=scale, dropout_p=dropout_p,
                                     key_padding_mask=plan.key_padding, deterministic=_deterministic(kwargs))
    else:
        keep = (_keep_mask(dropout_p, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
                if dropout_p > 0 else None)
        out = attention_reference(q, k, v, causal=plan.causal, softmax_scale=scale, key_padding_mask=plan.key_padding,
                                  dropout_p=dropout_p, dropout_mask=keep, attn_mask=layout.to_dense_elements())[0]
    return _drop_head_padding(out, v_head_dim), None


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def register():
    """Registers both names with transformers (done on `import hf_flash`; idempotent)."""
    for name, attention in ((ATTN_IMPLEMENTATION, hf_triton_attention_forward),
                            (SPARSE_ATTN_IMPLEMENTATION, hf_triton_sparse_attention_forward)):
        # transformers reads "flash" in a name as a hub-kernel request and "sdpa"/"flex" as those backends.
        assert not any(word in name for word in ("flash", "sdpa", "flex")), name
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, hf_triton_mask)


register()

__all__ = ["SPARSITY_CONFIG_KEY", "check_sparsity", "hf_triton_attention_forward", "hf_triton_mask",
           "hf_triton_sparse_attention_forward", "register", "sparsity_layout"]
