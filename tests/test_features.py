"""Padding masks, varlen, dropout, sliding windows and ALiBi against the float64 reference.

Each check runs the kernel, the float64 reference and PyTorch in the kernel's dtype on the same
inputs, visibility masks and dropout keep mask. out, dq, dk, dv follow flash-attn's rule (our error
<= 2 x PyTorch's own error, assert_close_2x); the lse is compared to the reference directly; a query
that sees no key must give out = 0, lse = +inf and dq = 0 exactly, and a key that no query sees must
get dk = dv = 0 exactly.

Dropout is reproduced through the kernels' test hooks: under a fixed torch seed each call draws one
seed with draw_dropout_seed and nothing else, and dropout_mask(seed, ...) returns its keep mask.
"""

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, ON_GPU, assert_close_2x, candidate_indices, fresh_tuning, one_candidate_each

import hf_flash
import hf_flash.kernels as kernels
from hf_flash.reference import attention_reference, varlen_attention_reference, visibility_mask

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPE_NAME = {FP16: "fp16", BF16: "bf16", FP32: "fp32"}
SEED = 1234


def _pick(cpu, gpu):
    """Tiny cases under the CPU interpreter (~2 s per forward + backward), bigger ones on a GPU."""
    return list(gpu) if ON_GPU else list(cpu)


def _gpu_product(shapes, *axes):
    """Every GPU shape (batch, nheads, nheads_kv, seqlen_q, seqlen_k, headdim) x causal x dtype x the other axes."""
    for shape, causal, dtype, *rest in itertools.product(shapes, (False, True), (FP16, BF16), *axes):
        yield ((*shape, causal, dtype), *rest)


GPU_SHAPES = [(4, 8, 2, 1023, 1025, 64), (4, 8, 8, 777, 1333, 96), (2, 8, 1, 1500, 300, 128), (4, 8, 4, 2048, 2048, 40)]


def _case_id(case):
    b, h, hk, sq, sk, d, causal, dtype = case
    return f"B{b}-H{h}-K{hk}-Sq{sq}-Sk{sk}-D{d}-{'causal' if causal else 'full'}-{DTYPE_NAME[dtype]}"


def _varlen_id(case):
    lens_q, lens_k, h, hk, d, causal, dtype = case
    lens = lambda ls: ".".join(map(str, ls))
    return (f"B{len(lens_q)}-H{h}-K{hk}-Lq{lens(lens_q)}-Lk{lens(lens_k)}-D{d}-{'causal' if causal else 'full'}-"
            f"{DTYPE_NAME[dtype]}")


def _ids(value):
    """pytest ids: cases by their shape, windows as W16.-1, extra keyword arguments as key=value; None
    leaves other values to pytest."""
    if isinstance(value, tuple) and len(value) == 8:
        return _case_id(value)
    if isinstance(value, tuple) and len(value) == 7:
        return _varlen_id(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) for x in value):
        return f"W{value[0]}.{value[1]}"
    if isinstance(value, dict):  # extra keyword arguments
        return "-".join(f"{key}={_ids(x) or x}" for key, x in value.items()) or "plain"
    return None


# --- inputs ---------------------------------------------------------------------------------------

def _qkv(b, h, hk, sq, sk, d, dtype):
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=DEVICE, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _padding_mask(batch, seqlen, side):
    """(batch, seqlen) bool, True = real token: 'right' or 'left' padding to random lengths >= 1 (the
    first row unpadded when there are several), or a 'random' pattern."""
    if side == "random":
        return torch.rand(batch, seqlen, device=DEVICE) > 0.3
    lengths = torch.randint(1, seqlen + 1, (batch,), device=DEVICE)
    if batch > 1:
        lengths[0] = seqlen
    positions = torch.arange(seqlen, device=DEVICE)[None, :]
    return positions < lengths[:, None] if side == "right" else positions >= seqlen - lengths[:, None]


def _slopes(kind, b, h):
    """ALiBi slopes in flash-attn's test range: 'h' -> (nheads,), 'bh' -> (batch, nheads), float32."""
    return torch.rand(h if kind == "h" else (b, h), device=DEVICE, dtype=torch.float32) * 0.3


def _cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _varlen_qkv(lens_q, lens_k, h, hk, d, dtype):
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


# --- the comparison -------------------------------------------------------------------------------

def _rng_state(device):
    device = torch.device(device)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _call(kernel, inputs, keep_shape, dropout_p, kwargs):
    """Runs the kernel with return_lse under a fixed seed. Returns out, lse and the keep mask it used
    (None without dropout), after checking it drew one dropout seed and nothing else."""
    device = inputs[0].device
    torch.manual_seed(SEED)
    before = _rng_state(device)
    out, lse = kernel(*inputs, dropout_p=dropout_p, return_lse=True, **kwargs)
    after = _rng_state(device)
    if dropout_p == 0:
        assert torch.equal(after, before), "dropout_p=0 must not draw random numbers"
        return out, lse, None
    torch.manual_seed(SEED)
    seed = kernels.dropout.draw_dropout_seed(device)
    assert torch.equal(_rng_state(device), after), "a call with dropout draws one draw_dropout_seed and nothing else"
    keep = kernels.dropout.dropout_mask(seed, *keep_shape, dropout_p)
    assert keep.dtype == torch.bool and tuple(keep.shape) == tuple(keep_shape)
    return out, lse, keep


def _check(kernel, reference, inputs, keep_shape, unseen_keys, *, dropout_p, lse_grad, features):
    """kernel(q, k, v, **kw) against reference(q, k, v, **kw); returns the kernel's out, lse, grads."""
    q, k, v = inputs
    out, lse, keep = _call(kernel, inputs, keep_shape, dropout_p, features)
    assert out.dtype == q.dtype and out.shape == q.shape
    lse_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3])  # dense (b, h, sq), varlen (h, total_q)
    assert lse.dtype == torch.float32 and lse.shape == lse_shape
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).to(q.dtype).float() if lse_grad else None  # representable in q's dtype

    def grads(out, lse, inputs):
        loss = (out * dout.to(out.dtype)).sum()
        if lse_grad:  # empty rows (lse = +inf) get no lse gradient
            loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, inputs)

    ref_kwargs = dict(features, dropout_p=dropout_p, dropout_mask=keep)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_lse = reference(*ref_inputs, **ref_kwargs)
    pt_out, pt_lse = reference(*inputs, **ref_kwargs)
    ours = (out, *grads(out, lse, inputs))
    for name, o, r, p in zip(("out", "dq", "dk", "dv"), ours, (ref_out, *grads(ref_out, ref_lse, ref_inputs)),
                             (pt_out, *grads(pt_out, pt_lse, inputs))):
        assert o.dtype == p.dtype and o.shape == p.shape, name
        assert_close_2x(o, r, p, name)

    empty = torch.isinf(ref_lse)  # rows that see no key
    assert not torch.isnan(lse).any(), "lse has NaN"
    assert torch.equal(torch.isinf(lse), empty), "lse must be +inf exactly on rows that see no key"
    assert (lse[empty] > 0).all(), "lse of an empty row must be +inf, not -inf"
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), rtol=1e-5, atol=1e-5)
    dq, dk, dv = ours[1:]
    assert (out.movedim(-2, -3)[empty] == 0).all(), "rows that see no key must output exactly 0"
    assert (dq.movedim(-2, -3)[empty] == 0).all(), "rows that see no key must get exactly zero dq"
    assert (dk[unseen_keys] == 0).all() and (dv[unseen_keys] == 0).all(), "keys no query sees must get dk = dv = 0"
    return out, lse, (dq, dk, dv)


def check_dense(q, k, v, *, dropout_p=0.0, lse_grad=False, **features):
    """flash_attn_func vs attention_reference with the same features (causal, window_size, masks, ...)."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    mask_kwargs = {key: features[key] for key in ("causal", "window_size", "key_padding_mask", "query_padding_mask")
                   if key in features}
    seen = visibility_mask(seqlen_q, seqlen_k, device=q.device, **mask_kwargs).any(dim=2)[:, 0]  # (b or 1, sk)
    unseen_keys = ~seen.expand(batch, seqlen_k)
    return _check(hf_flash.flash_attn_func, attention_reference, (q, k, v), (batch, nheads, seqlen_q, seqlen_k),
                  unseen_keys, dropout_p=dropout_p, lse_grad=lse_grad, features=features)


def check_varlen(q, k, v, lens_q, lens_k, *, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, lse_grad=False,
                 **features):
    """flash_attn_varlen_func vs varlen_attention_reference; max_seqlen_* default to the longest sequence."""
    cu_q, cu_k = _cu_seqlens(lens_q), _cu_seqlens(lens_k)
    max_q = max(lens_q) if max_seqlen_q is None else max_seqlen_q
    max_k = max(lens_k) if max_seqlen_k is None else max_seqlen_k
    mask_kwargs = {key: features[key] for key in ("causal", "window_size") if key in features}
    unseen_keys = torch.cat([~visibility_mask(lq, lk, device=q.device, **mask_kwargs)[0, 0].any(dim=0)
                             for lq, lk in zip(lens_q, lens_k)])

    def kernel(q, k, v, **kwargs):
        return hf_flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    def reference(q, k, v, **kwargs):
        return varlen_attention_reference(q, k, v, cu_q, cu_k, **kwargs)

    return _check(kernel, reference, (q, k, v), (len(lens_q), q.shape[1], max_q, max_k), unseen_keys,
                  dropout_p=dropout_p, lse_grad=lse_grad, features=features)


# --- padding masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("case, side", _pick(
    [((2, 2, 1, 97, 113, 40, True, FP16), "right"),
     ((2, 2, 2, 113, 97, 64, False, BF16), "left"),
     ((2, 2, 1, 64, 100, 32, True, FP32), "random"),
     ((3, 2, 1, 1, 77, 64, True, FP16), "left")],  # one-token decoding over a left-padded KV cache
    [*_gpu_product(GPU_SHAPES, ("right", "left", "random")), ((8, 8, 2, 1, 2049, 128, True, BF16), "left"),
     ((2, 4, 2, 333, 301, 64, True, FP32), "left"), ((2, 4, 4, 301, 333, 128, False, FP32), "random")],
), ids=_ids)
def test_key_padding(case, side):
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, key_padding_mask=_padding_mask(b, sk, side))


@pytest.mark.parametrize("case, sides", _pick(
    [((2, 2, 1, 97, 113, 40, False, FP16), ("right", "right")),
     ((2, 2, 2, 100, 70, 64, True, BF16), ("left", "random"))],
    _gpu_product(GPU_SHAPES[:2], (("right", "right"), ("left", "random"))),
), ids=lambda x: _ids(x) or f"q{x[0]}-k{x[1]}")
def test_query_padding(case, sides):
    """Padded query rows output exactly 0, with lse +inf and exactly zero dq, also with an lse gradient."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    query_mask = _padding_mask(b, sq, sides[0])
    out, lse, (dq, _, _) = check_dense(q, k, v, causal=causal, query_padding_mask=query_mask,
                                       key_padding_mask=_padding_mask(b, sk, sides[1]), lse_grad=True)
    assert (~query_mask).any()
    assert torch.equal(out[~query_mask], torch.zeros_like(out[~query_mask]))
    assert torch.equal(dq[~query_mask], torch.zeros_like(dq[~query_mask]))
    assert torch.isinf(lse.transpose(1, 2)[~query_mask]).all()


def test_a_padding_mask_changed_in_place_gets_its_new_key_range(monkeypatch):
    """Every layer of a model gets the same padding mask, so its key range (which key blocks the kernels skip) is
    computed once and reused while the mask is unchanged; a mask edited in place gets a new one, and the result
    follows the new mask exactly."""
    computed = []
    compute = kernels.launch._compute_key_range
    monkeypatch.setattr(kernels.launch, "_compute_key_range", lambda kpm: computed.append(1) or compute(kpm))
    monkeypatch.setattr(kernels.launch, "_last_key_range", None)
    q, k, v = _qkv(2, 2, 1, 40, 150, 32, FP16)
    mask = torch.ones(2, 150, dtype=torch.bool, device=DEVICE)
    mask[1, 70:] = False
    for _ in range(2):  # two layers
        check_dense(q, k, v, causal=False, key_padding_mask=mask)
    assert len(computed) == 1
    mask[1, 70:] = True  # the same tensor: row 1 gains keys past its old range, row 0 loses its first ones
    mask[0, :60] = False
    check_dense(q, k, v, causal=False, key_padding_mask=mask)
    assert len(computed) == 2


@pytest.mark.parametrize("case", _pick([(3, 2, 1, 65, 80, 32, True, FP16)], [(3, 8, 2, 1000, 1100, 64, True, BF16)]),
                         ids=_ids)
def test_fully_masked_batch_row(case):
    """Batch row 1 has no real key and row 2 no real query: zeros, lse +inf, zero gradients, no NaN."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    key_mask = _padding_mask(b, sk, "right")
    key_mask[1] = False
    query_mask = torch.ones(b, sq, dtype=torch.bool, device=DEVICE)
    query_mask[2] = False
    out, lse, (dq, dk, dv) = check_dense(q, k, v, causal=causal, key_padding_mask=key_mask,
                                         query_padding_mask=query_mask, lse_grad=True)
    for row in (1, 2):
        assert torch.equal(out[row], torch.zeros_like(out[row])) and torch.isinf(lse[row]).all()
        for grad in (dq, dk, dv):
            assert torch.equal(grad[row], torch.zeros_like(grad[row]))


@pytest.mark.parametrize("case", _pick(
    [(2, 3, 1, 90, 77, 48, True, FP16), (2, 2, 1, 70, 113, 32, False, BF16)],
    [(4, 8, 1, 1023, 1025, 64, True, BF16), (4, 8, 2, 777, 1333, 128, False, FP16),
     (2, 6, 3, 513, 513, 80, True, FP16)],
), ids=_ids)
def test_gqa_with_padding(case):
    """dK/dV of a shared KV head sum over its query heads, padded rows and keys included."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, key_padding_mask=_padding_mask(b, sk, "left"),
                query_padding_mask=_padding_mask(b, sq, "right"))


# --- sliding window and ALiBi ---------------------------------------------------------------------

@pytest.mark.parametrize("case, window, side", _pick(
    [((2, 2, 1, 97, 113, 40, True, FP16), (16, -1), "right"),   # left only + causal: the usual sliding window
     ((2, 2, 2, 113, 97, 64, False, BF16), (-1, 7), "left"),    # right only
     ((1, 3, 1, 128, 128, 32, False, FP32), (20, 5), "random"),  # both sides
     ((2, 2, 1, 60, 100, 48, True, FP16), (0, -1), "left")],     # window of one key: single-key rows
    _gpu_product(GPU_SHAPES[:2], ((256, -1), (-1, 100), (128, 64), (0, 0)), ("right", "left")),
), ids=_ids)
def test_window(case, window, side):
    """Sliding windows with causal and key padding together; rows whose window holds only padding are empty."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, window_size=window, key_padding_mask=_padding_mask(b, sk, side))


@pytest.mark.parametrize("case, slopes, padded", _pick(
    [((2, 3, 1, 97, 113, 40, True, FP16), "h", False),
     ((2, 2, 2, 113, 97, 64, True, BF16), "bh", False),
     ((2, 2, 1, 80, 80, 32, False, FP32), "bh", True)],
    _gpu_product(GPU_SHAPES[:2], ("h", "bh"), (False, True)),
), ids=lambda x: _ids(x) or ({"h": "slopes_h", "bh": "slopes_bh"}.get(x) if isinstance(x, str) else
                                 "padded" if x else "unpadded"))
def test_alibi(case, slopes, padded):
    """ALiBi slopes of shape (nheads,) and (batch, nheads); seqlen_q != seqlen_k checks the bias's diagonal."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    key_mask = _padding_mask(b, sk, "random") if padded else None
    check_dense(q, k, v, causal=causal, alibi_slopes=_slopes(slopes, b, h), key_padding_mask=key_mask, lse_grad=True)


# --- dropout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, dropout_p", _pick(
    [((2, 2, 1, 97, 113, 40, True, FP16), 0.17),
     ((2, 2, 2, 70, 128, 64, False, BF16), 0.5)],
    _gpu_product(GPU_SHAPES[:3], (0.1, 0.5)),
), ids=lambda x: _ids(x) or (f"p{x}" if isinstance(x, float) else None))
def test_dropout(case, dropout_p):
    """The kernel's output and gradients equal the reference's under the keep mask it reports."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=_padding_mask(b, sk, "right"),
                query_padding_mask=_padding_mask(b, sq, "right"), lse_grad=True)


@pytest.mark.parametrize("case", _pick(
    [(1, 3, 1, 33, 31, 40, True, FP16)],
    [(2, 6, 2, 257, 255, d, True, dtype) for d in (160, 192) for dtype in (FP16, BF16)],
), ids=_ids)
def test_dropout_in_32_key_tiles_at_large_head_dims(case):
    """Above head dim 128 the forward's tile is 64 x 32, so it draws the dropout mask through _dropout_keep's 32-key
    path, in loops that mask keys (causal, key padding, ragged lengths). With GQA that kernel faulted on the H200
    (misaligned address) when the path joined and permuted its calls' flags (tests/test_random.py,
    GPU_REGRESSIONS)."""
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, dropout_p=0.3, key_padding_mask=_padding_mask(b, sk, "left"))


@pytest.mark.parametrize("case", _pick([(1, 2, 1, 64, 90, 32, True, FP32)], [(4, 8, 2, 1023, 1025, 64, True, BF16)]),
                         ids=_ids)
def test_all_features_together(case):
    b, h, hk, sq, sk, d, causal, dtype = case
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=causal, softmax_scale=0.3, window_size=(40, -1), alibi_slopes=_slopes("bh", b, h),
                key_padding_mask=_padding_mask(b, sk, "left"), query_padding_mask=_padding_mask(b, sq, "random"),
                dropout_p=0.3, lse_grad=True)


@triton.jit
def _philox_probe(SEED, ROWS, GROUPS, OUT, N_ROWS: tl.constexpr, N_GROUPS: tl.constexpr):
    seed = tl.load(SEED)
    rows = tl.load(ROWS + tl.arange(0, N_ROWS))
    groups = tl.load(GROUPS + tl.arange(0, N_GROUPS))
    ours = kernels.dropout._philox_words(seed, rows, groups)
    r64 = rows.to(tl.int64)
    ref = tl.philox(seed, groups.to(tl.uint32)[None, :], (r64 >> 32).to(tl.uint32)[:, None],
                    r64.to(tl.uint32)[:, None], 0, 7)
    offs = tl.arange(0, N_ROWS)[:, None] * N_GROUPS + tl.arange(0, N_GROUPS)[None, :]
    for w in tl.static_range(4):
        tl.store(OUT + w * N_ROWS * N_GROUPS + offs, ours[w].to(tl.int32, bitcast=True))
        tl.store(OUT + (4 + w) * N_ROWS * N_GROUPS + offs, ref[w].to(tl.int32, bitcast=True))


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs tl.philox itself")
def test_philox_words_are_tl_philox_bit_for_bit():
    """_philox_words (whole 64-bit products through mul.wide on the GPU) gives tl.philox's 7-round words exactly,
    for seeds with both halves set, rows past 2^32 and any group."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        seed = torch.randint(-2**63, 2**63 - 1, (1,), generator=gen, dtype=torch.int64).cuda()
        rows = torch.randint(0, 2**40, (64,), generator=gen, dtype=torch.int64).cuda()
        groups = torch.randint(0, 2**31 - 1, (16,), generator=gen, dtype=torch.int32).cuda()
        out = torch.empty(8, 64, 16, dtype=torch.int32, device="cuda")
        _philox_probe[(1,)](seed, rows, groups, out, 64, 16)
        assert torch.equal(out[:4], out[4:])
        assert (out[:4] != 0).float().mean() > 0.99  # the words are there, not an unwritten buffer


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_statistics(dropout_p):
    """Kept fraction within 5 binomial standard deviations of the exact keep probability (1 - p, p quantised up
    to 14 bits); same seed same mask, new seed new mask."""
    shape = (4, 8, 1024, 1024) if ON_GPU else (2, 3, 64, 100)
    torch.manual_seed(0)
    seed = kernels.dropout.draw_dropout_seed(torch.device(DEVICE))
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device.type == DEVICE
    keep = kernels.dropout.dropout_mask(seed, *shape, dropout_p)
    assert keep.dtype == torch.bool and keep.shape == shape
    kept, n = keep.sum().item(), keep.numel()
    q = kernels.dropout.kept_probability(dropout_p)
    assert q == 1 - min(math.ceil(dropout_p * 16384), 16383) / 16384 and 0 <= (1 - dropout_p) - q < 2 ** -14
    with pytest.raises(ValueError, match="dropout_p must be a float in \\[0, 1\\), got 1.0"):
        kernels.dropout.kept_probability(1.0)
    std = math.sqrt(n * q * (1 - q))
    expected = n * q
    assert abs(kept - expected) <= 5 * std, f"kept {kept} of {n}, expected {expected:.0f} ± {5 * std:.0f}"
    assert torch.equal(kernels.dropout.dropout_mask(seed.clone(), *shape, dropout_p), keep), "same seed, different mask"
    other = kernels.dropout.dropout_mask(kernels.dropout.draw_dropout_seed(torch.device(DEVICE)), *shape, dropout_p)
    assert not torch.equal(other, keep), "a new seed gave the same mask"
    # batches, heads and rows each get their own numbers, not copies of one stream
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1]) and not torch.equal(keep[..., 0], keep[..., 1])
    # Neighbours share Philox calls (draws of one call are 1, 7, 8, 9, 16, ... keys apart, and those 1, 7 or 9
    # apart may share a byte of a word): pairs must be independent, i.e. both kept with probability
    # (1 - p)^2, within 5 standard deviations (byte sharing correlates them by ~0.2%, about 1 standard
    # deviation at the GPU size). Each pair shares an element with two others, which adds 2 (q^3 - q^4)
    # per pair to the binomial variance q^2 (1 - q^2).
    q = 1 - dropout_p
    for dq, dk in ((0, 1), (0, 2), (0, 7), (0, 8), (0, 9), (0, 16), (0, 32), (0, 64), (1, 0), (8, 0)):
        a, b = keep[:, :, :keep.shape[2] - dq, :keep.shape[3] - dk], keep[:, :, dq:, dk:]
        both, m = (a & b).sum().item(), a.numel()
        std = math.sqrt(m * (q ** 2 * (1 - q ** 2) + 2 * (q ** 3 - q ** 4)))
        assert abs(both - m * q ** 2) <= 5 * std, f"keys {dk} / rows {dq} apart are correlated"


@pytest.mark.parametrize("transposed", [False, True], ids=["rows-keys", "keys-rows"])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 32), (16, 64), (64, 128), (32, 256)])
def test_dropout_mask_same_for_every_tile_size(block_m, block_n, transposed):
    """The forward and backward kernels use different tiles, and the dK/dV kernel draws them transposed
    (_dropout_keep_t: raw Philox words gathered across threads from 64 keys on); each must draw the same mask."""
    shape = (2, 3, 70, 300)
    seed = kernels.dropout.draw_dropout_seed(torch.device(DEVICE))
    ref = kernels.dropout.dropout_mask(seed, *shape, 0.3)
    out = torch.empty(shape, device=DEVICE, dtype=torch.int8)
    kernels.dropout._dropout_mask_kernel[(triton.cdiv(shape[2], block_m) * shape[0] * shape[1],)](
        seed, out, shape[2], shape[3], 0.3, BLOCK_M=block_m, BLOCK_N=block_n, TRANSPOSED=transposed,
        INTERPRET=bool(kernels.settings.INTERPRET))
    assert torch.equal(out.bool(), ref)


@triton.jit
def _philox_words(SEED, OUT, N_GROUPS: tl.constexpr, N_ROWS: tl.constexpr):
    """The raw Philox-4x32-7 words for counters (g, row): OUT (N_ROWS, N_GROUPS, 4) int32."""
    rows = tl.arange(0, N_ROWS).to(tl.int64)
    groups = tl.arange(0, N_GROUPS).to(tl.uint32)[None, :]
    words = tl.philox(tl.load(SEED), groups, (rows >> 32).to(tl.uint32)[:, None], rows.to(tl.uint32)[:, None], 0, 7)
    base = OUT + rows[:, None] * N_GROUPS * 4 + groups.to(tl.int64) * 4
    for w in tl.static_range(4):
        tl.store(base + w, words[w].to(tl.int32, bitcast=True))


def test_dropout_mask_follows_the_documented_draws():
    """dropout_mask() (hence every kernel, see the tile-size test) keeps key k of row r iff the 14-bit draw
    that _dropout_keep's docstring assigns to it is >= t: Philox call (g, r) with g = 4 * (k // 64) + c, where
    k % 64 = 8 * n + 2 * c + e; its word n // 2 and draw j = 2 * (n % 2) + e of that word, the high 14 bits of
    the word's bytes lo + 1 mod 4 (high) and lo (low), lo = 0, 2, 3, 1 for j = 0..3."""
    rows, keys, p = 16, 128, 0.3
    seed = kernels.dropout.draw_dropout_seed(torch.device(DEVICE))
    words = torch.empty(rows, keys // 16, 4, dtype=torch.int32, device=DEVICE)
    _philox_words[(1,)](seed, words, N_GROUPS=keys // 16, N_ROWS=rows)
    data = words.to(torch.int64) & 0xFFFFFFFF
    byte = [(data >> (8 * b)) & 0xFF for b in range(4)]  # each (rows, groups, 4 words)
    t = min(math.ceil(p * 16384), 16383)
    expected = torch.empty(rows, keys, dtype=torch.bool, device=DEVICE)
    for k in range(keys):
        g, c, n, e = 4 * (k // 64) + (k % 8) // 2, (k % 8) // 2, (k % 64) // 8, k % 2
        w, j = n // 2, 2 * (n % 2) + e
        assert g % 4 == c
        lo = (0, 2, 3, 1)[j]
        draw = (byte[(lo + 1) % 4][:, g, w] * 256 + byte[lo][:, g, w]) >> 2
        expected[:, k] = draw >= t
    assert torch.equal(kernels.dropout.dropout_mask(seed, 1, 1, rows, keys, p)[0, 0], expected)


@triton.jit
def _pair_words_probe(SEED, OUT, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    x = kernels.dropout._pair_words(tl.load(SEED), rows.to(tl.int64), start_n, BLOCK_M, BLOCK_N)
    tl.store(OUT + rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], x.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("p", [0.1, 0.7])
def test_pair_words_give_the_documented_mask(block_n, p):
    """The forward's two-at-a-time dropout (_drop_pairs, 16-bit P and tiles of >= 64 keys) keeps a score iff its
    lane of the word _pair_words gives it, bits 0-13 (even key) or 16-29 (odd key), is >= t / 4 compared as an
    fp16 value: the same mask as dropout_mask(). The asm itself runs only on a GPU (the dropout tests there)."""
    rows = 16
    seed = kernels.dropout.draw_dropout_seed(torch.device(DEVICE))
    out = torch.empty(rows, block_n, dtype=torch.int32, device=DEVICE)
    _pair_words_probe[(1,)](seed, out, block_n, BLOCK_M=rows, BLOCK_N=block_n)  # the second tile of the row
    x = out.to(torch.int64) & 0xFFFFFFFF
    lane = torch.where(torch.arange(block_n, device=DEVICE) % 2 == 0, x & 0x3FFF, (x >> 16) & 0x3FFF)
    t = torch.tensor(min(math.ceil(p * 16384), 16383), dtype=torch.int16)
    keep = lane.to(torch.int16).view(torch.float16).cpu() >= t.view(torch.float16)
    assert torch.equal(keep, kernels.dropout.dropout_mask(seed, 1, 1, rows, 2 * block_n, p)[0, 0, :, block_n:].cpu())


def test_dropout_seed_and_return_lse():
    """return_lse=False returns out alone, equal to return_lse=True's under the same torch seed; a different
    seed changes the output."""
    q, k, v = _qkv(1, 2, 1, 50, 70, 32, FP16)
    kwargs = dict(causal=True, dropout_p=0.3, window_size=(30, -1), key_padding_mask=_padding_mask(1, 70, "left"))
    torch.manual_seed(5)
    out, lse = hf_flash.flash_attn_func(q, k, v, return_lse=True, **kwargs)
    torch.manual_seed(5)
    alone = hf_flash.flash_attn_func(q, k, v, **kwargs)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)
    torch.manual_seed(6)
    assert not torch.equal(hf_flash.flash_attn_func(q, k, v, **kwargs), out)

    lens = [3, 0, 50, 1]
    q, k, v = _varlen_qkv(lens, lens, 2, 1, 32, FP16)
    cu = _cu_seqlens(lens)
    torch.manual_seed(5)
    out, lse = hf_flash.flash_attn_varlen_func(q, k, v, cu, cu, 50, 50, dropout_p=0.3, return_lse=True)
    torch.manual_seed(5)
    alone = hf_flash.flash_attn_varlen_func(q, k, v, cu, cu, 50, 50, dropout_p=0.3)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)


# --- varlen ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, features", _pick(
    [(([0, 1, 97, 33], [0, 1, 97, 33], 2, 1, 40, False, FP16), {}),
     # len_q != len_k per sequence (empty queries over keys, queries over no keys), max_seqlen_q padded
     (([5, 1, 64, 0, 30, 4], [17, 1, 50, 3, 30, 0], 3, 1, 64, True, BF16), {"max_seqlen_q": 67}),
     (([1, 77, 0, 50], [9, 60, 2, 50], 2, 2, 32, True, FP32), {"window_size": (10, -1), "alibi_slopes": "bh"}),
     (([33, 2, 64], [33, 80, 1], 2, 1, 48, False, FP16), {"window_size": (-1, 20), "alibi_slopes": "h"})],
    [(([0, 1, 1025, 2000, 17, 513, 1], [0, 1, 1025, 2000, 17, 513, 1], 8, 2, 64, causal, dtype), {})
     for causal, dtype in itertools.product((False, True), (FP16, BF16))] +
    [(([5, 1, 1500, 0, 777, 64], [1700, 1, 1300, 3, 777, 0], 8, 1, 128, True, BF16), {"max_seqlen_q": 2000}),
     (([1000, 1, 300, 2048], [1000, 900, 1, 2048], 8, 8, 96, True, FP16),
      {"window_size": (256, -1), "alibi_slopes": "bh"}),
     (([1000, 1, 300, 2048], [1000, 900, 1, 2048], 8, 4, 40, False, BF16),
      {"window_size": (128, 64), "alibi_slopes": "h"})],
), ids=_ids)
def test_varlen(case, features):
    lens_q, lens_k, h, hk, d, causal, dtype = case
    q, k, v = _varlen_qkv(lens_q, lens_k, h, hk, d, dtype)
    features = dict(features)
    if "alibi_slopes" in features:
        features["alibi_slopes"] = _slopes(features["alibi_slopes"], len(lens_q), h)
    check_varlen(q, k, v, lens_q, lens_k, causal=causal, lse_grad=True, **features)


@pytest.mark.parametrize("case, dropout_p", _pick(
    [(([3, 64, 1, 0, 41], [60, 64, 1, 5, 41], 2, 1, 32, True, FP16), 0.2)],
    [(([3, 1024, 1, 0, 1999], [600, 1024, 1, 5, 1999], 8, 2, 64, causal, BF16), p)
     for causal, p in itertools.product((False, True), (0.1, 0.5))],
), ids=lambda x: _ids(x) or (f"p{x}" if isinstance(x, float) else None))
def test_varlen_dropout(case, dropout_p):
    """The keep mask is indexed per sequence at local positions, inside (batch, nheads, max_seqlen_q, max_seqlen_k)."""
    lens_q, lens_k, h, hk, d, causal, dtype = case
    q, k, v = _varlen_qkv(lens_q, lens_k, h, hk, d, dtype)
    check_varlen(q, k, v, lens_q, lens_k, max_seqlen_k=max(lens_k) + 3, causal=causal, dropout_p=dropout_p,
                 window_size=(50, -1), lse_grad=True)


def _check_backward_paths(dropout_p):
    """Gradients against the reference, dense (GQA, window, ALiBi, both paddings, lse gradient) and packed;
    returns the packed q, k, v."""
    b, h, hk, sq, sk, d, dtype = (4, 8, 2, 1023, 1025, 64, BF16) if ON_GPU else (2, 3, 1, 64, 90, 32, FP32)
    q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
    check_dense(q, k, v, causal=True, window_size=(40, -1), alibi_slopes=_slopes("bh", b, h),
                key_padding_mask=_padding_mask(b, sk, "left"), query_padding_mask=_padding_mask(b, sq, "random"),
                dropout_p=dropout_p, lse_grad=True)
    lens_q, lens_k = ([3, 1024, 1, 0, 1999], [600, 1024, 1, 5, 1999]) if ON_GPU else ([3, 64, 1, 0, 41], [60, 64, 1, 5, 41])
    q, k, v = _varlen_qkv(lens_q, lens_k, h, hk, d, dtype)
    check_varlen(q, k, v, lens_q, lens_k, causal=True, dropout_p=dropout_p, lse_grad=True)
    return q, k, v


@pytest.mark.parametrize("mode, dropout_p", [("1", 0.3), ("1", 0.0), ("dropout", 0.2)])
def test_atomic_dq(mode, dropout_p, monkeypatch):
    """kernels.settings._ATOMIC_DQ: the dK/dV kernel sums dQ with atomics (one launch); same gradients as the reference,
    dense (GQA, window, ALiBi, both paddings, lse gradient) and packed."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", mode)
    q, k, v = _check_backward_paths(dropout_p)

    # deterministic=True, or torch.use_deterministic_algorithms(True), computes dQ in the dQ kernel whatever
    # _ATOMIC_DQ says (else that kernel only computes delta)
    launched = []
    launch = kernels.launch._launch
    monkeypatch.setattr(kernels.launch, "_launch", lambda kernel, *a, **kw: launched.append(
        (kernel.base_fn.__name__, kw.get("DELTA_ONLY"), kw.get("ATOMIC_DQ"))) or launch(kernel, *a, **kw))
    for deterministic, torch_deterministic in ((True, False), (False, True), (False, False)):
        launched.clear()
        torch.use_deterministic_algorithms(torch_deterministic, warn_only=True)
        try:
            out = hf_flash.flash_attn_func(q[None], k[None], v[None], dropout_p=0.2, deterministic=deterministic)
            torch.autograd.grad(out.sum(), (q, k, v))
        finally:
            torch.use_deterministic_algorithms(False)
        atomic = not (deterministic or torch_deterministic)
        assert launched[1:] == [("_attn_bwd_dq", atomic, None), ("_attn_bwd_dkdv", None, atomic)], launched
    # rows wider than 256 bytes (here head dim 160 in bf16, a 256-wide tile) keep the dQ kernel
    launched.clear()
    wide = [torch.randn(1, 20, 2, 160, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(3)]
    torch.autograd.grad(hf_flash.flash_attn_func(*wide, dropout_p=0.2).float().sum(), wide)
    assert launched[1:] == [("_attn_bwd_dq", False, None), ("_attn_bwd_dkdv", None, False)], launched


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_dkdv_rows(dropout_p, monkeypatch):
    """kernels.settings._DKDV_ROWS = "1": the dK/dV kernel's tiles as (queries, keys); same gradients as the reference,
    dense (GQA, window, ALiBi, both paddings, lse gradient) and packed, with and without atomic dQ."""
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", "1")
    fresh_tuning(monkeypatch)  # the orientation is tuned: start from no tuned configs
    for atomic_dq in ("0", "dropout"):
        monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", atomic_dq)
        _check_backward_paths(dropout_p)
    dkdv = kernels.backward_dkdv._attn_bwd_dkdv
    chosen = [c.kwargs["QK_ROWS"] for key, c in kernels.launch._CHOSEN.items() if key[0] is dkdv]
    assert chosen and all(chosen), chosen


@pytest.mark.parametrize("mode, dropout, expected", [("dropout", True, {False, True}), ("dropout", False, {False}),
                                                     ("0", True, {False}), ("1", False, {True}),
                                                     ("tune", False, {False, True})])
def test_dkdv_rows_candidates(mode, dropout, expected, monkeypatch):
    """Which dK/dV tile orientations the tuner may time: by default both with dropout, (keys, queries) without."""
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", mode)
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", True)
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)  # so _prune returns every candidate, not the first
    kept = kernels.tuning._prune(kernels.backward_dkdv._attn_bwd_dkdv.configs, {"Q": torch.empty(0, dtype=FP16)},
                                 BLOCK_D=64, DROPOUT=dropout)
    assert {c.kwargs["QK_ROWS"] for c in kept} == expected


@pytest.mark.parametrize("dropout, head_dim, dtype, capped", [(True, 64, FP16, True), (True, 64, BF16, True),
                                                             (False, 64, FP16, False), (True, 128, FP16, False),
                                                             (True, 64, FP32, False), (True, 32, FP16, False)])
def test_register_capped_forward_tile_only_with_dropout_at_head_dim_64(dropout, head_dim, dtype, capped, monkeypatch):
    """The forward's register-capped candidate is timed only where it was measured to help: dropout, BLOCK_D 64,
    fp16 or bf16."""
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", True)
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)  # so _prune returns every candidate, not the first
    configs = kernels.tuning._configs([(64, 64, 4, 3)]) + kernels.tuning._configs([(64, 64, 4, 3)], maxnreg=128)
    kept = kernels.tuning._prune(configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=head_dim, DROPOUT=dropout)
    assert any(c.maxnreg for c in kept) == capped and any(not c.maxnreg for c in kept)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has no register cap")
def test_register_capped_forward_tile_is_exact_with_dropout(monkeypatch):
    """The capped candidate alone (what the tuner may pick), under dropout, padding and GQA."""
    monkeypatch.setattr(kernels.settings, "AUTOTUNE", True)
    fresh_tuning(monkeypatch)
    capped = [c for c in kernels.forward._attn_fwd.configs if c.maxnreg]
    assert capped
    monkeypatch.setattr(kernels.forward._attn_fwd, "configs", capped[:1])
    b, h, hk, sq, sk = 2, 6, 2, 777, 1029
    for dtype in (FP16, BF16):
        q, k, v = _qkv(b, h, hk, sq, sk, 64, dtype)
        check_dense(q, k, v, causal=True, dropout_p=0.2, key_padding_mask=_padding_mask(b, sk, "left"), lse_grad=True)
    assert [cfg for key, cfg in kernels.launch._CHOSEN.items() if key[0] is kernels.forward._attn_fwd] == capped[:1] * 2


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has a single config")
@pytest.mark.parametrize("dq", ["atomic", "kernel"])
@pytest.mark.parametrize("index", candidate_indices())
@pytest.mark.parametrize("head_dim, dtype", [(64, FP16), (128, BF16), (192, FP16)],
                         ids=["d64-fp16", "d128-bf16", "d192-fp16"])
def test_every_config_is_exact_with_dropout_and_padding(head_dim, dtype, index, dq, monkeypatch):
    """Each candidate the search may pick under dropout (its list differs: the capped forward tile, both dK/dV
    orientations), in loops that mask keys (causal, key padding, ragged lengths) with GQA, dQ summed with atomics or
    by its own kernel: the two tile shapes whose dropout flags once went wrong on the H200 only did so there."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "dropout" if dq == "atomic" else "0")
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", "tune")
    one_candidate_each(monkeypatch, index, triton.next_power_of_2(head_dim), dtype, DROPOUT=True)
    b, h, hk, sq, sk = _pick([(1, 3, 1, 40, 37)], [(2, 6, 2, 257, 255)])[0]
    q, k, v = _qkv(b, h, hk, sq, sk, head_dim, dtype)
    check_dense(q, k, v, causal=True, dropout_p=0.3, key_padding_mask=_padding_mask(b, sk, "left"), lse_grad=True)


# --- determinism and recomputation ----------------------------------------------------------------

@pytest.mark.parametrize("api", ["dense", "varlen"])
def test_deterministic_is_bit_identical(api):
    """deterministic=True: two runs under the same seed (GQA, dropout, padding) give bit-identical gradients."""
    h, hk, d, dtype = (8, 2, 64, BF16) if ON_GPU else (3, 1, 32, FP16)
    if api == "dense":
        b, sq, sk = (4, 1023, 1025) if ON_GPU else (1, 70, 90)
        q, k, v = _qkv(b, h, hk, sq, sk, d, dtype)
        key_mask = _padding_mask(b, sk, "left")

        def attn(q, k, v):
            return hf_flash.flash_attn_func(q, k, v, causal=True, dropout_p=0.2, deterministic=True,
                                            key_padding_mask=key_mask)
    else:
        lens_q, lens_k = ([1000, 1, 2000, 0], [1500, 5, 2000, 1]) if ON_GPU else ([40, 1, 50, 0], [60, 5, 50, 1])
        q, k, v = _varlen_qkv(lens_q, lens_k, h, hk, d, dtype)
        cu_q, cu_k = _cu_seqlens(lens_q), _cu_seqlens(lens_k)

        def attn(q, k, v):
            return hf_flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                   dropout_p=0.2, deterministic=True)
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    runs = []
    for _ in range(2):
        torch.manual_seed(SEED)
        runs.append(torch.autograd.grad(attn(q, k, v), (q, k, v), dout))
    for name, first, second in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(first, second), f"{name} differs between two deterministic runs"


def test_activation_checkpointing_with_dropout():
    """torch.utils.checkpoint replays the RNG state, so the recomputed forward draws the same dropout seed."""
    b, sq, sk = (2, 1024, 1000) if ON_GPU else (1, 70, 65)
    q, k, v = _qkv(b, 2, 1, sq, sk, 32, BF16)
    w = torch.randn(32, 32, device=DEVICE, dtype=BF16)
    key_mask = _padding_mask(b, sk, "right")

    def block(q, k, v):
        # deterministic: with dropout, dQ is otherwise summed with atomics, whose rounding varies between runs
        out = hf_flash.flash_attn_func(q @ w, k, v, causal=True, dropout_p=0.1, key_padding_mask=key_mask,
                                       deterministic=True)
        return (out @ w).float().square().sum()

    torch.manual_seed(SEED)
    plain = torch.autograd.grad(block(q, k, v), (q, k, v))
    torch.manual_seed(SEED)
    ckpt = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False), (q, k, v))
    for name, a, b_ in zip(("dq", "dk", "dv"), plain, ckpt):
        assert torch.equal(a, b_), f"{name} differs under checkpointing"


# --- bad input ------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _bool(*shape):
    return torch.ones(*shape, dtype=torch.bool, device=DEVICE)


def _bad(*values):
    """A bad-input case with an id like "key_padding_mask=2x8-bool": the keyword arguments it sets."""
    kwargs = values[-3]
    return pytest.param(*values, id="-".join(f"{key}={_value_id(x)}" for key, x in kwargs.items()))


def _value_id(value):
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() and value.dim() == 1:  # cu_seqlens: its values
            values = ".".join(map(str, value.tolist()))
            return values if value.dtype == torch.int32 else f"{values}-{str(value.dtype).removeprefix('torch.')}"
        return "x".join(map(str, value.shape)) + "-" + str(value.dtype).removeprefix("torch.")
    return str(value).replace(" ", "")


_QKV = (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16))
_QKV_LONG_K = (_t(2, 8, 2, 16), _t(2, 9, 2, 16), _t(2, 9, 2, 16))


@pytest.mark.parametrize("qkv, kwargs, error, match", [
    _bad(_QKV_LONG_K, {"key_padding_mask": _bool(2, 8)}, ValueError, "key_padding_mask"),  # seqlen_q, not seqlen_k
    _bad(_QKV_LONG_K, {"key_padding_mask": _bool(1, 9)}, ValueError, "key_padding_mask"),
    _bad(_QKV_LONG_K, {"key_padding_mask": _bool(2, 9, 1)}, ValueError, "key_padding_mask"),
    _bad(_QKV_LONG_K, {"key_padding_mask": _bool(2, 9).int()}, TypeError, "key_padding_mask"),
    _bad(_QKV_LONG_K, {"key_padding_mask": _bool(2, 9).float()}, TypeError, "key_padding_mask"),
    _bad(_QKV_LONG_K, {"query_padding_mask": _bool(2, 9)}, ValueError, "query_padding_mask"),
    _bad(_QKV_LONG_K, {"query_padding_mask": _bool(3, 8)}, ValueError, "query_padding_mask"),
    _bad(_QKV_LONG_K, {"query_padding_mask": _bool(2, 8).to(torch.uint8)}, TypeError, "query_padding_mask"),
    _bad(_QKV, {"dropout_p": -0.1}, ValueError, "dropout_p"),
    _bad(_QKV, {"dropout_p": 1.0}, ValueError, "dropout_p"),
    _bad(_QKV, {"dropout_p": 1.5}, ValueError, "dropout_p"),
    _bad(_QKV, {"window_size": (-2, 0)}, ValueError, "window_size"),
    _bad(_QKV, {"window_size": (4, -3)}, ValueError, "window_size"),
    _bad(_QKV, {"window_size": (4,)}, ValueError, "window_size"),
    _bad(_QKV, {"window_size": (4, 0, 1)}, ValueError, "window_size"),
    _bad(_QKV, {"alibi_slopes": torch.rand(3, device=DEVICE)}, ValueError, "alibi_slopes"),
    _bad(_QKV, {"alibi_slopes": torch.rand(2, 2, device=DEVICE)}, ValueError, "alibi_slopes"),  # batch is 1
    _bad(_QKV, {"alibi_slopes": torch.rand(1, 2, 1, device=DEVICE)}, ValueError, "alibi_slopes"),
])
def test_bad_input(qkv, kwargs, error, match):
    with pytest.raises(error, match=match):
        hf_flash.flash_attn_func(*qkv, **kwargs)


def _varlen_args(**overrides):
    """q: 2 sequences of 3 and 5 tokens; k, v: 4 and 2 tokens."""
    args = dict(q=_t(8, 2, 16), k=_t(6, 1, 16), v=_t(6, 1, 16),
                cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE),
                cu_seqlens_k=torch.tensor([0, 4, 6], dtype=torch.int32, device=DEVICE), max_seqlen_q=5, max_seqlen_k=4)
    args.update(overrides)
    return args


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("overrides, error, match", [
    _bad({"cu_seqlens_k": _cu(0, 6)}, (ValueError, TypeError), "cu_seqlens_[qk]"),  # batch 1 vs cu_seqlens_q's 2
    _bad({"cu_seqlens_q": _cu(0, 3, 5, 8)}, (ValueError, TypeError), "cu_seqlens_[qk]"),
    _bad({"cu_seqlens_q": _cu(0, 6, 3, 8)}, (ValueError, TypeError), "cu_seqlens_q"),  # not monotone
    _bad({"cu_seqlens_k": _cu(0, 7, 6)}, (ValueError, TypeError), "cu_seqlens_k"),  # not monotone
    _bad({"cu_seqlens_q": _cu(1, 3, 8)}, (ValueError, TypeError), "cu_seqlens_q"),  # not starting at 0
    _bad({"cu_seqlens_q": _cu(0, 3, 7)}, (ValueError, TypeError), "cu_seqlens_q"),  # last != total_q
    _bad({"cu_seqlens_k": _cu(0, 4, 7)}, (ValueError, TypeError), "cu_seqlens_k"),  # last != total_k
    _bad({"cu_seqlens_q": _cu(0, 3, 8, dtype=torch.int64)}, (ValueError, TypeError), "cu_seqlens_q"),
    _bad({"cu_seqlens_k": _cu(0, 4, 6).float()}, (ValueError, TypeError), "cu_seqlens_k"),
    _bad({"max_seqlen_q": 4}, ValueError, "max_seqlen"),
    _bad({"max_seqlen_k": 3}, ValueError, "max_seqlen"),
    _bad({"dropout_p": 1.0}, ValueError, "dropout_p"),
    _bad({"window_size": (-1, -2)}, ValueError, "window_size"),
    _bad({"alibi_slopes": torch.rand(3, 2, device=DEVICE)}, ValueError, "alibi_slopes"),  # batch is 2
])
def test_bad_input_varlen(overrides, error, match):
    args = _varlen_args(**overrides)
    kwargs = {key: args.pop(key) for key in ("dropout_p", "window_size", "alibi_slopes") if key in args}
    with pytest.raises(error, match=match):
        hf_flash.flash_attn_varlen_func(*args.values(), **kwargs)
