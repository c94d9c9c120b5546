"""What the autotuner saw: every candidate config's time for one attention shape, per kernel, in one run.

Each of the three kernels (forward, dQ, dK/dV) is tuned on the given shape; the report lists each config's
median GPU time (the tuner's own measurement, from a CUDA graph) sorted fastest first, with the one chosen
marked. --extra adds configs that are not among the candidates, to ask whether one would win, e.g.

    python tools/tune_report.py --batch 2 --seqlen 4096 --heads 12 --causal --dropout 0.1 \\
        --extra dkdv:64x64w8s3 dkdv:64x128w8s2r168 fwd:128x128w8s2

(M x N tile, w warps, s stages, optional r = maxnreg, q: a dK/dV tile as (queries, keys)). --dkdv-rows and
--atomic-dq set the kernels' private overrides (hf_flash.kernels.settings._DKDV_ROWS: which dK/dV tile orientations
the tuner times; settings._ATOMIC_DQ: when dQ is summed with atomics in the dK/dV kernel) for A/B comparisons, e.g.
`--dkdv-rows tune` times both orientations of every dK/dV tile. Then fwd and fwd+bwd times of the tuned kernels
next to SDPA's flash and cuDNN backends, from the same process. Needs a CUDA GPU.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch  # noqa: E402
import triton  # noqa: E402

from _common import bench_ms, describe_config, kernels, parse_config, sdpa, tuned_kernels  # noqa: E402

import hf_flash  # noqa: E402


def parse_extra(spec):
    """'KERNEL:MxNwWsS[rR][q]' -> (kernel name, triton.Config)."""
    kernel, _, tile = spec.partition(":")
    if kernel not in ("fwd", "dq", "dkdv"):
        raise SystemExit(f"--extra: expected KERNEL:MxNwWsS[rR][q] with KERNEL fwd, dq or dkdv, got {spec!r}")
    try:
        return kernel, parse_config(tile, dkdv=kernel == "dkdv")
    except ValueError as error:
        raise SystemExit(f"--extra {spec}: {error}") from None


def set_override(settings, name, value):
    """settings._ATOMIC_DQ / _DKDV_ROWS = value, refusing a name the kernels do not read."""
    if value is None:
        return
    if not hasattr(settings, name):
        raise SystemExit(f"hf_flash.kernels.settings has no {name}: this option does not apply to these kernels")
    setattr(settings, name, value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    p.add_argument("--extra", nargs="*", default=[], help="KERNEL:MxNwWsS[rR][q] configs to add to the candidates")
    p.add_argument("--dkdv-rows", choices=["0", "dropout", "1", "tune"], default=None,
                   help="dK/dV tile orientations the tuner times: 0 (keys, queries) only, 1 (queries, keys) only, "
                        "tune both, dropout both only under dropout (the kernels' default)")
    p.add_argument("--atomic-dq", choices=["0", "dropout", "1"], default=None,
                   help="dQ by its own kernel (0), summed with atomics in the dK/dV kernel (1), or atomics only "
                        "under dropout (the kernels' default)")
    args = p.parse_args(argv)
    hf_kernels = kernels()
    if not torch.cuda.is_available() or hf_kernels.settings.INTERPRET or not hf_kernels.settings.AUTOTUNE:
        raise SystemExit("tune_report.py needs a CUDA GPU, no TRITON_INTERPRET and HF_FLASH_AUTOTUNE unset or 1")
    set_override(hf_kernels.settings, "_DKDV_ROWS", args.dkdv_rows)
    set_override(hf_kernels.settings, "_ATOMIC_DQ", args.atomic_dq)
    kernel_by_name = tuned_kernels()
    for kernel, config in map(parse_extra, args.extra):
        kernel_by_name[kernel].configs.append(config)
    hf_kernels.launch.reset_tuning()

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.seqlen, args.heads, args.headdim, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    attn = lambda: hf_flash.flash_attn_func(q, k, v, causal=args.causal, dropout_p=args.dropout)  # noqa: E731
    out = attn()
    dout = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v), dout)  # tunes the backward's kernels
    torch.cuda.synchronize()

    print(f"B{args.batch} N{args.seqlen} H{args.heads} d{args.headdim} {args.dtype} causal={args.causal} "
          f"dropout={args.dropout} atomic dQ={getattr(hf_kernels.settings, '_ATOMIC_DQ', '?')} "
          f"dK/dV rows={getattr(hf_kernels.settings, '_DKDV_ROWS', '?')} | {torch.cuda.get_device_name()}, "
          f"triton {triton.__version__}")
    for name, kernel in kernel_by_name.items():
        timings = getattr(kernel, "configs_timings", None) or {}
        best = min(timings, key=lambda c: timings[c][0]) if timings else None
        print(f"{name}: {len(timings)} configs timed, ms (median)")
        for config, t in sorted(timings.items(), key=lambda item: item[1][0]):
            print(f"  {t[0]:8.4f}  {describe_config(config)}{'  <- chosen' if config is best else ''}")

    fwd_bwd = lambda f: (lambda: torch.autograd.grad(f(), (q, k, v), dout))  # noqa: E731
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    rows = [("hf_flash", attn, fwd_bwd(attn))]
    for label, backend in (("sdpa flash", "FLASH_ATTENTION"), ("sdpa cuDNN", "CUDNN_ATTENTION")):
        def baseline(backend=backend):
            return sdpa(qt, kt, vt, args.causal, backend, dropout_p=args.dropout).transpose(1, 2)
        rows.append((label, baseline, lambda f=baseline: torch.autograd.grad(f(), (qt, kt, vt), dout)))
    print("method        fwd ms   fwd+bwd ms")
    for label, fwd, both in rows:
        try:
            print(f"{label:12s} {bench_ms(fwd):7.3f}  {bench_ms(both):9.3f}", flush=True)
        except RuntimeError as error:  # e.g. a backend that refuses dropout
            print(f"{label:12s} failed: {str(error).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
