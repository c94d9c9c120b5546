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


def extend_position_embeddings(model, family, max_positions, init="copy"):
    """Replaces the family's position table in `model` (a transformers model, maybe with PEFT layers injected) by
    one with `max_positions` positions, grows the position-sized buffers beside it and updates the config.
    Returns the new nn.Embedding, or None when the table already has `max_positions` positions."""
    matches = [name for name, _ in model.named_modules()
               if name == family.position_embedding or name.endswith("." + family.position_embedding)]
    if len(matches) != 1:
        raise ValueError(f"expected one position table named '*{family.position_embedding}' in "
                         f"{type(model).__name__}, found {matches}")
    parent_name, _, attr = matches[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"{matches[0]} is a {type(old).__name__}, not an nn.Embedding (wrapped by PEFT's "
                        f"modules_to_save?); call hf_flash.patch before wrapping it")
    offset = family.position_offset(model.config)
    current = old.num_embeddings - offset
    if max_positions < current:
        raise ValueError(f"max_positions={max_positions} is smaller than the {current} positions the model "
                         f"already has; position tables are only extended, never truncated")
    if max_positions == current:
        return None
    rows = max_positions + offset
    with torch.no_grad():
        weight = extended_table(old.weight.detach(), rows, offset, init)
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
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
