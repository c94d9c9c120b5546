"""flash_attn_func against the float64 reference: outputs, LSE and gradients, odd shapes, layouts."""

import itertools

import pytest
import torch
from conftest import (DEVICE, ON_GPU, assert_close_2x, assert_compiled_matches, candidate_indices, fresh_tuning,
                      one_candidate_each)

import hf_flash
import hf_flash.kernels as kernels
from hf_flash.reference import attention_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SEQLENS = [(1, 97), (113, 203), (128, 128), (200, 57)]
HEADDIMS = [32, 40, 64, 80, 128]
DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _cases():
    """On the GPU, the full product for fp16 and bf16, and for fp32 every seqlen x causal with one head dim,
    rotating through all five (fp32 cases compile true-fp32 dots, the slowest kernels to compile, see
    tuning._FP32_TILE; with the larger tiles of before, two head dims each brought the suite to 9 of the 10 minutes
    one device call may run). On the CPU interpreter, every seqlen x dtype x causal once,
    with the head dim and GQA grouping rotating through their values so each still appears several times."""
    if ON_GPU:
        for causal, dtype, (sq, sk), d in itertools.product([False, True], DTYPES[:2], SEQLENS, HEADDIMS):
            yield 2, 6, 2, sq, sk, d, causal, dtype
        for i, (causal, (sq, sk)) in enumerate(itertools.product([False, True], SEQLENS)):
            yield 2, 6, 2, sq, sk, HEADDIMS[i % len(HEADDIMS)], causal, torch.float32
        for sq, sk, d in [(1023, 1025, 96), (4096, 4095, 256), (8192, 8192, 64), (2048, 8192, 128), (777, 333, 59)]:
            for causal in (False, True):
                yield 1, 4, 2, sq, sk, d, causal, torch.bfloat16
        return
    for i, ((sq, sk), dtype, causal) in enumerate(itertools.product(SEQLENS, DTYPES, [False, True])):
        nheads, nheads_kv = [(2, 1), (2, 2), (3, 1)][i % 3]
        yield 1, nheads, nheads_kv, sq, sk, HEADDIMS[i % len(HEADDIMS)], causal, dtype


def _case_id(case):
    b, h, hk, sq, sk, d, causal, dtype = case
    return f"B{b}-H{h}-K{hk}-Sq{sq}-Sk{sk}-D{d}-{'causal' if causal else 'full'}-{DTYPE_NAME[dtype]}"


def _qkv(b, h, hk, sq, sk, d, dtype, layout="bshd"):
    """Random q, k, v of shape (b, s, h, d) in the given memory layout."""
    def make(s, heads):
        if layout == "bshd":
            return torch.randn(b, s, heads, d, device=DEVICE, dtype=dtype)
        if layout == "bhsd":  # what transformers passes: a transposed view, no copy
            return torch.randn(b, heads, s, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        if layout == "packed":  # slices of one (b, s, 3, heads, d) buffer, as from a fused qkv projection
            return torch.randn(b, s, 3, heads, d, device=DEVICE, dtype=dtype)[:, :, 1]
        raise ValueError(layout)
    return [t.requires_grad_() for t in (make(sq, h), make(sk, hk), make(sk, hk))]


def check_against_reference(q, k, v, causal, dout=None, softmax_scale=None):
    out, lse = hf_flash.flash_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    dout = torch.randn_like(out) if dout is None else dout
    grads = torch.autograd.grad(out, (q, k, v), dout)

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_inputs, causal=causal, softmax_scale=softmax_scale)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, dout.double())
    pt_out, _ = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    pt_grads = torch.autograd.grad(pt_out, (q, k, v), dout)

    for name, ours, ref, pt in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (pt_out, *pt_grads)):
        assert ours.dtype == pt.dtype
        assert_close_2x(ours, ref, pt, name)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse must be +inf exactly on rows that see no key"
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("case", list(_cases()), ids=_case_id)
def test_matches_reference(case):
    b, h, hk, sq, sk, d, causal, dtype = case
    check_against_reference(*_qkv(b, h, hk, sq, sk, d, dtype), causal)


@pytest.mark.parametrize("layout", ["bhsd", "packed"])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs(layout, causal):
    q, k, v = _qkv(1, 2, 1, 97, 75, 64, torch.float16, layout)
    assert not q.is_contiguous()
    # a transposed, non-contiguous upstream gradient as well
    dout = torch.randn(1, 2, 97, 64, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    check_against_reference(q, k, v, causal, dout=dout)


def test_launch_cache_tells_calls_apart():
    """Repeated calls with the same shapes and strides that Triton compiles differently: a pointer that is not
    16-byte aligned, another dtype, another scale. On the GPU the second and later calls take the cached launch
    path (kernels.launch._COMPILED), which must not hand them a kernel compiled for the first."""
    b, s, h, d = 1, 37, 2, 32
    n = b * s * h * d
    for offset, dtype, scale in ((0, torch.float16, None), (1, torch.float16, None), (0, torch.bfloat16, None),
                                 (3, torch.bfloat16, 0.3), (0, torch.float16, None)):
        buffers = torch.randn(3, n + 8, device=DEVICE, dtype=dtype)
        q, k, v = (buf[offset:offset + n].view(b, s, h, d).requires_grad_() for buf in buffers.unbind(0))
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        check_against_reference(q, k, v, causal=True, softmax_scale=scale)


def test_launch_key_holds_what_triton_specialises_on(monkeypatch):
    """The cached launch path's key (runs on CPU too, where the interpreter has no cache): equal for new data
    in the same layout, so the cache is hit; different for a misaligned pointer, another dtype, another scalar."""
    calls = []
    monkeypatch.setattr(kernels.launch, "_launch",
                        lambda kernel, rows, block, programs, **kw: calls.append((kernel, kw)))
    q, k, v = (torch.randn(1, 40, 2, 32, device=DEVICE, dtype=torch.float16) for _ in range(3))
    hf_flash.flash_attn_func(q, k, v, causal=True)
    kernel, kwargs = calls[0]
    key = lambda **changes: kernels.launch._launch_key(kernel, {**kwargs, **changes})[0]  # noqa: E731
    assert key() == key(Q=q.clone(), K=k.clone(), V=v.clone())
    misaligned = torch.randn(q.numel() + 8, device=DEVICE, dtype=q.dtype)[1:1 + q.numel()].view_as(q)
    assert key() != key(Q=misaligned)
    assert key() != key(Q=q.bfloat16(), K=k.bfloat16(), V=v.bfloat16())
    assert key() != key(qk_scale=kwargs["qk_scale"] * 2)
    assert kernels.launch._launch_key(kernel, kwargs)[1][0] == q.data_ptr()  # addresses, in signature order


def test_reset_tuning_forgets_configs_and_launches():
    """reset_tuning (benchmarks comparing layouts call it between them) empties every tuning and launch cache;
    the next call tunes again and gives the same result."""
    q, k, v = _qkv(1, 2, 1, 45, 77, 32, torch.float16)
    out = hf_flash.flash_attn_func(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    tuned = (kernels.forward._attn_fwd, kernels.backward_dq._attn_bwd_dq, kernels.backward_dkdv._attn_bwd_dkdv)
    assert {key[0] for key in kernels.launch._CHOSEN} == set(tuned)
    kernels.launch.reset_tuning()
    assert not kernels.launch._CHOSEN and not kernels.launch._COMPILED and not any(kernel.cache for kernel in tuned)
    assert torch.equal(hf_flash.flash_attn_func(q, k, v, causal=True), out)
    assert kernels.launch._CHOSEN


def test_softmax_scale_and_empty_rows():
    """A custom scale (GPT-2 folds 1/layer_idx into it), and causal rows that see no key."""
    q, k, v = _qkv(1, 2, 2, 70, 20, 32, torch.float32)
    out = check_against_reference(q, k, v, True, softmax_scale=0.037)
    assert torch.equal(out[:, :50], torch.zeros_like(out[:, :50]))  # rows i < seq_q - seq_k see nothing


def test_lse_gradient():
    """return_lse's output is differentiable: loss = <out, dout> + <lse, dlse>."""
    q, k, v = _qkv(1, 2, 1, 45, 77, 40, torch.float32)
    out, lse = hf_flash.flash_attn_func(q, k, v, causal=True, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v), retain_graph=True)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_inputs, causal=True)
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), ref_inputs, retain_graph=True)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    # Either output alone (the other's gradient arrives as None, not as zeros).
    for used in (0, 1):
        grads = torch.autograd.grad((out, lse)[used].mul((dout, dlse)[used]).sum(), (q, k, v), retain_graph=True)
        ref_grads = torch.autograd.grad((ref_out, ref_lse)[used].mul((dout, dlse)[used]).sum(), ref_inputs,
                                        retain_graph=True, allow_unused=True, materialize_grads=True)
        for ours, ref in zip(grads, ref_grads):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_zero_length():
    q, k, v = _qkv(2, 2, 1, 5, 0, 16, torch.float32)
    out, lse = hf_flash.flash_attn_func(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q, k, v = _qkv(2, 2, 1, 0, 7, 16, torch.float32)
    assert hf_flash.flash_attn_func(q, k, v).shape == (2, 0, 2, 16)


def test_backward_is_deterministic():
    q, k, v = _qkv(1, 4, 1, 150, 150, 64, torch.float16)
    dout = torch.randn(1, 150, 4, 64, device=DEVICE, dtype=torch.float16)
    first = torch.autograd.grad(hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    second = torch.autograd.grad(hf_flash.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_activation_checkpointing():
    """Recomputing the forward inside torch.utils.checkpoint gives bit-identical gradients."""
    q, k, v = _qkv(1, 2, 1, 100, 90, 32, torch.bfloat16)
    w = torch.randn(32, 32, device=DEVICE, dtype=torch.bfloat16)

    def block(q, k, v):
        return (hf_flash.flash_attn_func(q @ w, k, v, causal=True) @ w).float().square().sum()

    plain = torch.autograd.grad(block(q, k, v), (q, k, v))
    ckpt = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False), (q, k, v))
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    """fullgraph=True raises on any graph break; compiled and eager results agree."""
    q, k, v = _qkv(2, 4, 2, 66, 130, 64, torch.float16)
    w = torch.randn(64, 64, device=DEVICE, dtype=torch.float16)

    def loss_fn(q, k, v):
        return (hf_flash.flash_attn_func(torch.tanh(q) @ w, k, v, causal=True) * 2.0).float().square().mean()

    assert_compiled_matches(loss_fn, (q, k, v), loss_atol=1e-4, grad_atol=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2**31-element tensors and a 65535+ grid; GPU only")
def test_int64_offsets_and_large_batch():
    # q's second batch lives beyond element 2**31: batch offsets must be computed in int64
    s, h, d = 128, 2, 64
    stride_b = 2**31 + 4096
    buf = torch.empty(stride_b + s * h * d, device=DEVICE, dtype=torch.float16)
    q = buf.as_strided((2, s, h, d), (stride_b, h * d, d, 1))
    q[0].normal_()
    q[1].normal_()
    q.requires_grad_()
    _, k, v = _qkv(2, h, h, s, 96, d, torch.float16)
    check_against_reference(q, k, v, causal=True)
    del buf, q
    # batch * nheads above CUDA's 65535 limit on grid axis 1
    q, k, v = _qkv(70000, 1, 1, 16, 16, 16, torch.float16)
    check_against_reference(q, k, v, causal=False)


# --- bad input -----------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float16, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16), "v"), {}, TypeError, "v must be a torch.Tensor"),
    ((_t(8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), {}, ValueError, "q must have 4 dims"),
    ((_t(1, 8, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16)), {}, ValueError, "batch size of q"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), {}, ValueError, "headdim of q"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 9, 2, 16)), {}, ValueError, "k and v must have the same shape"),
    ((_t(1, 8, 3, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), {}, ValueError, "multiple of nheads of k"),
    ((_t(1, 8, 2, 320), _t(1, 8, 2, 320), _t(1, 8, 2, 320)), {}, ValueError, "headdim must be between 1 and 256"),
    ((_t(1, 8, 2, 16, dtype=torch.int32),) * 3, {}, TypeError, "q must be float16, bfloat16 or float32"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16, dtype=torch.bfloat16), _t(1, 8, 2, 16)), {}, TypeError, "share one dtype"),
    ((_t(1, 8, 2, 16),) * 3, {"softmax_scale": "x"}, TypeError, "softmax_scale must be a finite float"),
    ((_t(1, 8, 2, 16),) * 3, {"causal": 1}, TypeError, "causal must be a bool"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        hf_flash.flash_attn_func(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_gpu_that_is_not_the_current_device():
    """A model split over GPUs (device_map="auto") calls attention with tensors on a GPU that is not the current
    device: the kernels run on the tensors' GPU (Triton launches on the current one), each GPU with its own compiled
    kernels, and the current device is left as it was."""
    torch.cuda.set_device(0)
    for device in ("cuda:1", "cuda:0", "cuda:1"):  # the same launch key on both GPUs, in turn
        q, k, v = (torch.randn(2, 333, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        check_against_reference(q, k, v, causal=True)
        seed = kernels.dropout.draw_dropout_seed(q.device)
        assert kernels.dropout.dropout_mask(seed, 1, 2, 70, 90, 0.3).device == q.device
        assert torch.cuda.current_device() == 0


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device next to the CPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match="must be on one device"):
        hf_flash.flash_attn_func(_t(1, 8, 2, 16), _t(1, 8, 2, 16, device="cpu"), _t(1, 8, 2, 16))


def test_other_devices_say_where_the_kernels_run():
    x = torch.randn(1, 8, 2, 16, device="meta")
    with pytest.raises(ValueError, match="are on meta: the hf_flash kernels run on CUDA GPUs"):
        hf_flash.flash_attn_func(x, x, x)


def test_cpu_without_interpreter_says_how_to_run(monkeypatch):
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)
    x = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        hf_flash.flash_attn_func(x, x, x)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has a single config")
@pytest.mark.parametrize("index", candidate_indices())
@pytest.mark.parametrize("head_dim, dtype", [(64, torch.float16), (128, torch.bfloat16), (256, torch.float16)])
def test_every_config_is_exact(index, head_dim, dtype, monkeypatch):
    """Each autotuning candidate computes the same function, whichever the tuner picks."""
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", "tune")  # the dK/dV tiles in both orientations
    one_candidate_each(monkeypatch, index, head_dim, dtype)
    for causal in (False, True):
        check_against_reference(*_qkv(2, 4, 2, 333, 301, head_dim, dtype), causal)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has a single config and no CUDA graphs")
@pytest.mark.parametrize("atomic_dq", ["0", "1"])
def test_autotuner_times_every_config_on_the_gpu(atomic_dq, monkeypatch):
    """The search times each candidate from a CUDA graph (_time_config), in the forward and in the backward
    (which autograd runs on its device thread), and the tuned kernels are exact; with _ATOMIC_DQ (the dQ kernel
    then computes only delta), the tuning runs' dQ sums are reset before the real launch."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", atomic_dq)
    x = torch.randn(1 << 20, device="cuda")
    median, low, high = kernels.tuning._time_config(lambda: x.mul_(1.0), None)
    assert 0 < low <= median <= high < 1.0  # ms; a 4 MB in-place multiply takes microseconds
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", True)
    tuners = fresh_tuning(monkeypatch)
    for kernel in tuners:
        monkeypatch.setattr(kernel, "configs_timings", None, raising=False)
    check_against_reference(*_qkv(2, 3, 3, 517, 517, 64, torch.bfloat16), True)
    assert {key[0] for key in kernels.launch._CHOSEN} == set(tuners)
    for kernel in tuners:
        timings = kernel.configs_timings
        assert timings and len(timings) > 1, kernel.base_fn.__name__
        assert all(0 < t[0] < float("inf") for t in timings.values()), (kernel.base_fn.__name__, timings)
