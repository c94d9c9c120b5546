"""The dK/dV kernel's tile as (keys, queries) against (queries, keys) (kernels.DKDV_ROWS "0" against "1").

For each shape: our forward at p = 0 and 0.1; our backward at p = 0 and 0.1 in both orientations
(kernels.DKDV_ROWS "0" and "1", each tuned apart over the tiles in that orientation; dQ as by default:
atomics when dropout is on); SDPA's FlashAttention-2 and cuDNN backends as controls; and how far the two
orientations' gradients are apart (same seed, so the same dropout mask). Medians of do_bench, ms.
Run from the repository root on a CUDA GPU: python benchmarks/ab_dkdv_rows.py
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import hf_flash  # noqa: E402
from hf_flash.kernels import attention as A  # noqa: E402

# (batch, seqlen, heads, headdim, causal, dtype): the FlashAttention-paper shapes, then GPT-2 small's 4K step
SHAPES = [(4, 4096, 32, 64, False, torch.float16), (4, 4096, 32, 64, True, torch.float16),
          (16, 1024, 12, 64, True, torch.float16), (4, 4096, 16, 128, False, torch.float16),
          (2, 4096, 12, 64, True, torch.bfloat16)]
BACKENDS = {"FA2": torch.nn.attention.SDPBackend.FLASH_ATTENTION, "cuDNN": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def grads(q, k, v, dout, causal, p):
    torch.manual_seed(1)
    out = hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p)
    return torch.autograd.grad(out, (q, k, v), dout)


def main():
    for b, n, h, d, causal, dtype in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        r, apart = {}, {}
        for p in (0.0, 0.1):
            r[f"fwd {p}"] = bench(lambda: hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p))
            ref = None
            for rows in ("0", "1"):
                A.DKDV_ROWS = rows
                A.reset_tuning()  # the orientation is a tuned parameter: the candidates change with the switch
                out = hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p)
                r[f"bwd {p} rows {rows}"] = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                g = grads(q, k, v, dout, causal, p)
                if ref is None:
                    ref = g
                else:
                    apart[p] = max(((a.float() - b_.float()).abs().max() / b_.float().abs().max()).item()
                                   for a, b_ in zip(g, ref))
            A.DKDV_ROWS = "0"
            A.reset_tuning()
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            for name, backend in BACKENDS.items():
                with torch.nn.attention.sdpa_kernel(backend):
                    try:
                        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, dropout_p=p)
                        r[f"{name} bwd {p}"] = bench(lambda: torch.autograd.grad(
                            out, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True))
                    except RuntimeError:  # a backend that refuses this case
                        r[f"{name} bwd {p}"] = float("nan")
        print(f"B{b} N{n} H{h} D{d} causal={causal} {str(dtype)[6:]}, ms: fwd {r['fwd 0.0']:.3f} / {r['fwd 0.1']:.3f}"
              + "".join(f" | bwd p={p}: keys-rows {r[f'bwd {p} rows 0']:.3f}, query-rows {r[f'bwd {p} rows 1']:.3f}"
                        f" ({r[f'bwd {p} rows 1'] / r[f'bwd {p} rows 0']:.2f}), FA2 {r[f'FA2 bwd {p}']:.3f},"
                        f" cuDNN {r[f'cuDNN bwd {p}']:.3f}, grads apart {apart[p]:.1e}" for p in (0.0, 0.1)),
              flush=True)


if __name__ == "__main__":
    main()
