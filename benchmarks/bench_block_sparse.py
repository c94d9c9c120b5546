"""Block-sparse benchmark: hf_flash.block_sparse_attn_func against compiled FlexAttention on the SAME blocks.

    python benchmarks/bench_block_sparse.py               # window/causal at 4K, 16K; BigBird/butterfly at 16K, 64K
    python benchmarks/bench_block_sparse.py --quick       # the 4096 cases only
    python benchmarks/bench_block_sparse.py --cases bigbird butterfly --seqlens 16384
    python benchmarks/bench_block_sparse.py --cpu-check   # no GPU: build every layout and its BlockMask, compare
    python benchmarks/bench_block_sparse.py --sweep 16384 # kernel time against kept blocks per row (banded layouts)

bf16, batch 1, 12 heads, headdim 64, block size 128. Flex gets a BlockMask built from the layout's own
CSR lists (BlockMask.from_kv_blocks) with the element predicate as a pure index function; before
timing, the BlockMask's blocks and elements are compared with the layout's, and the outputs and
gradients of both kernels with each other. Our kernels are retuned for every case
(reset_tuning), as a model using that one layout would tune them. Predicted = dense
hf_flash time x block density (target: actual / predicted <= 1.25; the same ratio for Flex against dense Flex
is reported too); Flex / ours > 1 means hf_flash is faster (target >= 1.0). Times are triton.testing.do_bench
medians of a call (the backward: autograd.grad on a retained graph), so at small sizes they hold host latency
too; a second table gives each pass's GPU kernel time alone (torch.profiler), and the configs our kernels were
tuned to.
Writes <out-dir>/<name>.{json,md,png} (default name bench_block_sparse; JSON after every case) and
prints the table last.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention, or_masks

from _common import (DOCS_BENCHMARKS, attempt, describe_config, environment, environment_line, fmt, fwd_bwd_ms,
                     jsonable_args, kernel_times, kernels, pyplot, require_cuda, save_figure, sdpa, write_outputs)

import hf_flash
from hf_flash import layouts

BATCH, HEADS, HEADDIM, DTYPE, DEVICE = 1, 12, 64, torch.bfloat16, "cuda"
ELEMENT_CHECK_MAX_SEQLEN = 8192  # the element-level mask comparison materialises seqlen^2 bools


def kept_block_mask_mod(layout):
    """A block-level layout's mask as a mask_mod: a lookup in its kept blocks. Compiled Flex never calls it
    (every kept block is full); eager Flex, which ignores the block lists, needs it to mean the same."""
    kept, block_q, block_k = layout.to_dense()[0, 0], layout.block_q, layout.block_k
    return lambda b, h, q_idx, kv_idx: kept[q_idx // block_q, kv_idx // block_k]


# key: (title, layout builder (n, device), Flex mask_mod (n, layout), default seqlens)
CASES = {
    "window_global": ("sliding window ±256 + 64 global tokens",
                      lambda n, dev: layouts.local(256, n, device=dev) | layouts.global_tokens(64, n, device=dev),
                      lambda n, _: or_masks(layouts.sliding_window_mask_mod(256, n),
                                            layouts.global_tokens_mask_mod(64)),
                      (4096, 16384)),
    "causal_window": ("causal sliding window 256", lambda n, dev: layouts.local((256, 0), n, device=dev),
                      lambda n, _: layouts.sliding_window_mask_mod((256, 0), n), (4096, 16384)),
    "causal": ("causal", lambda n, dev: layouts.causal(n, device=dev), lambda n, _: layouts.causal_mask_mod(n),
               (4096, 16384)),
    "bigbird": ("bigbird (window 1, global 1, random 2 blocks)",
                lambda n, dev: layouts.bigbird(window=1, n_global=1, n_random=2, seqlen_q=n, device=dev),
                lambda n, layout: kept_block_mask_mod(layout), (16384, 65536)),
    "butterfly": ("butterfly", lambda n, dev: layouts.butterfly(n, device=dev),
                  lambda n, layout: kept_block_mask_mod(layout), (16384, 65536)),
}
OURS, FLEX = "hf_flash", "flex"
DENSE = ["dense_hf_flash", "dense_sdpa_flash", "dense_flex", "dense_hf_flash_causal"]


def block_mask_of(layout, mask_mod):
    return BlockMask.from_kv_blocks(layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
                                    layout.full_kv_indices, BLOCK_SIZE=layout.block_size, mask_mod=mask_mod,
                                    seq_lengths=(layout.seqlen_q, layout.seqlen_k))


def check_masks(layout, block_mask):
    """Same kept blocks, and (up to ELEMENT_CHECK_MAX_SEQLEN) the same attended elements, where Flex
    attends its full blocks whole and applies its mask_mod inside its partial blocks."""
    res = {"blocks": torch.equal(block_mask.to_dense().bool(), layout.to_dense())}
    n_q, n_k = layout.seqlen_q, layout.seqlen_k
    if max(n_q, n_k) <= ELEMENT_CHECK_MAX_SEQLEN:
        def expand(blocks):
            return blocks.repeat_interleave(layout.block_q, -2).repeat_interleave(layout.block_k, -1)[..., :n_q, :n_k]
        full = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                        BLOCK_SIZE=block_mask.BLOCK_SIZE, seq_lengths=(n_q, n_k)).to_dense().bool()
        elements = create_mask(block_mask.mask_mod, 1, 1, n_q, n_k, device=layout.device)
        flex_elements = expand(block_mask.to_dense().bool()) & (expand(full) | elements)
        res["elements"] = torch.equal(flex_elements, layout.to_dense_elements())
    res["ok"] = all(res.values())
    return res


def max_diffs(methods, dout):
    """max |out_ours - out_flex| and max relative gradient difference, for one dout (B, N, H, D)."""
    results = []
    for name, transposed in ((OURS, False), (FLEX, True)):  # Flex works in (B, H, N, D)
        fn, inputs = methods[name]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, dout.transpose(1, 2) if transposed else dout)
        if transposed:
            out, grads = out.transpose(1, 2), [g.transpose(1, 2) for g in grads]
        results.append((out.float(), [g.float() for g in grads]))
    (a, grads_a), (b, grads_b) = results
    return {"out": (a - b).abs().max().item(),
            "grad_rel": max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(grads_a, grads_b))}


def kernel_ms(fwd, inputs, reps=20):
    """(forward, backward) ms of GPU kernel time alone (torch.profiler, summed over the pass's kernels): what the
    pass costs when the GPU has work queued, as in training, with no host latency in it."""
    from torch.profiler import ProfilerActivity, profile
    out = fwd(*inputs)
    dout = torch.randn_like(out)
    passes = {"fwd": lambda: fwd(*inputs), "bwd": lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)}
    result = []
    for run in passes.values():
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                run()
            torch.cuda.synchronize()
        result.append(kernel_times(prof, reps)[0])
    return tuple(result)


def chosen_configs():
    """The block-sparse kernels' autotuned configs, kernel -> 'BLOCK_MxBLOCK_N wWARPS sSTAGES'."""
    hf_kernels = kernels()
    sparse = hf_kernels.tuning._TUNE_KEY.index("SPARSE") + 2  # _CHOSEN keys: (kernel, dtype, *tune key)
    return {key[0].base_fn.__name__: describe_config(c) for key, c in hf_kernels.launch._CHOSEN.items() if key[sparse]}


def bench_case(key, n, flex, dense_cache):
    title, build, flex_mask_mod, _ = CASES[key]
    # Tune for this layout, as a model using it would: configs are keyed by lengths and flags, not by the
    # layout, so without this a layout runs with whatever an earlier case with the same key was tuned on.
    kernels().launch.reset_tuning()
    row = {"case": key, "title": title, "seqlen": n, "fwd_ms": {}, "bwd_ms": {}, "fwd_kernel_ms": {}, "bwd_kernel_ms": {},
           "errors": {}}
    layout = build(n, DEVICE)
    block_mask = block_mask_of(layout, flex_mask_mod(n, layout))
    row["density"] = layout.density
    row["mask_check"], row["errors"]["mask_check"] = attempt(lambda: check_masks(layout, block_mask))
    q, k, v = (torch.randn(BATCH, n, HEADS, HEADDIM, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # Flex's layout
    methods = {OURS: (lambda q, k, v: hf_flash.block_sparse_attn_func(q, k, v, layout), (q, k, v)),
               FLEX: (lambda q, k, v: flex(q, k, v, block_mask=block_mask), (qt, kt, vt))}
    row["max_diff"], row["errors"]["max_diff"] = attempt(lambda: max_diffs(methods, torch.randn_like(q)))
    dense = {"dense_hf_flash": (lambda q, k, v: hf_flash.flash_attn_func(q, k, v), (q, k, v)),
             "dense_sdpa_flash": (lambda q, k, v: sdpa(q, k, v, False, "FLASH_ATTENTION"), (qt, kt, vt)),
             "dense_flex": (lambda q, k, v: flex(q, k, v), (qt, kt, vt))}
    if key == "causal":
        dense["dense_hf_flash_causal"] = (lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v))
    for name, (fn, inputs) in {**methods, **dense}.items():
        if name in dense and (n, name) in dense_cache:  # dense times depend on n only
            times, err = dense_cache[n, name]
        else:
            times, err = attempt(lambda: fwd_bwd_ms(fn, inputs))
            if name in dense:
                dense_cache[n, name] = times, err
        row["fwd_ms"][name], row["bwd_ms"][name] = times or (None, None)
        row["errors"][name] = err
    for name, (fn, inputs) in methods.items():
        times, row["errors"][f"{name}_kernels"] = attempt(lambda: kernel_ms(fn, inputs))
        row["fwd_kernel_ms"][name], row["bwd_kernel_ms"][name] = times or (None, None)
    row["configs"] = chosen_configs()
    row["errors"] = {name: e for name, e in row["errors"].items() if e}
    for pas in ("fwd", "bwd"):
        ours, flex_ms = (row[f"{pas}_kernel_ms"].get(m) for m in (OURS, FLEX))
        row[f"{pas}_kernel_flex_over_ours"] = flex_ms / ours if ours and flex_ms else None
        ours, flex_ms, dense_ms = (row[f"{pas}_ms"].get(m) for m in (OURS, FLEX, "dense_hf_flash"))
        predicted = dense_ms * row["density"] if dense_ms else None
        row[f"{pas}_predicted_ms"] = predicted
        row[f"{pas}_actual_over_predicted"] = ours / predicted if ours and predicted else None
        # the same ratio for Flex against its own dense time: how far block sparsity pays off there
        flex_dense = row[f"{pas}_ms"].get("dense_flex")
        row[f"{pas}_flex_actual_over_predicted"] = (flex_ms / (flex_dense * row["density"])
                                                    if flex_ms and flex_dense else None)
        row[f"{pas}_flex_over_ours"] = flex_ms / ours if ours and flex_ms else None
    return row


def pair(row, key, spec=".2f", suffix=""):
    """'fwd / bwd' of row[f"fwd_{key}"] and row[f"bwd_{key}"]."""
    return f"{fmt(row.get(f'fwd_{key}'), spec, suffix)} / {fmt(row.get(f'bwd_{key}'), spec, suffix)}"


def ms(row, method):
    return f"{fmt(row['fwd_ms'].get(method), '.3f')} / {fmt(row['bwd_ms'].get(method), '.3f')}"


def markdown(results):
    env = results["env"]
    lines = [f"# Block-sparse attention: {env['gpu']}", "",
             f"{environment_line(env)} bf16, batch "
             f"{BATCH}, {HEADS} heads, hd {HEADDIM}, block 128. ms fwd / bwd (median). predicted = dense hf_flash × "
             "density (target actual ÷ predicted ≤ 1.25; Flex's own: Flex ÷ (dense Flex × density)); Flex ÷ ours > 1: hf_flash faster (target ≥ 1.0). diff: "
             "max |out ours − out Flex| / max relative gradient difference. — = failed (see the JSON).", "",
             "| mask | N | density | hf_flash | Flex | dense hf_flash | dense SDPA flash | dense Flex | dense hf_flash "
             "causal | actual ÷ predicted | Flex's own | Flex ÷ ours | mask check | diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results["rows"]:
        check = (r.get("mask_check") or {}).get("ok")
        diff = r.get("max_diff") or {}
        lines.append(f"| {r['title']} | {r['seqlen']} | {fmt(r['density'], '.3f')} | "
                     + " | ".join(ms(r, m) for m in [OURS, FLEX] + DENSE) +
                     f" | {pair(r, 'actual_over_predicted')} | {pair(r, 'flex_actual_over_predicted')} "
                     f"| {pair(r, 'flex_over_ours', suffix='×')} "
                     f"| {'ok' if check else 'MISMATCH' if check is False else '—'} "
                     f"| {fmt(diff.get('out'), '.1e')} / {fmt(diff.get('grad_rel'), '.1e')} |")
    lines += ["", "GPU kernel time alone (torch.profiler, the pass's kernels summed; no host latency: what a pass costs "
              "when the GPU has work queued, as in training), and the configs our kernels were tuned to.", "",
              "| mask | N | hf_flash kernels | Flex kernels | Flex ÷ ours (kernels) | configs (fwd; dQ; dK/dV) |",
              "|---|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        kernels = {pas: r.get(f"{pas}_kernel_ms") or {} for pas in ("fwd", "bwd")}
        configs = r.get("configs") or {}
        lines.append(f"| {r['title']} | {r['seqlen']} | "
                     + " | ".join(f"{fmt(kernels['fwd'].get(m), '.3f')} / {fmt(kernels['bwd'].get(m), '.3f')}"
                                  for m in (OURS, FLEX))
                     + f" | {pair(r, 'kernel_flex_over_ours', suffix='×')} | "
                     + "; ".join(configs.get(k, "—") for k in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    rows = results["rows"]
    plt = pyplot()
    if plt is None or not rows:
        return
    labels = [f"{r['case']}\n{r['seqlen'] // 1024}K" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.5), squeeze=False)
    for ax, pas in zip(axes[0], ("fwd", "bwd")):
        for i, (method, label) in enumerate(((OURS, "hf_flash"), (FLEX, "Flex"), ("dense_hf_flash", "dense hf_flash"))):
            values = [r[f"{pas}_ms"].get(method) or 0 for r in rows]
            ax.bar([x + (i - 1) * 0.27 for x in range(len(rows))], values, width=0.27, label=label)
        ax.set(yscale="log", ylabel="ms (log)", title=f"{pas}, bf16 B{BATCH} H{HEADS} d{HEADDIM}")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(plt, fig, path)


def density_sweep(flex, n, half_widths=(0, 1, 2, 4, 8, 16, 32, 63)):
    """Kernel time (profiler) against the number of kept blocks per query block, for banded layouts of whole
    (full) blocks, ours and Flex, and a least-squares line t = fixed + per_block * kept: the fixed part is what a
    launch costs whatever it visits, and what keeps sparse times above dense × density at low density."""
    blocks = -(-n // 128)
    rows = []
    for w in half_widths:
        kernels().launch.reset_tuning()
        i = torch.arange(blocks, device=DEVICE)
        layout = layouts.from_dense((i[:, None] - i[None, :]).abs() <= w, seqlen_q=n, seqlen_k=n)
        block_mask = block_mask_of(layout, kept_block_mask_mod(layout))
        q, k, v = (torch.randn(BATCH, n, HEADS, HEADDIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
                   for _ in range(3))
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        row = {"half_width": w, "kept_per_row": layout.density * blocks, "density": layout.density}
        row[OURS] = kernel_ms(lambda q, k, v: hf_flash.block_sparse_attn_func(q, k, v, layout), (q, k, v))
        row[FLEX] = kernel_ms(lambda q, k, v: flex(q, k, v, block_mask=block_mask), (qt, kt, vt))
        rows.append(row)
        print(f"sweep N={n} half width {w}: {row}", flush=True)
    fits = {}
    x = torch.tensor([r["kept_per_row"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], 1)
    for method in (OURS, FLEX):
        for j, pas in enumerate(("fwd", "bwd")):
            y = torch.tensor([r[method][j] for r in rows], dtype=torch.float64)
            fixed, per_block = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
            fits[f"{method}_{pas}"] = {"fixed_ms": fixed, "per_block_ms": per_block,
                                       "fixed_share_at_dense": fixed / (fixed + per_block * blocks)}
    return {"seqlen": n, "rows": rows, "fits": fits}


def sweep_markdown(sweep):
    env, n, rows, fits = sweep["env"], sweep["seqlen"], sweep["rows"], sweep["fits"]
    lines = [f"# Block-sparse time against kept blocks: {env['gpu']}", "",
             f"{environment_line(env)} bf16, batch {BATCH}, {HEADS} heads, hd "
             f"{HEADDIM}, N {n}, block 128, banded layouts of full blocks (|i − j| ≤ w blocks). GPU kernel ms "
             "(torch.profiler), fwd / bwd.", "",
             "| w | kept blocks per row | density | hf_flash | Flex |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['half_width']} | {r['kept_per_row']:.2f} | {r['density']:.3f} | "
                     f"{r[OURS][0]:.3f} / {r[OURS][1]:.3f} | {r[FLEX][0]:.3f} / {r[FLEX][1]:.3f} |")
    lines += ["", "Least-squares line t = fixed + per block × kept blocks per row (ms):", "",
              "| kernel | fixed | per kept block | fixed ÷ line at every block kept |", "|---|---:|---:|---:|"]
    for name, f in fits.items():
        lines.append(f"| {name.replace('_', ' ')} | {f['fixed_ms']:.4f} | {f['per_block_ms']:.5f} | "
                     f"{f['fixed_share_at_dense']:.3f} |")
    return "\n".join(lines) + "\n"


def cpu_check(n=1024):
    """Every layout and its BlockMask on the CPU: same blocks and elements; eager Flex vs the reference."""
    ok = True
    for key, (title, build, flex_mask_mod, _) in CASES.items():
        layout = build(n, "cpu")
        block_mask = block_mask_of(layout, flex_mask_mod(n, layout))
        res = check_masks(layout, block_mask)
        q, k, v = (torch.randn(1, 2, n, HEADDIM) for _ in range(3))
        out = flex_attention(q, k, v, block_mask=block_mask)  # eager (unfused) on the CPU; fine at this size
        ref, _ = hf_flash.attention_reference(*(t.transpose(1, 2) for t in (q, k, v)),
                                              attn_mask=layout.to_dense_elements())
        res["flex_vs_reference"] = (out.transpose(1, 2) - ref).abs().max().item()
        ok &= res["ok"] and res["flex_vs_reference"] < 1e-4
        print(f"{title} n={n}: density {layout.density:.3f} {res}", flush=True)
    sys.exit(0 if ok else "cpu check FAILED")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 4096 cases only")
    p.add_argument("--seqlens", type=int, nargs="+", help="run every selected case at these lengths")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS)
    p.add_argument("--name", default="bench_block_sparse", help="output file stem: <out-dir>/<name>.{json,md,png}")
    p.add_argument("--cpu-check", action="store_true", help="no timing: check layouts vs Flex BlockMasks on the CPU")
    p.add_argument("--sweep", type=int, metavar="N", help="instead: kernel time against kept blocks per row at length N, "
                   "banded layouts, ours and Flex (writes <name>_sweep.{json,md})")
    args = p.parse_args(argv)
    if args.cpu_check:
        cpu_check()
    require_cuda("bench_block_sparse.py", " (or pass --cpu-check)")
    if args.quick:
        grid = [(key, 4096) for key in args.cases if 4096 in CASES[key][3]]
    else:
        grid = [(key, n) for key in args.cases for n in (args.seqlens or CASES[key][3])]
    # one compiled graph per (shape, mask_mod): more than dynamo's default limit of 8 recompilations
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    # The backward is timed on a retained graph (_common.fwd_bwd_ms); compiled backwards that donate their
    # saved buffers refuse retain_graph=True, so donation is switched off (it only saves memory).
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False
    flex = torch.compile(flex_attention, dynamic=False)
    results = {"env": environment(), "args": jsonable_args(args),
               "rows": []}
    dense_cache = {}
    print(f"{results['env']['gpu']} | torch {results['env']['torch']} | triton {results['env']['triton']}", flush=True)
    if args.sweep:
        sweep = {"env": results["env"], **density_sweep(flex, args.sweep)}
        md = write_outputs(args.out_dir, f"{args.name}_sweep", sweep, sweep_markdown)
        print(md, flush=True)
        return
    for i, (key, n) in enumerate(grid, 1):
        torch.manual_seed(0)
        row, err = attempt(lambda: bench_case(key, n, flex, dense_cache))
        row = row or {"case": key, "title": CASES[key][0], "seqlen": n, "density": None, "fwd_ms": {},
                      "bwd_ms": {}, "errors": {"case": err}}
        results["rows"].append(row)
        print(f"[{i}/{len(grid)}] {key} N={n} density {fmt(row['density'], '.3f')} mask {row.get('mask_check')} "
              f"diff {row.get('max_diff')} ms ours {ms(row, OURS)} flex {ms(row, FLEX)} dense {ms(row, DENSE[0])} "
              f"flex/ours {pair(row, 'flex_over_ours')} (kernels {pair(row, 'kernel_flex_over_ours')}) "
              f"actual/predicted {pair(row, 'actual_over_predicted')} "
              f"{row['errors'] or ''}", flush=True)
        write_outputs(args.out_dir, args.name, results)  # a run cut short keeps the cases it finished
    md = write_outputs(args.out_dir, args.name, results, markdown, plot)
    print(f"\n{md}", flush=True)


if __name__ == "__main__":
    main()
