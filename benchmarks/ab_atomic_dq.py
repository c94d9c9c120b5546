"""The dropout cost of our kernels next to SDPA-FA2's, in one run, with dQ by its own kernel and by atomics.

Forward p = 0 and 0.1; backward p = 0, p = 0.1 with the dQ kernel (ATOMIC_DQ=0) and p = 0.1 with dQ summed by the
dK/dV kernel with atomics (ATOMIC_DQ=1); SDPA's flash backend at p = 0 and 0.1 as the control. fp16, medians of
do_bench. Run from the repository root on a CUDA GPU: python benchmarks/ab_atomic_dq.py
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import hf_flash  # noqa: E402
from hf_flash.kernels import attention as A  # noqa: E402

SHAPES = [(4, 4096, 32, 64, False), (4, 4096, 32, 64, True), (16, 1024, 12, 64, True), (4, 4096, 16, 128, False)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def main():
    for b, n, h, d, causal in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
        r = {}
        for p in (0.0, 0.1):
            r[f"fwd {p}"] = bench(lambda: hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p))
            for mode in ("0", "1") if p else ("0",):
                A.ATOMIC_DQ = mode
                out = hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p)
                dout = torch.randn_like(out)
                r[f"bwd {p} {mode}"] = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            A.ATOMIC_DQ = "0"
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, dropout_p=p)
                r[f"FA2 fwd {p}"] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, dropout_p=p))
                dout = torch.randn_like(out)
                r[f"FA2 bwd {p}"] = bench(lambda: torch.autograd.grad(out, (qt, kt, vt), dout, retain_graph=True))
        cost = lambda a, b: f"{r[a] / r[b] - 1:+.0%}"
        print(f"B{b} N{n} H{h} D{d} causal={causal}, ms: ours fwd {r['fwd 0.0']:.3f} -> {r['fwd 0.1']:.3f} "
              f"({cost('fwd 0.1', 'fwd 0.0')}), bwd {r['bwd 0.0 0']:.3f} -> {r['bwd 0.1 0']:.3f} "
              f"({cost('bwd 0.1 0', 'bwd 0.0 0')}), atomic dQ {r['bwd 0.1 1']:.3f} ({cost('bwd 0.1 1', 'bwd 0.0 0')}) | "
              f"FA2 fwd {r['FA2 fwd 0.0']:.3f} -> {r['FA2 fwd 0.1']:.3f} ({cost('FA2 fwd 0.1', 'FA2 fwd 0.0')}), "
              f"bwd {r['FA2 bwd 0.0']:.3f} -> {r['FA2 bwd 0.1']:.3f} ({cost('FA2 bwd 0.1', 'FA2 bwd 0.0')}) | "
              f"FA2 / ours at p=0.1: fwd {r['FA2 fwd 0.1'] / r['fwd 0.1']:.2f}, bwd {r['FA2 bwd 0.1'] / r['bwd 0.1 0']:.2f}, "
              f"atomic {r['FA2 bwd 0.1'] / r['bwd 0.1 1']:.2f}", flush=True)


if __name__ == "__main__":
    main()
