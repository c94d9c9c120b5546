"""Write the tile configs shipped for this GPU's architecture (hf_flash/kernels/tuned/smXY.json) from searches.

Runs the autotuner's timed search (HF_FLASH_AUTOTUNE=1 semantics) on a grid of calls, forward and backward, and
writes what it chose for every tuning key it met; with HF_FLASH_AUTOTUNE=0 those keys then run the same configs
without timing anything (hf_flash/kernels/choices.py). Entries already in the file for keys the run did not meet
are kept. On a CUDA GPU, from the repository root:

    python tools/ship_tuning.py                        # the default grid (dense benchmark grid + fine-tuning shapes)
    python tools/ship_tuning.py --headdims 64 --seqlens 512 1024 --out /tmp/sm90.json
    python tools/ship_tuning.py --jobs 15              # compile the candidates in 15 processes first

Compiling dominates a search (seconds per candidate, one at a time, on the CPU). With --jobs N, N processes first
compile every candidate of the grid's calls into Triton's cache without timing anything; the search in this process
then times them with nothing left to compile.
"""

import argparse
import itertools
import json
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


def calls(args):
    """(description, function running one forward and backward) over the grid."""
    for d, n, causal, dtype, features in itertools.product(args.headdims, args.seqlens, (False, True), args.dtypes,
                                                           args.features):
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
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--features", nargs="+", default=["", "dropout", "padding", "padding+dropout"],
                   help="'' (none), dropout, padding, or both joined by '+'")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen per call")
    p.add_argument("--out", type=Path, default=None, help="default: hf_flash/kernels/tuned/<arch>.json")
    p.add_argument("--jobs", type=int, default=1, help="processes that compile the candidates before the search")
    p.add_argument("--compile-slice", default=None, help=argparse.SUPPRESS)  # "i/N": a --jobs child's share
    args = p.parse_args()
    if not torch.cuda.is_available() or kernels.settings.INTERPRET:
        raise SystemExit("ship_tuning.py needs a CUDA GPU and no TRITON_INTERPRET")
    if args.compile_slice is not None:
        index, count = map(int, args.compile_slice.split("/"))
        kernels.settings.AUTOTUNE = False
        _compile_candidates_first()
        for i, (what, run) in enumerate(calls(args)):
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
    for what, run in calls(args):
        t0 = time.time()
        run()
        print(f"{what}: {time.time() - t0:.1f} s", flush=True)
    for (kernel, dtype, *values), config in kernels.launch._CHOSEN.items():
        key = dict(zip(kernel.keys, values))
        name, dtype = kernel.base_fn.__name__, str(dtype).removeprefix("torch.")
        entries[(name, dtype, json.dumps(key, sort_keys=True))] = {
            "kernel": name, "dtype": dtype, "key": key, "config": choices.config_record(config)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(), "arch": arch, "triton": triton.__version__, "torch": torch.__version__,
        "hf_flash": hf_flash.__version__, "command": " ".join(sys.argv),
        "entries": sorted(entries.values(), key=lambda e: (e["kernel"], e["dtype"], json.dumps(e["key"]))),
    }, indent=1) + "\n")
    print(f"{len(entries)} entries in {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
