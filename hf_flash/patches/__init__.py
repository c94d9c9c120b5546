"""`hf_flash.patch(model)`, `hf_flash.unpatch(model)`, `hf_flash.patch_transformers()` and
`hf_flash.train_positions(peft_model)`.

What a patch writes into `model.config`: `max_position_embeddings` (the extended table, whose weights are in the
checkpoint), `hf_flash_pretrained_positions` (the table size before the first extension), `hf_flash_sparsity` for
the sparse path, and `hf_flash_original_attn_implementation` for `unpatch`. It never writes `attn_implementation`:
a config that names "hf_triton" cannot be loaded where hf_flash is not installed (transformers rejects the
unknown name), and a fine-tuned model must load anywhere. So a saved model reloads with the model's default
attention (sdpa or eager), with or without hf_flash; ask for ours when loading:
`from_pretrained(path, attn_implementation="hf_triton")` after `import hf_flash`. The position buffers
(`position_ids`, `token_type_ids`) are non-persistent and rebuilt at the new size, so loading reports no missing or
unexpected keys.
"""

import functools

from transformers import PreTrainedModel

from .. import ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION
from ..integration import SPARSITY_CONFIG_KEY, check_sparsity
from .positions import INITS, extend_position_embeddings, extended_table, position_table
from .registry import REGISTRY, Family, family_of, position_capacity

_ORIGINAL_KEY = "hf_flash_original_attn_implementation"
_PRETRAINED_POSITIONS_KEY = "hf_flash_pretrained_positions"
_OURS = (ATTN_IMPLEMENTATION, SPARSE_ATTN_IMPLEMENTATION)


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


def _is_peft(model):
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def train_positions(peft_model):
    """Makes a PEFT (e.g. LoRA) model train its absolute position table and save it with the adapter.

    PEFT freezes every base weight, so a table that `hf_flash.patch` extended before `get_peft_model` would keep
    its copied rows for the whole run, and `PeftModel.save_pretrained` saves adapters only. This wraps the table in
    PEFT's `ModulesToSaveWrapper` for the active adapter and adds its name to that adapter's `modules_to_save`, as
    `get_peft_model(..., LoraConfig(modules_to_save=[...]))` would have: the copy trains, `save_pretrained` writes
    it into the adapter, `merge_and_unload` keeps it. `hf_flash.patch(peft_model, max_positions=...)` calls this
    itself, so only the order "patch, then get_peft_model" needs it. Idempotent. Reload the adapter onto a base
    model patched to the same `max_positions`:

        base = AutoModel...from_pretrained(original); hf_flash.patch(base, max_positions=4096)
        model = PeftModel.from_pretrained(base, adapter_dir)

    Returns `peft_model`.
    """
    if not _is_peft(peft_model):
        raise TypeError(f"train_positions takes a PEFT model (get_peft_model's result), got "
                        f"{type(peft_model).__name__}; a plain transformers model trains its table already")
    from peft.utils import ModulesToSaveWrapper
    hf_model = _transformers_model(peft_model)
    family = family_of(hf_model.config)
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    name = family.position_embedding.rpartition(".")[2]  # PEFT matches modules_to_save by name suffix
    if config.modules_to_save is None:
        config.modules_to_save = []
    if name not in config.modules_to_save:
        config.modules_to_save = [*config.modules_to_save, name]
    parent, attr, table = position_table(hf_model, family)
    if isinstance(table, ModulesToSaveWrapper):
        if adapter not in table.modules_to_save:
            table.update(adapter)
    else:
        table = ModulesToSaveWrapper(table, adapter)
        setattr(parent, attr, table)
    table.set_adapter(adapter)
    table.modules_to_save[adapter].weight.requires_grad_(True)
    return peft_model


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
    Under PEFT, an extended table (now or by an earlier patch) is trained and saved with the adapter
    (`train_positions`): positions past the pretrained length have to be learned. Patching before
    `get_peft_model` instead, call `hf_flash.train_positions(peft_model)` afterwards (or patch the PEFT model
    again: it is cheap once the table is extended).
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
        before = position_capacity(config)
        if extend_position_embeddings(hf_model, family, max_positions, init) is not None \
                and not hasattr(config, _PRETRAINED_POSITIONS_KEY):
            setattr(config, _PRETRAINED_POSITIONS_KEY, before)
        if tokenizer is not None:
            tokenizer.model_max_length = max_positions
    if _is_peft(model) and position_capacity(config) > getattr(config, _PRETRAINED_POSITIONS_KEY,
                                                                position_capacity(config)):
        train_positions(model)

    implementation = ATTN_IMPLEMENTATION if sparsity is None else SPARSE_ATTN_IMPLEMENTATION
    # Loaded with attn_implementation="hf_triton", the model had no attention of its own before hf_flash: record
    # nothing, and unpatch restores transformers' default.
    if not hasattr(config, _ORIGINAL_KEY) and config._attn_implementation not in _OURS:
        setattr(config, _ORIGINAL_KEY, config._attn_implementation)
    if sparsity is not None:
        setattr(config, SPARSITY_CONFIG_KEY, sparsity)
    hf_model.set_attn_implementation(implementation)
    return model


def default_attn_implementation(model):
    """The attention transformers gives `model` when none is asked for: sdpa where the model supports it."""
    return "sdpa" if getattr(_transformers_model(model), "_supports_sdpa", False) else "eager"


def unpatch(model):
    """Restores the attention `model` had before hf_flash: the one it ran before the first `patch`, or, for a model
    that ran hf_flash's attention from the start (loaded or built with attn_implementation="hf_triton", or under
    `patch_transformers`), transformers' default for it (sdpa where supported, else eager). Removes the sparsity
    layout from the config. Extended position tables stay: the model may have been trained on them, and positions
    past the pretrained length would otherwise have no embedding. A model not on hf_flash's attention is left
    alone. Returns `model`."""
    hf_model = _transformers_model(model)
    config = hf_model.config
    if config._attn_implementation not in _OURS:
        return model
    original = getattr(config, _ORIGINAL_KEY, None)
    for key in (_ORIGINAL_KEY, SPARSITY_CONFIG_KEY):
        if hasattr(config, key):
            delattr(config, key)
    hf_model.set_attn_implementation(original if original not in (None, *_OURS) else default_attn_implementation(model))
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
            if not hasattr(model.config, _PRETRAINED_POSITIONS_KEY):
                setattr(model.config, _PRETRAINED_POSITIONS_KEY, current)
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


__all__ = ["Family", "INITS", "REGISTRY", "default_attn_implementation", "extend_position_embeddings", "extended_table",
           "family_of", "patch", "patch_transformers", "position_capacity", "position_table", "train_positions",
           "unpatch", "unpatch_transformers"]
