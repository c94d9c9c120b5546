"""Which config a call runs with (hf_flash.kernels.choices): shipped entries, the nearest-bucket rule, the search's
choices persisted across processes, and the one-time notices."""

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import triton
from conftest import ON_GPU, fresh_tuning
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
