"""Write the tile configs shipped for this GPU's architecture (hf_flash/kernels/tuned/smXY.json) from searches.

Runs the autotuner's timed search (HF_FLASH_AUTOTUNE=1 semantics) on a grid of calls, forward and backward, and
writes what it chose for every tuning key it met; with HF_FLASH_AUTOTUNE=0 those keys then run the same configs
without timing anything (hf_flash/kernels/choices.py). Entries already in the file for keys the run did not meet
are kept. On a CUDA GPU, from the repository root:

    python tools/ship_tuning.py                        # the default grid (dense benchmark grid + fine-tuning shapes)
    python tools/ship_tuning.py --headdims 64 --seqlens 512 1024 --out /tmp/sm90.json
    python tools/ship_tuning.py --jobs 15              # compile the candidates in 15 processes first

Every candidate's time is kept, and the length buckets of one key (same kernel, dtype, head dim and features) share a
config wherever that costs each bucket at most --merge-within (default 2%, about the run-to-run noise) against its
own best: a model whose batches fall in several buckets then compiles one variant instead of one per bucket. Each
entry records its time relative to the best candidate for its bucket ("slower").

Compiling dominates a search (seconds per candidate, one at a time, on the CPU). With --jobs N, N processes first
compile every candidate of the grid's calls into Triton's cache without timing anything; the search in this process
then times them with nothing left to compile.
"""

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_flash  # noqa: E402
import hf_flash.kernels as kernels  # noqa: E402
from hf_flash.kernels import choices, launch, tuning  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def calls(args, one_length=False):
    """(description, function running one forward and backward) over the grid; one_length: only the shortest
    length of each (head dim, causal, dtype, features), which compiles every variant the others need (lengths
    that are multiples of 16 share the compiled kernels)."""
    seqlens = sorted(args.seqlens)[:1] if one_length else args.seqlens
    for d, causal, dtype, features, n in itertools.product(args.headdims, (False, True), args.dtypes, args.features,
                                                           seqlens):
        batch, heads = max(1, args.tokens // n), max(1, 2048 // d)
        def run(d=d, n=n, causal=causal, dtype=DTYPES[dtype], features=features, batch=batch, heads=heads):
            q, k, v = (torch.randn(batch, n, heads, d, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(3))
            kw = {}
            if "padding" in features:  # right padding, lengths in [n/2, n]
                lengths = torch.randint(n // 2, n + 1, (batch,), device="cuda")
                kw["key_padding_mask"] = torch.arange(n, device="cuda")[None] < lengths[:, None]
            if "dropout" in features:
                kw["dropout_p"] = 0.1
            out = hf_flash.flash_attn_func(q, k, v, causal=causal, **kw)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        yield f"d{d} N{n} {'causal' if causal else 'full'} {dtype} {features or 'plain'}", run


def write(out, arch, entries, timings, args):
    """Adds this run's choices (merged across length buckets) to entries and writes the table."""
    merged = merge(timings, args.merge_within)
    for chosen, config in kernels.launch._CHOSEN.items():
        kernel, dtype, *values = chosen
        key = dict(zip(kernel.keys, values))
        name, dtype = kernel.base_fn.__name__, str(dtype).removeprefix("torch.")
        config, slower = merged.get(chosen, (config, None))
        entries[(name, dtype, json.dumps(key, sort_keys=True))] = {
            "kernel": name, "dtype": dtype, "key": key, "config": choices.config_record(config),
            **({"slower": round(slower, 4)} if slower is not None else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(), "arch": arch, "triton": triton.__version__, "torch": torch.__version__,
        "hf_flash": hf_flash.__version__, "command": " ".join(sys.argv),
        "entries": sorted(entries.values(), key=lambda e: (e["kernel"], e["dtype"], json.dumps(e["key"]))),
    }, indent=1) + "\n")


def merge(timings, within):
    """{chosen key: (config, its time / the bucket's best)} where the length buckets of each (kernel, dtype, rest of the
    key) share as few configs as possible, each bucket within `within` of its own best (a greedy cover: the config
    that serves the most remaining buckets first, ties to the least summed slowdown)."""
    groups = {}
    for chosen, times in timings.items():
        kernel, dtype, *values = chosen
        rest = tuple(v for name, v in zip(kernel.keys, values) if name not in choices._BUCKETS)
        groups.setdefault((kernel, dtype, rest), {})[chosen] = times
    out = {}
    for buckets in groups.values():
        ratios = {chosen: {c: t / min(times.values()) for c, t in times.items() if math.isfinite(t)}
                  for chosen, times in buckets.items()}
        left = set(ratios)
        while left:
            configs = {c for chosen in left for c in ratios[chosen]}
            def serves(c):
                return [chosen for chosen in left if ratios[chosen].get(c, math.inf) <= 1 + within]
            best = max(configs, key=lambda c: (len(serves(c)), -sum(ratios[b][c] for b in serves(c)), _record(c)))
            for chosen in serves(best):
                out[chosen] = (best, ratios[chosen][best])
                left.discard(chosen)
    return out


def _record(config):
    """The config as a string: a tie-break that does not depend on the process."""
    return json.dumps(choices.config_record(config), sort_keys=True)


def _compile_candidates_first():
    """Makes every launch in this process compile all its tuning candidates (Triton's warmup: nothing runs or is
    timed), then run the config the rule picks, so that the next call of the grid has its inputs."""
    run_rule = launch._launch

    def compile_then_launch(kernel, rows, block, programs, **kwargs):
        for config in tuning._prune(kernel.configs, kwargs):
            grid = (triton.cdiv(rows, config.kwargs[block]) * programs,)
            try:
                kernel.fn.warmup(grid=grid, **kwargs, **config.all_kwargs())
            except Exception as error:  # a candidate that does not compile: the search skips it too
                print(f"  {kernel.base_fn.__name__} {config}: {type(error).__name__}", flush=True)
        run_rule(kernel, rows, block, programs, **kwargs)

    launch._launch = compile_then_launch  # the launchers look _launch up at each call


def _compile_in_parallel(args):
    """Runs this script with --compile-slice i/N in N processes; returns when all are done."""
    started = time.time()
    children = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--compile-slice", f"{i}/{args.jobs}"])
                for i in range(args.jobs)]
    failed = sum(child.wait() != 0 for child in children)
    print(f"compiled in {args.jobs} processes ({time.time() - started:.0f} s){f'; {failed} failed' if failed else ''}",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--headdims", type=int, nargs="+", default=[32, 64, 128])  # 32: all-MiniLM-L6-v2
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"],
                   help="fp16 calls take the bf16 entries where the table has no fp16 one (choices.choose)")
    p.add_argument("--features", nargs="+", default=["", "dropout", "padding", "padding+dropout"],
                   help="'' (none), dropout, padding, or both joined by '+'")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen per call")
    p.add_argument("--out", type=Path, default=None, help="default: hf_flash/kernels/tuned/<arch>.json")
    p.add_argument("--jobs", type=int, default=1, help="processes that compile the candidates before the search")
    p.add_argument("--merge-within", type=float, default=0.02,
                   help="the length buckets of a key share a config that is at most this much slower for each (0: no)")
    p.add_argument("--compile-slice", default=None, help=argparse.SUPPRESS)  # "i/N": a --jobs child's share
    args = p.parse_args()
    if not torch.cuda.is_available() or kernels.settings.INTERPRET:
        raise SystemExit("ship_tuning.py needs a CUDA GPU and no TRITON_INTERPRET")
    if args.compile_slice is not None:
        index, count = map(int, args.compile_slice.split("/"))
        kernels.settings.AUTOTUNE = False
        _compile_candidates_first()
        for i, (what, run) in enumerate(calls(args, one_length=True)):
            if i % count == index:
                run()
        return
    if args.jobs > 1:
        _compile_in_parallel(args)
    kernels.settings.AUTOTUNE = True
    arch = choices._arch(torch.device("cuda"))
    out = args.out or choices.TUNED_DIR / f"{arch}.json"
    entries = {}
    if out.is_file():
        for entry in json.loads(out.read_text())["entries"]:
            entries[(entry["kernel"], entry["dtype"], json.dumps(entry["key"], sort_keys=True))] = entry
    started = time.time()
    timings = {}  # launch._CHOSEN key -> {config: median ms} of the search that chose it
    tuned = (kernels.forward._attn_fwd, kernels.backward_dq._attn_bwd_dq, kernels.backward_dkdv._attn_bwd_dkdv)
    for kernel in tuned:
        kernel.cache_results = False  # time every key here, never read a choice an earlier search saved
    for what, run in calls(args):
        t0, seen = time.time(), set(kernels.launch._CHOSEN)
        for kernel in tuned:
            kernel.configs_timings = None
        run()
        for chosen in set(kernels.launch._CHOSEN) - seen:
            if chosen[0].configs_timings:  # None where the pruned list had one candidate: nothing was timed
                timings[chosen] = {c: t[0] if isinstance(t, (list, tuple)) else t
                                   for c, t in chosen[0].configs_timings.items()}
        write(out, arch, entries, timings, args)  # after every call: a run cut short keeps what it searched
        print(f"{what}: {time.time() - t0:.1f} s", flush=True)
    print(f"{len(entries)} entries in {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
