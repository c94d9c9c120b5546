"""Which model families `hf_flash.patch` knows, keyed by `config.model_type`: adding a family is one entry.

Attention needs nothing per family (any model that dispatches through transformers' AttentionInterface takes
"hf_triton"); the entry says where the absolute position table lives and how many leading rows are not positions.
"""

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Family:
    position_embedding: str  # the nn.Embedding's module name, as it ends in `model.named_modules()`
    # Leading table rows that are not positions: RoBERTa counts positions from padding_idx + 1.
    position_offset: Callable = field(default=lambda config: 0)
    # Position-sized buffers beside the table ("position_ids" is rebuilt as arange, others as zeros).
    buffers: tuple = ()


_BERT_BUFFERS = ("position_ids", "token_type_ids")

REGISTRY = {
    "bert": Family("embeddings.position_embeddings", buffers=_BERT_BUFFERS),
    "roberta": Family("embeddings.position_embeddings", lambda config: config.pad_token_id + 1, _BERT_BUFFERS),
    "gpt2": Family("wpe"),
}


def family_of(config):
    """The registry entry for `config.model_type`, or a ValueError that lists the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(f"hf_flash.patch does not support model_type {model_type!r}; supported: "
                         f"{sorted(REGISTRY)}. Other models that use transformers' AttentionInterface can still "
                         f"load with attn_implementation=\"hf_triton\" after `import hf_flash`.")
    return REGISTRY[model_type]


def position_capacity(config):
    """Positions `config`'s absolute position table encodes, or None for a model_type the registry does not know
    (its positions cannot be extended by hf_flash.patch)."""
    family = REGISTRY.get(getattr(config, "model_type", None))
    if family is None:
        return None
    return config.max_position_embeddings - family.position_offset(config)
