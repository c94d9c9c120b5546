"""Dense exact attention (FlashAttention-2) in Triton: forward, backward, launchers, custom ops.

Layout: q, k, v are (batch, seqlen, nheads, headdim) with any strides; k and v may have
nheads_q / group heads (GQA/MQA). The forward tiles K/V through on-chip memory with an online
softmax in fp32 and writes only the output and the log-sum-exp (LSE, natural log, (batch, nheads,
seqlen_q) fp32). The backward recomputes the probabilities from Q, K and the LSE.

Causal masking is aligned bottom-right: query i sees key j iff j <= i + (seqlen_k - seqlen_q).
A row that sees no key outputs 0 and has LSE = +inf (as flash-attn), so that exp(s - lse) = 0 in
the backward without a special case.

Read top to bottom: configs, jit helpers, forward, backward, launchers, custom ops with autograd.
"""

import math
import os

import torch
import triton
import triton.language as tl

# HF_FLASH_AUTOTUNE=0 skips the config search and takes the first config that fits: no tuning
# time on the first call of each shape bucket, at some cost in speed (the test suite uses it).
AUTOTUNE = os.environ.get("HF_FLASH_AUTOTUNE", "1") not in ("", "0")
# The interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors for testing. It is read at
# import time because triton.jit chooses between compiling and interpreting when it decorates.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEADDIM = 256


# --------------------------------------------------------------------------------------------
# Autotuning. Few configs, pruned by head dim and dtype, keyed on power-of-two length buckets so a
# new sequence length rarely triggers a new search.
# --------------------------------------------------------------------------------------------

def _configs(candidates):
    if INTERPRET:  # one small config: the interpreter is slow and autotuning it means nothing
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]


def _prune(configs, named_args, **kwargs):
    """Keep only tiles that fit registers and shared memory for this row width (head dim x dtype)."""
    args = {**named_args, **kwargs}
    row_bytes = args["Q"].element_size() * args["BLOCK_D"]
    kept = configs
    if row_bytes > 256:  # beyond fp16/bf16 headdim 128 or fp32 headdim 64
        max_tile = 128 * 64 if row_bytes <= 512 else 64 * 32
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile and c.num_stages <= 2]
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept if AUTOTUNE else kept[:1]


_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
])
_BWD_DKDV_CONFIGS = _configs([  # BLOCK_M walks queries, BLOCK_N is the resident K/V tile
    (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 2), (32, 32, 8, 2),
])
_BWD_DQ_CONFIGS = _configs([  # BLOCK_M is the resident Q tile, BLOCK_N walks keys
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 2), (32, 32, 8, 2),
])
_TUNE_KEY = ["SEQ_Q_BUCKET", "SEQ_K_BUCKET", "HEAD_DIM", "CAUSAL"]
_PRUNE = {"early_config_prune": _prune}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _mm(x, INTERPRET: tl.constexpr):
    # The interpreter's tl.dot multiplies the raw bit patterns of bf16 operands: upcast there.
    if INTERPRET:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter truncates fp32 -> bf16, which biases every rounded probability downwards;
    # round to nearest even there, as the GPU does.
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= n_rows (if checked) and the padded head dim."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _tile(n_blocks, REVERSE: tl.constexpr):
    """(block index along the sequence, batch * nheads index) of this program.

    The grid is 1-D because CUDA caps grid axis 1 at 65535, below batch * nheads for large batches
    of short sequences. Consecutive programs share a head, so its K/V stay in L2; with REVERSE
    (causal, where later query blocks do more work) the heaviest blocks start first.
    """
    pid = tl.program_id(0)
    block = pid % n_blocks
    if REVERSE:
        block = n_blocks - 1 - block
    return block, pid // n_blocks


@triton.jit
def _key_blocks(start_m, SEQ_Q, SEQ_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block start_m, split as [0, full_hi) needing no mask, [full_hi, hi) masked.

    Blocks below full_hi are inside the key range and (if causal) visible to every row of the
    query block; the rest need the element mask (causal diagonal or the ragged last key block).
    """
    full_hi = SEQ_K // BLOCK_N * BLOCK_N
    hi = SEQ_K
    if CAUSAL:
        diag = SEQ_K - SEQ_Q
        first_row = start_m * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, SEQ_Q) - 1
        full_hi = tl.minimum(full_hi, tl.maximum(first_row + diag + 1, 0) // BLOCK_N * BLOCK_N)
        hi = tl.maximum(tl.minimum(hi, last_row + diag + 1), 0)
    return full_hi, hi


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               lo, hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        if MASK:
            keep = cols[None, :] < SEQ_K
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead of -inf
            # so that exp2 gives 0 rather than NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            qk = qk - m_sub[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            qk = qk * qk_scale - m_sub[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, MASK)
        acc = tl.dot(_mm(_cast(p, v.dtype, INTERPRET), INTERPRET), _mm(v, INTERPRET), acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh, stride_od,
              NHEADS, GROUP, SEQ_Q, SEQ_K, qk_scale, SEQ_Q_BUCKET, SEQ_K_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(tl.cdiv(SEQ_Q, BLOCK_M), CAUSAL)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + (off_h // GROUP) * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = SEQ_K - SEQ_Q
    full_hi, hi = _key_blocks(start_m, SEQ_Q, SEQ_K, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               0, full_hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               full_hi, hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET)

    empty = l_i == 0.0  # the row sees no key
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]  # the one division, at the end
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, INTERPRET), mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O) - dLSE, then dK/dV (one program per key block, looping over the
# query heads of its KV group, so no atomics), then dQ (one program per query block).
#
# Query rows past seqlen_q load as q = 0, dO = 0, LSE = +inf, so their probabilities are exactly 0
# and need no mask. Key rows past seqlen_k only touch dK/dV rows that are never stored, but in dQ
# they must be masked like in the forward.
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, Delta,
                         stride_ob, stride_om, stride_oh, stride_od,
                         stride_dob, stride_dom, stride_doh, stride_dod,
                         NHEADS, SEQ_Q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    start_m, off_bh = _tile(tl.cdiv(SEQ_Q, BLOCK_M), False)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_bh.to(tl.int64) * SEQ_Q + offs_m
    if HAS_DLSE:  # d lse_i / d s_ij = p_ij, which folds into delta
        delta -= tl.load(DLSE + row, mask=offs_m < SEQ_Q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    lo, hi, offs_m, offs_n, offs_d, SEQ_Q, diag, qk_scale,
                    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       rows, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(lse_base + rows, mask=rows < SEQ_Q, other=float("inf")) * 1.4426950408889634
        qk_t = tl.dot(_mm(k, INTERPRET), _mm(tl.trans(q), INTERPRET), input_precision=PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:  # causal diagonal
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        do = _load_rows(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        rows, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
        dv = tl.dot(_mm(_cast(p_t, do.dtype, INTERPRET), INTERPRET), _mm(do, INTERPRET), dv, input_precision=PRECISION)
        delta = tl.load(delta_base + rows, mask=rows < SEQ_Q, other=0.0)
        dp_t = tl.dot(_mm(v, INTERPRET), _mm(tl.trans(do), INTERPRET), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_mm(_cast(ds_t, q.dtype, INTERPRET), INTERPRET), _mm(q, INTERPRET), dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_dob, stride_dom, stride_doh, stride_dod,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, SEQ_Q_BUCKET, SEQ_K_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block_n, off_bhk = _tile(tl.cdiv(SEQ_K, BLOCK_N), False)
    start_n = block_n * BLOCK_N
    nheads_kv = NHEADS // GROUP
    off_b = (off_bhk // nheads_kv).to(tl.int64)
    off_hk = (off_bhk % nheads_kv).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query blocks [lo, full_lo) straddle the causal diagonal of this key block; [full_lo, SEQ_Q)
    # see all of it.
    diag = SEQ_K - SEQ_Q
    lo = 0
    full_lo = 0
    if CAUSAL:
        q_end = tl.cdiv(SEQ_Q, BLOCK_M) * BLOCK_M
        lo = tl.minimum(tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M, q_end)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, q_end)

    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * NHEADS + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + off_bh * SEQ_Q, Delta + off_bh * SEQ_Q,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     lo, full_lo, offs_m, offs_n, offs_d, SEQ_Q, diag, qk_scale,
                                     True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + off_bh * SEQ_Q, Delta + off_bh * SEQ_Q,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 full_lo, SEQ_Q, offs_m, offs_n, offs_d, SEQ_Q, diag, qk_scale,
                                 False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET)

    mask = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast(dk, DK.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             _cast(dv, DV.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, MASK)
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, SEQ_K, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            keep = cols[None, :] < SEQ_K
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(_mm(do, INTERPRET), _mm(tl.trans(v), INTERPRET), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_mm(_cast(ds, k.dtype, INTERPRET), INTERPRET), _mm(k, INTERPRET), dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ,
                 stride_qb, stride_qm, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_dob, stride_dom, stride_doh, stride_dod,
                 stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                 NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, SEQ_Q_BUCKET, SEQ_K_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(tl.cdiv(SEQ_Q, BLOCK_M), CAUSAL)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    k_base = K + off_b * stride_kb + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + (off_h // GROUP) * stride_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, SEQ_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    row = off_bh.to(tl.int64) * SEQ_Q + offs_m
    lse2 = tl.load(LSE + row, mask=offs_m < SEQ_Q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=offs_m < SEQ_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    diag = SEQ_K - SEQ_Q
    full_hi, hi = _key_blocks(start_m, SEQ_Q, SEQ_K, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       0, full_hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
                       False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       full_hi, hi, offs_m, offs_n, offs_d, SEQ_K, diag, qk_scale,
                       True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _cast(dq, DQ.dtype.element_ty, INTERPRET), mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _bucket(n):
    return triton.next_power_of_2(max(n, 16))


def _common(q, k, causal):
    batch, seq_q, nheads, head_dim = q.shape
    seq_k, nheads_kv = k.shape[1], k.shape[2]
    return dict(
        NHEADS=nheads, GROUP=nheads // nheads_kv, SEQ_Q=seq_q, SEQ_K=seq_k,
        SEQ_Q_BUCKET=_bucket(seq_q), SEQ_K_BUCKET=_bucket(seq_k),
        HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs get true fp32 dots: tf32 would be ~1e-3 off, far from PyTorch's fp32 result.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
    )


def attention_forward(q, k, v, causal, softmax_scale):
    """Returns out (batch, seq_q, nheads, headdim, contiguous) and lse (batch, nheads, seq_q) fp32."""
    batch, seq_q, nheads, head_dim = q.shape
    out = torch.empty((batch, seq_q, nheads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, nheads, seq_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if k.shape[1] == 0:  # no keys at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    meta = _common(q, k, causal)
    grid = lambda cfg: (triton.cdiv(seq_q, cfg["BLOCK_M"]) * batch * nheads,)
    _attn_fwd[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    qk_scale=softmax_scale * LOG2E, **meta)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, dlse, causal, softmax_scale):
    """Returns dq, dk, dv (contiguous, in the input dtypes). dlse may be None."""
    batch, seq_q, nheads, head_dim = q.shape
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _common(q, k, causal)
    delta = torch.empty_like(lse)
    block_pre = 64 if not INTERPRET else 32
    _attn_bwd_preprocess[(triton.cdiv(seq_q, block_pre) * batch * nheads,)](
        out, dout, dlse if dlse is not None else lse, delta, *out.stride(), *dout.stride(), nheads, seq_q,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_M=block_pre)
    scales = dict(sm_scale=softmax_scale, qk_scale=softmax_scale * LOG2E)
    nheads_kv = k.shape[2]
    grid_kv = lambda cfg: (triton.cdiv(k.shape[1], cfg["BLOCK_N"]) * batch * nheads_kv,)
    _attn_bwd_dkdv[grid_kv](q, k, v, dout, lse, delta, dk, dv,
                            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
                            **scales, **meta)
    grid_q = lambda cfg: (triton.cdiv(seq_q, cfg["BLOCK_M"]) * batch * nheads,)
    _attn_bwd_dq[grid_q](q, k, v, dout, lse, delta, dq,
                         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
                         **scales, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with autograd registered, so the same
# function works eagerly, compiled and under activation checkpointing.
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_flash::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, softmax_scale)


@attention_fwd_op.register_fake
def _(q, k, v, causal, softmax_scale):
    batch, seq_q, nheads, head_dim = q.shape
    return q.new_empty((batch, seq_q, nheads, head_dim)), q.new_empty((batch, nheads, seq_q), dtype=torch.float32)


@torch.library.custom_op("hf_flash::attention_bwd", mutates_args=())
def attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, dlse, causal, softmax_scale)


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, causal, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
