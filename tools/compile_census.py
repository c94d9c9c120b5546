"""Which kernel variants a run compiles: runs a Python script with Triton's JIT hooks installed, then prints each
kernel's variants (one per distinct set of constexprs, tile config and argument specialisations), the seconds each
took to compile or to load from Triton's disk cache, and what tells the variants of one kernel apart.

A Triton kernel compiles once per variant: its constexprs (hf_flash's feature flags and tile), and for each
integer argument whether it is 1 or a multiple of 16, and for each pointer whether it is 16-byte aligned. So a
fine-tune meets a new variant for each feature set (padding, dropout in training, none in evaluation), tile the
tuner or table picks (per length bucket), and ragged length. On a CUDA GPU, from the repository root:

    python tools/compile_census.py --out /tmp/census.json examples/finetune_classification.py --max-length 1024
"""

import argparse
import json
import runpy
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import triton

_lock = threading.Lock()
_started = {}  # (kernel name, repr) -> perf_counter at the cache hook
_variants = []  # one dict per compiled or loaded variant, in order


def _name(fn):
    return fn.jit_function.fn.__name__ if hasattr(fn, "jit_function") else fn.name


def _before(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    with _lock:
        _started[(_name(fn), repr)] = time.perf_counter()
    return False  # compile as usual


def _after(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    seconds = time.perf_counter() - _started.pop((_name(fn), repr), time.perf_counter())
    params = [p.name for p in fn.jit_function.params]
    specialised = {}
    for path, attrs in compile["configs"][0].items():
        specialised[params[path[0]]] = "+".join(f"{a}={v}" for a, v in attrs)
    constants = {params[path[0]]: (v.value if hasattr(v, "value") else v)
                 for path, v in compile["constants"].items() if isinstance(path, tuple)}
    with _lock:
        _variants.append({"kernel": _name(fn), "seconds": round(seconds, 3), "num_warps": compile["num_warps"],
                          "num_stages": compile["num_stages"], "constants": _plain(constants),
                          "specialised": specialised})


def _plain(values):
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in values.items()}


def install():
    """Starts recording every variant Triton compiles or loads in this process."""
    triton.knobs.runtime.jit_cache_hook = _before
    triton.knobs.runtime.jit_post_compile_hook = _after


def summary(variants):
    """{kernel: {"variants", "seconds", "differ"}}; differ names each constexpr, config field or specialised
    argument whose value is not the same in all of the kernel's variants."""
    by_kernel = defaultdict(list)
    for v in variants:
        by_kernel[v["kernel"]].append(v)
    out = {}
    for kernel, vs in by_kernel.items():
        fields = defaultdict(set)
        for v in vs:
            flat = {**v["constants"], "num_warps": v["num_warps"], "num_stages": v["num_stages"]}
            names = set(flat) | {n for u in vs for n in u["specialised"]}
            for name in names:
                fields[name].add(str(flat.get(name, v["specialised"].get(name, "-"))))
        out[kernel] = {"variants": len(vs), "seconds": round(sum(v["seconds"] for v in vs), 1),
                       "differ": {name: sorted(values) for name, values in sorted(fields.items()) if len(values) > 1}}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write every variant and the summary as JSON")
    p.add_argument("script", type=Path, help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args()
    install()
    sys.argv = [str(args.script), *args.args]
    sys.path.insert(0, str(args.script.resolve().parent))
    started = time.time()
    try:
        runpy.run_path(str(args.script), run_name="__main__")
    finally:
        table = summary(_variants)
        if args.out:
            args.out.write_text(json.dumps({"command": " ".join(sys.argv), "wall_s": round(time.time() - started, 1),
                                            "summary": table, "variants": _variants}, indent=1) + "\n")
        print(f"\ncompiled or loaded {len(_variants)} kernel variants in {time.time() - started:.0f} s of run")
        print("| kernel | variants | seconds | what differs |\n|---|---|---|---|")
        for kernel, row in table.items():
            differ = "; ".join(f"{n} {'/'.join(v)}" for n, v in row["differ"].items()) or "-"
            print(f"| {kernel} | {row['variants']} | {row['seconds']} | {differ} |")


if __name__ == "__main__":
    main()
