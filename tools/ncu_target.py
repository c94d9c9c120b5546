"""A target for Nsight Compute: one launch of our tuned dense forward and one of cuDNN's, inside NVTX range "prof".

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats \\
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \\
        python tools/ncu_target.py --headdim 128 --config 64x64w4s3

B4 N4096 fp16, nheads x headdim = 2048, not causal. --config keeps one forward candidate (MxNwWsS): under
ncu every launch is replayed and serialised, so the autotuner's timings, and its choice, are not the real ones.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch  # noqa: E402

from _common import kernels, parse_config, sdpa, tuned_kernels  # noqa: E402

import hf_flash  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--config", help="the one forward config to keep, e.g. 64x64w4s3 (default: let the tuner pick)")
    args = p.parse_args(argv)
    if args.config:
        try:
            want = parse_config(args.config)
        except ValueError as error:
            raise SystemExit(f"--config: {error}") from None
        forward = tuned_kernels()["fwd"]
        forward.configs = [c for c in forward.configs if (c.kwargs, c.num_warps, c.num_stages)
                           == (want.kwargs, want.num_warps, want.num_stages)]
        if len(forward.configs) != 1:
            raise SystemExit(f"--config {args.config}: not one of the forward candidates")
        kernels().launch.reset_tuning()
    q, k, v = (torch.randn(4, 4096, 2048 // args.headdim, args.headdim, device="cuda", dtype=torch.float16)
               for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn():
        return sdpa(qt, kt, vt, False, "CUDNN_ATTENTION")

    for _ in range(3):  # tune and warm up outside the profiled range
        hf_flash.flash_attn_func(q, k, v)
        cudnn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    hf_flash.flash_attn_func(q, k, v)
    cudnn()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
