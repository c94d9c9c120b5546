"""Kernel-feature benchmarks: padded batches, dropout, sliding windows (fp16, H100/H200).

    python benchmarks/bench_features.py [--out-dir docs/benchmarks]

Each case is timed in one run against the SDPA backend a Transformers user would get for it, as
ratios (> 1 means hf_flash is faster). Writes bench_features.{json,md} and prints the tables last.
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def padded_batch(n, batch=8, nheads=16, head_dim=64, dtype=torch.float16):
    """Lengths uniform in [n/2, n], right padding. In-kernel masks vs unpad -> varlen -> pad vs SDPA."""
    lengths = torch.randint(n // 2, n + 1, (batch,), generator=torch.Generator().manual_seed(n))
    mask = torch.arange(n)[None, :] < lengths[:, None]
    mask_dev = mask.cuda()
    q, k, v = (torch.randn(batch, n, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    idx = mask_dev.flatten().nonzero().squeeze(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    max_len = int(lengths.max())

    def in_kernel(q, k, v):
        return hf_flash.flash_attn_func(q, k, v, key_padding_mask=mask_dev, query_padding_mask=mask_dev)

    def varlen(q, k, v):  # what an adapter does: gather the real tokens, attend, scatter back
        packed = [t.flatten(0, 1).index_select(0, idx) for t in (q, k, v)]
        out = hf_flash.flash_attn_varlen_func(*packed, cu, cu, max_len, max_len)
        return torch.zeros(batch * n, nheads, head_dim, device="cuda", dtype=dtype).index_copy(0, idx, out).view_as(q)

    attn_mask = mask_dev[:, None, None, :]

    def sdpa(q, k, v):  # transformers' sdpa path: a boolean mask, which rules out the flash backend
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=attn_mask).transpose(1, 2)

    ref = in_kernel(q, k, v)
    err = max((varlen(q, k, v) - ref)[mask_dev].abs().max().item(), (sdpa(q, k, v) - ref)[mask_dev].abs().max().item())
    row = {"seqlen": n, "batch": batch, "real_tokens": int(lengths.sum()), "max_abs_diff": err}
    for name, fn in (("in_kernel", in_kernel), ("varlen", varlen), ("sdpa_masked", sdpa)):
        row[name] = fwd_bwd(fn, (q, k, v))
    return row


def dropout(n, batch=None, nheads=16, head_dim=64, dtype=torch.float16, p=0.1):
    batch = batch or max(1, 16384 // n)
    q, k, v = (torch.randn(batch, n, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    row = {"seqlen": n, "batch": batch, "p": p}
    row["hf_flash_p0"] = fwd_bwd(lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v))
    row["hf_flash_p"] = fwd_bwd(lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True, dropout_p=p), (q, k, v))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row["sdpa_flash_p0"] = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (qt, kt, vt))
        row["sdpa_flash_p"] = fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p), (qt, kt, vt))
    keep = hf_flash.kernels.attention.dropout_mask(hf_flash.kernels.attention.draw_dropout_seed("cuda"),
                                                   2, nheads, n, n, p)
    row["kept_fraction"] = keep.float().mean().item()
    row["kept_fraction_sigma"] = math.sqrt(p * (1 - p) / keep.numel())
    return row


def window(n, left=256, nheads=16, head_dim=64, dtype=torch.float16):
    batch = max(1, 16384 // n)
    q, k, v = (torch.randn(batch, n, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    row = {"seqlen": n, "batch": batch, "window": left}
    row["causal"] = fwd_bwd(lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v))
    row["causal_window"] = fwd_bwd(
        lambda q, k, v: hf_flash.flash_attn_func(q, k, v, causal=True, window_size=(left, 0)), (q, k, v))
    return row


def tables(results):
    lines = ["### Padded batch (8 sequences, lengths uniform in [N/2, N], 16 heads, d64, fp16), ms fwd / bwd", "",
             "| N | in-kernel masks | unpad → varlen → pad | SDPA with mask | in-kernel vs SDPA (fwd / bwd) | varlen vs SDPA |",
             "|---|---|---|---|---|---|"]
    for r in results["padded"]:
        a, b, s = r["in_kernel"], r["varlen"], r["sdpa_masked"]
        lines.append(f"| {r['seqlen']} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | {s[0]:.3f} / {s[1]:.3f} "
                     f"| {s[0] / a[0]:.2f}× / {s[1] / a[1]:.2f}× | {s[0] / b[0]:.2f}× / {s[1] / b[1]:.2f}× |")
    lines += ["", "### Dropout p = 0.1, causal, 16 heads, d64, fp16, ms fwd / bwd", "",
              "| N | hf_flash p=0 | hf_flash p=0.1 | dropout cost fwd / bwd | SDPA flash p=0.1 | vs SDPA flash (fwd / bwd) | kept fraction |",
              "|---|---|---|---|---|---|---|"]
    for r in results["dropout"]:
        a, b, s = r["hf_flash_p0"], r["hf_flash_p"], r["sdpa_flash_p"]
        lines.append(f"| {r['seqlen']} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | "
                     f"+{100 * (b[0] / a[0] - 1):.0f}% / +{100 * (b[1] / a[1] - 1):.0f}% | {s[0]:.3f} / {s[1]:.3f} | "
                     f"{s[0] / b[0]:.2f}× / {s[1] / b[1]:.2f}× | {r['kept_fraction']:.5f} ± {r['kept_fraction_sigma']:.5f} |")
    lines += ["", "### Causal sliding window (256 back), 16 heads, d64, fp16, ms fwd / bwd", "",
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
               "padded": [], "dropout": [], "window": []}
    for n in (1024, 4096):
        results["padded"].append(padded_batch(n))
        print("padded", results["padded"][-1], flush=True)
    for n in (1024, 4096):
        results["dropout"].append(dropout(n))
        print("dropout", results["dropout"][-1], flush=True)
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
