"""The sparsemax / alpha-entmax backward kernels (`kernels/entmax.py` has the launchers and the
Jacobian): a dQ program per query block, made of a delta pass and a dQ pass, and a dK/dV
program per key block. Both recompute the weights from the forward's saved `m`, `tau` over the
tiles its flags mark.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .entmax_fwd import ENTMAX_HEURISTICS, head_alpha, slopes, tile_logits
from .program import (
    add_mask_grad,
    alibi_slope,
    allowed_keys,
    head_row,
    key_end,
    key_start,
    load_tile,
    mask_tile,
    modify_logits,
    program_prologue,
    query_range,
    row_scales,
    sequence_offset,
    softcap_slope,
    store_tile,
)


@triton.jit
def _load_row_stats(row_max, tau, offs_m, mask_m):
    """The saved `m`, `tau` of rows `offs_m`, [BM] each; rows past the end get tau = +inf, so
    every weight of theirs is 0 (as for rows with no key)."""
    m = tl.load(row_max + offs_m, mask=mask_m, other=0.0)
    t = tl.load(tau + offs_m, mask=mask_m, other=float("inf"))
    return m, t


@triton.heuristics(ENTMAX_HEURISTICS)
@triton.jit
def entmax_attention_bwd_kernel_dkdv(
    q, k, v, do, row_max, tau, tile_flags, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi,
    alphas, stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, window_offset, alibi_offset, softcap,
    n_qblocks, n_kblocks,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FLAG_BLOCK_M: tl.constexpr, FLAG_BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr, CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr,
    HAS_KEY_COUNTS: tl.constexpr, HAS_HEAD_ALPHA: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group in this
    program: deterministic, no atomics. Works on transposed tiles, [BN, BM]. A (query, key) tile
    is skipped when the forward's flags of the tiles that cover it (FLAG_BLOCK_M rows, FLAG_BLOCK_N
    keys) are all clear."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    stride_rows_h = Nq  # a head's rows in the row stats: (B, Hq, Nq), or (Hq, total_q) in varlen mode
    i_b, i_h0, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, _row, done = \
        program_prologue(i_n, i_bh, cu_seqlens_q, cu_seqlens_k, seqused_k, Hkv, GROUP, Nq, Nk, causal_offset,
                         window_offset, alibi_offset, BLOCK_N, True, IS_VARLEN, HAS_KEY_LENGTHS,
                         CAUSAL_FROM_END, HAS_WINDOW, HAS_ALIBI)
    if done:
        return
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_dv = offs_n < Nk, offs_d < D, offs_dv < Dv
    offs_n64 = offs_n.to(tl.int64)
    offs_q = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    offs_do = offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod

    p_k = k + sequence_offset(i_b, i_hkv, bos_k, stride_kb, stride_kh, stride_kn) \
        + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    p_v = v + sequence_offset(i_b, i_hkv, bos_k, stride_vb, stride_vh, stride_vn) \
        + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    b_k = load_tile(p_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
    b_v = load_tile(p_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    start_m, end_m = query_range(i_n, Nq, Nk, causal_offset, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for i_g in range(GROUP):
        i_h = i_h0 + i_g  # a tensor, like the program ids, so .to(tl.int64) applies
        q_h = q + sequence_offset(i_b, i_h, bos_q, stride_qb, stride_qh, stride_qm) \
            + start_m.to(tl.int64) * stride_qm
        do_h = do + sequence_offset(i_b, i_h, bos_q, stride_dob, stride_doh, stride_dom) \
            + start_m.to(tl.int64) * stride_dom
        row_h = head_row(i_b, i_h, Hq, stride_rows_h, bos_q, IS_VARLEN)  # row offset into the row stats
        alpha_h, softcap_h, slope_h = head_alpha(alpha, alphas, softcap,
                                                 alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI), i_h,
                                                 HAS_HEAD_ALPHA)
        p = 1.0 / (alpha_h - 1.0)
        flags_h = tile_flags + (i_b * Hq + i_h).to(tl.int64) * n_qblocks * n_kblocks
        mask_h = mask
        if HAS_MASK:
            mask_h = mask + sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
        for m0 in range(start_m, end_m, BLOCK_M):
            flag_row = flags_h + (m0 // FLAG_BLOCK_M) * n_kblocks
            tile0 = i_n * (BLOCK_N // FLAG_BLOCK_N)
            alive = tl.load(flag_row + tile0) != 0
            for i_t in tl.static_range(1, BLOCK_N // FLAG_BLOCK_N):
                alive = alive | (tl.load(flag_row + tile0 + i_t, mask=tile0 + i_t < n_kblocks, other=0) != 0)
            if alive:
                rows = m0 + offs_m
                mask_m = rows < Nq
                b_q = load_tile(q_h + offs_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
                m_i, t_i = _load_row_stats(row_max + row_h, tau + row_h, rows, mask_m)
                f_scale, _ = row_scales(s, i_h, rows, Nk, scale, causal_offset, window_offset, BLOCK_M,
                                        HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row_h, Nq, HAS_KEY_COUNTS)
                # [BN, BM] = [BN, BD] @ [BD, BM]; rows past Nq have tau = +inf, so d = 0
                x_t = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) \
                    * (f_scale * (alpha_h - 1.0))[None, :]
                if HAS_SOFTCAP or HAS_ALIBI:
                    x_raw = x_t
                    x_t = modify_logits(x_t, offs_n[:, None] - rows[None, :] - alibi_offset, slope_h,
                                        softcap_h, HAS_SOFTCAP, HAS_ALIBI)
                if HAS_MASK:
                    in_mask, bias_t = mask_tile(mask_h, rows[None, :], offs_n[:, None], Nq, Nk, stride_mm,
                                                stride_mn, mask_floor, MASK_IS_BOOL)
                    x_t = x_t + bias_t * (alpha_h - 1.0)
                d_t = tl.maximum((x_t - m_i[None, :]) - t_i[None, :], 0.0)
                if HAS_MASK:
                    d_t = tl.where(in_mask, d_t, 0.0)
                if IS_CAUSAL:  # keys past Nk need no mask: their rows of dK, dV are never stored
                    d_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, d_t, 0.0)
                if HAS_WINDOW:
                    d_t = tl.where(offs_n[:, None] >= rows[None, :] + window_offset, d_t, 0.0)
                # Rows the forward found NaN in carry a NaN dO (the launcher's doing), which the
                # products below spread to dK and dV; their d is 0, so they are tested apart.
                # The flags cover more rows than this tile, hence the test.
                nan_rows = tl.max((m_i != m_i).to(tl.int32), 0) > 0
                if (tl.max(tl.max(d_t, 1), 0) > 0) | nan_rows:
                    u_t = slopes(d_t, p, ALPHA_IS_2, ALPHA_IS_1_5)
                    b_do = load_tile(do_h + offs_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
                    b_delta = tl.load(delta + row_h + rows, mask=mask_m, other=0.0)
                    # [BN, BDV] += [BN, BM] @ [BM, BDV]
                    b_dv += tl.dot((u_t * d_t).to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
                    # [BN, BM] = [BN, BDV] @ [BDV, BM]
                    dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
                    # dz_ij = u_ij (dP_ij - delta_i); dk_j = sum_i dz_ij scale f_i q_i
                    ds_t = u_t * (dp_t - b_delta[None, :]) * f_scale[None, :]
                    if HAS_SOFTCAP:  # through the cap, to the uncapped logits
                        ds_t = ds_t * softcap_slope(x_raw, softcap_h)
                    b_dk += tl.dot(ds_t.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)  # [BN, BD]
            q_h += BLOCK_M * stride_qm
            do_h += BLOCK_M * stride_dom

    p_dk = dk + sequence_offset(i_b, i_hkv, bos_k, stride_dkb, stride_dkh, stride_dkn) \
        + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    p_dv = dv + sequence_offset(i_b, i_hkv, bos_k, stride_dvb, stride_dvh, stride_dvn) \
        + offs_n64[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    store_tile(p_dk, b_dk.to(dk.dtype.element_ty), mask_n, mask_d, EVEN_N, EVEN_D)
    store_tile(p_dv, b_dv.to(dv.dtype.element_ty), mask_n, mask_dv, EVEN_N, EVEN_D)


# ----------------------------------------------------------------------------------------------
# The dQ program's passes, over the flagged key tiles [0, n_end) of one query block: `k`, `v`
# are the sequence's base pointers, `offs_k`, `offs_v` the loop-invariant int32 tile offsets.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _delta_pass(b_q, b_do, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m, offs_n, mask_d,
                mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t_i, p, u_sink,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, HAS_WINDOW: tl.constexpr, head_slope,
                alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, alpha_1, mask,
                stride_mm, stride_mn, mask_floor, Nq, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """delta_i = dO_i . (sum_j u_ij v_j) / sum_j u_ij, [BM]. sum_j u_ij v_j is not the output, so
    it takes a key loop of its own. `u_sink` [BM] (zeros without one) joins the denominator only:
    the sink has no value."""
    uv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    u_sum = u_sink
    for start_n in range(n_start, n_end, BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            x = tile_logits(b_q, k + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                            window_offset, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope,
                            alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
                            stride_mn,
                            mask_floor, Nq, HAS_MASK, MASK_IS_BOOL)
            d = tl.maximum((x - m_i[:, None]) - t_i[:, None], 0.0)
            u = slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5)
            b_v = load_tile(v + offs_v, start_n + offs_n < Nk, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            u_sum += tl.sum(u, 1)
            u_hi = u.to(b_v.dtype)
            uv += tl.dot(u_hi, b_v, input_precision=DOT_PRECISION)  # [BM, BDV]
            if b_v.dtype != tl.float32 and not ALPHA_IS_2:
                # 16-bit inputs: u's rounding error goes into the dot as well. delta is a small
                # difference (dz sums to 0 over a row), and ds sums dz q.k over every row, so a
                # rounded u gave 5-30x the reference's error in ds (fp16, alpha 1.25 / 1.5).
                uv += tl.dot((u - u_hi.to(tl.float32)).to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn
    return tl.where(u_sum > 0, tl.sum(b_do.to(tl.float32) * uv, 1) / tl.where(u_sum > 0, u_sum, 1.0), 0.0)


@triton.jit
def _dq_pass(b_q, b_do, b_delta, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m, offs_n,
             mask_d, mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t_i, p,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
             EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             HAS_LENGTH_SCALE: tl.constexpr, ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr,
             HAS_WINDOW: tl.constexpr, head_slope, alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr,
             HAS_ALIBI: tl.constexpr, alpha_1, mask, stride_mm, stride_mn, mask_floor, Nq,
             HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, dmask, stride_gm, stride_gn,
             MASK_GRAD: tl.constexpr, MASK_GRAD_SUM_ROWS: tl.constexpr, MASK_GRAD_SUM_KEYS: tl.constexpr,
             ALPHA_GRAD: tl.constexpr):
    """`sum_j dz_ij k_j` [BM, BD], dz_ij = u_ij (dP_ij - delta_i), and with length scaling
    `sum_j dz_ij q_i.k_j` [BM] (zeros otherwise). With MASK_GRAD, dz_ij before the cap's factor
    is added into the float mask's gradient `dmask` (the program's base). With ALPHA_GRAD, the
    row sums alpha's gradient takes (`reference.entmax_alpha_grad`), [BM] each: `sum_j dP_ij
    p_ij`, `sum_j dP_ij p_ij ln p_ij` and `sum_j p_ij ln p_ij` (zeros otherwise)."""
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_ds = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dz_ij q_i.k_j
    dp_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    dp_p_log_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_log_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            mask_n = start_n + offs_n < Nk
            b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
            qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BM, BN]
            x = qk * x_scale[:, None]
            if HAS_SOFTCAP or HAS_ALIBI:
                x = modify_logits(x, (start_n + offs_n)[None, :] - offs_m[:, None] - alibi_offset, head_slope,
                                  softcap, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_MASK:
                in_mask, bias = mask_tile(mask, offs_m[:, None], (start_n + offs_n)[None, :], Nq, Nk,
                                          stride_mm,
                                          stride_mn, mask_floor, MASK_IS_BOOL)
                x = x + bias * alpha_1
            d = tl.maximum((x - m_i[:, None]) - t_i[:, None], 0.0)
            if HAS_MASK:
                d = tl.where(in_mask, d, 0.0)
            if IS_CAUSAL or HAS_WINDOW or not EVEN_N:
                allowed = allowed_keys(offs_m, start_n + offs_n, Nk, causal_offset, window_offset, IS_CAUSAL,
                                       EVEN_N, HAS_WINDOW)
                d = tl.where(allowed, d, 0.0)
            u = slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5)
            b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN]
            if ALPHA_GRAD:  # p = u d, ln p = p_exp ln d on the support
                w = u * d
                w_log_w = tl.where(d > 0, w * (tl.log(tl.where(d > 0, d, 1.0)) * p), 0.0)
                dp_p += tl.sum(dp * w, 1)
                dp_p_log_p += tl.sum(dp * w_log_w, 1)
                p_log_p += tl.sum(w_log_w, 1)
            if MASK_GRAD:  # the bias is added after the cap: its gradient is dz before the cap's factor
                add_mask_grad(dmask, u * (dp - b_delta[:, None]), offs_m, start_n + offs_n, offs_m < Nq,
                              mask_n,
                              stride_gm, stride_gn, MASK_GRAD_SUM_ROWS, MASK_GRAD_SUM_KEYS)
            if HAS_SOFTCAP:  # through the cap, to the uncapped logits, recomputed from qk and folded in
                # before the dP dot: keeping them as a tile spilled on sm_80 (bf16, D = 128)
                u = u * softcap_slope(qk * x_scale[:, None], softcap)
            dz = u * (dp - b_delta[:, None])
            b_dq += tl.dot(dz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [BM, BD]
            if HAS_LENGTH_SCALE:
                # Summed directly, not recovered from dQ: that would divide by f_i, 0 when n_i = 1.
                b_ds += tl.sum(dz * qk, 1)
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn
    return b_dq, b_ds, dp_p, dp_p_log_p, p_log_p


@triton.heuristics(ENTMAX_HEURISTICS)
@triton.jit
def entmax_attention_bwd_kernel_dq(
    q, k, v, do, row_max, tau, tile_flags, delta, dq, ds_row, dsink_row, dalpha_row, s, cu_seqlens_q,
    cu_seqlens_k, seqused_k, alibi, sink, alphas,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, window_offset, alibi_offset, softcap, n_qblocks,
    n_kblocks,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    dmask, stride_gb, stride_gh, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr, CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr,
    HAS_KEY_COUNTS: tl.constexpr,
    MASK_GRAD: tl.constexpr, MASK_GRAD_SUM_ROWS: tl.constexpr, MASK_GRAD_SUM_KEYS: tl.constexpr,
    FLAG_BLOCK_M: tl.constexpr, HAS_HEAD_ALPHA: tl.constexpr, ALPHA_GRAD: tl.constexpr,
):
    """One query block: first delta_i = dO_i . (sum_j u_ij v_j) / sum_j u_ij (stored, for the
    dK/dV kernel launched after this one), then dQ, and with length scaling each row's share of
    ds_h, `scale ln(n_i) sum_j dz_ij q_i.k_j`, summed over rows on the host (deterministic).
    With ALPHA_GRAD, each row's share of its head's alpha gradient too (`dalpha_row`), summed
    on the host likewise. Both passes visit the flagged tiles only: the forward's blocks."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, row, done = \
        program_prologue(i_m, i_bh, cu_seqlens_q, cu_seqlens_k, seqused_k, Hq, GROUP, Nq, Nk, causal_offset,
                         window_offset, alibi_offset, BLOCK_M, False, IS_VARLEN, HAS_KEY_LENGTHS,
                         CAUSAL_FROM_END, HAS_WINDOW, HAS_ALIBI)
    if done:
        return
    q += sequence_offset(i_b, i_h, bos_q, stride_qb, stride_qh, stride_qm)
    do += sequence_offset(i_b, i_h, bos_q, stride_dob, stride_doh, stride_dom)
    dq += sequence_offset(i_b, i_h, bos_q, stride_dqb, stride_dqh, stride_dqm)
    k += sequence_offset(i_b, i_hkv, bos_k, stride_kb, stride_kh, stride_kn)
    v += sequence_offset(i_b, i_hkv, bos_k, stride_vb, stride_vh, stride_vn)

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < Nq, offs_d < D, offs_dv < Dv
    offs_m64 = offs_m.to(tl.int64)
    offs_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    p_q = q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    p_do = do + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_q = load_tile(p_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
    b_do = load_tile(p_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
    m_i, t_i = _load_row_stats(row_max + row, tau + row, offs_m, mask_m)
    f_scale, ln_scale = row_scales(s, i_h, offs_m, Nk, scale, causal_offset, window_offset, BLOCK_M,
                                   HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row, Nq, HAS_KEY_COUNTS)
    alpha, softcap, head_slope = head_alpha(alpha, alphas, softcap,
                                            alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI), i_h, HAS_HEAD_ALPHA)
    alpha_1 = alpha - 1.0
    x_scale = f_scale * alpha_1
    if HAS_MASK:
        mask += sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
    if MASK_GRAD:
        dmask += sequence_offset(i_b, i_h, 0, stride_gb, stride_gh, 0)
    p = 1.0 / (alpha - 1.0)
    n_start = key_start(i_m, Nk, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    n_end = key_end(i_m, Nq, Nk, causal_offset, BLOCK_M)
    if HAS_WINDOW:
        k += n_start.to(tl.int64) * stride_kn
        v += n_start.to(tl.int64) * stride_vn
    # the forward's blocks, FLAG_BLOCK_M rows each: this program's rows lie in one of them
    flags = tile_flags + (i_bh.to(tl.int64) * n_qblocks + i_m * BLOCK_M // FLAG_BLOCK_M) * n_kblocks

    # A sink's slope term u joins delta's denominator; its own gradient is u (0 - delta_i), the
    # sink having no value (dP = 0), summed over rows on the host.
    u_sink = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_sink = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINK:
        d_sink = tl.maximum((tl.load(sink + i_h) * (alpha - 1.0) - m_i) - t_i, 0.0)
        u_sink = slopes(d_sink, p, ALPHA_IS_2, ALPHA_IS_1_5)
    b_delta = _delta_pass(b_q, b_do, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m,
                          offs_n, mask_d, mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t_i,
                          p, u_sink, BLOCK_M, BLOCK_N, BLOCK_DV, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION,
                          ALPHA_IS_2, ALPHA_IS_1_5, HAS_WINDOW, head_slope, alibi_offset, softcap,
                          HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm, stride_mn, mask_floor, Nq,
                          HAS_MASK, MASK_IS_BOOL)
    tl.store(delta + row + offs_m, b_delta, mask=mask_m)
    if HAS_SINK:
        tl.store(dsink_row + row + offs_m, -u_sink * b_delta, mask=mask_m)
    b_dq, b_ds, dp_p, dp_p_log_p, p_log_p = _dq_pass(
        b_q, b_do, b_delta, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m, offs_n,
        mask_d, mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t_i, p, BLOCK_M, BLOCK_N,
        BLOCK_D, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_LENGTH_SCALE, ALPHA_IS_2, ALPHA_IS_1_5,
        HAS_WINDOW, head_slope, alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
        stride_mn, mask_floor, Nq, HAS_MASK, MASK_IS_BOOL, dmask, stride_gm, stride_gn, MASK_GRAD,
        MASK_GRAD_SUM_ROWS, MASK_GRAD_SUM_KEYS, ALPHA_GRAD)
    if ALPHA_GRAD:
        # (sum dP p - delta) / (alpha - 1)^2 - (sum dP p ln p - delta H) / (alpha - 1), H = sum p ln p
        # over every term, the sink's (whose dP is 0) too: `reference.entmax_alpha_grad`
        w_sink = u_sink * d_sink
        p_log_p += tl.where(d_sink > 0, w_sink * (tl.log(tl.where(d_sink > 0, d_sink, 1.0)) * p), 0.0)
        d_alpha = (dp_p - b_delta) / (alpha_1 * alpha_1) - (dp_p_log_p - b_delta * p_log_p) / alpha_1
        tl.store(dalpha_row + row + offs_m, d_alpha, mask=mask_m)

    p_dq = dq + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    store_tile(p_dq, (b_dq * f_scale[:, None]).to(dq.dtype.element_ty), mask_m, mask_d, EVEN_M, EVEN_D)
    if HAS_LENGTH_SCALE:
        tl.store(ds_row + row + offs_m, b_ds * ln_scale, mask=mask_m)
