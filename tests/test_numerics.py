"""Numerical edge cases that once gave silent wrong answers, each on every path it can reach.

- Keys past seqlen_k (the ragged last key tile) against a query row whose scores are all very negative
  (lse below about -11): there p = exp2(0 - lse) overflows fp16, and inf * 0 = NaN crossed into real dQ rows
  through the dK/dV kernel's atomic dQ. Dense (both dK/dV tile orientations, atomics with and without
  dropout, the dQ kernel), block-sparse and packed.
- Negative softmax scales: the unmasked loop takes the running max on unscaled scores.
- Dropout's expectation near p -> 1, where the keep test quantises p to 14 bits.
- Double backward, which the kernels cannot differentiate: an error, never a gradient without its second-order
  term.
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, assert_close_2x, fresh_tuning
from test_block_sparse import check_sparse
from test_features import FP16, FP32, _qkv, check_dense, check_varlen

import hf_flash
from hf_flash import layouts as L
import hf_flash.kernels as kernels

# seqlen_k one past a multiple of each first dK/dV key tile (32 under the interpreter, 128 on the GPU)
KEY_LENGTHS = [33, 129] if ON_GPU else [33]


def _very_negative_rows(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype=FP16):
    """Keys all close to one direction u and queries along -6 u: every score of every row is about -34, so the
    lse is about -30."""
    u = torch.randn(head_dim, device=DEVICE)
    k = u + 0.01 * torch.randn(batch, seqlen_k, nheads, head_dim, device=DEVICE)
    q = (-6 * u).expand(batch, seqlen_q, nheads, head_dim) + 0.01 * torch.randn(batch, seqlen_q, nheads, head_dim,
                                                                               device=DEVICE)
    v = torch.randn(batch, seqlen_k, nheads, head_dim, device=DEVICE)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("seqlen_k", KEY_LENGTHS)
@pytest.mark.parametrize("atomic_dq, dkdv_rows, dropout_p", [
    ("dropout", "0", 0.17), ("dropout", "1", 0.17), ("1", "0", 0.0), ("1", "1", 0.0), ("0", "0", 0.17)],
    ids=["atomic-dropout-keys_rows", "atomic-dropout-rows_keys", "atomic-keys_rows", "atomic-rows_keys",
         "dq_kernel-dropout"])
def test_ragged_keys_with_very_negative_scores_dense(seqlen_k, atomic_dq, dkdv_rows, dropout_p, monkeypatch):
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", atomic_dq)
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", dkdv_rows)
    fresh_tuning(monkeypatch)  # the orientation is a tuned parameter
    q, k, v = _very_negative_rows(1, 8, seqlen_k, 1, 32)
    check_dense(q, k, v, dropout_p=dropout_p)


@pytest.mark.parametrize("seqlen_k", KEY_LENGTHS)
def test_ragged_keys_with_very_negative_scores_block_sparse(seqlen_k, monkeypatch):
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "1")
    fresh_tuning(monkeypatch)
    q, k, v = _very_negative_rows(1, 40, seqlen_k, 2, 32)
    layout = L.local(24, 40, seqlen_k, block_size=16, device=DEVICE) | L.global_tokens(3, 40, seqlen_k, 16,
                                                                                         device=DEVICE)
    check_sparse(q, k, v, layout, dropout_p=0.17)


@pytest.mark.parametrize("seqlen_k", KEY_LENGTHS)
def test_ragged_keys_with_very_negative_scores_varlen(seqlen_k):
    lens_q, lens_k = [8, 5, 0], [seqlen_k, 7, 3]
    q, k, v = _very_negative_rows(1, sum(lens_q), sum(lens_k), 2, 32)
    check_varlen(*(t.detach()[0].requires_grad_() for t in (q, k, v)), lens_q, lens_k, dropout_p=0.17)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "causal"])
@pytest.mark.parametrize("scale", [-0.177, -1e-3, -4.0])
def test_negative_softmax_scale(scale, masked):
    q, k, v = _qkv(2, 2, 1, 64, 70, 32, FP16)
    with torch.no_grad():
        q *= 2
    out, lse, _ = check_dense(q, k, v, softmax_scale=scale, causal=masked)
    assert torch.isfinite(out).all()


def test_negative_softmax_scale_block_sparse_and_varlen():
    q, k, v = _qkv(1, 2, 2, 48, 48, 32, FP16)
    check_sparse(q, k, v, L.local(20, 48, 48, block_size=16, device=DEVICE), softmax_scale=-0.3)
    lens = [17, 31]
    q, k, v = (t.detach()[0].requires_grad_() for t in _qkv(1, 2, 2, sum(lens), sum(lens), 32, FP16))
    check_varlen(q, k, v, lens, lens, softmax_scale=-0.3)


@pytest.mark.parametrize("dropout_p", [0.5, 0.9, 0.999, 0.9999])
def test_dropout_keeps_the_expectation(dropout_p):
    """E[out] is the output without dropout. With equal scores and all values 1, out = (kept keys / seqlen_k) /
    keep probability: exactly so for the kernels' own mask, and its mean over all rows is 1 within 5 binomial
    standard deviations (on the GPU's 67M draws that resolves the 2% bias that scaling by 1 / (1 - p) had at
    p = 0.999, and the 39% at 0.9999)."""
    batch, heads, seqlen = (8, 8, 1024) if ON_GPU else (2, 2, 128)
    q = torch.zeros(batch, seqlen, heads, 16, device=DEVICE, dtype=FP32)
    torch.manual_seed(0)
    out = hf_flash.flash_attn_func(q, q, torch.ones_like(q), dropout_p=dropout_p)[..., 0]
    torch.manual_seed(0)
    seed = kernels.dropout.draw_dropout_seed(q.device)
    kept = kernels.dropout.dropout_mask(seed, batch, heads, seqlen, seqlen, dropout_p)
    keep = kernels.dropout.kept_probability(dropout_p)
    expected = kept.sum(-1).double().transpose(1, 2) / seqlen / keep  # (batch, seqlen, heads)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    std = (keep * (1 - keep) / kept.numel()) ** 0.5 / keep
    mean = out.double().mean().item()
    assert abs(mean - 1.0) <= 5 * std, f"E[out] / out = {mean:.4f}, expected 1 ± {5 * std:.4f}"
    assert kernels.dropout.quantised_dropout_p(dropout_p) == 1 - keep >= dropout_p


def test_double_backward_raises():
    """A gradient penalty differentiates through dq: an error. create_graph=True for a loss whose second
    backward does not pass through attention still works."""
    q, k, v = _qkv(1, 2, 2, 20, 20, 16, FP32)
    out = hf_flash.flash_attn_func(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        dq.square().sum().backward()

    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    out = hf_flash.flash_attn_func(q, k, v)
    (dw,) = torch.autograd.grad((out * weight).square().sum(), weight, create_graph=True)
    dw.square().sum().backward()  # through out's first-order backward only
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_w = weight.detach().double().requires_grad_()
    ref_out = hf_flash.attention_reference(ref_q, ref_k, ref_v)[0]
    (ref_dw,) = torch.autograd.grad((ref_out * ref_w).square().sum(), ref_w, create_graph=True)
    ref_dw.square().sum().backward()
    pt_q, pt_k, pt_v = (t.detach().requires_grad_() for t in (q, k, v))
    pt_w = weight.detach().requires_grad_()
    (pt_dw,) = torch.autograd.grad((hf_flash.attention_reference(pt_q, pt_k, pt_v)[0] * pt_w).square().sum(), pt_w,
                                   create_graph=True)
    pt_dw.square().sum().backward()
    assert_close_2x(weight.grad, ref_w.grad, pt_w.grad, "dweight")
    assert_close_2x(q.grad, ref_q.grad, pt_q.grad, "dq")
