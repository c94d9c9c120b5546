"""The kernels' settings: two read from the environment at import, two private switches, and the head-dim limit.

Host code in the other modules reads each one as an attribute of this module when it runs (settings._ATOMIC_DQ,
settings.INTERPRET), so that setting one here, or monkeypatching it in a test, reaches every reader. Jit code
reads INTERPRET as a constexpr global of its own module, fixed at import like the interpreter choice itself.
"""

import os

import triton.language as tl

# HF_FLASH_AUTOTUNE (default 1): time the candidate tiles for each new tuning key, the choice saved on disk for later
# processes; 0: time nothing, take the shipped or rule-picked config (choices.py; the test suite runs so).
AUTOTUNE = os.environ.get("HF_FLASH_AUTOTUNE", "1") not in ("", "0")
# The backward's dQ: "dropout" (default) sums it in the dK/dV kernel with fp32 atomics when dropout is on, so the
# keep mask is drawn once instead of twice, as in FlashAttention-2 (H200, p = 0.1: 5-11% faster backward; without
# dropout atomics gain nothing); "0" always a dQ kernel of its own (two launches), "1" atomics always.
# deterministic=True, or torch.use_deterministic_algorithms(True), keeps the dQ kernel whatever this says.
# A private override for tests and tools (tools/), not a user setting: call launch.reset_tuning() after changing it.
_ATOMIC_DQ = "dropout"
# The dK/dV kernel's tile orientation (QK_ROWS, a tuned parameter; see _bwd_dkdv_inner): (keys, queries) or, like
# the forward, (queries, keys). H200, B4 N4096 d64 p = 0.1: (queries, keys) 0.84-0.85x the backward time, since the
# dropout mask is then drawn in place; but 1.15x at d128 with dropout and 1.05-1.24x on every shape without dropout.
# So "dropout" (default): with dropout the tuner times both orientations, without it only (keys, queries);
# "0" never (queries, keys); "1" only (queries, keys); "tune" both always. Private, like _ATOMIC_DQ.
_DKDV_ROWS = "dropout"
# The interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors for testing. It is read at import time
# because triton.jit chooses between compiling and interpreting when it decorates. A tl.constexpr, so that jit
# functions may read it as a global (host code reads it as a bool through bool()).
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

MAX_HEADDIM = 256
