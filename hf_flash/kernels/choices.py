"""Which tile config a kernel call runs with: a timed search when asked, else a shipped choice or a rule.

The autotuner's search compiles and times every candidate (tuning._prune) for each new tuning key (head dim,
dtype, features, power-of-two length buckets): seconds per kernel, again in every process. So:
- HF_FLASH_AUTOTUNE=1 runs the search (settings.AUTOTUNE). Its choices are saved through Triton's own autotuning
  disk cache (cache_results, under TRITON_CACHE_DIR, default ~/.triton/cache), keyed by Triton's version, the
  compile target, the kernel's source, the candidates, the tuning key and, added here, the GPU's name and hf_flash's
  version; a later process reads the choice instead of timing again.
- Otherwise no call times anything. The config comes from the table shipped for the GPU's architecture
  (tuned/sm90.json, tuned/sm80.json: written by tools/ship_tuning.py from searches on that GPU): the entry for
  this tuning key, else the entry that differs from it only in the length buckets and is nearest to them, else
  the same for the other 16-bit dtype (fp16 for bf16 and back, see _TWIN); where none exists (or
  under the interpreter), the first candidate that fits (tuning._prune's order puts the tiles
  measured best first). An entry that is not among the call's candidates (a table older than the candidate
  list) is never used.
"""

import functools
import json
import logging
import math
import threading
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner

from . import settings
from .tuning import _PRUNE, _prune, _time_config

_log = logging.getLogger("hf_flash")
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_BUCKETS = ("SEQ_Q_BUCKET", "SEQ_K_BUCKET")


class _Autotuner(Autotuner):
    """Triton's autotuner, whose disk cache is also keyed by the GPU's name (the compile target, sm_90, is shared
    by the H100 and the H200, and their best tiles differ) and by hf_flash's version (Triton's key holds the kernel's
    source, not the host code that prepares its arguments)."""

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        from .. import __version__
        named = (*tuning_key, torch.cuda.get_device_name(), f"hf_flash {__version__}")
        found = super().check_disk_cache(named, configs, bench_fn)
        if found:  # Triton stored the choice under the named key; run() reads it under its own
            self.cache[tuning_key] = self.cache.pop(named)
        return found


def autotune(configs, key, reset_to_zero=None):
    """triton.autotune with hf_flash's pruning, timing (tuning._time_config) and persisted choices."""
    def decorator(fn):
        return _Autotuner(fn, fn.arg_names, configs, key, reset_to_zero, None, prune_configs_by=_PRUNE,
                          do_bench=_time_config, cache_results=True)
    return decorator


def config_record(config):
    """A Config as the JSON object the tables hold."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            "maxnreg": config.maxnreg}


def _same(config, record):
    return config_record(config) == {**record, "maxnreg": record.get("maxnreg")}


@functools.lru_cache(maxsize=None)
def _table(arch):
    """{kernel name: [(dtype, key dict, config record)]} shipped for arch ("sm90"), {} when none is shipped."""
    path = TUNED_DIR / f"{arch}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        shipped = json.load(f)
    table = {}
    for entry in shipped["entries"]:
        table.setdefault(entry["kernel"], []).append((entry["dtype"], entry["key"], entry["config"]))
    return table


def _arch(device):
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def tuning_key(kernel, kwargs):
    """{name: value} of the kernel's tuning key for these arguments."""
    return {name: kwargs[name] for name in kernel.keys}


def choose(kernel, kwargs):
    """The config a call runs with when nothing is timed (see the module docstring)."""
    candidates = _prune(kernel.configs, kwargs)
    if settings.INTERPRET:
        return candidates[0]
    entries = _table(_arch(kwargs["Q"].device)).get(kernel.base_fn.__name__, ())
    dtype, key = str(kwargs["Q"].dtype).removeprefix("torch."), tuning_key(kernel, kwargs)
    return (nearest(entries, dtype, key, candidates) or nearest(entries, _TWIN.get(dtype), key, candidates)
            or candidates[0])


# fp16 and bf16 tiles have the same sizes and MMA rate, so a table may hold one of them for a key (tools/ship_tuning.py
# searches bf16); `bench_kernels.py --vs-search` times fp16 rows on bf16's entries against a search of their own
_TWIN = {"float16": "bfloat16", "bfloat16": "float16"}


def nearest(entries, dtype, key, candidates):
    """The candidate an entry names for (dtype, key), or for the same key but the nearest length buckets (in
    factors of two, summed over queries and keys); None when no entry matches."""
    rest = {name: value for name, value in key.items() if name not in _BUCKETS}
    best, best_distance = None, math.inf
    for entry_dtype, entry_key, record in entries:
        if entry_dtype != dtype or {n: v for n, v in entry_key.items() if n not in _BUCKETS} != rest:
            continue
        config = next((c for c in candidates if _same(c, record)), None)
        if config is None:
            continue
        distance = sum(abs(math.log2(entry_key[n] / key[n])) for n in _BUCKETS if n in key)
        if distance < best_distance:
            best, best_distance = config, distance
    return best


_said = set()


def say_once(what, message):
    """Logs message at INFO on the "hf_flash" logger, once per process for each `what`. Without any logging
    configuration the line still reaches stderr (a handler of its own, at INFO), since it explains a wait the user
    sees; configure the "hf_flash" logger (e.g. setLevel(logging.WARNING)) to silence it."""
    if what in _said:
        return
    _said.add(what)
    if not _log.handlers and not logging.getLogger().handlers and _log.level == logging.NOTSET:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("hf_flash: %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
    _log.info(message)


def announce_search():
    say_once("search", "HF_FLASH_AUTOTUNE=1: timing the tile configs of each new shape bucket (once: the choices "
                       f"are saved under {triton.knobs.cache.dir} for later processes)")


class CompileNotice:
    """`with CompileNotice(describe):` around a call that may compile: if it is still running after a second, says
    once per process that the kernels are compiling (describe() names the call) and why the wait happens once."""

    def __init__(self, describe, after_s=1.0):
        self._timer = threading.Timer(after_s, lambda: say_once(
            "compile", f"compiling attention kernels for {describe()}: the first call of each new shape bucket or "
                       "feature set compiles for a few seconds; later calls, and later processes, reuse them"))
        self._timer.daemon = True

    def __enter__(self):
        if not settings.INTERPRET and "compile" not in _said:
            self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def describe_call(kernel, kwargs):
    """A short description of a call for the compile notice, e.g. "the forward (bfloat16, head dim 64, causal)"."""
    names = {"_attn_fwd": "the forward", "_attn_bwd_dq": "the backward (dQ)", "_attn_bwd_dkdv": "the backward (dK/dV)"}
    flags = [text for name, text in (("HAS_RIGHT", "causal or windowed"), ("HAS_KPM", "padding"),
                                     ("IS_VARLEN", "packed"), ("DROPOUT", "dropout"), ("SPARSE", "block-sparse"),
                                     ("HAS_ALIBI", "ALiBi")) if kwargs.get(name)]
    details = [str(kwargs["Q"].dtype).removeprefix("torch."), f"head dim {kwargs['HEAD_DIM']}", *flags]
    return f"{names.get(kernel.base_fn.__name__, kernel.base_fn.__name__)} ({', '.join(details)})"
