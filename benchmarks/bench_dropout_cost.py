"""What attention dropout costs the forward: ours against SDPA's FlashAttention-2 and cuDNN backends, in one run.

For each shape, the forward's time at p = 0 and at p = 0.1 (fp16, do_bench mean over 200 ms after 50 ms of
warm-up), the cost t(p) / t(0) - 1, and the forward tile our tuner chose at each p (each shape tuned for itself).
Forward only: bench_kernels.py --cases dropout times the backward too (against FA2 only) and checks the kept
fraction.

    python benchmarks/bench_dropout_cost.py --out-dir docs/benchmarks

Writes <out-dir>/<name>.{json,md}. Needs a CUDA GPU.
"""
import argparse
from pathlib import Path

import torch

from _common import (DOCS_BENCHMARKS, bench_ms, describe_config, environment, environment_line, kernels,
                     require_cuda, sdpa, write_outputs)

import hf_flash

# (batch, seqlen, heads, head dim, causal): batch·seqlen 16384 and heads·head dim 2048 as in bench_kernels.py,
# one 1K shape, and GPT-2 small's attention at 4K (batch 2).
SHAPES = [(4, 4096, 32, 64, False), (4, 4096, 32, 64, True), (4, 4096, 16, 128, False), (4, 4096, 16, 128, True),
          (16, 1024, 32, 64, False), (2, 4096, 12, 64, True)]
P = 0.1
SDPA = {"fa2": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def time_ms(fn):
    fn()
    torch.cuda.synchronize()
    return bench_ms(fn, warmup=50, rep=200, return_mode="mean")


def measure(b, n, h, d, causal, with_sdpa=True):
    hf_kernels = kernels()
    # each shape tunes for itself (GPT-2's shares a tuning key with B4 H32 causal), as alone
    hf_kernels.launch.reset_tuning()
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
    row = {"shape": f"B{b} N{n} H{h} d{d} {'causal' if causal else 'full'}"}
    for p in (0.0, P):
        row[f"ours{p}"] = time_ms(lambda: hf_flash.flash_attn_func(q, k, v, dropout_p=p, causal=causal))
        row[f"cfg{p}"] = describe_config(hf_kernels.forward._attn_fwd.best_config)
    if with_sdpa:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        for name, backend in SDPA.items():
            for p in (0.0, P):
                try:
                    row[f"{name}{p}"] = time_ms(lambda: sdpa(qt, kt, vt, causal, backend, dropout_p=p))
                except RuntimeError as e:  # a backend that refuses the shape: an empty cell, said once here
                    print(f"{name} p={p} {row['shape']}: {str(e)[:120]}", flush=True)
    return row


def cost(row, method):
    t0, tp = row.get(f"{method}0.0"), row.get(f"{method}{P}")
    return f"+{tp / t0 - 1:.0%}" if t0 and tp else ""


def markdown(results):
    env = results["env"]
    lines = [f"# Dropout's forward cost: {env['gpu']}", "",
             environment_line(env), "",
             f"fp16, ms (do_bench mean), p = 0 → p = {P}; cost = t(p) ÷ t(0) − 1 (target for ours: ≤ 15%). Tile: our "
             "forward config at p = 0 / p.", "",
             "| shape | ours | cost | FA2 | FA2 cost | cuDNN | cuDNN cost | ours ÷ FA2 (p) | ours ÷ cuDNN (p) "
             "| tile |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        cells = [f"{r[f'{m}0.0']:.3f} → {r[f'{m}{P}']:.3f}" if f"{m}{P}" in r else ""
                 for m in ("ours", "fa2", "cudnn")]
        ratios = [f"{r[f'{m}{P}'] / r[f'ours{P}']:.2f}×" if f"{m}{P}" in r else "" for m in ("fa2", "cudnn")]
        lines.append(f"| {r['shape']} | {cells[0]} | {cost(r, 'ours')} | {cells[1]} | {cost(r, 'fa2')} | {cells[2]} | "
                     f"{cost(r, 'cudnn')} | {ratios[0]} | {ratios[1]} | {r['cfg0.0']} / {r[f'cfg{P}']} |")
    lines.append("")
    lines.append("ours ÷ X: X's time with dropout over ours (> 1: ours faster).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS)
    p.add_argument("--name", default="bench_dropout_cost", help="output file stem: <out-dir>/<name>.{json,md}")
    p.add_argument("--no-sdpa", action="store_true", help="time ours only")
    args = p.parse_args(argv)
    require_cuda("bench_dropout_cost.py")
    results = {"env": environment(), "rows": []}
    for shape in SHAPES:
        row = measure(*shape, with_sdpa=not args.no_sdpa)
        results["rows"].append(row)
        print(f"{row['shape']:24s} ours {cost(row, 'ours'):>5s}  FA2 {cost(row, 'fa2'):>5s}  "
              f"cuDNN {cost(row, 'cudnn'):>5s}  tile {row[f'cfg{P}']}", flush=True)
        write_outputs(args.out_dir, args.name, results)
    print(write_outputs(args.out_dir, args.name, results, markdown))


if __name__ == "__main__":
    main()
