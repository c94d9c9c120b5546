"""How long a cold first call compiles, without a GPU: compiles the forward, dQ and dK/dV kernels of one variant for
sm_90 into an empty Triton cache, one after the other and then on three threads at once (as a training call's first
step does: the forward on the calling thread, the backward's two on kernels.ahead's workers), and prints the
seconds of each, with the tile the rule picks first (tuning._prune; what runs with nothing timed and no table entry).
C launchers are not built here (no CUDA driver); each adds ~0.3 s (gcc -O3), built on the same threads.

    pip install --target /tmp/t36 triton==3.6.0 --no-deps     # the GPU's Triton, apart
    PYTHONPATH=/tmp/t36 python tools/compile_times.py --headdim 64 128 --dropout 0 1

Compile time is CPU time: a GPU host's cores give other figures; compare rows of one run.
"""
import argparse
import tempfile
import threading
import time

from sass_counts import BASE, KERNELS, compile_sm90  # first: it makes Triton compile for real, not interpret

import torch
import triton

from hf_flash.kernels.tuning import _prune


def first_candidate(name, consts):
    """The config the rule runs first for 16-bit inputs with these constexprs."""
    return _prune(KERNELS[name].configs, {"Q": torch.empty(0, dtype=torch.bfloat16), **consts})[0]


def compile_one(name, consts):
    config = first_candidate(name, consts)
    start = time.perf_counter()
    compile_sm90(KERNELS[name], {**consts, **config.kwargs}, config.num_warps, config.num_stages)
    return time.perf_counter() - start


def variant(headdim, dropout, causal):
    """The constexprs of a training call's three launches (with dropout, dQ is summed with atomics in dK/dV)."""
    common = {**BASE, "HEAD_DIM": headdim, "BLOCK_D": triton.next_power_of_2(headdim), "DROPOUT": dropout,
              "HAS_RIGHT": causal}
    return {"fwd": common, "dq": {**common, "DELTA_ONLY": dropout}, "dkdv": {**common, "ATOMIC_DQ": dropout}}


def fresh_cache():
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="compile_times_")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--headdim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dropout", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    p.add_argument("--causal", type=int, choices=(0, 1), default=1)
    args = p.parse_args()
    fresh_cache()
    compile_one("dq", variant(32, False, False)["dq"])  # loads the compiler: not part of any row
    print("| head dim | dropout | fwd s | dQ s | dK/dV s | one after the other s | three threads at once s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for headdim in args.headdim:
        for dropout in args.dropout:
            consts = variant(headdim, bool(dropout), bool(args.causal))
            fresh_cache()
            each = {name: compile_one(name, consts[name]) for name in KERNELS}
            fresh_cache()
            start = time.perf_counter()
            threads = [threading.Thread(target=compile_one, args=(name, consts[name])) for name in KERNELS]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            together = time.perf_counter() - start
            print(f"| {headdim} | {dropout} | {each['fwd']:.2f} | {each['dq']:.2f} | {each['dkdv']:.2f} | "
                  f"{sum(each.values()):.2f} | {together:.2f} |", flush=True)


if __name__ == "__main__":
    main()
