"""What the autotuner saw: every candidate config's time for one attention shape, per kernel, in one run.

Each of the three kernels (forward, dQ, dK/dV) is tuned on the given shape; the report lists each config's
median GPU time (the tuner's own measurement, from a CUDA graph) sorted fastest first, with the one chosen
marked. --extra adds configs that are not among the candidates, to ask whether one would win, e.g.

    python benchmarks/tune_report.py --batch 2 --seqlen 4096 --heads 12 --causal --dropout 0.1 \
        --extra dkdv:64x64w8s3 dkdv:64x128w8s2r168 fwd:128x128w8s2

(M x N tile, w warps, s stages, optional r = maxnreg, q: a dK/dV tile as (queries, keys), see
HF_FLASH_DKDV_ROWS, which also decides which orientations the candidates include). Then fwd and fwd+bwd times of the tuned kernels next
to SDPA's flash and cuDNN backends, from the same process. Needs a CUDA GPU.
"""
import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import hf_flash  # noqa: E402
from hf_flash.kernels import attention as A  # noqa: E402

KERNELS = {"fwd": A._attn_fwd, "dq": A._attn_bwd_dq, "dkdv": A._attn_bwd_dkdv}
EXTRA = re.compile(r"(fwd|dq|dkdv):(\d+)x(\d+)w(\d+)s(\d+)(?:r(\d+))?(q?)$")


def parse_extra(spec):
    match = EXTRA.match(spec)
    if not match or (match.group(7) and match.group(1) != "dkdv"):
        raise SystemExit(f"--extra: expected KERNEL:MxNwWsS[rR][q] with KERNEL fwd, dq or dkdv (q: dkdv only), "
                         f"got {spec!r}")
    kernel, m, n, w, s, r, rows = match.groups()
    flags = {"QK_ROWS": bool(rows)} if kernel == "dkdv" else {}
    return kernel, triton.Config({**flags, "BLOCK_M": int(m), "BLOCK_N": int(n)}, num_warps=int(w), num_stages=int(s),
                                 maxnreg=int(r) if r else None)


def describe(config):
    kw = config.kwargs
    reg = f" maxnreg {config.maxnreg}" if config.maxnreg else ""
    rows = " (queries, keys)" if kw.get("QK_ROWS") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}{reg}{rows}"


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    p.add_argument("--extra", nargs="*", default=[], help="KERNEL:MxNwWsS[rR] configs to add to the candidates")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or A.INTERPRET or not A.AUTOTUNE:
        raise SystemExit("tune_report.py needs a CUDA GPU, no TRITON_INTERPRET and HF_FLASH_AUTOTUNE unset or 1")
    for kernel, config in map(parse_extra, args.extra):
        KERNELS[kernel].configs.append(config)
    A.reset_tuning()

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.seqlen, args.heads, args.headdim, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    attn = lambda: hf_flash.flash_attn_func(q, k, v, causal=args.causal, dropout_p=args.dropout)
    out = attn()
    dout = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v), dout)  # tunes the backward's kernels
    torch.cuda.synchronize()

    print(f"B{args.batch} N{args.seqlen} H{args.heads} d{args.headdim} {args.dtype} causal={args.causal} "
          f"dropout={args.dropout} atomic dQ={A.ATOMIC_DQ} | {torch.cuda.get_device_name()}, triton {triton.__version__}")
    for name, kernel in KERNELS.items():
        timings = getattr(kernel, "configs_timings", None) or {}
        best = min(timings, key=lambda c: timings[c][0]) if timings else None
        print(f"{name}: {len(timings)} configs timed, ms (median)")
        for config, t in sorted(timings.items(), key=lambda item: item[1][0]):
            print(f"  {t[0]:8.4f}  {describe(config)}{'  <- chosen' if config is best else ''}")

    fwd_bwd = lambda f: (lambda: torch.autograd.grad(f(), (q, k, v), dout))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    rows = [("hf_flash", attn, fwd_bwd(attn))]
    for label, backend in (("sdpa flash", "FLASH_ATTENTION"), ("sdpa cuDNN", "CUDNN_ATTENTION")):
        def sdpa(backend=getattr(torch.nn.attention.SDPBackend, backend)):
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal,
                                                      dropout_p=args.dropout).transpose(1, 2)
        rows.append((label, sdpa, lambda sdpa=sdpa: torch.autograd.grad(sdpa(), (qt, kt, vt), dout)))
    print("method        fwd ms   fwd+bwd ms")
    for label, fwd, both in rows:
        try:
            print(f"{label:12s} {bench(fwd):7.3f}  {bench(both):9.3f}", flush=True)
        except RuntimeError as error:  # e.g. a backend that refuses dropout
            print(f"{label:12s} failed: {str(error).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
