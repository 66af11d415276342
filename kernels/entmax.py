"""Tiled sparsemax / alpha-entmax attention (Peters et al. 2019; sparsemax: Martins & Astudillo
2016), forward and backward, with causal offsets, grouped-query heads, packed variable-length
documents and fused length scaling (SSMax's `s_h ln(n_i)`, Nakanishi 2025).

Layers, as in fla and `kernels/softmax.py`: the `@triton.jit` kernels; the host launchers
`entmax_attention_fwd` and `entmax_attention_bwd`, wrapped as the custom ops
`longattn::entmax_attention_fwd` / `_bwd` (with fake implementations, so that
`torch.compile(fullgraph=True)` treats them as opaque calls); `EntmaxAttentionFunction`, which
wires them into autograd; and the entries `entmax_attention` and `entmax_varlen_attention`.
Semantics are `attention/reference.py` with normalizer "entmax" (alpha = 2 is sparsemax), the
algorithm that of `attention/chunked.py` (`entmax_threshold`), tile by tile::

    n_i = Nk if not causal else clamp(i + causal_offset + 1, 0, Nk)   # keys j <= i + causal_offset
    z_ij = scale * (s_h * ln(n_i) if length_scale is not None else 1) * q_i . k_j
    x_ij = (alpha - 1) * z_ij,  m_i = max_j x_ij                      # "entmax units"
    tau_i: sum_j [x_ij - m_i - tau_i]_+ ** (1 / (alpha - 1)) = 1
    p_ij = [x_ij - m_i - tau_i]_+ ** (1 / (alpha - 1)),  out_i = p_i @ v
    (a row with n_i = 0 gives 0 and saves m_i = 0, tau_i = +inf; one with a NaN logit gives
    NaN, and NaN gradients where they depend on it)

Forward: one program holds a block of query rows and streams the key tiles through it several
times, recomputing `q . k` on each pass and never storing scores: one pass for the row max,
Newton passes for tau (below), for alpha = 1.5 one pass for the exact finish, and one for the
output. `m` and `tau` are saved per row, and an int8 flag per (query block, key tile): the
Newton iterates only rise, so a tile whose weights are all zero at one iterate stays so; its
flag is cleared and every later pass, the backward's included, skips it without loading K.

Backward (the entmax Jacobian, Peters et al. 2019): with `u_ij = p_ij ** (2 - alpha)` on the
support (`d ** (1 / (alpha - 1) - 1)`, `d` the clamped base: the indicator for sparsemax, `d`
itself for alpha = 1.5) and `dP = dO V^T`,

    delta_i = sum_j u_ij dP_ij / sum_j u_ij = dO_i . (sum_j u_ij v_j) / sum_j u_ij
    dz_ij = u_ij (dP_ij - delta_i),  dV = P^T dO,  dQ = dZ K * c,  dK = dZ^T Q * c

as FlashAttention-2's backward with `p (dp - delta)` replaced: a dQ program per query block that
first loops over the keys for delta (`sum_j u_ij v_j` is not the output) and stores it, then a
dK/dV program per key block; both recompute `d` from the saved `m`, `tau`, over the flagged
tiles only.

Varlen mode (`IS_VARLEN`, set when the launchers get `cu_seqlens_q` / `cu_seqlens_k`): as in
`kernels/softmax.py`, each program reads its document's offsets and lengths from cu_seqlens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import device_capability, dot_precision, load_tile, padded_dim, store_tile, tile_config
from .softmax import (
    _allowed, _causal_args, _check_inputs, _doc_span, _key_end, _length_scale_vector, _row_scales,
    _shapes, _strides,
)

# Newton's method on G(t) = ||[x - max - t]_+||_p = 1 from t = -1 rises monotonically to the root
# (`attention/chunked.py`), so a program stops once no row of its block moves by more than
# NEWTON_TOL; the cap only guards against pathological rounding. Passes until the fp32 threshold
# stops changing, the last one confirming, measured on 32 rows of N(0, 1) logits at N = 512 and
# 2048: 5 (alpha 1.25), 6 (1.5), 6 (2); with peaked rows (q scaled 30x) 1 to 3; nearly flat rows
# (q scaled 1e-3) 2 to 5; on the GPU benchmark's structured inputs (N = 2048) 5 for all three
# (`test_newton_converges_in_few_passes` pins 6 at N = 256).
MAX_NEWTON_STEPS = 30
NEWTON_TOL = 1e-6

_HEURISTICS = {
    "IS_VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "EVEN_M": lambda args: args["cu_seqlens_q"] is None and args["Nq"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["cu_seqlens_q"] is None and args["Nk"] % args["BLOCK_N"] == 0,
    "EVEN_D": lambda args: args["D"] == args["BLOCK_D"] and args["Dv"] == args["BLOCK_DV"],
    "HAS_LENGTH_SCALE": lambda args: args["s"] is not None,
    # the cheap special cases: no pow per element
    "ALPHA_IS_2": lambda args: args["alpha"] == 2.0,
    "ALPHA_IS_1_5": lambda args: args["alpha"] == 1.5,
}


@triton.jit
def _tile_logits(b_q, p_k, x_scale, offs_m, offs_n, mask_d, Nk, causal_offset,
                 IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """`[BM, BN]` logits in entmax units of the key tile at `p_k` (keys `offs_n`), masked keys
    at -inf."""
    b_k = load_tile(p_k, offs_n < Nk, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
    # [BM, BN] = [BM, BD] @ [BD, BN]
    x = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * x_scale[:, None]
    if IS_CAUSAL or not EVEN_N:
        x = tl.where(_allowed(offs_m, offs_n, Nk, causal_offset, IS_CAUSAL, EVEN_N), x, float("-inf"))
    return x


@triton.jit
def _pow(d, e):
    """`d ** e` for `d >= 0`, 0 where `d == 0` (any sign of e)."""
    return tl.where(d > 0, tl.exp2(tl.log2(tl.where(d > 0, d, 1.0)) * e), 0.0)


@triton.jit
def _slopes(d, p, ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr):
    """`u = d ** (p - 1)` of `d = [x - max - tau]_+`, `p = 1 / (alpha - 1)`: the weights are
    `u * d`, and `u` is both Newton's slope term and the backward's `p ** (2 - alpha)` (the
    indicator for sparsemax, d for alpha = 1.5; one pow per element otherwise)."""
    if ALPHA_IS_2:
        u = (d > 0).to(tl.float32)
    elif ALPHA_IS_1_5:
        u = d
    else:
        u = _pow(d, p - 1.0)
    return u


@triton.jit
def _load_row_stats(row_max, tau, offs_m, mask_m):
    """The saved `m`, `tau` of rows `offs_m`, [BM] each; rows past the end get tau = +inf, so
    every weight of theirs is 0 (as for rows with no key)."""
    m = tl.load(row_max + offs_m, mask=mask_m, other=0.0)
    t = tl.load(tau + offs_m, mask=mask_m, other=float("inf"))
    return m, t


@triton.heuristics(_HEURISTICS)
@triton.jit
def entmax_attention_fwd_kernel(
    q, k, v, o, row_max, tau, tile_flags, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, n_qblocks, n_kblocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MAX_STEPS: tl.constexpr, TOL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
    BISECT_ONLY: tl.constexpr = False,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq  # varlen: i_b is the document (the batch strides are 0)
    i_hkv = i_h // GROUP  # GQA: the group's K/V are read in place, never repeated
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh
    o += i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    if IS_VARLEN:  # row_max, tau are (Hq, total_q): Nq is the packed length until it is the doc's
        bos_q, bos_k, len_q, len_k = _doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        row = i_h.to(tl.int64) * Nq + bos_q
        Nq, Nk = len_q, len_k
        if i_m * BLOCK_M >= Nq:
            return
        q += bos_q * stride_qm
        o += bos_q * stride_om
        k += bos_k * stride_kn
        v += bos_k * stride_vn
    else:
        row = i_bh.to(tl.int64) * Nq

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
    f_scale, _ = _row_scales(s, i_h, offs_m, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
    x_scale = f_scale * (alpha - 1.0)  # [BM], logits in entmax units
    p = 1.0 / (alpha - 1.0)  # the weights are d ** p
    key_end = _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M)
    flags = tile_flags + (i_bh.to(tl.int64) * n_qblocks + i_m) * n_kblocks  # this block's row of flags

    # Pass 1: the row max, and which rows hold a NaN logit (tl.maximum would pass over it).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    k_n = k
    for start_n in range(0, key_end, BLOCK_N):
        x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                         IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
        m_i = tl.maximum(m_i, tl.max(x, 1))
        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), 1))
        k_n += BLOCK_N * stride_kn
    # A row with a NaN logit gives NaN, as the definition does: it takes no part in the search,
    # its output, m and tau are stored as NaN, and its block keeps every tile flagged, so that
    # the backward turns its gradients to NaN too.
    nan_row = mask_m & (has_nan > 0)
    block_has_nan = tl.max(nan_row.to(tl.int32), 0) > 0

    # Newton passes on G(t) = ||[x - m - t]_+||_p = 1 from t = -1: t += (mass - mass^(1-1/p)) / slope,
    # mass = sum d^p, slope = sum d^(p-1). G is convex and decreasing, so from the left every
    # step stays left of the root and d only shrinks. Safeguard (rtsafe's): the root stays
    # bracketed in [lo, hi], from [-1, -n^(1-alpha)] (the largest term is at most 1, the n terms
    # sum to 1), lo rising to each iterate with mass >= 1, hi falling to each with mass < 1; a
    # step that leaves the bracket by more than rounding is replaced by bisection. In exact
    # arithmetic none does, so it costs no pass. Rows past Nq (padding) and rows without keys
    # start at t = +inf and stay there: all their d are 0, so they flag no tile.
    n_keys = tl.maximum(tl.minimum(offs_m + causal_offset + 1, Nk), 1).to(tl.float32)
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
        mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_n = k
        for start_n in range(0, key_end, BLOCK_N):
            if (n_steps == 0) | (tl.load(flags + start_n // BLOCK_N) != 0):
                x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                                 IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
                d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # masked keys: -inf -> 0
                u = _slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5)  # sparsemax: Michelot's support refinement
                mass += tl.sum(u * d, 1)
                slope += tl.sum(u, 1)
                # cleared against t_left - TOL: a margin for rounding in the last Newton step
                live = (tl.max(tl.max(x, 1) - m_i - (t_left - TOL), 0) > 0) | block_has_nan
                tl.store(flags + start_n // BLOCK_N, live.to(tl.int8))
            k_n += BLOCK_N * stride_kn
        tl.debug_barrier()  # this pass's flags are read by other threads of the program in the next
        if ALPHA_IS_2:
            root = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        elif ALPHA_IS_1_5:
            root = tl.sqrt(mass)
        else:
            root = _pow(mass, 1.0 - 1.0 / p)
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
        t = t_next
        step_max = tl.max(tl.abs(delta), 0)  # a NaN row never holds the loop
        n_steps += 1

    if ALPHA_IS_1_5:  # on the support S found above, sum_S (x_j - m - tau)^2 = 1 is a quadratic
        s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        size = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_n = k
        for start_n in range(0, key_end, BLOCK_N):
            if tl.load(flags + start_n // BLOCK_N) != 0:
                x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                                 IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
                d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)
                s1 += tl.sum(d, 1)
                s2 += tl.sum(d * d, 1)
                size += tl.sum((d > 0).to(tl.float32), 1)
            k_n += BLOCK_N * stride_kn
        size_safe = tl.where(size > 0, size, 1.0)
        t += tl.where(size > 0, (s1 - tl.sqrt(tl.maximum(s1 * s1 - size * (s2 - 1.0), 0.0))) / size_safe, 0.0)

    # Output pass: acc = sum_j d_j^p v_j, l = sum_j d_j^p, over the tiles still flagged. The flags
    # left for the backward mark exactly the tiles with a non-zero weight at the final tau.
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_n, v_n = k, v
    for start_n in range(0, key_end, BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                             IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # empty rows: t = +inf -> 0
            live = (tl.max(tl.max(d, 1), 0) > 0) | block_has_nan
            if live:
                w = _slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5) * d
                b_v = load_tile(v_n + offs_v, start_n + offs_n < Nk, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
                l_i += tl.sum(w, 1)
                # [BM, BDV] += [BM, BN] @ [BN, BDV]
                acc += tl.dot(w.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
            else:
                tl.store(flags + start_n // BLOCK_N, tl.zeros([], dtype=tl.int8))
        k_n += BLOCK_N * stride_kn
        v_n += BLOCK_N * stride_vn

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rounding leaves l a few ulps off 1; empty rows stay 0
    p_o = o + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    b_o = tl.where(nan_row[:, None], float("nan"), acc / l_safe[:, None])
    store_tile(p_o, b_o.to(o.dtype.element_ty), mask_m, mask_dv, EVEN_M, EVEN_D)
    tl.store(row_max + row + offs_m, tl.where(nan_row, float("nan"), m_i), mask=mask_m)
    tl.store(tau + row + offs_m, tl.where(nan_row, float("nan"), t), mask=mask_m)


@triton.heuristics(_HEURISTICS)
@triton.jit
def entmax_attention_bwd_kernel_dkdv(
    q, k, v, do, row_max, tau, tile_flags, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, n_qblocks, n_kblocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FLAG_BLOCK_M: tl.constexpr, FLAG_BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group in this
    program: deterministic, no atomics. Works on transposed tiles, [BN, BM]. A (query, key) tile
    is skipped when the forward's flags of the tiles that cover it (FLAG_BLOCK_M rows, FLAG_BLOCK_N
    keys) are all clear."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bh // Hkv, i_bh % Hkv
    if IS_VARLEN:  # row stats are (Hq, total_q): row i of head h is h * total_q + bos_q + i
        bos_q, bos_k, len_q, len_k = _doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        stride_row_h = Nq
        Nq, Nk = len_q, len_k
        if i_n * BLOCK_N >= Nk:
            return
        q += bos_q * stride_qm
        do += bos_q * stride_dom
        k += bos_k * stride_kn
        v += bos_k * stride_vn
        dk += bos_k * stride_dkn
        dv += bos_k * stride_dvn
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_dv = offs_n < Nk, offs_d < D, offs_dv < Dv
    offs_n64 = offs_n.to(tl.int64)
    offs_q = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    offs_do = offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    p = 1.0 / (alpha - 1.0)

    p_k = k + i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh \
        + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    p_v = v + i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh \
        + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    b_k = load_tile(p_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
    b_v = load_tile(p_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # The first query row that sees key j0 = i_n * BLOCK_N is j0 - causal_offset.
    start_m = tl.maximum(i_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for i_g in range(GROUP):
        i_h = i_hkv * GROUP + i_g  # a tensor, like the program ids, so .to(tl.int64) applies
        q_h = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh \
            + start_m.to(tl.int64) * stride_qm
        do_h = do + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh \
            + start_m.to(tl.int64) * stride_dom
        if IS_VARLEN:
            row_h = i_h.to(tl.int64) * stride_row_h + bos_q
        else:
            row_h = (i_b * Hq + i_h).to(tl.int64) * Nq  # row offset into the row stats
        flags_h = tile_flags + (i_b * Hq + i_h).to(tl.int64) * n_qblocks * n_kblocks
        for m0 in range(start_m, Nq, BLOCK_M):
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
                f_scale, _ = _row_scales(s, i_h, rows, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
                # [BN, BM] = [BN, BD] @ [BD, BM]; rows past Nq have tau = +inf, so d = 0
                x_t = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * (f_scale * (alpha - 1.0))[None, :]
                d_t = tl.maximum((x_t - m_i[None, :]) - t_i[None, :], 0.0)
                if IS_CAUSAL:  # keys past Nk need no mask: their rows of dK, dV are never stored
                    d_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, d_t, 0.0)
                # Rows the forward found NaN in carry a NaN dO (the launcher's doing), which the
                # products below spread to dK and dV; their d is 0, so they are tested apart.
                # The flags cover more rows than this tile, hence the test.
                nan_rows = tl.max((m_i != m_i).to(tl.int32), 0) > 0
                if (tl.max(tl.max(d_t, 1), 0) > 0) | nan_rows:
                    u_t = _slopes(d_t, p, ALPHA_IS_2, ALPHA_IS_1_5)
                    b_do = load_tile(do_h + offs_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
                    b_delta = tl.load(delta + row_h + rows, mask=mask_m, other=0.0)
                    # [BN, BDV] += [BN, BM] @ [BM, BDV]
                    b_dv += tl.dot((u_t * d_t).to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
                    # [BN, BM] = [BN, BDV] @ [BDV, BM]
                    dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
                    # dz_ij = u_ij (dP_ij - delta_i); dk_j = sum_i dz_ij scale f_i q_i
                    ds_t = u_t * (dp_t - b_delta[None, :]) * f_scale[None, :]
                    b_dk += tl.dot(ds_t.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)  # [BN, BD]
            q_h += BLOCK_M * stride_qm
            do_h += BLOCK_M * stride_dom

    p_dk = dk + i_b.to(tl.int64) * stride_dkb + i_hkv.to(tl.int64) * stride_dkh \
        + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    p_dv = dv + i_b.to(tl.int64) * stride_dvb + i_hkv.to(tl.int64) * stride_dvh \
        + offs_n64[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    store_tile(p_dk, b_dk.to(dk.dtype.element_ty), mask_n, mask_d, EVEN_N, EVEN_D)
    store_tile(p_dv, b_dv.to(dv.dtype.element_ty), mask_n, mask_dv, EVEN_N, EVEN_D)


@triton.heuristics(_HEURISTICS)
@triton.jit
def entmax_attention_bwd_kernel_dq(
    q, k, v, do, row_max, tau, tile_flags, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset, n_qblocks, n_kblocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One query block: first delta_i = dO_i . (sum_j u_ij v_j) / sum_j u_ij (stored, for the
    dK/dV kernel launched after this one), then dQ, and with length scaling each row's share of
    ds_h, `scale ln(n_i) sum_j dz_ij q_i.k_j`, summed over rows on the host (deterministic).
    Both passes visit the flagged tiles only: the forward's blocks."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    i_hkv = i_h // GROUP
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    do += i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    dq += i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    k += i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh
    if IS_VARLEN:
        bos_q, bos_k, len_q, len_k = _doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        row = i_h.to(tl.int64) * Nq + bos_q
        Nq, Nk = len_q, len_k
        if i_m * BLOCK_M >= Nq:
            return
        q += bos_q * stride_qm
        do += bos_q * stride_dom
        dq += bos_q * stride_dqm
        k += bos_k * stride_kn
        v += bos_k * stride_vn
    else:
        row = i_bh.to(tl.int64) * Nq

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < Nq, offs_d < D, offs_dv < Dv
    offs_m64 = offs_m.to(tl.int64)
    offs_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    b_q = load_tile(q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask_m, mask_d, EVEN_M, EVEN_D)
    b_do = load_tile(do + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask_m, mask_dv,
                     EVEN_M, EVEN_D)
    m_i, t_i = _load_row_stats(row_max + row, tau + row, offs_m, mask_m)
    f_scale, ln_scale = _row_scales(s, i_h, offs_m, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
    x_scale = f_scale * (alpha - 1.0)
    p = 1.0 / (alpha - 1.0)
    flags = tile_flags + (i_bh.to(tl.int64) * n_qblocks + i_m) * n_kblocks  # the forward's blocks
    k_start, v_start = k, v

    # Pass 1: delta. sum_j u_ij v_j is not the output, so it takes a key loop of its own.
    uv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    u_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            x = _tile_logits(b_q, k + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                             IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
            d = tl.maximum((x - m_i[:, None]) - t_i[:, None], 0.0)
            u = _slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5)
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
    b_delta = tl.where(u_sum > 0, tl.sum(b_do.to(tl.float32) * uv, 1) / tl.where(u_sum > 0, u_sum, 1.0), 0.0)
    tl.store(delta + row + offs_m, b_delta, mask=mask_m)

    # Pass 2: dQ, dz_ij = u_ij (dP_ij - delta_i).
    k, v = k_start, v_start


    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_ds = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dz_ij q_i.k_j
    for start_n in range(0, _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        if tl.load(flags + start_n // BLOCK_N) != 0:
            mask_n = start_n + offs_n < Nk
            b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
            qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BM, BN]
            d = tl.maximum((qk * x_scale[:, None] - m_i[:, None]) - t_i[:, None], 0.0)
            if IS_CAUSAL or not EVEN_N:
                d = tl.where(_allowed(offs_m, start_n + offs_n, Nk, causal_offset, IS_CAUSAL, EVEN_N), d, 0.0)
            b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN]
            dz = _slopes(d, p, ALPHA_IS_2, ALPHA_IS_1_5) * (dp - b_delta[:, None])
            b_dq += tl.dot(dz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [BM, BD]
            if HAS_LENGTH_SCALE:
                # Summed directly, not recovered from dQ: that would divide by f_i, 0 when n_i = 1.
                b_ds += tl.sum(dz * qk, 1)
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn

    p_dq = dq + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    store_tile(p_dq, (b_dq * f_scale[:, None]).to(dq.dtype.element_ty), mask_m, mask_d, EVEN_M, EVEN_D)
    if HAS_LENGTH_SCALE:
        tl.store(ds_row + row + offs_m, b_ds * ln_scale, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _row_stats_like(q: torch.Tensor, Hq: int, Nq: int, B: int, varlen: bool) -> torch.Tensor:
    """An fp32 per-row buffer: (B, Hq, Nq), or (Hq, total_q) in varlen mode."""
    shape = (Hq, Nq) if varlen else (B, Hq, Nq)
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _tile_blocks(D: int, Dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """`(BLOCK_M, BLOCK_N)` of the forward's tiles, the blocks its tile flags refer to."""
    return tile_config(max(padded_dim(D), padded_dim(Dv)), dtype)[:2]


def _tile_flags_shape(q, v, cu_seqlens_q=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """`(B * Hq, query blocks, key tiles)` of the forward's int8 tile flags, 1 where a (query
    block, key tile) holds a non-zero weight: Nq Nk / 2048 bytes per (batch, head) in 16 bits
    (64 x 32 tiles), Nq Nk / 1024 in fp32. Varlen: B counts documents, the blocks span the
    longest one."""
    B, Hq, _, D, _, _, Dv, grid_nq, grid_nk = _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    BLOCK_M, BLOCK_N = _tile_blocks(D, Dv, q.dtype)
    return B * Hq, triton.cdiv(grid_nq, BLOCK_M), triton.cdiv(grid_nk, BLOCK_N)


def entmax_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alpha: float,
    causal_offset: int | None, length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, max_newton_steps: int = MAX_NEWTON_STEPS,
    bisect_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q` (B, Hq, Nq, D), `k` (B, Hkv, Nk, D), `v` (B, Hkv, Nk, Dv), any strides; `alpha` in
    (1, 2] (2: sparsemax). `causal_offset`: None (no mask) or key j allowed for row i iff
    j <= i + causal_offset. `length_scale`: None, a float or a `()` / `(Hq,)` tensor.
    `max_newton_steps` caps the Newton passes (the tests lower it to count them);
    `bisect_only` replaces every Newton step by the safeguard's bisection (for the tests).

    Returns `out` (B, Hq, Nq, Dv) in q's dtype and, for the backward, `row_max` and `tau`
    (B, Hq, Nq) in fp32, both in entmax units: the weights are
    `[x - row_max - tau]_+ ** (1 / (alpha - 1))`, normalised; a row with no key has 0 and +inf;
    and the int8 `tile_flags` (`_tile_flags_shape`) of the tiles with a non-zero weight.
    Varlen as in `softmax_attention_fwd`: packed `(total, H, D)` inputs, `out` (total_q, Hq, Dv),
    `row_max` and `tau` (Hq, total_q)."""
    if max_newton_steps < 1:
        raise ValueError(f"max_newton_steps must be at least 1; got {max_newton_steps}")
    varlen = cu_seqlens_q is not None
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, _ = _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out_shape = (Nq, Hq, Dv) if varlen else (B, Hq, Nq, Dv)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    row_max, tau = _row_stats_like(q, Hq, Nq, B, varlen), _row_stats_like(q, Hq, Nq, B, varlen)
    # zeros: tiles no program visits (past a causal block's last key) read as empty
    flags_shape = _tile_flags_shape(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    tile_flags = torch.zeros(flags_shape, dtype=torch.int8, device=q.device)
    if B * Hq * grid_nq == 0:
        return out, row_max, tau, tile_flags
    is_causal, offset = _causal_args(causal_offset, Nq, Nk)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_M, BLOCK_N, num_warps, num_stages = tile_config(max(BLOCK_D, BLOCK_DV), q.dtype)
    if q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) == 128:
        # 8 warps capped ptxas at 128 registers here and spilled 8-56 bytes on sm_80 (the tile
        # flags' branches keep more alive than softmax's loop); 4 warps take 198-208, no spill.
        num_warps = 4
    entmax_attention_fwd_kernel[(triton.cdiv(grid_nq, BLOCK_M), B * Hq)](
        q, k, v, out, row_max, tau, tile_flags, _length_scale_vector(length_scale, Hq, q.device),
        cu_seqlens_q, cu_seqlens_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        Hq, Hq // Hkv, Nq, Nk, D, Dv, float(scale), float(alpha), offset, *flags_shape[1:],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        IS_CAUSAL=is_causal, DOT_PRECISION=dot_precision(q.dtype),
        MAX_STEPS=max_newton_steps, TOL=NEWTON_TOL, BISECT_ONLY=bisect_only,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, row_max, tau, tile_flags


def entmax_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_max: torch.Tensor, tau: torch.Tensor, tile_flags: torch.Tensor, scale: float, alpha: float,
    causal_offset: int | None,
    length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of `entmax_attention_fwd` from the upstream `do`, the weights recomputed from
    the saved `row_max` and `tau`, the tiles without weight (`tile_flags` clear) skipped. Returns `dq`, `dk`, `dv` in the inputs' dtypes and `ds`, the
    gradient of the `(Hq,)` length scale in fp32 (None without length scaling). Varlen as in
    `entmax_attention_fwd`, the tensors in its packed layouts."""
    varlen = cu_seqlens_q is not None
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk = _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    is_causal, offset = _causal_args(causal_offset, Nq, Nk)
    s = _length_scale_vector(length_scale, Hq, q.device)
    do = do.to(q.dtype)  # the kernels' dots take one dtype; autograd already hands q's
    row_max, tau = row_max.float().contiguous(), tau.float().contiguous()
    # A row the forward found a NaN in (row_max saved as NaN) gets a NaN dO: the kernels' products
    # then carry it into dQ, dK and dV wherever that row reaches, as the definition's would.
    nan_or_zero = (row_max * 0).to(do.dtype)
    do = do + (nan_or_zero.T if varlen else nan_or_zero).unsqueeze(-1)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages = tile_config(
        max(BLOCK_D, BLOCK_DV), q.dtype, backward=True
    )
    # the dQ program reads the flags tile for tile: it needs the forward's blocks
    assert (BLOCK_HELD, BLOCK_STREAMED) == _tile_blocks(D, Dv, q.dtype)
    n_blocks = _tile_flags_shape(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)[1:]
    common = {"BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "IS_CAUSAL": is_causal,
              "DOT_PRECISION": dot_precision(q.dtype), "num_warps": num_warps, "num_stages": num_stages}
    scalars = (float(scale), float(alpha), offset)
    qkv_strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen))

    delta = torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ds_row = None if s is None else torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    if B * Hq * grid_nq > 0:  # first: it stores delta for dK/dV
        row_grid = (triton.cdiv(grid_nq, BLOCK_HELD), B * Hq)
        # dQ at D <= 64 in 16 bits: 4 warps spilled 8 bytes on sm_80 (uneven lengths, length
        # scaling); 8 warps take 170 registers and none
        dq_warps = 8 if q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) <= 64 else num_warps
        entmax_attention_bwd_kernel_dq[row_grid](
            q, k, v, do, row_max, tau, tile_flags, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k,
            *qkv_strides, *_strides(dq, varlen),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, *scalars, *n_blocks,
            BLOCK_M=BLOCK_HELD, BLOCK_N=BLOCK_STREAMED, **{**common, "num_warps": dq_warps},
        )

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # Before Hopper, dK/dV holds 32 keys rather than 64 at D <= 64 in 16 bits: with 64, ptxas
    # spilled 8-16 bytes on sm_80 for every alpha (u and the support test keep more alive than
    # softmax's p). sm_90 keeps 64, which its warpgroup MMA needs and which builds without spills
    # there (tests/test_kernel_builds.py checks both).
    keys_held = BLOCK_HELD
    capability = device_capability(q.device)
    if capability is not None and capability < 90 and q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) <= 64:
        keys_held = 32
    if B * Hkv * grid_nk > 0:
        entmax_attention_bwd_kernel_dkdv[(triton.cdiv(grid_nk, keys_held), B * Hkv)](
            q, k, v, do, row_max, tau, tile_flags, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k,
            *qkv_strides, *_strides(dk, varlen), *_strides(dv, varlen),
            Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, *scalars, *n_blocks,
            BLOCK_M=BLOCK_STREAMED, BLOCK_N=keys_held, FLAG_BLOCK_M=BLOCK_HELD, FLAG_BLOCK_N=BLOCK_STREAMED,
            **common,
        )
    if s is None:
        return dq, dk, dv, None
    return dq, dk, dv, ds_row.sum(dim=1) if varlen else ds_row.sum(dim=(0, 2))


# ----------------------------------------------------------------------------------------------
# torch custom ops: torch.compile traces through them without graph breaks
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::entmax_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alpha: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return entmax_attention_fwd(q, k, v, scale, alpha, causal_offset, length_scale,
                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@_fwd_op.register_fake
def _(q, k, v, scale, alpha, causal_offset, length_scale, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0):
    if cu_seqlens_q is not None:  # varlen: (total_q, Hq, Dv) and (Hq, total_q)
        Nq, Hq, _ = q.shape
        out, stats = q.new_empty(Nq, Hq, v.shape[-1]), (Hq, Nq)
    else:
        B, Hq, Nq, _ = q.shape
        out, stats = q.new_empty(B, Hq, Nq, v.shape[-1]), (B, Hq, Nq)
    flags = q.new_empty(_tile_flags_shape(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k), dtype=torch.int8)
    return out, q.new_empty(stats, dtype=torch.float32), q.new_empty(stats, dtype=torch.float32), flags


@torch.library.custom_op("longattn::entmax_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_max: torch.Tensor,
    tau: torch.Tensor, tile_flags: torch.Tensor, scale: float, alpha: float, causal_offset: int | None,
    length_scale: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, ds = entmax_attention_bwd(do, q, k, v, row_max, tau, tile_flags, scale, alpha, causal_offset,
                                          length_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # A custom op cannot return None: an empty ds stands for "no length scale".
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if ds is None else ds


@_bwd_op.register_fake
def _(do, q, k, v, row_max, tau, tile_flags, scale, alpha, causal_offset, length_scale, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    ds = q.new_empty(0 if length_scale is None else q.shape[1], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


# ----------------------------------------------------------------------------------------------
# Autograd and the entry points
# ----------------------------------------------------------------------------------------------


class EntmaxAttentionFunction(torch.autograd.Function):
    """Wires the launchers (through their custom ops) into autograd. The trailing arguments,
    `(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`, are given in varlen mode only."""

    @staticmethod
    def forward(ctx, q, k, v, scale, alpha, causal_offset, length_scale, *varlen):
        s = _length_scale_vector(length_scale, q.shape[1], q.device)
        out, row_max, tau, tile_flags = torch.ops.longattn.entmax_attention_fwd(
            q, k, v, scale, alpha, causal_offset, s, *varlen
        )
        ctx.save_for_backward(q, k, v, row_max, tau, tile_flags, s, *varlen[:2])
        ctx.scale, ctx.alpha, ctx.causal_offset, ctx.max_seqlens = scale, alpha, causal_offset, varlen[2:]
        ctx.length_scale_meta = None
        if torch.is_tensor(length_scale):
            ctx.length_scale_meta = (length_scale.shape, length_scale.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, row_max, tau, tile_flags, s, *cu_seqlens = ctx.saved_tensors
        dq, dk, dv, ds = torch.ops.longattn.entmax_attention_bwd(
            dout, q, k, v, row_max, tau, tile_flags, ctx.scale, ctx.alpha, ctx.causal_offset, s,
            *cu_seqlens, *ctx.max_seqlens,
        )
        d_length_scale = None
        if ctx.length_scale_meta is not None and ctx.needs_input_grad[6]:
            shape, dtype = ctx.length_scale_meta
            d_length_scale = ds.sum_to_size(shape).to(dtype)  # () sums over heads
        return dq, dk, dv, None, None, None, d_length_scale, *(None,) * (len(cu_seqlens) + len(ctx.max_seqlens))


def _check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2]; got {alpha}")
    return alpha


def entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    alpha: float = 1.5,
    is_causal: bool = False,
    causal_offset: int | None = None,
    length_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha-entmax attention (sparsemax at alpha = 2) by the tiled Triton kernels (the Triton
    interpreter on CPU, with `TRITON_INTERPRET=1` set before longattn is imported).

    Args:
        q: `(B, Hq, Nq, D)`; k: `(B, Hkv, Nk, D)`; v: `(B, Hkv, Nk, Dv)`, `Hq` a multiple of `Hkv`
            (query head h reads kv head `h // (Hq // Hkv)`), `D, Dv <= 256`, float16, bfloat16
            or float32, any strides.
        scale: logit scale, default `D ** -0.5`.
        alpha: the entmax parameter, any float in `(1, 2]`; 2 is sparsemax, 1.5 is entmax15
            (those two need no pow per element).
        is_causal: top-left causal mask, `j <= i`; same as `causal_offset=0`.
        causal_offset: key j allowed for row i iff `j <= i + causal_offset`; implies causal.
            `Nk - Nq` aligns bottom-right (decoding with a KV cache).
        length_scale: `s` of length scaling (SSMax's, Nakanishi 2025): row i of head h has its
            `q . k` multiplied by `s_h * ln(n_i)`, `n_i` the keys it may see. A float, or a
            `()` / `(Hq,)` tensor that may require grad.

    Returns:
        `(B, Hq, Nq, Dv)` in q's dtype. A row with no key gives 0 and gradient 0.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    return EntmaxAttentionFunction.apply(q, k, v, scale, _check_alpha(alpha), causal_offset, length_scale)


def entmax_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    alpha: float = 1.5,
    is_causal: bool = False,
    length_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha-entmax attention over packed documents (flash-attn's varlen layout): arguments as
    `softmax_varlen_attention`, plus `alpha` as `entmax_attention`. Returns `(total_q, Hq, Dv)`."""
    _check_inputs(q, k, v, varlen=True)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return EntmaxAttentionFunction.apply(
        q, k, v, scale, _check_alpha(alpha), 0 if is_causal else None, length_scale,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
    )
