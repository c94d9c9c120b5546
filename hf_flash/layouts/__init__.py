"""Block-sparse attention layouts: which (query-block, key-block) tiles the kernels visit.

A `BlockSparseLayout` (layout.py) is the CSR description the block-sparse kernels read (FlexAttention's
BlockMask convention), plus an optional element-level `mask_mod` applied inside partial blocks. The builders
(builders.py) return layouts that compose with `|` and `&`:

    local(256, 4096) | global_tokens(64, 4096)      # sliding window ±256 tokens + 64 global tokens
    local(256, 16384) & causal(16384)               # causal sliding window of 256 tokens
    from_mask_mod(lambda b, h, q, kv: (q // 512) == (kv // 512), 4096)   # any element predicate

mask_mods.py holds the element predicates and their combinators; _blocks.py the block-level machinery (CSR
lists, block classification, element rules); _checks.py the argument checks.

Pure PyTorch: everything is built on the requested device with vectorised ops (no Python loop
over blocks), so a layout is cheap enough to build per batch.
"""

from .builders import bigbird, butterfly, causal, from_dense, from_mask_mod, global_tokens, local
from .layout import BlockSparseLayout
from .mask_mods import (MaskMod, and_masks, causal_mask_mod, global_tokens_mask_mod, or_masks,
                        sliding_window_mask_mod)

__all__ = [
    "BlockSparseLayout", "MaskMod",
    "causal", "local", "global_tokens", "bigbird", "butterfly", "from_dense", "from_mask_mod",
    "and_masks", "or_masks", "causal_mask_mod", "sliding_window_mask_mod", "global_tokens_mask_mod",
]
