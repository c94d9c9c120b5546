"""Kernel-feature benchmark: causal sliding window vs plain causal (fp16, H100/H200).

    python benchmarks/bench_features.py [--out-dir docs/benchmarks]

Padded batches and dropout live in bench_kernels.py (`--cases padded dropout`), block-sparse
layouts in bench_block_sparse.py. fwd_bwd here is the timing helper bench_block_sparse.py reuses.
Writes bench_features.{json,md} and prints the table last.
"""

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flash  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(fwd, inputs):
    """(forward ms, backward ms) of fwd(*inputs); the backward reuses one recorded graph."""
    out = fwd(*inputs)
    dout = torch.randn_like(out)
    torch.autograd.grad(out, inputs, dout, retain_graph=True)  # autotune both passes before timing
    torch.cuda.synchronize()
    t_fwd = bench(lambda: fwd(*inputs))
    t_bwd = bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return t_fwd, t_bwd


def window(n, left=256, nheads=16, head_dim=64, dtype=torch.float16):
    batch = max(1, 16384 // n)
    q, k, v = (torch.randn(batch, n, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    row = {"seqlen": n, "batch": batch, "window": left}
    row["causal"] = fwd_bwd(lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v))
    row["causal_window"] = fwd_bwd(
        lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True, window_size=(left, 0)), (q, k, v))
    return row


def tables(results):
    lines = ["### Causal sliding window (256 back), 16 heads, d64, fp16, ms fwd / bwd", "",
              "| N | causal | causal + window | speedup fwd / bwd |", "|---|---|---|---|"]
    for r in results["window"]:
        a, b = r["causal"], r["causal_window"]
        lines.append(f"| {r['seqlen']} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | "
                     f"{a[0] / b[0]:.2f}× / {a[1] / b[1]:.2f}× |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_features.py needs a CUDA GPU")
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "window": []}
    for n in (2048, 4096, 8192, 16384):
        results["window"].append(window(n))
        print("window", results["window"][-1], flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    text = tables(results)
    with open(os.path.join(args.out_dir, "bench_features.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out_dir, "bench_features.md"), "w") as f:
        f.write(f"# Kernel features — {results['gpu']}, torch {results['torch']}, triton {results['triton']}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
