"""Host-overhead benchmark: how much CPU time one attention call costs, and how much of a training step the GPU
spends waiting for the host.

    python benchmarks/bench_host.py                 # both parts (about 2 minutes on an H100/H200 machine)
    python benchmarks/bench_host.py --part calls    # host us per call only
    python benchmarks/bench_host.py --part steps --cases gpt2-small:1024x8 bert-large:512x16

calls: host microseconds per call (median of --repeats), with the GPU kept busy by a queued sleep kernel so no
call ever waits for it: what the Python/C++ path costs, not the kernels. hf_flash.flash_attn_func and the
transformers entry ("hf_triton", as GPT-2 calls it: (batch, heads, seq, dim) views, dropout 0.1, causal) against
SDPA, forward alone and forward + backward, with the backward on the autograd engine's CUDA device thread (the
default, as in training) and on the calling thread (torch.autograd.set_multithreading_enabled(False)).

steps: one training step as in bench_training.py (bf16 autocast, AdamW), wall ms per step against the sum of the
step's CUDA kernel times (torch.profiler): wall - kernels is time the GPU sat idle waiting for the host. Also the
attention kernels' share (ours: _attn_*; SDPA: flash / cuDNN / efficient kernels).

Wall times of host-bound steps differ by up to ~25% between machines of the same kind; compare rows of one run.
Writes <out-dir>/<name>.{json,md,png} (default name bench_host) and prints the tables last.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (DOCS_BENCHMARKS, TRAINING_CASES, build_model, environment, environment_line, kernel_times,
                     make_batch, pyplot, require_cuda, save_figure, train_step, write_outputs)

import hf_flash
from hf_flash import integration

DEVICE = "cuda"


class _Layer(torch.nn.Module):
    """What the transformers entry reads from an attention module."""
    is_causal = True


def host_us(fn, repeats, inner=5):
    """Median host microseconds of fn() while the GPU is busy with a queued sleep (so no call waits on it)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(5_000_000)  # ~2-3 ms of GPU work queued ahead of the calls
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def bench_calls(args):
    batch, seqlen, heads, headdim = args.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, headdim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(batch, seqlen, heads, headdim, device=DEVICE, dtype=torch.bfloat16)
    layer = _Layer().train()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    calls = {
        "hf_flash.flash_attn_func": lambda: hf_flash.flash_attn_func(qt, kt, vt, causal=True, dropout_p=0.1),
        "transformers entry (hf_triton)": lambda: integration.hf_triton_attention_forward(
            layer, q, k, v, None, dropout=0.1, scaling=headdim ** -0.5)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True).transpose(1, 2),
    }
    rows = []
    for name, forward in calls.items():
        both = lambda forward=forward: torch.autograd.grad(forward(), (q, k, v), grad)  # noqa: E731
        for _ in range(3):  # compile, autotune, warm the launch cache
            both()
        row = {"call": name, "forward_us": host_us(forward, args.repeats)}
        for threads in (True, False):
            torch.autograd.set_multithreading_enabled(threads)
            row[f"fwd_bwd_us_{'device_thread' if threads else 'calling_thread'}"] = host_us(both, args.repeats)
        torch.autograd.set_multithreading_enabled(True)
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_steps(args):
    from torch.profiler import ProfilerActivity, profile
    rows = []
    device = torch.device("cuda")
    for spec in args.cases:
        case, shape = spec.split(":")
        seqlen, batch = (int(x) for x in shape.split("x"))
        for impl in args.impls:
            model, family = build_model(case, impl, seqlen, device)
            inputs = make_batch(family, model.config.vocab_size, seqlen, batch, device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            model.train()
            step = lambda model=model, opt=opt, inputs=inputs: train_step(model, opt, inputs, device)  # noqa: E731
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            kernels, attention = kernel_times(prof, args.steps)
            row = {"case": case, "seqlen": seqlen, "batch": batch, "impl": impl, "wall_ms": wall,
                   "kernel_ms": kernels, "attention_kernel_ms": attention, "gpu_idle_ms": wall - kernels}
            rows.append(row)
            print(row, flush=True)
            del model, opt, step
            torch.cuda.empty_cache()
    return rows


def markdown(results):
    env = results["env"]
    lines = [f"# Host-overhead benchmark: {env['gpu']}", "", environment_line(env), ""]
    if results.get("calls"):
        b, n, h, d = results["shape"]
        lines += [f"## Host µs per call (bf16, batch {b}, seqlen {n}, {h} heads × {d}, causal, dropout 0.1)", "",
                  "GPU kept busy, so this is the CPU cost of issuing the work. fwd+bwd: backward on the autograd "
                  "CUDA device thread (default) / on the calling thread.", "",
                  "| call | forward | fwd+bwd (device thread) | fwd+bwd (calling thread) |", "|---|---:|---:|---:|"]
        for r in results["calls"]:
            lines.append(f"| {r['call']} | {r['forward_us']:.0f} | {r['fwd_bwd_us_device_thread']:.0f} | "
                         f"{r['fwd_bwd_us_calling_thread']:.0f} |")
        lines.append("")
    if results.get("steps"):
        lines += ["## Training step: wall time against kernel time (ms per step)", "",
                  "gpu idle = wall − sum of kernel times: time the GPU waited for the host.", "",
                  "| case | seqlen × batch | attn | wall | kernels | attention kernels | gpu idle |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in results["steps"]:
            lines.append(f"| {r['case']} | {r['seqlen']} × {r['batch']} | {r['impl']} | {r['wall_ms']:.1f} | "
                         f"{r['kernel_ms']:.1f} | {r['attention_kernel_ms']:.2f} | {r['gpu_idle_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Each step as a stacked bar: other kernels, attention kernels, GPU idle (wall = the bar's height)."""
    steps = results.get("steps")
    plt = pyplot()
    if plt is None or not steps:
        return
    fig, ax = plt.subplots(figsize=(1.1 * len(steps) + 2, 3.6))
    labels = [f"{r['case']}\n{r['seqlen']}×{r['batch']}\n{r['impl']}" for r in steps]
    x = range(len(steps))
    other = [r["kernel_ms"] - r["attention_kernel_ms"] for r in steps]
    attention = [r["attention_kernel_ms"] for r in steps]
    idle = [max(r["gpu_idle_ms"], 0.0) for r in steps]
    ax.bar(x, other, color="C7", label="other kernels")
    ax.bar(x, attention, bottom=other, color="C0", label="attention kernels")
    ax.bar(x, idle, bottom=[o + a for o, a in zip(other, attention)], color="C3", label="GPU idle (host)")
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set(ylabel="ms per training step", title="Training step: where the wall time goes")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(plt, fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["calls", "steps", "both"], default="both")
    p.add_argument("--shape", type=int, nargs=4, default=[8, 1024, 12, 64], metavar=("BATCH", "SEQLEN", "HEADS", "DIM"),
                   help="the per-call problem (default: a GPT-2 small layer at 1024 x 8)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--cases", nargs="+", default=["gpt2-small:1024x8", "gpt2-small:4096x2", "bert-large:512x16"],
                   help=f"CASE:SEQLENxBATCH, CASE one of bench_training.py's cases {sorted(TRAINING_CASES)}")
    p.add_argument("--impls", nargs="+", default=["sdpa", hf_flash.ATTN_IMPLEMENTATION])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS)
    p.add_argument("--name", default="bench_host", help="output file stem: <out-dir>/<name>.{json,md,png}")
    args = p.parse_args(argv)
    for spec in args.cases:
        case, _, shape = spec.partition(":")
        if case not in TRAINING_CASES or len(shape.split("x")) != 2:
            p.error(f"--cases takes CASE:SEQLENxBATCH with CASE in {sorted(TRAINING_CASES)}, got {spec!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    require_cuda("bench_host.py")
    results = {"env": environment(DEVICE), "shape": args.shape}
    if args.part in ("calls", "both"):
        results["calls"] = bench_calls(args)
    if args.part in ("steps", "both"):
        results["steps"] = bench_steps(args)
    print(write_outputs(args.out_dir, args.name, results, markdown, plot))


if __name__ == "__main__":
    main()
