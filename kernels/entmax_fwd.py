"""The sparsemax / alpha-entmax forward kernel (`kernels/entmax.py` has the launchers and the
algorithm's overview) and the per-element functions of the weights that the backward shares.

The kernel holds a block of query rows and streams the key tiles through it in passes, each a
`@triton.jit` helper as the Triton tutorial's `_attn_fwd_inner` is: the row max, Newton passes
for the threshold (with their safeguarded step), for alpha = 1.5 the exact finish, and the
output. Every pass recomputes `q . k`; no score is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import HEURISTICS
from .program import (
    alibi_slope,
    allowed_keys,
    key_end,
    key_start,
    load_tile,
    mask_tile,
    modify_logits,
    program_prologue,
    row_keys,
    row_scales,
    sequence_offset,
    store_tile,
    tile_live,
)

ENTMAX_HEURISTICS = {
    **HEURISTICS,
    # one alpha per head, read from memory: a changing (learned) alpha never recompiles
    "HAS_HEAD_ALPHA": lambda args: args["alphas"] is not None,
    # the cheap special cases of a float alpha: no pow per element
    "ALPHA_IS_2": lambda args: args["alphas"] is None and args["alpha"] == 2.0,
    "ALPHA_IS_1_5": lambda args: args["alphas"] is None and args["alpha"] == 1.5,
}


@triton.jit
def head_alpha(alpha, alphas, softcap, slope, i_h, HAS_HEAD_ALPHA: tl.constexpr):
    """`(alpha, softcap, slope)` of head `i_h`: the launch's float alpha and the cap and ALiBi
    slope it scaled to entmax units, or with per-head alphas (`alphas`, (Hq,) fp32) the head's
    own, and the cap and slope, which the launcher left in natural units, scaled by it."""
    if HAS_HEAD_ALPHA:
        alpha = tl.load(alphas + i_h)
        softcap = softcap * (alpha - 1.0)
        slope = slope * (alpha - 1.0)
    return alpha, softcap, slope


@triton.jit
def tile_logits(b_q, p_k, x_scale, offs_m, offs_n, mask_d, Nk, causal_offset, window_offset,
                IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, head_slope, alibi_offset, softcap,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, alpha_1, mask, stride_mm, stride_mn,
                mask_floor, Nq, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """`[BM, BN]` logits in entmax units of the key tile at `p_k` (keys `offs_n`), capped and
    biased (`modify_logits`), the mask's bias added (`mask`: the program's base), masked keys at
    -inf."""
    b_k = load_tile(p_k, offs_n < Nk, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
    # [BM, BN] = [BM, BD] @ [BD, BN]
    x = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * x_scale[:, None]
    if HAS_SOFTCAP or HAS_ALIBI:
        x = modify_logits(x, offs_n[None, :] - offs_m[:, None] - alibi_offset, head_slope, softcap,
                          HAS_SOFTCAP, HAS_ALIBI)
    if HAS_MASK:  # alpha - 1 converts the natural-unit bias, as the launchers scale the modifiers
        in_mask, bias = mask_tile(mask, offs_m[:, None], offs_n[None, :], Nq, Nk, stride_mm, stride_mn,
                                  mask_floor, MASK_IS_BOOL)
        x = tl.where(in_mask, x + bias * alpha_1, float("-inf"))
    if IS_CAUSAL or HAS_WINDOW or not EVEN_N:
        allowed = allowed_keys(offs_m, offs_n, Nk, causal_offset, window_offset, IS_CAUSAL, EVEN_N,
                               HAS_WINDOW)
        x = tl.where(allowed, x, float("-inf"))
    return x


@triton.jit
def nonneg_pow(d, e):
    """`d ** e` for `d >= 0`, 0 where `d == 0` (any sign of e)."""
    return tl.where(d > 0, tl.exp2(tl.log2(tl.where(d > 0, d, 1.0)) * e), 0.0)


@triton.jit
def slopes(d, p, ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr):
    """`u = d ** (p - 1)` of `d = [x - max - tau]_+`, `p = 1 / (alpha - 1)`: the weights are
    `u * d`, and `u` is both Newton's slope term and the backward's `p ** (2 - alpha)` (the
    indicator for sparsemax, d for alpha = 1.5; one pow per element otherwise)."""
    if ALPHA_IS_2:
        u = (d > 0).to(tl.float32)
    elif ALPHA_IS_1_5:
        u = d
    else:
        u = nonneg_pow(d, p - 1.0)
    return u


# ----------------------------------------------------------------------------------------------
# The forward's passes. Each streams the key tiles [0, n_end) of one query block: `k` is the
# sequence's base pointer and `offs_k` the loop-invariant int32 tile offsets; `flags` is the
# block's row of tile flags.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_max_pass(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk, causal_offset,
                  window_offset, n_start, n_end,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
                  EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, head_slope,
                  alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, alpha_1, mask,
                  stride_mm, stride_mn, mask_floor, Nq, HAS_MASK: tl.constexpr,
                  MASK_IS_BOOL: tl.constexpr, block_map, stride_bm, stride_bn, row0, MAP_BLOCK: tl.constexpr,
                  HAS_BLOCK_MAP: tl.constexpr):
    """The row max, and which rows hold a NaN logit (tl.maximum would pass over it); [BM] each.
    Where tiles may be skipped (a block map, a boolean mask: `tile_live`), the skipped ones are
    never loaded, and every tile's flag is set to whether it is live, for the Newton passes."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(n_start, n_end, BLOCK_N):
        cols = start_n + offs_n
        live = tile_live(block_map, mask, row0, start_n, offs_m[:, None], cols[None, :], Nq, Nk, stride_bm,
                         stride_bn, stride_mm, stride_mn, MAP_BLOCK, HAS_BLOCK_MAP, HAS_MASK, MASK_IS_BOOL)
        if live:
            x = tile_logits(b_q, k + offs_k, x_scale, offs_m, cols, mask_d, Nk, causal_offset, window_offset,
                            IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope, alibi_offset,
                            softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm, stride_mn, mask_floor,
                            Nq,
                            HAS_MASK, MASK_IS_BOOL)
            m_i = tl.maximum(m_i, tl.max(x, 1))
            has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), 1))
        if HAS_BLOCK_MAP or (HAS_MASK and MASK_IS_BOOL):
            tl.store(flags + start_n // BLOCK_N, live.to(tl.int8))
        k += BLOCK_N * stride_kn
    return m_i, has_nan


@triton.jit
def _newton_pass(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk, causal_offset,
                 window_offset, n_start, n_end, m_i, t, t_left, p, first, block_has_nan,
                 TOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, HAS_WINDOW: tl.constexpr, head_slope,
                 alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, alpha_1, mask,
                 stride_mm, stride_mn, mask_floor, Nq, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                 HAS_BLOCK_MAP: tl.constexpr):
    """`mass = sum_j d^p` and `slope = sum_j d^(p-1)` of `d = [x - m - t]_+`, [BM] each, over the
    flagged tiles (every tile on the `first` pass, but those the row max pass found dead); each
    visited tile's flag is rewritten: clear when all its weights are zero at `t_left`."""
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        visit = tl.load(flags + start_n // BLOCK_N) != 0
        if not (HAS_BLOCK_MAP or (HAS_MASK and MASK_IS_BOOL)):  # else the row max pass set the flags
            visit = visit | first
        if visit:
            x = tile_logits(b_q, k + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                            window_offset, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope,
                            alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
                            stride_mn,
                            mask_floor, Nq, HAS_MASK, MASK_IS_BOOL)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # masked keys: -inf -> 0
            u = slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5)  # sparsemax: Michelot's support refinement
            mass += tl.sum(u * d, 1)
            slope += tl.sum(u, 1)
            # cleared against t_left - TOL: a margin for rounding in the last Newton step
            live = (tl.max(tl.max(x, 1) - m_i - (t_left - TOL), 0) > 0) | block_has_nan
            tl.store(flags + start_n // BLOCK_N, live.to(tl.int8))
        k += BLOCK_N * stride_kn
    return mass, slope


@triton.jit
def _newton_step(t, lo, hi, mass, slope, active, p, TOL: tl.constexpr, BLOCK_M: tl.constexpr,
                 ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, BISECT_ONLY: tl.constexpr):
    """The safeguarded step from `t` (see the kernel): `(t_next, lo, hi, t_left, step_max)`, the
    bracket narrowed, `t_left` a point left of the root at which to clear tile flags, and the
    largest move of a row."""
    if ALPHA_IS_2:
        root = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    elif ALPHA_IS_1_5:
        root = tl.sqrt(mass)
    else:
        root = nonneg_pow(mass, 1.0 - 1.0 / p)
    delta = tl.where(slope > 0, (mass - root) / tl.where(slope > 0, slope, 1.0), 0.0)
    left = mass >= 1.0
    lo = tl.where(active & left, t, lo)
    hi = tl.where(active & ~left, tl.minimum(hi, t), hi)
    t_newton = t + delta
    newton = (t_newton >= lo - TOL) & (t_newton <= hi + TOL)
    if BISECT_ONLY:  # the tests' way into the safeguard, which real inputs never take
        newton = newton & False
    t_next = tl.where(newton, tl.minimum(tl.maximum(t_newton, lo), hi), 0.5 * (lo + hi))
    t_next = tl.where(active, t_next, t)
    delta = tl.where(active, t_next - t, 0.0)
    t_left = tl.where(newton & left, t_next, lo)
    step_max = tl.max(tl.abs(delta), 0)  # a NaN row never holds the loop
    return t_next, lo, hi, t_left, step_max


@triton.jit
def _alpha_1_5_finish(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk, causal_offset,
                      window_offset, n_start, n_end, m_i, t,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, head_slope, alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, x_sink, HAS_SINK: tl.constexpr, alpha_1, mask, stride_mm,
                      stride_mn, mask_floor, Nq, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """alpha = 1.5: on the support S found by the Newton passes (a sink's logit `x_sink` among
    its terms), sum_S (x_j - m - tau)^2 = 1 is a quadratic; returns its root, the exact tau."""
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    size = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINK:
        d_sink = tl.maximum((x_sink - m_i) - t, 0.0)
        s1, s2, size = s1 + d_sink, s2 + d_sink * d_sink, size + (d_sink > 0).to(tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            x = tile_logits(b_q, k + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                            window_offset, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope,
                            alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
                            stride_mn,
                            mask_floor, Nq, HAS_MASK, MASK_IS_BOOL)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)
            s1 += tl.sum(d, 1)
            s2 += tl.sum(d * d, 1)
            size += tl.sum((d > 0).to(tl.float32), 1)
        k += BLOCK_N * stride_kn
    size_safe = tl.where(size > 0, size, 1.0)
    root = (s1 - tl.sqrt(tl.maximum(s1 * s1 - size * (s2 - 1.0), 0.0))) / size_safe
    return t + tl.where(size > 0, root, 0.0)


@triton.jit
def _output_pass(b_q, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m, offs_n, mask_d,
                 mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t, p, block_has_nan,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, head_slope, alibi_offset, softcap, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, alpha_1, mask, stride_mm, stride_mn, mask_floor, Nq,
                 HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """`acc = sum_j d_j^p v_j` [BM, BDV] and `l = sum_j d_j^p` [BM] over the tiles still flagged,
    clearing the flag of each that holds no weight at the final tau: the flags left for the
    backward mark exactly the tiles with a non-zero weight."""
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            x = tile_logits(b_q, k + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                            window_offset, IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope,
                            alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
                            stride_mn,
                            mask_floor, Nq, HAS_MASK, MASK_IS_BOOL)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # empty rows: t = +inf -> 0
            live = (tl.max(tl.max(d, 1), 0) > 0) | block_has_nan
            if live:
                w = slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5) * d
                b_v = load_tile(v + offs_v, start_n + offs_n < Nk, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
                l_i += tl.sum(w, 1)
                # [BM, BDV] += [BM, BN] @ [BN, BDV]
                acc += tl.dot(w.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
            else:
                tl.store(flags + start_n // BLOCK_N, tl.zeros([], dtype=tl.int8))
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn
    return acc, l_i


@triton.heuristics(ENTMAX_HEURISTICS)
@triton.jit
def entmax_attention_fwd_kernel(
    q, k, v, o, row_max, tau, tile_flags, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi, sink, alphas,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, window_offset, alibi_offset, softcap, n_qblocks,
    n_kblocks,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MAX_STEPS: tl.constexpr, TOL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr, CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, BISECT_ONLY: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr,
    HAS_KEY_COUNTS: tl.constexpr, HAS_HEAD_ALPHA: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, row, done = \
        program_prologue(i_m, i_bh, cu_seqlens_q, cu_seqlens_k, seqused_k, Hq, GROUP, Nq, Nk, causal_offset,
                         window_offset, alibi_offset, BLOCK_M, False, IS_VARLEN, HAS_KEY_LENGTHS,
                         CAUSAL_FROM_END, HAS_WINDOW, HAS_ALIBI)
    if done:
        return
    q += sequence_offset(i_b, i_h, bos_q, stride_qb, stride_qh, stride_qm)
    k += sequence_offset(i_b, i_hkv, bos_k, stride_kb, stride_kh, stride_kn)
    v += sequence_offset(i_b, i_hkv, bos_k, stride_vb, stride_vh, stride_vn)
    o += sequence_offset(i_b, i_h, bos_q, stride_ob, stride_oh, stride_om)

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < Nq, offs_d < D, offs_dv < Dv
    offs_m64 = offs_m.to(tl.int64)
    # Tile offsets stay int32 and loop-invariant; a scalar base pointer advances per tile.
    offs_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    p_q = q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = load_tile(p_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
    f_scale, _ = row_scales(s, i_h, offs_m, Nk, scale, causal_offset, window_offset, BLOCK_M,
                            HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row, Nq, HAS_KEY_COUNTS)
    alpha, softcap, head_slope = head_alpha(alpha, alphas, softcap,
                                            alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI), i_h, HAS_HEAD_ALPHA)
    alpha_1 = alpha - 1.0
    x_scale = f_scale * alpha_1  # [BM], logits in entmax units
    if HAS_MASK:
        mask += sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
    if HAS_BLOCK_MAP:
        block_map += sequence_offset(i_b, i_h, 0, stride_bb, stride_bh, 0)
    p = 1.0 / (alpha - 1.0)  # the weights are d ** p
    # every pass streams the key tiles [n_start, n_end): the causal rule's and the window's
    n_start = key_start(i_m, Nk, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    n_end = key_end(i_m, Nq, Nk, causal_offset, BLOCK_M)
    if HAS_WINDOW:
        k += n_start.to(tl.int64) * stride_kn
        v += n_start.to(tl.int64) * stride_vn
    flags = tile_flags + (i_bh.to(tl.int64) * n_qblocks + i_m) * n_kblocks  # this block's row of flags

    m_i, has_nan = _row_max_pass(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk,
                                 causal_offset, window_offset, n_start, n_end, BLOCK_M, BLOCK_N, IS_CAUSAL,
                                 EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope, alibi_offset, softcap,
                                 HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm, stride_mn, mask_floor, Nq,
                                 HAS_MASK, MASK_IS_BOOL,
                                 block_map, stride_bm, stride_bn, i_m * BLOCK_M, MAP_BLOCK, HAS_BLOCK_MAP)
    if HAS_BLOCK_MAP or (HAS_MASK and MASK_IS_BOOL):
        tl.debug_barrier()  # the flags it set are read by other threads of the program
    # A sink is one more logit of every row, with no value: it joins the max, each pass's sums
    # and the output's normalizer, and leaves the tiles and their flags alone.
    x_sink = 0.0
    if HAS_SINK:
        x_sink = tl.load(sink + i_h) * (alpha - 1.0)
        m_i = tl.maximum(m_i, x_sink)
    # A row with a NaN logit gives NaN, as the definition does, and so does one whose max is +inf
    # or, with keys to see, -inf: x - max is NaN at the max (inf - inf), which the clamp
    # [.]_+ (a NaN-dropping maximum) would turn into weight 0, so that the row passed for empty.
    # Such a row takes no part in the search, its output, m and tau are stored as NaN, and its
    # block keeps every tile flagged, so that the backward turns its gradients to NaN too.
    n_seen = row_keys(key_counts, row, offs_m, Nq, Nk, causal_offset, window_offset, HAS_WINDOW,
                      HAS_KEY_COUNTS)
    inf_max = (m_i == float("inf")) | ((m_i == float("-inf")) & (n_seen > 0))
    nan_row = mask_m & ((has_nan > 0) | inf_max)
    block_has_nan = tl.max(nan_row.to(tl.int32), 0) > 0

    # Newton passes on G(t) = ||[x - m - t]_+||_p = 1 from t = -1: t += (mass - mass^(1-1/p)) / slope,
    # mass = sum d^p, slope = sum d^(p-1). G is convex and decreasing, so from the left every
    # step stays left of the root and d only shrinks. Safeguard (rtsafe's): the root stays
    # bracketed in [lo, hi], from [-1, -n^(1-alpha)] (the largest term is at most 1, the n terms
    # sum to 1), lo rising to each iterate with mass >= 1, hi falling to each with mass < 1; a
    # step that leaves the bracket by more than rounding is replaced by bisection. In exact
    # arithmetic none does, so it costs no pass. Rows past Nq (padding) and rows without keys
    # start at t = +inf and stay there: all their d are 0, so they flag no tile.
    n_keys = tl.maximum(n_seen + HAS_SINK, 1).to(tl.float32)  # the terms of the sum, the sink's too
    active = mask_m & (m_i > float("-inf")) & ~nan_row
    m_i = tl.where(m_i > float("-inf"), m_i, 0.0)  # a row with no key: saved as 0 (and tau +inf)
    t = tl.where(active, -1.0, float("inf"))
    lo, hi = t, tl.where(active, -tl.exp2(tl.log2(n_keys) * (1.0 - alpha)), float("inf"))
    # A key tile whose weights are all zero at a point left of the root stays so at the root
    # (and at every later iterate left of it): its flag is cleared, and later passes skip it
    # without loading K. That point is t itself after a Newton step from the left (`t_left`),
    # lo after a bisection. The first pass visits every tile.
    t_left = t
    step_max = tl.full([], TOL + 1.0, dtype=tl.float32)  # tensors: loop-carried values keep one type
    n_steps = tl.full([], 0, dtype=tl.int32)
    while (step_max > TOL) & (n_steps < MAX_STEPS):
        mass, slope = _newton_pass(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk,
                                   causal_offset, window_offset, n_start, n_end, m_i, t, t_left, p,
                                   n_steps == 0, block_has_nan, TOL, BLOCK_M, BLOCK_N, IS_CAUSAL, EVEN_N,
                                   EVEN_D, DOT_PRECISION, ALPHA_IS_2, ALPHA_IS_1_5, HAS_WINDOW, head_slope,
                                   alibi_offset, softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm,
                                   stride_mn, mask_floor, Nq, HAS_MASK, MASK_IS_BOOL,
                                   HAS_BLOCK_MAP)
        if HAS_SINK:
            d_sink = tl.maximum((x_sink - m_i) - t, 0.0)
            u_sink = slopes(d_sink, p, ALPHA_IS_2, ALPHA_IS_1_5)
            mass, slope = mass + u_sink * d_sink, slope + u_sink
        tl.debug_barrier()  # this pass's flags are read by other threads of the program in the next
        t, lo, hi, t_left, step_max = _newton_step(t, lo, hi, mass, slope, active, p, TOL, BLOCK_M,
                                                   ALPHA_IS_2, ALPHA_IS_1_5, BISECT_ONLY)
        n_steps += 1

    if ALPHA_IS_1_5:
        t = _alpha_1_5_finish(b_q, k, offs_k, stride_kn, flags, x_scale, offs_m, offs_n, mask_d, Nk,
                              causal_offset, window_offset, n_start, n_end, m_i, t, BLOCK_M, BLOCK_N,
                              IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION, HAS_WINDOW, head_slope, alibi_offset,
                              softcap, HAS_SOFTCAP, HAS_ALIBI, x_sink, HAS_SINK, alpha_1, mask, stride_mm,
                              stride_mn, mask_floor, Nq, HAS_MASK, MASK_IS_BOOL)

    acc, l_i = _output_pass(b_q, k, offs_k, stride_kn, v, offs_v, stride_vn, flags, x_scale, offs_m, offs_n,
                            mask_d, mask_dv, Nk, causal_offset, window_offset, n_start, n_end, m_i, t, p,
                            block_has_nan, BLOCK_M, BLOCK_N, BLOCK_DV, IS_CAUSAL, EVEN_N, EVEN_D,
                            DOT_PRECISION, ALPHA_IS_2, ALPHA_IS_1_5, HAS_WINDOW, head_slope, alibi_offset,
                            softcap, HAS_SOFTCAP, HAS_ALIBI, alpha_1, mask, stride_mm, stride_mn, mask_floor,
                            Nq, HAS_MASK, MASK_IS_BOOL)
    if HAS_SINK:  # its weight, in the normalizer only
        d_sink = tl.maximum((x_sink - m_i) - t, 0.0)
        l_i += slopes(d_sink, p, ALPHA_IS_2, ALPHA_IS_1_5) * d_sink
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rounding leaves l a few ulps off 1; empty rows stay 0
    p_o = o + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    b_o = tl.where(nan_row[:, None], float("nan"), acc / l_safe[:, None])
    store_tile(p_o, b_o.to(o.dtype.element_ty), mask_m, mask_dv, EVEN_M, EVEN_D)
    tl.store(row_max + row + offs_m, tl.where(nan_row, float("nan"), m_i), mask=mask_m)
    tl.store(tau + row + offs_m, tl.where(nan_row, float("nan"), t), mask=mask_m)
