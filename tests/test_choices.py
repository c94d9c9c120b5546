"""Which config a call runs with (hf_flash.kernels.choices): shipped entries, the nearest-bucket rule, the search's
choices persisted across processes, the one-time notices, and the backward compiled ahead (kernels.ahead)."""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import triton
from conftest import DEVICE, ON_GPU, fresh_tuning
from triton.runtime.errors import OutOfResources

import hf_flash
import hf_flash.kernels as kernels
from hf_flash.kernels import choices

ROOT = Path(__file__).resolve().parents[1]
KEY = {"SEQ_Q_BUCKET": 1024, "SEQ_K_BUCKET": 1024, "HEAD_DIM": 64, "DROPOUT": False}
CANDIDATES = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=3) for m, n in
              ((128, 64), (64, 64), (64, 32))]


def _entry(dtype="bfloat16", block_m=64, block_n=64, **key):
    return dtype, {**KEY, **key}, {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 3}


def test_a_shipped_entry_for_the_key_is_taken():
    entries = [_entry(block_n=32), _entry(block_n=64, SEQ_Q_BUCKET=2048)]
    assert choices.nearest(entries, "bfloat16", KEY, CANDIDATES) is CANDIDATES[2]


def test_else_the_entry_nearest_in_length_buckets():
    entries = [_entry(block_n=32, SEQ_Q_BUCKET=8192, SEQ_K_BUCKET=8192), _entry(block_m=128, SEQ_Q_BUCKET=2048)]
    assert choices.nearest(entries, "bfloat16", KEY, CANDIDATES) is CANDIDATES[0]


@pytest.mark.parametrize("entry", [_entry(dtype="float16"), _entry(DROPOUT=True), _entry(HEAD_DIM=128),
                                   _entry(block_m=256)])  # other dtype, features, head dim; not a candidate
def test_entries_for_other_keys_or_configs_are_never_used(entry):
    assert choices.nearest([entry], "bfloat16", KEY, CANDIDATES) is None


def test_a_key_without_an_entry_of_its_dtype_takes_the_other_16_bit_one(monkeypatch):
    """A table tuned in bf16 serves fp16 (and back) where it has no entry of that dtype; an entry of the call's own
    dtype wins, and fp32 never borrows."""
    kernel = kernels.forward._attn_fwd
    q = torch.empty(0, dtype=torch.float16)
    kwargs = {"Q": q, "BLOCK_D": 64, **{name: False for name in kernel.keys}, "HEAD_DIM": 64,
              "SEQ_Q_BUCKET": 1024, "SEQ_K_BUCKET": 1024, "LAYOUT_BQ": 0, "LAYOUT_BK": 0}
    candidates = kernels.tuning._prune(kernel.configs, kwargs)
    key = choices.tuning_key(kernel, kwargs)
    table = {kernel.base_fn.__name__: [("bfloat16", key, choices.config_record(candidates[1]))]}
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)
    monkeypatch.setattr(choices, "_arch", lambda device: "sm90")
    monkeypatch.setattr(choices, "_table", lambda arch: table)
    assert choices.choose(kernel, kwargs) is candidates[1]
    table[kernel.base_fn.__name__].append(("float16", key, choices.config_record(candidates[2])))
    assert choices.choose(kernel, kwargs) is candidates[2]
    assert choices.choose(kernel, {**kwargs, "Q": torch.empty(0, dtype=torch.float32)}) is \
        kernels.tuning._prune(kernel.configs, {**kwargs, "Q": torch.empty(0, dtype=torch.float32)})[0]


def test_without_a_table_the_first_candidate_that_fits_runs(monkeypatch):
    """The interpreter (and a GPU without a shipped table) takes _prune's first candidate, timing nothing."""
    monkeypatch.setattr(kernels.launch, "_CHOSEN", {})
    q = torch.randn(1, 40, 2, 32, device="cuda" if ON_GPU else "cpu", dtype=torch.float16)
    with monkeypatch.context() as m:
        m.setattr(kernels.settings, "AUTOTUNE", False)
        m.setattr(choices, "_table", lambda arch: {})
        hf_flash.flash_attn_func(q, q, q)
    (key, config), = [(key, c) for key, c in kernels.launch._CHOSEN.items() if key[0] is kernels.forward._attn_fwd]
    kwargs = dict(zip(kernels.forward._attn_fwd.keys, key[2:]))
    first = kernels.tuning._prune(kernels.forward._attn_fwd.configs, {"Q": q, "BLOCK_D": 32, **kwargs})[0]
    assert config is first


def test_a_tile_this_gpu_cannot_fit_gives_way_to_the_next_candidate(monkeypatch, caplog):
    """The rule's first candidate needs more shared memory than the GPU has (Triton raises OutOfResources before
    launching): the next candidate that fits runs, the result is exact, the choice is kept, and it is said once."""
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", False)
    monkeypatch.setattr(choices, "_table", lambda arch: {})
    monkeypatch.setattr(choices, "_said", set())
    fresh_tuning(monkeypatch)
    fwd = kernels.forward._attn_fwd
    q = torch.randn(1, 40, 2, 32, device="cuda" if ON_GPU else "cpu", dtype=torch.float16)
    first = kernels.tuning._prune(fwd.configs, {"Q": q, "BLOCK_D": 32})[0]
    run, tried = fwd.fn.run, []

    def run_unless_first(*args, **kwargs):
        tried.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]))
        if tried[-1] == (first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"], first.num_warps, first.num_stages):
            raise OutOfResources(245760, 232448, "shared memory")
        return run(*args, **kwargs)

    monkeypatch.setattr(fwd.fn, "run", run_unless_first)
    caplog.set_level(logging.INFO, logger="hf_flash")
    for _ in range(2):
        out = hf_flash.flash_attn_func(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, q, q)))
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-3, rtol=0)
    chosen, = [c for key, c in kernels.launch._CHOSEN.items() if key[0] is fwd]
    assert chosen is not first and len(tried) == (2 if ON_GPU else 3)  # the interpreter caches no launch
    messages = [r.getMessage() for r in caplog.records if "needs 245760 of shared memory" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("the forward (float16, head dim 32")


def test_the_search_cache_is_keyed_by_gpu_name(monkeypatch):
    """Triton's disk cache stores the choice under the key plus the GPU's name and hf_flash's version; run() finds it
    under its own key."""
    seen = []

    def cached(self, tuning_key, configs, bench_fn):
        seen.append(tuning_key)
        self.cache[tuning_key] = "chosen"
        return True

    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "check_disk_cache", cached)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    kernel = kernels.forward._attn_fwd
    monkeypatch.setattr(kernel, "cache", {})
    assert kernel.check_disk_cache((1024, 64), CANDIDATES, bench_fn=None)
    assert seen == [(1024, 64, "NVIDIA H200", f"hf_flash {hf_flash.__version__}")]
    assert kernel.cache == {(1024, 64): "chosen"}


def test_a_slow_call_says_once_that_it_compiles(monkeypatch, caplog):
    monkeypatch.setattr(choices, "_said", set())
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)
    caplog.set_level(logging.INFO, logger="hf_flash")
    with choices.CompileNotice(lambda: "the forward (bfloat16, head dim 64)", after_s=0.01):
        pass  # fast: nothing said
    assert not caplog.records
    for _ in range(2):
        with choices.CompileNotice(lambda: "the forward (bfloat16, head dim 64)", after_s=0.01):
            time.sleep(0.3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("compiling attention kernels for the forward (bfloat16")


@pytest.mark.skipif(not ON_GPU, reason="Triton's autotuning disk cache is off under the interpreter")
def test_a_later_process_reads_the_search_choice_instead_of_timing(tmp_path):
    """HF_FLASH_AUTOTUNE=1: the first process times the candidates; a second one with the same cache times none."""
    script = textwrap.dedent("""
        import torch, hf_flash, hf_flash.kernels as kernels
        q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
        hf_flash.flash_attn_func(q, k, v, causal=True).sum().backward()
        tuned = (kernels.forward._attn_fwd, kernels.backward_dq._attn_bwd_dq, kernels.backward_dkdv._attn_bwd_dkdv)
        print("timed", sum(hasattr(kernel, "bench_time") for kernel in tuned))  # set by Triton when it times
    """)
    env = {**os.environ, "HF_FLASH_AUTOTUNE": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    counts = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        counts.append(int(done.stdout.split("timed")[-1]))
    assert counts[0] > 0 and counts[1] == 0, counts


def _backward_ahead_cases():
    """(name, q, k, v, flash_attn_func keywords): the variants whose backward must be the one compiled ahead."""
    def make(b, sq, sk, h, hk, d, dtype=torch.float16, layout="bshd"):
        def one(s, heads):
            if layout == "bhsd":  # transformers' transposed views
                return torch.randn(b, heads, s, d, device=DEVICE, dtype=dtype).transpose(1, 2)
            return torch.randn(b, s, heads, d, device=DEVICE, dtype=dtype)
        return [t.requires_grad_() for t in (one(sq, h), one(sk, hk), one(sk, hk))]
    padding = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    padding[1, 29:] = False
    yield "causal dropout (atomic dQ)", make(2, 40, 40, 2, 2, 32), dict(causal=True, dropout_p=0.2)
    yield "padding, no dropout", make(2, 40, 40, 2, 2, 32, layout="bhsd"), dict(key_padding_mask=padding)
    yield "gqa cross lengths bf16", make(1, 23, 57, 4, 2, 40, torch.bfloat16), dict(window_size=(8, 3))
    yield "deterministic dropout", make(1, 33, 33, 2, 1, 64), dict(dropout_p=0.1, deterministic=True)
    yield "alibi", make(1, 17, 17, 2, 2, 16), dict(alibi_slopes=torch.tensor([0.5, 0.25], device=DEVICE))


@pytest.mark.parametrize("case", list(_backward_ahead_cases()), ids=lambda case: case[0])
def test_the_backward_compiled_ahead_is_the_one_the_backward_launches(case, monkeypatch):
    """A forward whose inputs need gradients starts compiling its backward's dQ and dK/dV variants (launch keys: every
    argument Triton specialises on); the backward, given the contiguous dout that models give it, launches exactly
    those. Runs on the CPU too: the submitted compiles are recorded, not run."""
    _, (q, k, v), options = case
    submitted, launched = [], []
    monkeypatch.setattr(kernels.launch, "_compiles_ahead", lambda: True)
    monkeypatch.setattr(kernels.launch, "_COMPILED", {})
    monkeypatch.setattr(kernels.ahead, "submit", lambda key, compile_fn: submitted.append(key))
    out = hf_flash.flash_attn_func(q, k, v, **options)
    assert len(submitted) == 2
    launch = kernels.launch._launch

    def recording(kernel, rows, block, programs, **kwargs):
        launched.append(kernels.launch._launch_key(kernel, kwargs)[0])
        return launch(kernel, rows, block, programs, **kwargs)

    monkeypatch.setattr(kernels.launch, "_launch", recording)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert launched == submitted


def test_nothing_is_compiled_ahead_without_a_backward_to_come(monkeypatch):
    submitted = []
    monkeypatch.setattr(kernels.launch, "_compiles_ahead", lambda: True)
    monkeypatch.setattr(kernels.launch, "_COMPILED", {})
    monkeypatch.setattr(kernels.ahead, "submit", lambda key, compile_fn: submitted.append(key))
    q = torch.randn(1, 24, 2, 32, device=DEVICE, dtype=torch.float16)
    hf_flash.flash_attn_func(q, q, q, causal=True)  # no input needs a gradient
    with torch.no_grad():
        hf_flash.flash_attn_func(*(q.clone().requires_grad_() for _ in range(3)), causal=True)
    assert submitted == []


def test_a_launch_waits_for_its_compile_started_ahead_and_failures_there_are_dropped(monkeypatch, caplog):
    monkeypatch.setattr(kernels.ahead, "_PENDING", {})
    started, release, done = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        done.append(threading.current_thread().name)

    kernels.ahead.submit("key", slow)
    kernels.ahead.submit("key", lambda: done.append("twice"))  # already pending: not run again
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    kernels.ahead.wait("key")
    assert done and done[0].startswith("hf_flash-compile") and "twice" not in done
    caplog.set_level(logging.DEBUG, logger="hf_flash")
    kernels.ahead.submit("bad", lambda: 1 / 0)
    kernels.ahead.wait_all()  # the failure is logged, not raised: the launch compiles again and raises there
    assert not kernels.ahead._PENDING and any("ZeroDivisionError" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter compiles nothing")
def test_a_training_call_compiles_its_backward_on_the_worker_threads_once(monkeypatch):
    """End to end on the GPU: the first training call of a new variant compiles dQ and dK/dV on the hf_flash-compile
    threads while the forward runs; the backward finds them (no compile of its own) and is exact."""
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", False)
    fresh_tuning(monkeypatch)
    compiles = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook",
                        lambda *, fn, **kw: compiles.append((fn.name, threading.current_thread().name)) and False)
    q, k, v = (torch.randn(1, 77, 3, 24, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = hf_flash.flash_attn_func(q, k, v, causal=True, dropout_p=0.1)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    backward = sorted((name, thread.split("_")[0]) for name, thread in compiles if "bwd" in name)
    assert backward == [("_attn_bwd_dkdv", "hf_flash-compile"), ("_attn_bwd_dq", "hf_flash-compile")], compiles
    assert all(torch.isfinite(g).all() for g in grads) and not kernels.ahead._PENDING
