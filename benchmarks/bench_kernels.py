"""Kernel benchmark: hf_flash against the SDPA backends and plain PyTorch, forward and backward.

Run from the repository root on a CUDA GPU:

    python benchmarks/bench_kernels.py --quick          # hd 64/128, seqlen 1024/4096, fp16
    python benchmarks/bench_kernels.py                  # full grid (several minutes)
    python benchmarks/bench_kernels.py --headdims 128 --seqlens 2048 8192 --causal yes --dtypes bf16

Methodology: batch * seqlen = 16384 and nheads * headdim = 2048, so every row moves the same number
of tokens; forward FLOPs = 4*B*H*N^2*D (halved when causal), backward = 2.5x forward. Times are
medians of triton.testing.do_bench; backward is timed on a precomputed forward graph. Writes
<out-dir>/bench_kernels.{json,md,png} and prints the Markdown tables last.
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so the script works from a checkout without installing the package
import hf_flash  # noqa: E402

METHODS = ["hf_flash", "sdpa_flash", "sdpa_cudnn", "sdpa_mem_eff", "torch"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_MAX_SCORE_BYTES = 8 * 2**30  # beyond this the naive scores (plus their grads) do not fit
MEM_SEQLENS, MEM_HEADS, MEM_HEADDIM = (4096, 16384, 65536), 16, 64
DEVICE = "cuda"
TOKENS, WIDTH = 16384, 2048  # batch * seqlen and nheads * headdim, fixed across rows


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_mem_eff": "EFFICIENT_ATTENTION"}


def sdpa(q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # Pin one backend, or SDPA silently falls back; a backend this torch lacks raises, recorded as "—".
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def naive(q, k, v, mask):
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attempt(fn):
    """Run fn; on any failure (unsupported backend, OOM, compile error) return (None, message)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a failing method must not stop the sweep
        err = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    gc.collect()  # drop the traceback's tensors before emptying the cache
    torch.cuda.empty_cache()
    return None, err


def make_methods(q, k, v, qt, kt, vt, causal, batch, nheads, seqlen):
    """Forward closures plus the leaves whose .grad do_bench must reset; inputs are prepared here,
    outside the timed code, in each method's native layout."""
    fns = {"hf_flash": (lambda: hf_flash.flash_attn_func(q, k, v, causal=causal), [q, k, v])}
    for name, backend in SDPA_BACKENDS.items():
        fns[name] = (lambda b=backend: sdpa(qt, kt, vt, causal, b), [qt, kt, vt])
    if batch * nheads * seqlen**2 * 2 <= TORCH_MAX_SCORE_BYTES:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1) if causal else None
        fns["torch"] = (lambda: naive(qt, kt, vt, mask), [qt, kt, vt])
    return fns


def check(q, k, v, qt, kt, vt, causal):
    """hf_flash vs SDPA flash (any SDPA backend if flash is unavailable), output and gradients."""
    out = hf_flash.flash_attn_func(q, k, v, causal=causal)
    ref, _ = attempt(lambda: sdpa(qt, kt, vt, causal, "FLASH_ATTENTION"))
    ref_name = "sdpa_flash"
    if ref is None:
        ref, ref_name = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), "sdpa_default"
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.transpose(1, 2))
    res = {"reference": ref_name, "max_abs_diff_out": (out - ref.transpose(1, 2)).abs().max().item()}
    for name, a, b in (("dq", q, qt), ("dk", k, kt), ("dv", v, vt)):
        g_ref = b.grad.transpose(1, 2)
        res[f"max_rel_diff_{name}"] = ((a.grad - g_ref).abs().max() / g_ref.abs().max()).item()
    for t in (q, k, v, qt, kt, vt):  # leave no grads behind to be accumulated into while timing
        t.grad = None
    tol_out = 1e-2 if q.dtype == torch.float16 else 5e-2
    diffs = [res["max_abs_diff_out"]] + [res[f"max_rel_diff_{n}"] for n in ("dq", "dk", "dv")]
    # generous bounds: they only need to catch a broken kernel, not grade accuracy
    res["ok"] = all(math.isfinite(d) for d in diffs) and diffs[0] <= tol_out and max(diffs[1:]) <= 0.1
    return res


def time_method(fwd, leaves, args):
    """Median forward ms, and backward ms on one retained forward graph (not fwd+bwd minus fwd)."""
    def timed(fn, grads=None):
        return do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, return_mode="median")

    def bwd():
        out = fwd()
        dout = torch.randn_like(out)
        return timed(lambda: out.backward(dout, retain_graph=True), leaves)

    ms_f, err = attempt(lambda: timed(fwd))
    ms_b, err = attempt(bwd) if ms_f is not None else (None, err)
    return ms_f, ms_b, err


def bench_config(dtype_name, headdim, seqlen, causal, args):
    batch, nheads = TOKENS // seqlen, WIDTH // headdim
    dtype = DTYPES[dtype_name]
    row = {"dtype": dtype_name, "headdim": headdim, "seqlen": seqlen, "causal": causal, "batch": batch,
           "nheads": nheads, "fwd_ms": {}, "bwd_ms": {}, "fwd_tflops": {}, "bwd_tflops": {}, "errors": {}}
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    row["check"], err = attempt(lambda: check(q, k, v, qt, kt, vt, causal))
    fwd_flops = 4 * batch * nheads * seqlen**2 * headdim / (2 if causal else 1)
    methods = make_methods(q, k, v, qt, kt, vt, causal, batch, nheads, seqlen)
    for name in METHODS:
        ms_f = ms_b = None
        if name == "hf_flash" and not (row["check"] or {}).get("ok"):
            row["errors"][name] = err or f"correctness check failed: {row['check']}"  # never time a wrong kernel
        elif name not in methods:
            row["errors"][name] = "skipped: score matrix too large"
        else:
            ms_f, ms_b, row["errors"][name] = time_method(*methods[name], args)
        row["fwd_ms"][name], row["bwd_ms"][name] = ms_f, ms_b
        row["fwd_tflops"][name] = fwd_flops / (ms_f * 1e-3) / 1e12 if ms_f else None
        row["bwd_tflops"][name] = 2.5 * fwd_flops / (ms_b * 1e-3) / 1e12 if ms_b else None
        gc.collect()
        torch.cuda.empty_cache()
    row["errors"] = {k_: e for k_, e in row["errors"].items() if e}
    for pas in ("fwd", "bwd"):
        tf = row[f"{pas}_tflops"]
        for other in ("sdpa_flash", "sdpa_cudnn"):
            ok = tf["hf_flash"] and tf[other]
            row.setdefault("ratios", {})[f"{pas}_hf_over_{other}"] = tf["hf_flash"] / tf[other] if ok else None
    return row


def peak_memory(method, seqlen, dtype=torch.float16):
    """Peak of one forward+backward, total and over the inputs, dout and the grads they end up with."""
    shape = (1, seqlen, MEM_HEADS, MEM_HEADDIM) if method == "hf_flash" else (1, MEM_HEADS, seqlen, MEM_HEADDIM)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=DEVICE, dtype=dtype)

    def step():
        out = hf_flash.flash_attn_func(q, k, v) if method == "hf_flash" else sdpa(q, k, v, False, "FLASH_ATTENTION")
        out.backward(dout)

    step()  # autotuning allocates a 256 MB cache-flush buffer: keep it out of the measured step
    for t in (q, k, v):
        t.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() + 3 * q.numel() * q.element_size()  # + the grads to come
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    mib = 2**20
    return {"method": method, "seqlen": seqlen, "peak_mib": peak / mib, "extra_mib": (peak - base) / mib,
            "extra_mib_per_1k_tokens": (peak - base) / mib / (seqlen / 1024)}


def environment():
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": version("transformers"), "hf_flash": hf_flash.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def fmt(x, spec=".1f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def markdown(results):
    env, lines = results["env"], []
    lines += [f"# Kernel benchmark: {env['gpu']}", "",
              f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
              f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, hf_flash {env['hf_flash']}; {env['date']}.", "",
              "batch·seqlen = 16384, nheads·headdim = 2048; TFLOP/s from the median time "
              "(fwd 4·B·H·N²·D, halved when causal; bwd 2.5× fwd). Ratios > 1: hf_flash faster. "
              "— = unsupported, failed or skipped (see the JSON)."]
    for pas, title in (("fwd", "Forward"), ("bwd", "Backward")):
        lines += ["", f"## {title} TFLOP/s", "",
                  "| dtype | hd | seqlen | causal | " + " | ".join(METHODS) + " | ÷ flash | ÷ cuDNN |",
                  "|" + "---|" * 4 + "---:|" * (len(METHODS) + 2)]
        for r in results["rows"]:
            ratios = r.get("ratios", {})
            cells = [r["dtype"], r["headdim"], r["seqlen"], "yes" if r["causal"] else "no"]
            cells += [fmt(r[f"{pas}_tflops"].get(m)) for m in METHODS]
            cells += [fmt(ratios.get(f"{pas}_hf_over_{o}"), ".2f", "×") for o in ("sdpa_flash", "sdpa_cudnn")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if results.get("memory"):
        lines += ["", f"## Peak memory of one forward+backward (batch 1, {MEM_HEADS} heads, hd {MEM_HEADDIM}, "
                  "fp16, non-causal)", "", "Extra = peak minus inputs, dout and grads.", "",
                  "| method | seqlen | peak MiB | extra MiB | extra MiB / 1K tokens | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for m in results["memory"]:
            lines.append(f"| {m['method']} | {m['seqlen']} | {fmt(m.get('peak_mib'))} | {fmt(m.get('extra_mib'))} "
                         f"| {fmt(m.get('extra_mib_per_1k_tokens'), '.2f')} | {m.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", flush=True)
        return
    rows = [r for r in rows if r["dtype"] == "fp16"] or rows  # one dtype per figure keeps it readable
    combos = sorted({(r["headdim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 4), squeeze=False)
    for ax, (hd, causal) in zip(axes[0], combos):
        sub = sorted((r for r in rows if (r["headdim"], r["causal"]) == (hd, causal)), key=lambda r: r["seqlen"])
        for i, m in enumerate(METHODS):
            for pas, style in (("fwd", "-o"), ("bwd", "--s")):
                pts = [(r["seqlen"], r[f"{pas}_tflops"][m]) for r in sub if r[f"{pas}_tflops"].get(m)]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{m} {pas}", markersize=4)
        ax.set(xscale="log", xlabel="seqlen", ylabel="TFLOP/s", title=f"{sub[0]['dtype']} hd={hd} causal={causal}")
        ax.set_xticks([r["seqlen"] for r in sub], [str(r["seqlen"]) for r in sub])
        ax.minorticks_off()  # log-axis minor labels (7x10^1 ...) clutter the seqlen ticks
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def write_outputs(results, out_dir, final):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_kernels.json").write_text(json.dumps(results, indent=1))
    if final:
        md = markdown(results)
        (out_dir / "bench_kernels.md").write_text(md)
        print(f"wrote {out_dir / 'bench_kernels.json'} and {out_dir / 'bench_kernels.md'}", flush=True)
        plot(results["rows"], out_dir / "bench_kernels.png")
        return md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="hd 64/128, seqlen 1024/4096, causal both, fp16 only")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks",
                   help="default: docs/benchmarks in the repository")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory section")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    args = p.parse_args(argv)
    if args.quick:
        args.headdims, args.seqlens, args.causal, args.dtypes = [64, 128], [1024, 4096], "both", ["fp16"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    grid = [(d, hd, n, c) for d in args.dtypes for hd in args.headdims for c in causals for n in args.seqlens]
    results = {"env": environment(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": [], "memory": []}
    print(f"{results['env']['gpu']} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    for i, (dtype_name, hd, n, causal) in enumerate(grid, 1):
        torch.manual_seed(0)
        row = bench_config(dtype_name, hd, n, causal, args)
        results["rows"].append(row)
        chk = row["check"] or {}
        tf = " ".join(f"{m}={fmt(row['fwd_tflops'][m])}/{fmt(row['bwd_tflops'][m])}" for m in METHODS)
        print(f"[{i}/{len(grid)}] {dtype_name} hd={hd} N={n} causal={causal} B={row['batch']} H={row['nheads']} "
              f"check={'ok' if chk.get('ok') else 'FAIL'} (out diff {fmt(chk.get('max_abs_diff_out'), '.1e')}) "
              f"fwd/bwd TFLOP/s: {tf}", flush=True)
        write_outputs(results, args.out_dir, final=False)  # a partial run still leaves its numbers on disk
    if not args.no_memory:
        for method in ("hf_flash", "sdpa_flash"):
            for n in MEM_SEQLENS:
                m, err = attempt(lambda: peak_memory(method, n))
                results["memory"].append(m or {"method": method, "seqlen": n, "error": err})
                print(f"memory {method} N={n}: peak {fmt((m or {}).get('peak_mib'))} MiB, "
                      f"extra {fmt((m or {}).get('extra_mib'))} MiB {err or ''}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    md = write_outputs(results, args.out_dir, final=True)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
