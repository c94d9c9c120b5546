"""EXPERIMENT (branch dropout-16-draws): A/B in one run: backward with the dQ kernel (ATOMIC_DQ=0) vs dQ summed by dK/dV with atomics (1), p = 0 and 0.1.
Also the forward's dropout cost. Run on the dropout-16-draws branch."""
import sys
import torch, triton
sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parents[1])]
import hf_flash
from hf_flash.kernels import attention as A

bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
rows = []
for b, n, h, d, causal in [(4, 4096, 32, 64, False), (4, 4096, 32, 64, True), (16, 1024, 32, 64, True),
                           (4, 4096, 16, 128, False), (1, 16384, 12, 64, True)]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    res = {}
    for p in (0.0, 0.1):
        grads = {}
        for mode in ("0", "1"):
            A.ATOMIC_DQ = mode
            A.reset_tuning()  # ATOMIC_DQ is not in the tune key: tune each variant for itself
            torch.manual_seed(1)
            out = hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p)
            dout = torch.randn_like(out)
            grads[mode] = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            res[f"bwd p={p} mode={mode}"] = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        res[f"fwd p={p}"] = bench(lambda: hf_flash.flash_attn_func(q, k, v, causal=causal, dropout_p=p))
        res[f"maxdiff p={p}"] = max((x - y).abs().max().item() / y.abs().max().item()
                                    for x, y in zip(grads["0"], grads["1"]))
    print(f"B{b} N{n} H{h} D{d} causal={causal}: " + ", ".join(
        f"{key} {val:.3f}" if "diff" not in key else f"{key} {val:.1e}" for key, val in res.items()), flush=True)
    f0, f1 = res["fwd p=0.0"], res["fwd p=0.1"]
    print(f"   fwd dropout cost {f1 / f0 - 1:+.0%}; bwd dropout cost two kernels {res['bwd p=0.1 mode=0'] / res['bwd p=0.0 mode=0'] - 1:+.0%}, "
          f"atomic {res['bwd p=0.1 mode=1'] / res['bwd p=0.0 mode=0'] - 1:+.0%} (vs two-kernel p=0); atomic ÷ two-kernel at p=0 "
          f"{res['bwd p=0.0 mode=1'] / res['bwd p=0.0 mode=0']:.2f}, at p=0.1 {res['bwd p=0.1 mode=1'] / res['bwd p=0.1 mode=0']:.2f}",
          flush=True)
