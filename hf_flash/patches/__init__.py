"""`hf_flash.patch(model)`, `hf_flash.unpatch(model)` and `hf_flash.patch_transformers()`.

What a patch writes into `model.config`, so that `save_pretrained` + `from_pretrained` (after `import hf_flash`)
restores it: `max_position_embeddings` (the extended table, whose weights are in the checkpoint), `attn_implementation`
(a key PretrainedConfig.__init__ reads when the config is loaded, so the model is built with hf_triton),
`hf_flash_sparsity` for the sparse path, and `hf_flash_original_attn_implementation` for `unpatch`. The position
buffers (`position_ids`, `token_type_ids`) are non-persistent and rebuilt at the new size, so loading reports no
missing or unexpected keys. PretrainedConfig consumes `attn_implementation` when it loads it, so a loaded model runs
hf_triton but saving it again drops the choice: call `hf_flash.patch(model)` (cheap once positions are extended)
before re-saving.
"""

import functools

from transformers import PreTrainedModel

from .. import ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION
from ..integration import SPARSITY_CONFIG_KEY, check_sparsity
from .positions import INITS, extend_position_embeddings, extended_table
from .registry import REGISTRY, Family, family_of

_ORIGINAL_KEY = "hf_flash_original_attn_implementation"


def _transformers_model(model):
    """The transformers model inside `model`: itself, or the one a PEFT wrapper holds (LoRA layers injected)."""
    if isinstance(model, PreTrainedModel):
        return model
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"hf_flash.patch takes a transformers PreTrainedModel or a PEFT model wrapping one, "
                        f"got {type(model).__name__}")
    return inner


def _check_max_positions(max_positions):
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")


def patch(model, *, max_positions=None, sparsity=None, tokenizer=None, init="copy"):
    """Switches `model` to hf_flash attention and, with `max_positions`, extends its absolute position table.

    model: a BERT, RoBERTa or GPT-2 transformers model (any head), or a PEFT model wrapping one.
    max_positions: positions the model should take (RoBERTa's table gets padding_idx + 1 rows more). Smaller than
        the current number raises; equal changes nothing, so patching twice is harmless.
    sparsity: a `config.hf_flash_sparsity` dict (see `hf_flash.integration.check_sparsity`) to use
        "hf_triton_sparse"; None uses dense "hf_triton".
    tokenizer: its `model_max_length` is set to `max_positions`.
    init: "copy" repeats the pretrained rows (positions the model had keep their rows, so outputs on inputs of the
        original length do not change); "interpolate" stretches them linearly over the new length.
    Under PEFT the new table is left trainable (requires_grad=True) even if PEFT froze the old one: the positions
    past the pretrained length have to be learned. PeftModel.save_pretrained saves adapters only, so either save the
    table yourself or patch before `get_peft_model(..., modules_to_save=["position_embeddings"])` (GPT-2: "wpe").
    Returns `model`.
    """
    _check_max_positions(max_positions)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    hf_model = _transformers_model(model)
    config = hf_model.config
    family = family_of(config)

    if max_positions is not None:
        table = extend_position_embeddings(hf_model, family, max_positions, init)
        if table is not None and hf_model is not model:
            table.weight.requires_grad_(True)
        if tokenizer is not None:
            tokenizer.model_max_length = max_positions

    implementation = ATTN_IMPLEMENTATION if sparsity is None else SPARSE_ATTN_IMPLEMENTATION
    if not hasattr(config, _ORIGINAL_KEY):  # a second patch must not record hf_triton as the original
        setattr(config, _ORIGINAL_KEY, config._attn_implementation)
    if sparsity is not None:
        setattr(config, SPARSITY_CONFIG_KEY, sparsity)
    hf_model.set_attn_implementation(implementation)
    config.attn_implementation = implementation
    return model


def unpatch(model):
    """Restores the attention implementation `model` had before `patch` (sdpa or eager for models loaded with
    `patch_transformers` active). Extended position tables stay: the model may have been trained on them, and
    positions past the pretrained length would otherwise have no embedding. Returns `model`."""
    hf_model = _transformers_model(model)
    config = hf_model.config
    original = getattr(config, _ORIGINAL_KEY, None)
    if original is None and config._attn_implementation not in (ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION):
        return model  # never patched
    for key in (_ORIGINAL_KEY, SPARSITY_CONFIG_KEY, "attn_implementation"):
        if hasattr(config, key):
            delattr(config, key)
    hf_model.set_attn_implementation(original or "sdpa")
    return model


# ---------------------------------------------------------------------------------------------
# Class level
# ---------------------------------------------------------------------------------------------

_settings = None   # the last patch_transformers() arguments; None when inactive
_loading = 0       # > 0 inside from_pretrained, whose checkpoint fixes the table size at construction
_originals = {}


def _patched_init(self, config, *args, **kwargs):
    if _settings is not None and getattr(config, "model_type", None) in REGISTRY \
            and config._attn_implementation is None:  # an explicit attn_implementation wins
        sparsity = _settings["sparsity"]
        if sparsity is not None:
            setattr(config, SPARSITY_CONFIG_KEY, sparsity)
        config._attn_implementation = ATTN_IMPLEMENTATION if sparsity is None else SPARSE_ATTN_IMPLEMENTATION
        config.attn_implementation = config._attn_implementation  # saved, so a reload picks it again
        max_positions = _settings["max_positions"]
        if not _loading and max_positions is not None:
            # Built from a config: make the table the right size from the start (randomly initialised anyway).
            rows = max_positions + REGISTRY[config.model_type].position_offset(config)
            config.max_position_embeddings = max(config.max_position_embeddings, rows)
    _originals["__init__"](self, config, *args, **kwargs)


def _patched_from_pretrained(cls, *args, **kwargs):
    global _loading
    _loading += 1
    try:
        result = _originals["from_pretrained"].__func__(cls, *args, **kwargs)
    finally:
        _loading -= 1
    model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True gives (model, info)
    settings = _settings
    if settings is not None and getattr(model.config, "model_type", None) in REGISTRY \
            and model.config._attn_implementation in (ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION):
        family = REGISTRY[model.config.model_type]
        current = model.config.max_position_embeddings - family.position_offset(model.config)
        max_positions = settings["max_positions"]
        if max_positions is not None and max_positions > current:
            extend_position_embeddings(model, family, max_positions)
    return result


def patch_transformers(*, max_positions=None, sparsity=None):
    """Class-level patch: BERT, RoBERTa and GPT-2 models (any `config.model_type` in the registry) built afterwards,
    by `from_pretrained`, `from_config` or their constructors, use "hf_triton" (or "hf_triton_sparse" with
    `sparsity`); with `max_positions`, `from_pretrained` extends shorter pretrained tables by copying (init="copy")
    and models built from a config get a table that large. A model given an explicit `attn_implementation` is left
    alone entirely (attention and positions).
    Calling it again replaces the settings; `unpatch_transformers()` turns it off."""
    global _settings
    _check_max_positions(max_positions)
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    _settings = {"max_positions": max_positions, "sparsity": sparsity}
    if not _originals:
        _originals["__init__"] = PreTrainedModel.__init__
        _originals["from_pretrained"] = PreTrainedModel.__dict__["from_pretrained"]
        PreTrainedModel.__init__ = functools.wraps(_originals["__init__"])(_patched_init)
        PreTrainedModel.from_pretrained = classmethod(
            functools.wraps(_originals["from_pretrained"].__func__)(_patched_from_pretrained))


def unpatch_transformers():
    """Undoes `patch_transformers` for models built afterwards (models already built keep their attention)."""
    global _settings
    _settings = None
    if _originals:
        PreTrainedModel.__init__ = _originals.pop("__init__")
        PreTrainedModel.from_pretrained = _originals.pop("from_pretrained")


__all__ = ["Family", "INITS", "REGISTRY", "extend_position_embeddings", "extended_table", "family_of", "patch",
           "patch_transformers", "unpatch", "unpatch_transformers"]
