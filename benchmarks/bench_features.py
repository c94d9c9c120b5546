"""Sliding-window benchmark: a causal window of 256 keys against plain causal attention, as the length grows.

    python benchmarks/bench_features.py [--out-dir docs/benchmarks]

fp16, 16 heads, d64, batch·seqlen = 16384 (batch 1 from 16K). Forward and backward ms (do_bench medians; the
backward on one retained graph). Key blocks outside the window are skipped, so the windowed time should stay flat
while causal grows with N². Padded batches and dropout are in bench_kernels.py (`--cases padded dropout`),
block-sparse layouts in bench_block_sparse.py. Writes <out-dir>/<name>.{json,md} and prints the table last.
"""

import argparse
from pathlib import Path

import torch

from _common import DOCS_BENCHMARKS, environment, environment_line, fwd_bwd_ms, require_cuda, write_outputs

import hf_flash

SEQLENS, WINDOW, HEADS, HEADDIM = (2048, 4096, 8192, 16384), 256, 16, 64


def window_row(n, left=WINDOW, nheads=HEADS, head_dim=HEADDIM, dtype=torch.float16):
    batch = max(1, 16384 // n)
    q, k, v = (torch.randn(batch, n, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    row = {"seqlen": n, "batch": batch, "window": left}
    row["causal"] = fwd_bwd_ms(lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v))
    row["causal_window"] = fwd_bwd_ms(
        lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True, window_size=(left, 0)), (q, k, v))
    return row


def markdown(results):
    lines = [f"# Sliding window: {results['env']['gpu']}", "", environment_line(results["env"]), "",
             f"Causal sliding window ({WINDOW} back) against causal, {HEADS} heads, d{HEADDIM}, fp16, ms fwd / bwd.", "",
             "| N | causal | causal + window | speedup fwd / bwd |", "|---|---|---|---|"]
    for r in results["window"]:
        a, b = r["causal"], r["causal_window"]
        lines.append(f"| {r['seqlen']} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | "
                     f"{a[0] / b[0]:.2f}× / {a[1] / b[1]:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS)
    parser.add_argument("--name", default="bench_features", help="output file stem: <out-dir>/<name>.{json,md}")
    args = parser.parse_args(argv)
    require_cuda("bench_features.py")
    torch.manual_seed(0)
    results = {"env": environment(), "window": []}
    for n in SEQLENS:
        results["window"].append(window_row(n))
        print("window", results["window"][-1], flush=True)
        write_outputs(args.out_dir, args.name, results)
    print(write_outputs(args.out_dir, args.name, results, markdown))


if __name__ == "__main__":
    main()
