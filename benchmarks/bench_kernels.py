"""Kernel benchmark: hf_flash against the SDPA backends and plain PyTorch, forward and backward.

Run from the repository root on a CUDA GPU:

    python benchmarks/bench_kernels.py --quick          # dense hd 64/128 N 1024/4096 + padded 4K + dropout 4K d64, fp16
    python benchmarks/bench_kernels.py                  # everything (dense grid, padded, dropout; >10 minutes)
    python benchmarks/bench_kernels.py --cases dense --dtypes fp16 --name bench_kernels_fp16
    python benchmarks/bench_kernels.py --cases padded dropout --dtypes fp16 bf16
    python benchmarks/bench_kernels.py --headdims 128 --seqlens 2048 8192 --causal yes --dtypes bf16
    python benchmarks/bench_kernels.py --cases dense --vs-search --no-memory --name bench_shipped_vs_search

Case groups (--cases):
  dense    batch * seqlen = 16384 and nheads * headdim = 2048, so every row moves the same number of
           tokens; hf_flash vs SDPA flash / cuDNN / mem-efficient and plain PyTorch (+ peak memory), and
           FlashAttention-4's CuTe kernels (fa4) where `flash_attn.cute` imports (PyPI flash-attn-4).
           --vs-search adds hf_flash_search: the same calls with a timed search of their own
           (HF_FLASH_AUTOTUNE=1, no choice read from disk), against hf_flash's shipped or rule-picked configs.
  padded   8 sequences, lengths uniform in [N/2, N] (seeded), right padding, 16 heads, d64,
           non-causal: hf_flash with key/query padding masks in the kernel, hf_flash through
           unpad -> flash_attn_varlen_func -> pad, and SDPA with a boolean attn_mask (what
           transformers' sdpa path runs; default dispatch, then mem-efficient and cuDNN pinned).
           TFLOP/s count only the real (unpadded) tokens.
  dropout  p = 0.1, same shapes as dense: hf_flash p = 0 vs p = 0.1 (the dropout cost
           t(p) / t(0) - 1), SDPA flash p = 0 and p = 0.1, and the fraction of elements the
           kernel's Philox mask keeps (expected 1 - p).

Forward FLOPs = 4*B*H*N^2*D (halved when causal), backward = 2.5x forward. Times are medians of
triton.testing.do_bench; backward is timed on a precomputed forward graph. Every ratio compares
methods measured in the same run. Writes <out-dir>/<name>.{json,md,png} (JSON after every row)
and prints the Markdown tables last.
"""

import argparse
import contextlib
import gc
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from _common import (DOCS_BENCHMARKS, SDPA_BACKENDS, attempt, bench_ms, environment, environment_line, fmt,
                     jsonable_args, kernels, pyplot, require_cuda, save_figure, sdpa, tuned_kernels, write_outputs)

import hf_flash

METHODS = ["hf_flash", "sdpa_flash", "sdpa_cudnn", "sdpa_mem_eff", "torch"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_MAX_SCORE_BYTES = 8 * 2**30  # beyond this the naive scores (plus their grads) do not fit
MEM_SEQLENS, MEM_HEADS, MEM_HEADDIM = (4096, 16384, 65536), 16, 64
DEVICE = "cuda"
TOKENS, WIDTH = 16384, 2048  # batch * seqlen and nheads * headdim, fixed across rows
CASES = ("dense", "padded", "dropout")
DENSE_SEQLENS, FEATURE_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384], [1024, 4096]
PADDED_BATCH, PADDED_HEADS, PADDED_HEADDIM = 8, 16, 64
PADDED_METHODS = ["hf_flash_masks", "hf_flash_varlen", "sdpa_masked", "sdpa_mem_eff_masked", "sdpa_cudnn_masked"]
DROPOUT_P = 0.1
DROPOUT_METHODS = ["hf_flash_p0", "hf_flash_p", "sdpa_flash_p0", "sdpa_flash_p"]



def naive(q, k, v, mask):
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _fa4():
    """flash_attn.cute.flash_attn_func (FlashAttention-4: PyPI flash-attn-4 with nvidia-cutlass-dsl), else None."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # not installed, or its CUDA libraries do not load here
        return None
    return flash_attn_func


FA4 = _fa4()


class SearchMode:
    """`with SEARCH:` hf_flash times its candidates (a search of its own, whatever HF_FLASH_AUTOTUNE says), its
    choices and cached launches kept apart from the default mode's. Global for the whole timing, since autograd runs
    the backward on a thread of its own."""

    def __init__(self):
        self.chosen, self.compiled = {}, {}

    def __enter__(self):
        launch = kernels().launch
        self.saved = kernels().settings.AUTOTUNE, launch._CHOSEN, launch._COMPILED
        kernels().settings.AUTOTUNE, launch._CHOSEN, launch._COMPILED = True, self.chosen, self.compiled
        for kernel in tuned_kernels().values():
            kernel.cache_results = False  # a search in this run, not a choice read from an earlier one

    def __exit__(self, *exc):
        launch = kernels().launch
        kernels().settings.AUTOTUNE, launch._CHOSEN, launch._COMPILED = self.saved


SEARCH = SearchMode()
MODES = {"hf_flash_search": SEARCH}


def make_methods(q, k, v, qt, kt, vt, causal, batch, nheads, seqlen, vs_search=False):
    """Forward closures plus the leaves whose .grad do_bench must reset; inputs are prepared here,
    outside the timed code, in each method's native layout."""
    fns = {"hf_flash": (lambda: hf_flash.flash_attn_func(q, k, v, causal=causal), [q, k, v])}
    if vs_search:
        fns["hf_flash_search"] = fns["hf_flash"]  # timed under SEARCH (time_methods)
    if FA4 is not None:  # the same (batch, seqlen, nheads, headdim) layout as ours; it may also return the lse
        fns["fa4"] = (lambda: _first(FA4(q, k, v, causal=causal)), [q, k, v])
    for name, backend in SDPA_BACKENDS.items():
        fns[name] = (lambda b=backend: sdpa(qt, kt, vt, causal, b), [qt, kt, vt])
    if batch * nheads * seqlen**2 * 2 <= TORCH_MAX_SCORE_BYTES:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1) if causal else None
        fns["torch"] = (lambda: naive(qt, kt, vt, mask), [qt, kt, vt])
    return fns


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def compare(out, grads, ref, ref_grads, rows=None):
    """Max |out - ref| (over `rows`, a bool (batch, seqlen) mask, if given) and max relative gradient
    differences, all in (batch, seqlen, nheads, headdim); ok under generous bounds that only need to
    catch a broken kernel, not grade accuracy."""
    diff = (out.float() - ref.float()).abs()
    res = {"max_abs_diff_out": (diff[rows] if rows is not None else diff).max().item()}
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        res[f"max_rel_diff_{name}"] = ((g.float() - g_ref.float()).abs().max() / g_ref.float().abs().max()).item()
    tol_out = 1e-2 if out.dtype == torch.float16 else 5e-2
    diffs = [res["max_abs_diff_out"]] + [res[f"max_rel_diff_{n}"] for n in ("dq", "dk", "dv")]
    res["ok"] = all(math.isfinite(d) for d in diffs) and diffs[0] <= tol_out and max(diffs[1:]) <= 0.1
    return res


def run_with_grads(fwd, leaves, dout, transposed=False):
    """out and the gradients of its leaves for dout, both in (batch, seqlen, nheads, headdim)."""
    out = fwd()
    grads = torch.autograd.grad(out, leaves, dout.transpose(1, 2) if transposed else dout)
    if transposed:
        return out.transpose(1, 2), [g.transpose(1, 2) for g in grads]
    return out, list(grads)


def check(q, k, v, qt, kt, vt, causal):
    """hf_flash vs SDPA flash (any SDPA backend if flash is unavailable), output and gradients."""
    ref_name, ref_fwd = "sdpa_flash", lambda: sdpa(qt, kt, vt, causal, "FLASH_ATTENTION")
    if attempt(ref_fwd)[0] is None:
        ref_name, ref_fwd = "sdpa_default", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dout = torch.randn_like(q)
    out, grads = run_with_grads(lambda: hf_flash.flash_attn_func(q, k, v, causal=causal), [q, k, v], dout)
    ref, ref_grads = run_with_grads(ref_fwd, [qt, kt, vt], dout, transposed=True)
    return {"reference": ref_name, **compare(out, grads, ref, ref_grads)}


def time_method(fwd, leaves, args):
    """Median forward ms, and backward ms on one retained forward graph (not fwd+bwd minus fwd)."""
    def timed(fn, grads=None):
        return bench_ms(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads)

    def bwd():
        out = fwd()
        dout = torch.randn_like(out)
        return timed(lambda: out.backward(dout, retain_graph=True), leaves)

    ms_f, err = attempt(lambda: timed(fwd))
    ms_b, err = attempt(bwd) if ms_f is not None else (None, err)
    return ms_f, ms_b, err


def time_methods(row, methods, order, fwd_flops, refused, args):
    """Fill row's fwd/bwd ms and TFLOP/s for each method in order; refused: name -> why it is not timed."""
    for key in ("fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "errors"):
        row.setdefault(key, {})
    for name in order:
        ms_f = ms_b = None
        if refused.get(name):
            row["errors"][name] = refused[name]
        else:
            with MODES.get(name, contextlib.nullcontext()):
                ms_f, ms_b, row["errors"][name] = time_method(*methods[name], args)
        row["fwd_ms"][name], row["bwd_ms"][name] = ms_f, ms_b
        row["fwd_tflops"][name] = fwd_flops / (ms_f * 1e-3) / 1e12 if ms_f else None
        row["bwd_tflops"][name] = 2.5 * fwd_flops / (ms_b * 1e-3) / 1e12 if ms_b else None
        gc.collect()
        torch.cuda.empty_cache()
    row["errors"] = {k_: e for k_, e in row["errors"].items() if e}


def speedup(row, pas, ours, other):
    """other's time / ours (> 1: ours faster), or None when either is missing."""
    a, b = row[f"{pas}_ms"].get(ours), row[f"{pas}_ms"].get(other)
    return b / a if a and b else None


def dense_methods(args):
    return METHODS + (["fa4"] if FA4 is not None else []) + (["hf_flash_search"] if args.vs_search else [])


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
    methods = make_methods(q, k, v, qt, kt, vt, causal, batch, nheads, seqlen, args.vs_search)
    refused = {"hf_flash": None if (row["check"] or {}).get("ok") else
               err or f"correctness check failed: {row['check']}"}  # never time a wrong kernel
    refused["hf_flash_search"] = refused["hf_flash"]
    order = dense_methods(args)
    refused.update({m: "skipped: score matrix too large" for m in order if m not in methods})
    time_methods(row, methods, order, fwd_flops, refused, args)
    for pas in ("fwd", "bwd"):
        tf = row[f"{pas}_tflops"]
        for other in ("sdpa_flash", "sdpa_cudnn", *order[len(METHODS):]):
            ok = tf["hf_flash"] and tf[other]
            row.setdefault("ratios", {})[f"{pas}_hf_over_{other}"] = tf["hf_flash"] / tf[other] if ok else None
    return row


def padded_lengths(seqlen, batch=PADDED_BATCH):
    """Sequence lengths uniform in [seqlen/2, seqlen], seeded by seqlen so every run draws the same."""
    return torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=torch.Generator().manual_seed(seqlen))


def bench_padded(dtype_name, seqlen, args):
    """A right-padded batch: hf_flash's in-kernel padding masks, unpad -> varlen -> pad, SDPA with a mask."""
    batch, nheads, headdim, dtype = PADDED_BATCH, PADDED_HEADS, PADDED_HEADDIM, DTYPES[dtype_name]
    lengths = padded_lengths(seqlen, batch)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).to(DEVICE)
    row = {"dtype": dtype_name, "headdim": headdim, "seqlen": seqlen, "causal": False, "batch": batch,
           "nheads": nheads, "lengths": lengths.tolist(), "real_tokens": int(lengths.sum())}
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    real = mask.flatten().nonzero().squeeze(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    max_len = int(lengths.max())

    def varlen():  # what a Transformers adapter does: gather the real tokens, attend, scatter back
        packed = [t.flatten(0, 1).index_select(0, real) for t in (q, k, v)]
        out = hf_flash.flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, max_len, max_len)
        return out.new_zeros(batch * seqlen, nheads, headdim).index_copy(0, real, out).view(q.shape)

    attn_mask = mask[:, None, None, :]  # True = attend; masks keys only, as transformers' sdpa mask does
    methods = {
        "hf_flash_masks": (lambda: hf_flash.flash_attn_func(q, k, v, key_padding_mask=mask, query_padding_mask=mask),
                           [q, k, v]),
        "hf_flash_varlen": (varlen, [q, k, v]),
        # SDPA's own dispatch: a boolean mask rules out flash, so cuDNN or mem-efficient, whichever accepts it
        "sdpa_masked": (lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask), [qt, kt, vt]),
        "sdpa_mem_eff_masked": (lambda: sdpa(qt, kt, vt, False, "EFFICIENT_ATTENTION", attn_mask), [qt, kt, vt]),
        "sdpa_cudnn_masked": (lambda: sdpa(qt, kt, vt, False, "CUDNN_ATTENTION", attn_mask), [qt, kt, vt]),
    }

    def check_padded():
        # dout is zero on padded queries, so every method's gradients agree everywhere, padding included
        dout = torch.randn_like(q) * mask[:, :, None, None]
        ref, ref_grads = run_with_grads(methods["sdpa_masked"][0], [qt, kt, vt], dout, transposed=True)
        return {name: compare(*run_with_grads(methods[name][0], [q, k, v], dout), ref, ref_grads, rows=mask)
                for name in ("hf_flash_masks", "hf_flash_varlen")}

    row["check"], err = attempt(check_padded)
    refused = {name: None if ((row["check"] or {}).get(name) or {}).get("ok") else
               err or f"correctness check failed: {row['check'][name]}" for name in PADDED_METHODS[:2]}
    fwd_flops = 4 * nheads * headdim * float((lengths.double() ** 2).sum())
    time_methods(row, methods, PADDED_METHODS, fwd_flops, refused, args)
    row["ratios"] = {f"{pas}_{ours}_over_{other}": speedup(row, pas, ours, other)
                     for pas in ("fwd", "bwd") for ours in ("hf_flash_masks", "hf_flash_varlen")
                     for other in ("sdpa_masked", "sdpa_mem_eff_masked")}
    return row


def check_dropout(dtype, headdim, causal, p=DROPOUT_P, shape=(2, 300, 4)):
    """hf_flash with dropout against the reference given the kernel's own keep mask, on a small problem."""
    batch, seqlen, nheads = shape
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    state = torch.cuda.get_rng_state()
    out, grads = run_with_grads(lambda: hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p), [q, k, v], dout)
    torch.cuda.set_rng_state(state)  # the call draws exactly one seed: draw it again
    dropout = kernels().dropout
    keep = dropout.dropout_mask(dropout.draw_dropout_seed(q.device), batch, nheads, seqlen, seqlen, p)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    def reference():
        return hf_flash.attention_reference(q32, k32, v32, causal=causal, dropout_p=p, dropout_mask=keep)[0]

    ref, ref_grads = run_with_grads(reference, [q32, k32, v32], dout.float())
    return compare(out, grads, ref, ref_grads)


def kept_fraction(nheads, seqlen, p=DROPOUT_P):
    """Fraction of a (2, nheads, seqlen, seqlen) Philox keep mask that is kept, and its z against the exact keep
    probability (p quantised up to 14 bits: 0.899963 at p = 0.1, which 1 - p would put at z ~ -3 on this mask)."""
    dropout = kernels().dropout
    keep = dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), 2, nheads, seqlen, seqlen, p)
    q = dropout.kept_probability(p)
    kept, sigma = keep.sum(dtype=torch.int64).item() / keep.numel(), math.sqrt(q * (1 - q) / keep.numel())
    return {"kept_fraction": kept, "kept_expected": q, "kept_fraction_sigma": sigma,
            "kept_fraction_z": (kept - q) / sigma}


def bench_dropout(dtype_name, headdim, seqlen, causal, args, p=DROPOUT_P):
    """hf_flash p = 0 vs p, and SDPA flash p = 0 vs p, on the dense shapes."""
    batch, nheads, dtype = TOKENS // seqlen, WIDTH // headdim, DTYPES[dtype_name]
    row = {"dtype": dtype_name, "headdim": headdim, "seqlen": seqlen, "causal": causal, "batch": batch,
           "nheads": nheads, "p": p}
    row["check"], err = attempt(lambda: check_dropout(dtype, headdim, causal, p))
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    methods = {
        "hf_flash_p0": (lambda: hf_flash.flash_attn_func(q, k, v, causal=causal), [q, k, v]),
        "hf_flash_p": (lambda: hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p), [q, k, v]),
        "sdpa_flash_p0": (lambda: sdpa(qt, kt, vt, causal, "FLASH_ATTENTION"), [qt, kt, vt]),
        "sdpa_flash_p": (lambda: sdpa(qt, kt, vt, causal, "FLASH_ATTENTION", dropout_p=p), [qt, kt, vt]),
    }
    refused = {"hf_flash_p": None if (row["check"] or {}).get("ok") else
               err or f"correctness check failed: {row['check']}"}
    fwd_flops = 4 * batch * nheads * seqlen**2 * headdim / (2 if causal else 1)
    time_methods(row, methods, DROPOUT_METHODS, fwd_flops, refused, args)
    row["ratios"] = {}
    for pas in ("fwd", "bwd"):
        for who in ("hf_flash", "sdpa_flash"):  # the dropout cost, t(p) / t(0) - 1
            slowdown = speedup(row, pas, f"{who}_p", f"{who}_p0")
            row["ratios"][f"{pas}_cost_{who}"] = 1 / slowdown - 1 if slowdown else None
        for p_ in ("p", "p0"):
            row["ratios"][f"{pas}_hf_over_sdpa_flash_{p_}"] = speedup(row, pas, f"hf_flash_{p_}", f"sdpa_flash_{p_}")
    stats, row["errors"]["kept_fraction"] = attempt(lambda: kept_fraction(nheads, seqlen, p))
    row.update(stats or {})
    row["errors"] = {k_: e for k_, e in row["errors"].items() if e}
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


def ms_cell(row, pas, method):
    """'ms (TFLOP/s)' of one method, — if it has no time."""
    ms = row[f"{pas}_ms"].get(method)
    return "—" if ms is None else f"{ms:.3f} ({fmt(row[f'{pas}_tflops'].get(method), '.0f')})"


def dense_markdown(rows):
    extra = [m for m in ("fa4", "hf_flash_search") if any(m in r["fwd_ms"] for r in rows)]
    methods = METHODS + extra
    others = [("sdpa_flash", "÷ flash"), ("sdpa_cudnn", "÷ cuDNN")] + [
        (m, {"fa4": "÷ FA4", "hf_flash_search": "÷ search"}[m]) for m in extra]
    lines = ["batch·seqlen = 16384, nheads·headdim = 2048; TFLOP/s from the median time "
             "(fwd 4·B·H·N²·D, halved when causal; bwd 2.5× fwd). Ratios > 1: hf_flash faster. "
             "— = unsupported, failed or skipped (see the JSON)."]
    for pas, title in (("fwd", "Forward"), ("bwd", "Backward")):
        lines += ["", f"## {title} TFLOP/s", "",
                  "| dtype | hd | seqlen | causal | " + " | ".join(methods + [t for _, t in others]) + " |",
                  "|" + "---|" * 4 + "---:|" * (len(methods) + len(others))]
        for r in rows:
            ratios = r.get("ratios", {})
            cells = [r["dtype"], r["headdim"], r["seqlen"], "yes" if r["causal"] else "no"]
            cells += [fmt(r[f"{pas}_tflops"].get(m)) for m in methods]
            cells += [fmt(ratios.get(f"{pas}_hf_over_{o}"), ".2f", "×") for o, _ in others]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def padded_markdown(rows):
    lines = [f"## Padded batch: {PADDED_BATCH} sequences, lengths uniform in [N/2, N], right padding, "
             f"{PADDED_HEADS} heads, hd {PADDED_HEADDIM}, non-causal", "",
             "ms (TFLOP/s counted on the real tokens: 4·H·D·Σ len², bwd 2.5×). masks: hf_flash with "
             "key_padding_mask + query_padding_mask; varlen: unpad → flash_attn_varlen_func → pad (gather and "
             "scatter timed); SDPA: boolean attn_mask, SDPA's own choice of backend, then mem-efficient and "
             "cuDNN pinned. Ratios: SDPA time ÷ ours (> 1: hf_flash faster)."]
    names = ["masks", "varlen", "SDPA", "SDPA mem-eff", "SDPA cuDNN"]
    for pas, title in (("fwd", "Forward"), ("bwd", "Backward")):
        lines += ["", f"### {title}", "",
                  "| dtype | N | real tokens | " + " | ".join(names) +
                  " | masks ÷ SDPA | varlen ÷ SDPA | masks ÷ mem-eff | varlen ÷ mem-eff |",
                  "|---|---|---:|" + "---:|" * (len(names) + 4)]
        for r in rows:
            ratios = r.get("ratios", {})
            cells = [r["dtype"], r["seqlen"], r["real_tokens"]] + [ms_cell(r, pas, m) for m in PADDED_METHODS]
            cells += [fmt(ratios.get(f"{pas}_{ours}_over_{other}"), ".2f", "×")
                      for other in ("sdpa_masked", "sdpa_mem_eff_masked") for ours in PADDED_METHODS[:2]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def dropout_markdown(rows):
    p = rows[0]["p"]
    lines = [f"## Dropout p = {p}: batch·seqlen = 16384, nheads·headdim = 2048", "",
             "ms (TFLOP/s, dropout not counted). Cost = t(p) ÷ t(0) − 1 (target for hf_flash: ≤ 15% forward). "
             "÷ SDPA = SDPA flash time ÷ hf_flash time at the same p (> 1: hf_flash faster). Kept: fraction of a "
             "(2, H, N, N) keep mask that is kept, and z = (kept − q) / σ against the exact keep probability q "
             f"(p quantised up to 14 bits: q = {rows[0].get('kept_expected', 1 - p):.6f})."]
    for pas, title in (("fwd", "Forward"), ("bwd", "Backward")):
        kept = " kept | z |" if pas == "fwd" else ""
        lines += ["", f"### {title}", "",
                  "| dtype | hd | N | causal | hf_flash p=0 | hf_flash p | cost | SDPA flash p=0 | SDPA flash p "
                  f"| SDPA cost | ÷ SDPA (p) | ÷ SDPA (p=0) |{kept}",
                  "|---|---|---|---|" + "---:|" * (8 + (2 if kept else 0))]
        for r in rows:
            ratios = r.get("ratios", {})
            cells = [r["dtype"], r["headdim"], r["seqlen"], "yes" if r["causal"] else "no"]
            cells += [ms_cell(r, pas, "hf_flash_p0"), ms_cell(r, pas, "hf_flash_p"),
                      fmt(ratios.get(f"{pas}_cost_hf_flash"), "+.0%"),
                      ms_cell(r, pas, "sdpa_flash_p0"), ms_cell(r, pas, "sdpa_flash_p"),
                      fmt(ratios.get(f"{pas}_cost_sdpa_flash"), "+.0%"),
                      fmt(ratios.get(f"{pas}_hf_over_sdpa_flash_p"), ".2f", "×"),
                      fmt(ratios.get(f"{pas}_hf_over_sdpa_flash_p0"), ".2f", "×")]
            if kept:
                cells += [fmt(r.get("kept_fraction"), ".5f"), fmt(r.get("kept_fraction_z"), "+.1f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def markdown(results):
    env = results["env"]
    lines = [f"# Kernel benchmark: {env['gpu']}", "", environment_line(env), ""]
    if results["rows"]:
        lines += dense_markdown(results["rows"])
    if results.get("memory"):
        lines += ["", f"## Peak memory of one forward+backward (batch 1, {MEM_HEADS} heads, hd {MEM_HEADDIM}, "
                  "fp16, non-causal)", "", "Extra = peak minus inputs, dout and grads.", "",
                  "| method | seqlen | peak MiB | extra MiB | extra MiB / 1K tokens | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for m in results["memory"]:
            lines.append(f"| {m['method']} | {m['seqlen']} | {fmt(m.get('peak_mib'))} | {fmt(m.get('extra_mib'))} "
                         f"| {fmt(m.get('extra_mib_per_1k_tokens'), '.2f')} | {m.get('error', '')} |")
    for key, table in (("padded", padded_markdown), ("dropout", dropout_markdown)):
        if results.get(key):
            lines += [""] + table(results[key])
    return "\n".join(lines) + "\n"


def plot(results, path):
    rows = results["rows"]
    plt = pyplot()
    if plt is None or not rows:
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
    save_figure(plt, fig, path)


def save(results, args, final):
    """The JSON after every row; the Markdown and the plot at the end."""
    return write_outputs(args.out_dir, args.name, results, markdown if final else None, plot if final else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="case groups to run (default: all)")
    p.add_argument("--headdims", type=int, nargs="+", default=[64, 128], help="dense and dropout head dims")
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help=f"default: {DENSE_SEQLENS} for dense, {FEATURE_SEQLENS} for padded and dropout")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both", help="dense and dropout")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--quick", action="store_true",
                   help="fp16 only; dense hd 64/128 seqlen 1024/4096 causal both, padded N 4096, dropout N 4096 hd 64")
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS,
                   help="default: docs/benchmarks in the repository")
    p.add_argument("--name", default="bench_kernels", help="output file stem: <out-dir>/<name>.{json,md,png}")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory section (part of dense)")
    p.add_argument("--vs-search", action="store_true",
                   help="dense rows also time hf_flash with a timed search of its own (hf_flash_search)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    args = p.parse_args(argv)
    args.dropout_headdims = args.headdims
    args.dense_seqlens = args.seqlens or DENSE_SEQLENS
    args.padded_seqlens = args.dropout_seqlens = args.seqlens or FEATURE_SEQLENS
    if args.quick:
        args.headdims, args.dense_seqlens, args.causal, args.dtypes = [64, 128], [1024, 4096], "both", ["fp16"]
        args.padded_seqlens, args.dropout_seqlens, args.dropout_headdims = [4096], [4096], [64]
    return args


def check_summary(check):
    """'ok (out diff 1.2e-03)' / 'FAIL (...)' for a compare() result."""
    check = check or {}
    return f"{'ok' if check.get('ok') else 'FAIL'} (out diff {fmt(check.get('max_abs_diff_out'), '.1e')})"


def main(argv=None):
    args = parse_args(argv)
    require_cuda("bench_kernels.py")
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    grids = {
        "dense": [(d, hd, n, c) for d in args.dtypes for hd in args.headdims for c in causals
                  for n in args.dense_seqlens],
        "padded": [(d, n) for d in args.dtypes for n in args.padded_seqlens],
        "dropout": [(d, hd, n, c) for d in args.dtypes for hd in args.dropout_headdims for c in causals
                    for n in args.dropout_seqlens],
    }
    results = {"env": environment(), "args": jsonable_args(args),
               "rows": [], "memory": [], "padded": [], "dropout": []}
    print(f"{results['env']['gpu']} | torch {torch.__version__} | triton {triton.__version__} | cases {args.cases}",
          flush=True)
    if "dense" in args.cases:
        grid = grids["dense"]
        for i, (dtype_name, hd, n, causal) in enumerate(grid, 1):
            torch.manual_seed(0)
            row = bench_config(dtype_name, hd, n, causal, args)
            results["rows"].append(row)
            tf = " ".join(f"{m}={fmt(row['fwd_tflops'][m])}/{fmt(row['bwd_tflops'][m])}" for m in dense_methods(args))
            print(f"[dense {i}/{len(grid)}] {dtype_name} hd={hd} N={n} causal={causal} B={row['batch']} "
                  f"H={row['nheads']} check={check_summary(row['check'])} fwd/bwd TFLOP/s: {tf}", flush=True)
            save(results, args, final=False)  # a partial run still leaves its numbers on disk
        if not args.no_memory:
            for method in ("hf_flash", "sdpa_flash"):
                for n in MEM_SEQLENS:
                    m, err = attempt(lambda: peak_memory(method, n))
                    results["memory"].append(m or {"method": method, "seqlen": n, "error": err})
                    print(f"memory {method} N={n}: peak {fmt((m or {}).get('peak_mib'))} MiB, "
                          f"extra {fmt((m or {}).get('extra_mib'))} MiB {err or ''}", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
            save(results, args, final=False)
    if "padded" in args.cases:
        grid = grids["padded"]
        for i, (dtype_name, n) in enumerate(grid, 1):
            torch.manual_seed(0)
            row = bench_padded(dtype_name, n, args)
            results["padded"].append(row)
            checks = " ".join(f"{m}={check_summary((row['check'] or {}).get(m))}" for m in PADDED_METHODS[:2])
            ms = " ".join(f"{m}={fmt(row['fwd_ms'][m], '.3f')}/{fmt(row['bwd_ms'][m], '.3f')}" for m in PADDED_METHODS)
            print(f"[padded {i}/{len(grid)}] {dtype_name} N={n} real tokens {row['real_tokens']} {checks} "
                  f"fwd/bwd ms: {ms}", flush=True)
            save(results, args, final=False)
    if "dropout" in args.cases:
        grid = grids["dropout"]
        for i, (dtype_name, hd, n, causal) in enumerate(grid, 1):
            torch.manual_seed(0)
            row = bench_dropout(dtype_name, hd, n, causal, args)
            results["dropout"].append(row)
            ms = " ".join(f"{m}={fmt(row['fwd_ms'][m], '.3f')}/{fmt(row['bwd_ms'][m], '.3f')}" for m in DROPOUT_METHODS)
            cost = row["ratios"]
            print(f"[dropout {i}/{len(grid)}] {dtype_name} hd={hd} N={n} causal={causal} "
                  f"check={check_summary(row['check'])} "
                  f"fwd/bwd ms: {ms} cost fwd {fmt(cost['fwd_cost_hf_flash'], '+.0%')} bwd "
                  f"{fmt(cost['bwd_cost_hf_flash'], '+.0%')} kept {fmt(row.get('kept_fraction'), '.5f')} "
                  f"(z {fmt(row.get('kept_fraction_z'), '+.1f')}) {row['errors'] or ''}", flush=True)
            save(results, args, final=False)
    md = save(results, args, final=True)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
