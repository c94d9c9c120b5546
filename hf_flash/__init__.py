"""hf_flash: exact, IO-aware attention in Triton for Hugging Face Transformers."""

from . import layouts
from .interface import block_sparse_attn_func, flash_attn_func, flash_attn_varlen_func
from .layouts import BlockSparseLayout
from .reference import attention_reference

__version__ = "0.1.0"

ATTN_IMPLEMENTATION = "hf_triton"
SPARSE_ATTN_IMPLEMENTATION = "hf_triton_sparse"
# Registers both names with transformers (AttentionInterface + AttentionMaskInterface); needs the names above.
from . import integration  # noqa: E402
# patch / unpatch / patch_transformers need the registered names.
from .patches import patch, patch_transformers, train_positions, unpatch, unpatch_transformers  # noqa: E402

__all__ = [
    "BlockSparseLayout", "layouts", "block_sparse_attn_func", "flash_attn_func", "flash_attn_varlen_func", "attention_reference",
    "ATTN_IMPLEMENTATION", "SPARSE_ATTN_IMPLEMENTATION", "patch", "patch_transformers", "train_positions", "unpatch",
    "unpatch_transformers",
]
