"""First-call latency: seconds from a fresh process's first flash_attn_func call to its result, forward and backward.

What a user waits for before a first step: tuning (with the search on) and compiling. Each shape's first forward
and first backward are timed (synchronised), in one child process per cache state (with nothing timed, the forward
also starts the backward's compiles, kernels/ahead.py, so the sum of the two is the figure to read):
  cold  an empty TRITON_CACHE_DIR: everything is searched and compiled;
  warm  a second process on the same cache: the search's choices and the compiled kernels are read from disk.
The shapes run in order in one process, so a row pays only for what the rows above it did not compile. Run from
the repository root on a CUDA GPU:

    python benchmarks/bench_first_call.py                      # default settings (HF_FLASH_AUTOTUNE unset)
    HF_FLASH_AUTOTUNE=0 python benchmarks/bench_first_call.py  # nothing timed: shipped configs or the rule

Writes <out-dir>/<name>.{json,md} and prints the table last.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DOCS_BENCHMARKS, REPO, environment, environment_line, require_cuda, write_outputs

# (batch, seqlen, heads, head dim, causal): the rows of issue 25's table, in its order
SHAPES = [(2, 4096, 16, 64, True), (2, 4096, 16, 64, True), (1, 1000, 16, 64, True), (2, 4096, 16, 128, False),
          (4, 512, 12, 64, False)]

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {repo!r})
import hf_flash
rows = []
for batch, seqlen, heads, head_dim, causal in {shapes!r}:
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf_flash.flash_attn_func(q, k, v, causal=causal)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    rows.append((t1 - t0, time.perf_counter() - t1))
print("ROWS" + json.dumps(rows))
"""


def run_child(cache_dir, shapes):
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), shapes=shapes)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"the child process failed:\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.split("ROWS")[-1])
    return rows, time.perf_counter() - started


def markdown(results):
    env = results["environment"]
    lines = [f"# First-call latency ({env['gpu']}, bf16, HF_FLASH_AUTOTUNE={results['autotune']})", "",
             environment_line(env), "", "Seconds to the first forward / backward result of each shape in a fresh "
             "process, rows run in order (a repeated shape is a second call in the same process).", "",
             "| first call of | cold fwd | cold bwd | cold fwd + bwd | warm fwd | warm bwd | warm fwd + bwd |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for shape, (cf, cb), (wf, wb) in zip(results["shapes"], results["cold"], results["warm"]):
        b, n, h, d, causal = shape
        name = f"({b}, {n}, {h}, {d}) {'causal' if causal else 'full'}" + (" again" if tuple(shape) in seen else "")
        seen.add(tuple(shape))
        lines.append(f"| {name} | {cf:.2f} | {cb:.2f} | {cf + cb:.2f} | {wf:.2f} | {wb:.2f} | {wf + wb:.2f} |")
    lines += ["", f"Process wall time: cold {results['cold_wall_s']:.1f} s, warm {results['warm_wall_s']:.1f} s "
              "(including Python and CUDA start-up)."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=DOCS_BENCHMARKS)
    p.add_argument("--name", default="bench_first_call")
    args = p.parse_args()
    require_cuda("bench_first_call.py")
    with tempfile.TemporaryDirectory() as cache:
        cold, cold_wall = run_child(cache, SHAPES)
        warm, warm_wall = run_child(cache, SHAPES)
    results = {"environment": environment(), "autotune": os.environ.get("HF_FLASH_AUTOTUNE", "unset (1)"),
               "shapes": SHAPES, "cold": cold, "warm": warm, "cold_wall_s": cold_wall, "warm_wall_s": warm_wall}
    print(write_outputs(args.out_dir, args.name, results, markdown))


if __name__ == "__main__":
    main()
