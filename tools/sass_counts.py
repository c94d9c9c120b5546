"""Static view of the kernels without a GPU: compile for sm_90 on this machine and count SASS instructions.

Prints the resource report (registers, stack and local memory per thread, shared memory per block) and
counts per kernel and per loop body (the instructions between a backward branch and its target), by opcode.
Static counts only rank variants; every speed claim still needs a GPU run. The GPU's Triton compiles differently
from a newer local one (layouts, rematerialisation), so install its version apart and put it first on the path:

    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python tools/sass_counts.py --kernel dkdv --tile 64x128 --warps 8 --dropout 0 1

Needs Triton's bundled cuobjdump (part of the NVIDIA backend wheel); no CUDA driver.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from _common import tuned_kernels  # noqa: E402

KERNELS = tuned_kernels()
INT32_PTRS = {"CU_Q", "CU_K", "K_RANGE", "LY_NUM", "LY_IDX", "LY_FULL_NUM", "LY_FULL_IDX", "TILE_IDX", "TILES", "RULE",
              "ORDER", "MAJOR"}
FP32_PTRS = {"LSE", "Delta", "DLSE", "ALIBI"}
BASE = dict(IS_VARLEN=False, HAS_LEFT=False, HAS_RIGHT=False, HAS_KPM=False, HAS_QPM=False, HAS_ALIBI=False,
            PRECISION="tf32", INTERPRET=False, SPARSE=False, HAS_TILES=False, HAS_RULE=False, LAYOUT_BQ=0, LAYOUT_BK=0,
            HAS_DLSE=False, ATOMIC_DQ=False, DELTA_ONLY=False, QK_ROWS=False)
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);")


# What a length that is not a multiple of 16 takes away: Triton specialises integers on divisibility by 16, and the
# lse / delta row stride and the masks' row strides are the lengths themselves
RAGGED = {"SEQ_Q", "SEQ_K", "stride_lh", "stride_kpm", "stride_qpm"}


def signature(kernel, consts, ragged=False):
    """Argument types as the JIT would specialise them for contiguous fp16 tensors of round sizes: pointers and
    integers divisible by 16 (which lets Triton use async copies), head-dim strides equal to 1 (constexpr).
    A DQ pointer is an fp32 buffer where dQ is summed in fp32 (dK/dV kernel, DELTA_ONLY dQ launch)."""
    fn = kernel.fn
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    sig, ones, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], ones[name] = "constexpr", 1
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name in FP32_PTRS or (name == "DQ" and (kernel is KERNELS["dkdv"] or consts.get("DELTA_ONLY"))):
            sig[name] = "*fp32"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name in ("KPM", "QPM"):
            sig[name] = "*i1"
        elif name.isupper() and len(name) <= 2:
            sig[name] = "*fp16"
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if (sig[name].startswith("*") or sig[name] == "i32") and not (ragged and name in RAGGED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, ones, attrs


def compile_sm90(kernel, consts, warps, stages, ragged=False):
    """The kernel compiled for sm_90 with these constexprs (a full set: BASE plus the tile and head dim)."""
    sig, constexprs, ones, attrs = signature(kernel, consts, ragged)
    src = ASTSource(kernel.fn, signature=sig, attrs=attrs,
                    constexprs={**{k: v for k, v in consts.items() if k in constexprs}, **ones})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def compile_sass(kernel, consts, warps, stages, ragged=False):
    compiled = compile_sm90(kernel, consts, warps, stages, ragged)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    resources = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", usage))  # registers, spill space per thread
    sass = [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(sass)]
    return sass, f"{resources} SHARED:{compiled.metadata.shared}"


def summary(ops, top=14):
    counts = collections.Counter(op.split(".")[0] for op in ops)
    return f"{len(ops)} instr: " + " ".join(f"{k}={v}" for k, v in counts.most_common(top))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=sorted(KERNELS), nargs="+", default=sorted(KERNELS))
    p.add_argument("--tile", default="64x64", help="BLOCK_MxBLOCK_N")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dropout", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    p.add_argument("--ragged", action="store_true", help="lengths that are not multiples of 16 (see RAGGED)")
    p.add_argument("--const", nargs="*", default=[], metavar="NAME=INT",
                   help="other constexprs, e.g. HAS_RIGHT=1 IS_VARLEN=1 (ignored by kernels without them)")
    args = p.parse_args()
    if not re.fullmatch(r"\d+x\d+", args.tile):
        p.error(f"--tile must be BLOCK_MxBLOCK_N, e.g. 64x128, got {args.tile!r}")
    if any(not re.fullmatch(r"[A-Z_]+=-?\d+", c) for c in args.const):
        p.error(f"--const takes NAME=INT items, got {args.const}")
    block_m, block_n = map(int, args.tile.split("x"))
    extra = {name: int(value) for name, value in (c.split("=") for c in args.const)}
    for name in args.kernel:
        kernel = KERNELS[name]
        for dropout in args.dropout:
            consts = {**BASE, "HEAD_DIM": args.headdim, "BLOCK_D": triton.next_power_of_2(args.headdim),
                      "DROPOUT": bool(dropout), "BLOCK_M": block_m, "BLOCK_N": block_n, **extra}
            sass, resources = compile_sass(kernel, consts, args.warps, args.stages, args.ragged)
            print(f"{name} {args.tile} w{args.warps} s{args.stages} d{args.headdim} dropout={dropout} {extra or ''}"
                  f"{' ragged' if args.ragged else ''}, "
                  f"{resources}, kernel {summary([op for _, op, _ in sass])}")
            for addr, op, rest in sass:  # loop bodies: a branch back to an earlier address
                target = re.search(r"0x([0-9a-f]+)", rest)
                if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
                    lo = int(target.group(1), 16)
                    print(f"    loop {lo:#x}-{addr:#x}: {summary([o for a, o, _ in sass if lo <= a <= addr])}")


if __name__ == "__main__":
    main()
