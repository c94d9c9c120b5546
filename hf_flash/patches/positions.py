"""Extending an absolute position-embedding table (BERT / RoBERTa / GPT-2) to more positions."""

import math

import torch
from torch import nn

INITS = ("copy", "interpolate")


def extended_table(weight, rows, offset=0, init="copy"):
    """`weight` (old_rows, hidden) grown to (rows, hidden). The first `offset` rows (RoBERTa's padding rows) are
    kept; the position rows after them are either repeated end to end ("copy", as Longformer initialised RoBERTa:
    the first old_rows positions are unchanged) or linearly interpolated over the new length ("interpolate": the
    first and last rows are kept, the pretrained rows in between are stretched, so every position moves)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    head, old = weight[:offset], weight[offset:]
    n_new = rows - offset
    if init == "copy":
        new = old.repeat(math.ceil(n_new / old.shape[0]), 1)[:n_new]
    else:
        # F.interpolate wants (batch, channels, length); compute in fp32 so bf16 tables interpolate accurately.
        new = nn.functional.interpolate(old.float().T[None], size=n_new, mode="linear", align_corners=True)[0].T
    return torch.cat([head, new.to(weight.dtype)])


def _grown(old, rows, offset, init):
    """A new nn.Embedding holding `old`'s table extended to `rows` rows, with `old`'s dtype, device, mode and
    requires_grad."""
    with torch.no_grad():
        weight = extended_table(old.weight.detach(), rows, offset, init)
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    return new


def _peft_copies(module):
    """PEFT's ModulesToSaveWrapper (the table listed in `modules_to_save`) holds the frozen original and one trained
    copy per adapter; returns {attribute path: embedding} for all of them, or None for a plain module."""
    if not (hasattr(module, "original_module") and hasattr(module, "modules_to_save")):
        return None
    copies = {"original_module": module.original_module}
    copies.update({f"modules_to_save.{name}": copy for name, copy in module.modules_to_save.items()})
    return copies


def position_table(model, family):
    """(parent module, attribute name, the table module) of the family's position table in `model`."""
    matches = [name for name, _ in model.named_modules()
               if name == family.position_embedding or name.endswith("." + family.position_embedding)]
    if len(matches) != 1:
        raise ValueError(f"expected one position table named '*{family.position_embedding}' in "
                         f"{type(model).__name__}, found {matches}")
    parent_name, _, attr = matches[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, attr, getattr(parent, attr)


def extend_position_embeddings(model, family, max_positions, init="copy"):
    """Replaces the family's position table in `model` (a transformers model, maybe with PEFT layers injected) by
    one with `max_positions` positions, grows the position-sized buffers beside it and updates the config. A table
    that PEFT wraps for `modules_to_save` has its original and each adapter's trained copy extended alike.
    Returns the new nn.Embedding (the wrapper, under PEFT), or None when the table already has `max_positions`
    positions."""
    parent, attr, old = position_table(model, family)
    copies = _peft_copies(old)
    embeddings = list(copies.values()) if copies else [old]
    if not all(isinstance(e, nn.Embedding) for e in embeddings):
        raise TypeError(f"{family.position_embedding} is a {type(old).__name__}, not an nn.Embedding")
    offset = family.position_offset(model.config)
    current = embeddings[0].num_embeddings - offset
    if max_positions < current:
        raise ValueError(f"max_positions={max_positions} is smaller than the {current} positions the model "
                         f"already has; position tables are only extended, never truncated")
    if max_positions == current:
        return None
    rows = max_positions + offset
    if copies:
        for path, embedding in copies.items():
            owner_path, _, name = path.rpartition(".")
            owner = old.get_submodule(owner_path) if owner_path else old
            setattr(owner, name, _grown(embedding, rows, offset, init))
        new = old
    else:
        new = _grown(old, rows, offset, init)
        setattr(parent, attr, new)

    for name in family.buffers:
        buffer = getattr(parent, name, None)
        if buffer is None:
            continue
        # Assigning to an existing buffer name keeps it a buffer, and keeps it non-persistent (not in checkpoints).
        if name == "position_ids":
            setattr(parent, name, torch.arange(rows, device=buffer.device, dtype=buffer.dtype).expand(1, -1))
        else:
            setattr(parent, name, buffer.new_zeros(1, rows))
    # GPT-2's config maps max_position_embeddings to n_positions, so one attribute covers every family.
    model.config.max_position_embeddings = rows
    return new
