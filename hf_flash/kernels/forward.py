"""The forward kernel: one program per query block, an online softmax over its key blocks in fp32.

It tiles K/V through on-chip memory and writes only the output and the log-sum-exp (LSE, natural log, fp32),
from which the backward recomputes the probabilities. Causal and windowed work is split into unmasked blocks and
masked edge blocks (_key_blocks); block-sparse programs walk their layout row, partial blocks then full ones.
A row that sees no key outputs 0 and has LSE = +inf, so that exp(s - lse) = 0 in the backward.
"""

import triton
import triton.language as tl

from .common import _block_start, _cast, _load_rows, _mm, _n_tiles, _pin_fp32, _seq_bounds, _sparse_tile, _tile
from .choices import autotune
from .tuning import _FWD_CONFIGS, _TUNE_KEY
from .dropout import _drop_pairs, _dropout_keep, _dropout_seed, _keep_threshold, _pair_words
from .masking import _alibi, _alibi_slope2, _keep, _key_blocks, _rule_trim


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               lo, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right, kpm_base,
               slope2, seed, rng_rows, SEQ_K, dropout_p, idx_ptr, tile_ptr, TILES, RULE,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
               SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
               LAYOUT_BK: tl.constexpr):
    if HAS_RULE:
        lo, hi = _rule_trim(lo, hi, idx_ptr, RULE, tl.min(rows, 0), tl.max(rows, 0), diag, True, LAYOUT_BK, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(_block_start(it, idx_ptr, SPARSE, LAYOUT_BK, BLOCK_N), BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(_mm(q, INTERPRET), _mm(tl.trans(k), INTERPRET), input_precision=PRECISION)
        if MASK or HAS_ALIBI:
            qk = qk * qk_scale
            if HAS_ALIBI:
                qk += _alibi(rows[:, None], cols[None, :], diag, slope2)
            if MASK:
                keep = _keep(rows[:, None], cols[None, :], seq_k, diag, win_left, win_right, kpm_base,
                             tile_ptr + start_n // LAYOUT_BK, TILES, RULE, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                             HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
                qk = tl.where(keep, qk, float("-inf"))
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
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASK)
        if DROPOUT and not INTERPRET and BLOCK_N >= 64 and v.dtype.primitive_bitwidth == 16:
            p = _drop_pairs(p.to(v.dtype), _pair_words(seed, rng_rows, start_n, rows.shape[0], BLOCK_N),
                            _keep_threshold(dropout_p))
        else:
            if DROPOUT:
                p = _pin_fp32(tl.where(_dropout_keep(seed, rng_rows, start_n, dropout_p, rows.shape[0], BLOCK_N),
                                       p, 0.0), INTERPRET)
            p = _cast(p, v.dtype, INTERPRET)
        acc = tl.dot(_mm(p, INTERPRET), _mm(v, INTERPRET), acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(_FWD_CONFIGS, _TUNE_KEY)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, KPM, K_RANGE, QPM, ALIBI, SEED,
              LY_NUM, LY_IDX, LY_FULL_NUM, LY_FULL_IDX, TILE_IDX, TILES, RULE, ORDER, MAJOR, ly_sb, ly_sh,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh, stride_od,
              stride_lb, stride_lh, stride_kpm, stride_qpm, stride_ab, stride_ah,
              NHEADS, GROUP, SEQ_Q, SEQ_K, qk_scale, win_left, win_right, dropout_p,
              SEQ_Q_BUCKET, SEQ_K_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
              HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
              SPARSE: tl.constexpr, HAS_TILES: tl.constexpr, HAS_RULE: tl.constexpr, LAYOUT_BQ: tl.constexpr,
              LAYOUT_BK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = _tile(_n_tiles(SEQ_Q, BLOCK_M, SPARSE, LAYOUT_BQ), MAJOR, HAS_RIGHT, SPARSE)
    off_b = (off_bh // NHEADS).to(tl.int64)
    off_h = (off_bh % NHEADS).to(tl.int64)
    start_m = _sparse_tile(start_m, ORDER, off_b * ly_sb + off_h * ly_sh, SEQ_Q, LAYOUT_BQ, BLOCK_M, SPARSE)
    q_start, seq_q = _seq_bounds(CU_Q, off_b, SEQ_Q, IS_VARLEN)
    k_start, seq_k = _seq_bounds(CU_K, off_b, SEQ_K, IS_VARLEN)
    first_row = start_m * BLOCK_M
    if first_row >= seq_q:  # a packed sequence shorter than max_seqlen_q
        return
    q_base = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
    k_base = K + off_b * stride_kb + k_start * stride_kn + (off_h // GROUP) * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vn + (off_h // GROUP) * stride_vh
    o_base = O + off_b * stride_ob + q_start * stride_om + off_h * stride_oh

    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)

    diag = seq_k - seq_q
    kpm_base = KPM + off_b * stride_kpm
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = off_bh.to(tl.int64) * SEQ_Q + rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:
        # This query block's row of the layout: its partial key blocks (element-masked), then its
        # full ones (masked only for key padding). BLOCK_M divides LAYOUT_BQ, so the row is unique.
        n_kv_blocks = tl.cdiv(SEQ_K, LAYOUT_BK)
        ly_row = (off_b * ly_sb + off_h * ly_sh) * tl.cdiv(SEQ_Q, LAYOUT_BQ) + first_row // LAYOUT_BQ
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   0, tl.load(LY_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag,
                                   qk_scale, win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                                   LY_IDX + ly_row * n_kv_blocks, TILE_IDX + ly_row * n_kv_blocks, TILES, RULE,
                                   True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET,
                                   True, HAS_TILES, HAS_RULE, LAYOUT_BQ, LAYOUT_BK)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   0, tl.load(LY_FULL_NUM + ly_row) * LAYOUT_BK, rows, offs_n, offs_d, seq_k, diag,
                                   qk_scale, win_left, win_right, kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p,
                                   LY_FULL_IDX + ly_row * n_kv_blocks, TILE_IDX, TILES, RULE,
                                   HAS_KPM, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET,
                                   True, False, False, LAYOUT_BQ, LAYOUT_BK)
    else:
        lo, full_lo, full_hi, hi = _key_blocks(first_row, seq_q, seq_k, diag, win_left, win_right, K_RANGE, off_b,
                                               HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N)
        if HAS_LEFT:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                       lo, full_lo, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                       kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                       True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                       HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   full_lo, full_hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                   kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                   False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   full_hi, hi, rows, offs_n, offs_d, seq_k, diag, qk_scale, win_left, win_right,
                                   kpm_base, slope2, seed, rng_rows, SEQ_K, dropout_p, LY_IDX, TILE_IDX, TILES, RULE,
                                   True, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, INTERPRET, False, False, False, 1, 1)

    empty = l_i == 0.0  # the row sees no key
    if HAS_QPM:  # a padding query: output 0, lse +inf, so the backward gives it zero gradient
        empty = empty | (tl.load(QPM + off_b * stride_qpm + rows, mask=rows < seq_q, other=0) == 0)
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)
    acc = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])  # the one division, at the end
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + q_start + rows, lse, mask=rows < seq_q)
    o_ptrs = o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, INTERPRET), mask=(rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
