"""The backward's dK/dV kernel: one program per key block, looping over the query heads of its KV group.

It runs after the dQ kernel (backward_dq.py, which says how the two share the work) and reads the delta that
kernel stored. Its tiles are (keys, queries) or, with QK_ROWS, (queries, keys) as in the forward (settings.py's
_DKDV_ROWS says which the tuner times); with ATOMIC_DQ it also adds each key block's dS K into an fp32 dQ buffer.
"""

import triton
import triton.language as tl

from .common import LOG2E, _block_start, _cast, _load_rows, _mm, _n_tiles, _pin_fp32, _seq_bounds, _sparse_tile, _tile
from .choices import autotune
from .tuning import _BWD_DKDV_CONFIGS, _TUNE_KEY
from .dropout import _dropout_keep, _dropout_keep_t, _dropout_seed
from .masking import _alibi, _alibi_slope2, _keep, _query_blocks, _rule_trim


@triton.jit
def _q_axis(x, QK_ROWS: tl.constexpr):
    """A vector over the dK/dV tile's queries, broadcast along its keys: a column of a (queries, keys) tile
    (QK_ROWS), else a row of a (keys, queries) tile."""
    if QK_ROWS:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _k_axis(x, QK_ROWS: tl.constexpr):
    """A vector over the dK/dV tile's keys, broadcast along its queries (see _q_axis)."""
    if QK_ROWS:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _trans_if(x, TRANSPOSE: tl.constexpr):
    if TRANSPOSE:
        x = tl.trans(x)
    return x


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_dqm, stride_dqd, sm_scale,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    lo, hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale, win_left, win_right, key_kept,
                    slope2, seed, rng_base, SEQ_K, dropout_p, idx_ptr, tile_ptr, tile_stride, TILES, RULE,
                    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                    SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                    LAYOUT_BK: tl.constexpr, ATOMIC_DQ: tl.constexpr, QK_ROWS: tl.constexpr):
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, start_n, start_n + cols.shape[0] - 1, diag, False, LAYOUT_BQ,
                            BLOCK_M)
    for it in range(lo, hi, BLOCK_M):
        # QK_ROWS: the tile is (queries, keys) as in the forward, so the dropout mask is _dropout_keep's, drawn where
        # each thread holds its elements, and P and dS enter dV and dK transposed (a shared-memory MMA operand).
        # Else (keys, queries): dV and dK need no transposes, and the mask is drawn transposed (_dropout_keep_t).
        start_m = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BQ, BLOCK_M), BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(lse_base + rows, mask=rows < seq_q, other=float("inf")) * LOG2E
        if QK_ROWS:
            s = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION) * qk_scale
        else:
            s = tl.dot(_mm(k, INTERPRET), _mm(tl.trans(q), INTERPRET), input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += _alibi(_q_axis(rows, QK_ROWS), _k_axis(cols, QK_ROWS), diag, slope2)
        p = tl.math.exp2(s - _q_axis(lse2, QK_ROWS))
        if MASK:
            keep = _keep(_q_axis(rows, QK_ROWS), _k_axis(cols, QK_ROWS), seq_k, diag, win_left, win_right, 0,
                         tile_ptr + start_m // LAYOUT_BQ * tile_stride, TILES, RULE, HAS_LEFT, HAS_RIGHT, False,
                         HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
            p = tl.where(keep, p, 0.0)
        if HAS_KPM or (ATOMIC_DQ and not MASK):
            # Keys past seqlen_k load as k = 0, so s = 0 and p = exp2(-lse) there, which overflows fp16 when lse is
            # very negative. Their dK/dV rows are never stored, but the atomic dQ += dS K crosses rows: inf * 0 = NaN.
            p = tl.where(_k_axis(key_kept, QK_ROWS), p, 0.0)
        do = _load_rows(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
        if QK_ROWS:
            dp = tl.dot(_mm(do, INTERPRET), _mm(tl.trans(v), INTERPRET), input_precision=PRECISION)
        else:
            dp = tl.dot(_mm(v, INTERPRET), _mm(tl.trans(do), INTERPRET), input_precision=PRECISION)
        if DROPOUT:
            # dV sums the kept P unscaled (the caller scales dV by 1 / (1 - p) once); dP's scale rides the FMA below.
            if QK_ROWS:
                kept = _dropout_keep(seed, rng_base + rows, start_n, dropout_p, BLOCK_M, cols.shape[0])
            else:
                kept = _dropout_keep_t(seed, rng_base + rows, start_n, dropout_p, BLOCK_M, cols.shape[0], INTERPRET)
            p_drop = _pin_fp32(tl.where(kept, p, 0.0), INTERPRET)
            dp = tl.where(kept, dp, 0.0) * inv_keep
        else:
            p_drop = p
        dv = tl.dot(_mm(_trans_if(_cast(p_drop, do.dtype, INTERPRET), QK_ROWS), INTERPRET), _mm(do, INTERPRET), dv,
                    input_precision=PRECISION)
        delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        ds = _cast(p * (dp - _q_axis(delta, QK_ROWS)), q.dtype, INTERPRET)
        dk = tl.dot(_mm(_trans_if(ds, QK_ROWS), INTERPRET), _mm(q, INTERPRET), dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # this key block's share of dQ for these query rows, summed in fp32 across key blocks
            dq = tl.dot(_mm(_trans_if(ds, not QK_ROWS), INTERPRET), _mm(k, INTERPRET), input_precision=PRECISION)
            dq = dq * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                          mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


# ATOMIC_DQ adds a matmul and atomics: tuned apart, and tuning runs' sums into DQ are reset before the real launch
@autotune(_BWD_DKDV_CONFIGS, _TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DQ, CU_Q, CU_K, KPM, ALIBI, SEED,
                   LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_dob, stride_dom, stride_doh, stride_dod,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                   stride_lb, stride_lh, stride_kpm, stride_ab, stride_ah,
                   NHEADS, GROUP, SEQ_Q, SEQ_K, sm_scale, qk_scale, win_left, win_right, dropout_p,
                   SEQ_Q_BUCKET, SEQ_K_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                   SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                   LAYOUT_BK: tl.constexpr, ATOMIC_DQ: tl.constexpr, QK_ROWS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block_n, off_bhk = _tile(_n_tiles(SEQ_K, BLOCK_N, SPARSE, LAYOUT_BK), MAJOR, False, SPARSE)
    nheads_kv = NHEADS // GROUP
    off_b = (off_bhk // nheads_kv).to(tl.int64)
    off_hk = (off_bhk % nheads_kv).to(tl.int64)
    # the order of the group's first head (any permutation of the key blocks is correct)
    block_n = _sparse_tile(block_n, ORDER, off_b * ly_sb + off_hk * GROUP * ly_sh, SEQ_K, LAYOUT_BK, BLOCK_N, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    start_n = block_n * BLOCK_N
    if start_n >= seq_k:
        return

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh
                   + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh
                   + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    key_kept = cols < seq_k
    if HAS_KPM:
        key_kept = tl.load(KPM + off_b * stride_kpm + cols, mask=cols < seq_k, other=0) != 0
    seed = _dropout_seed(SEED, DROPOUT)

    diag = seq_k - seq_q
    lo, full_lo, full_hi, hi = _query_blocks(start_n, seq_q, diag, win_left, win_right,
                                             HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * NHEADS + off_h
        q_base = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
        do_base = DO + off_b * stride_dob + q_start * stride_dom + off_h * stride_doh
        lse_base = LSE + off_b * stride_lb + off_h * stride_lh + q_start
        delta_base = Delta + off_b * stride_lb + off_h * stride_lh + q_start
        dq_base = DQ + off_b * stride_dqb + q_start * stride_dqm + off_h * stride_dqh
        slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
        rng_base = off_bh * SEQ_Q
        if SPARSE:
            # This key block's column of the layout (transposed lists): partial query blocks, then full.
            n_q_blocks = tl.cdiv(SEQ_Q, LAYOUT_BQ)
            ly_col = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_K, LAYOUT_BK) + start_n // LAYOUT_BK
            tile_col = TILE_IDX + (off_b * ly_sb + off_h * ly_sh) * n_q_blocks * tl.cdiv(SEQ_K, LAYOUT_BK) \
                + start_n // LAYOUT_BK
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     0, tl.load(LY_NUM + ly_col) * LAYOUT_BQ, offs_m, start_n, cols, offs_d, seq_q,
                                     seq_k, diag, qk_scale, win_left, win_right, key_kept, slope2, seed, rng_base,
                                     SEQ_K, dropout_p, LY_IDX + ly_col * n_q_blocks, tile_col,
                                     tl.cdiv(SEQ_K, LAYOUT_BK), TILES, RULE,
                                     True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK, ATOMIC_DQ, QK_ROWS)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     0, tl.load(LY_FULL_NUM + ly_col) * LAYOUT_BQ, offs_m, start_n, cols, offs_d,
                                     seq_q, seq_k, diag, qk_scale, win_left, win_right, key_kept, slope2, seed,
                                     rng_base, SEQ_K, dropout_p, LY_FULL_IDX + ly_col * n_q_blocks, tile_col, 0, TILES, RULE,
                                     False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     True, False, False, LAYOUT_BQ, LAYOUT_BK, ATOMIC_DQ, QK_ROWS)
        else:
            if HAS_RIGHT:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                         dq_base, stride_dqm, stride_dqd, sm_scale,
                                         stride_qm, stride_qd, stride_dom, stride_dod,
                                         lo, full_lo, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                         win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                         LY_IDX, TILE_IDX, 0, TILES, RULE,
                                         True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                         False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     dq_base, stride_dqm, stride_dqd, sm_scale,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     full_lo, full_hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                     win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                     LY_IDX, TILE_IDX, 0, TILES, RULE,
                                     False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                     False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)
            if HAS_LEFT:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                         dq_base, stride_dqm, stride_dqd, sm_scale,
                                         stride_qm, stride_qd, stride_dom, stride_dod,
                                         full_hi, hi, offs_m, start_n, cols, offs_d, seq_q, seq_k, diag, qk_scale,
                                         win_left, win_right, key_kept, slope2, seed, rng_base, SEQ_K, dropout_p,
                                         LY_IDX, TILE_IDX, 0, TILES, RULE,
                                         True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, INTERPRET,
                                         False, False, False, 1, 1, ATOMIC_DQ, QK_ROWS)

    mask = (cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    dk *= sm_scale
    if DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    tl.store(DK + off_b * stride_dkb + k_start * stride_dkn + off_hk * stride_dkh
             + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, _cast(dk, DK.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(DV + off_b * stride_dvb + k_start * stride_dvn + off_hk * stride_dvh
             + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, _cast(dv, DV.dtype.element_ty, INTERPRET), mask=mask)
