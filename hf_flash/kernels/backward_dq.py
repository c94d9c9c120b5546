"""The backward's dQ kernel, one program per query block; it also computes delta for the dK/dV kernel.

The backward takes two launches. First dQ (one program per query block), which also computes and stores
delta = rowsum(dO * O) - dLSE for its rows; then dK/dV (one program per key block, looping over the
query heads of its KV group, so no atomics), which reads delta. Each recomputes P (and the dropout
mask). With ATOMIC_DQ (by default when dropout is on), the dQ kernel only stores delta and zeroes an
fp32 dQ buffer, and the dK/dV kernel adds each key block's dS K into it with atomics, as FlashAttention-2
does (P and the dropout mask are computed once; the sum's order, hence its rounding, varies).

Query rows past seqlen_q load as q = 0, dO = 0, LSE = +inf, so their probabilities are exactly 0
and need no mask. Key rows past seqlen_k only touch dK/dV rows that are never stored, but in dQ
they must be masked like in the forward. With dropout, dS = P * (dropped(dP) / (1 - p) - delta).
"""

import triton
import triton.language as tl

from .common import LOG2E, _block_start, _cast, _load_rows, _mm, _n_tiles, _seq_bounds, _sparse_tile, _tile
from .choices import autotune
from .tuning import _BWD_DQ_CONFIGS, _TUNE_KEY
from .dropout import _dropout_keep, _dropout_seed
from .masking import _alibi, _alibi_slope2, _keep, _key_blocks, _rule_trim


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                  slope2, seed, rng_rows, SEQ_K, dropout_p, idx_ptr, tile_ptr, TILES, RULE,
                  MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                  SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                  LAYOUT_BK: tl.constexpr):
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, tl.min(rows, 0), tl.max(rows, 0), diag, True, LAYOUT_BK, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BK, BLOCK_N), BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        s = qk * qk_scale
        if HAS_ALIBI:
            s += _alibi(rows[:, None], cols[None, :], diag, slope2)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            keep = _keep(rows[:, None], cols[None, :], seq_k, diag, win_left, win_right, kpm_base,
                         tile_ptr + start_n // LAYOUT_BK, TILES, RULE, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                         HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(_mm(do, INTERPRET), _mm(tl.trans(v), INTERPRET), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rng_rows, start_n, dropout_p, rows.shape[0], BLOCK_N), dp, 0.0) \
                * inv_keep
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_mm(_cast(ds, k.dtype, INTERPRET), INTERPRET), _mm(k, INTERPRET), dq, input_precision=PRECISION)
    return dq


@autotune(_BWD_DQ_CONFIGS, _TUNE_KEY + ["DELTA_ONLY"])
@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DLSE, Delta, DQ, CU_Q, CU_K, KPM, K_RANGE, ALIBI, SEED,
                 LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
                 stride_qb, stride_qm, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_ob, stride_om, stride_oh, stride_od,
                 stride_dob, stride_dom, stride_doh, stride_dod,
                 stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                 stride_lb, stride_lh, stride_kpm, stride_ab, stride_ah,
                 NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, win_left, win_right, dropout_p,
                 SEQ_Q_BUCKET, SEQ_K_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                 LAYOUT_BK: tl.constexpr, HAS_DLSE: tl.constexpr, DELTA_ONLY: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(_n_tiles(SEQ_Q, BLOCK_M, SPARSE, LAYOUT_BQ), MAJOR, HAS_RIGHT, SPARSE)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    start_m = _sparse_tile(start_m, ORDER, off_b * ly_sb + off_h * ly_sh, SEQ_Q, LAYOUT_BQ, BLOCK_M, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    first_row = start_m * BLOCK_M
    if first_row >= seq_q:
        return
    k_base = K + off_b * stride_kb + k_start * stride_kn + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vn + (off_h // GROUP) * stride_vh

    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_b * stride_qb + (q_start + rows[:, None]) * stride_qm + off_h * stride_qh
                   + offs_d[None, :] * stride_qd, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + (q_start + rows[:, None]) * stride_dom + off_h * stride_doh
                    + offs_d[None, :] * stride_dod, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    o = _load_rows(O + off_b * stride_ob + (q_start + rows[:, None]) * stride_om + off_h * stride_oh
                   + offs_d[None, :] * stride_od, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    lse_ptrs = off_b * stride_lb + off_h * stride_lh + q_start + rows
    lse2 = tl.load(LSE + lse_ptrs, mask=rows < seq_q, other=float("inf")) * LOG2E
    # delta = rowsum(dO * O) - dLSE (d lse_i / d s_ij = p_ij folds into it), stored for the dK/dV kernel,
    # which runs after this one: computed here rather than in a kernel of its own, to save a launch.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_ptrs, mask=rows < seq_q, other=0.0)
    tl.store(Delta + lse_ptrs, delta, mask=rows < seq_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DELTA_ONLY:  # ATOMIC_DQ: only delta, and zeros in the fp32 buffer the dK/dV kernel adds dQ into
        tl.store(DQ + off_b * stride_dqb + (q_start + rows[:, None]) * stride_dqm + off_h * stride_dqh
                 + offs_d[None, :] * stride_dqd, dq, mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
        return

    diag = seq_k - seq_q
    kpm_base = KPM + off_b * stride_kpm
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = off_bh.to(tl.int64) * SEQ_Q + rows
    if SPARSE:  # as in the forward: the partial, then the full key blocks of this query block's layout row
        n_kv_blocks = tl.cdiv(SEQ_K, LAYOUT_BK)
        ly_row = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_Q, LAYOUT_BQ) + first_row // LAYOUT_BQ
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           0, tl.load(LY_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag, qk_scale,
                           win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                           LY_IDX + ly_row * n_kv_blocks, TILE_IDX + ly_row * n_kv_blocks, TILES, RULE,
                           True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           0, tl.load(LY_FULL_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag, qk_scale,
                           win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                           LY_FULL_IDX + ly_row * n_kv_blocks, TILE_IDX, TILES, RULE,
                           HAS_KPM, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, True, False, False, LAYOUT_BQ, LAYOUT_BK)
    else:
        lo, full_lo, full_hi, hi = _key_blocks(first_row, seq_q, seq_k, diag, win_left, win_right, K_RANGE, off_b,
                                               HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N)
        if HAS_LEFT:
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               lo, full_lo, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                               slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                               True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                               HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           full_lo, full_hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                           slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                           False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           full_hi, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
                           slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                           True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + (q_start + rows[:, None]) * stride_dqm + off_h * stride_dqh
             + offs_d[None, :] * stride_dqd, _cast(dq, DQ.dtype.element_ty, INTERPRET),
             mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
