"""Tiled sparsemax / alpha-entmax attention (Peters et al. 2019; sparsemax: Martins & Astudillo
2016), forward only for now, with causal offsets, grouped-query heads and fused length scaling
(SSMax, Nakanishi 2025). The backward, which recomputes the weights from the saved `row_max` and
`tau`, is the next step; until then the entry refuses inputs that require grad.

Layers, as in fla and `kernels/softmax.py`: the `@triton.jit` kernel `entmax_attention_fwd_kernel`,
the host launcher `entmax_attention_fwd` and the entry `entmax_attention_forward`.
Semantics are `attention/reference.py` with normalizer "entmax" (alpha = 2 is sparsemax), the
algorithm that of `attention/chunked.py` (`entmax_threshold`), tile by tile::

    n_i = Nk if not causal else clamp(i + causal_offset + 1, 0, Nk)   # keys j <= i + causal_offset
    x_ij = (alpha - 1) * scale * (s_h * ln(n_i) if length_scale is not None else 1) * q_i . k_j
    m_i = max_j x_ij;  tau_i: sum_j [x_ij - m_i - tau_i]_+ ** (1 / (alpha - 1)) = 1
    out_i = [x_i - m_i - tau_i]_+ ** (1 / (alpha - 1)) @ v   (normalised; a row with n_i = 0
                                                               gives 0, m_i = 0, tau_i = +inf)

One program holds a block of query rows and streams the key tiles through it several times,
recomputing `q . k` on each pass and never storing scores: one pass for the row max, Newton
passes for tau (below), for alpha = 1.5 one pass for the exact finish, and one for the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, load_tile, padded_dim, store_tile, tile_config
from .softmax import _allowed, _causal_args, _check_inputs, _key_end, _length_scale_vector, _row_scales

# Newton's method on G(t) = ||[x - max - t]_+||_p = 1 from t = -1 rises monotonically to the root
# (`attention/chunked.py`), so a program stops once no row of its block moves by more than
# NEWTON_TOL; the cap only guards against pathological rounding. Passes until the fp32 threshold
# stops changing, the last one confirming, measured on 32 rows of N(0, 1) logits at N = 512 and
# 2048: 5 (alpha 1.25), 6 (1.5), 6 (2); with peaked rows (q scaled 30x) 1 to 3; nearly flat rows
# (q scaled 1e-3) 2 to 5 (`test_newton_converges_in_few_passes` pins 6 at N = 256).
MAX_NEWTON_STEPS = 30
NEWTON_TOL = 1e-6

_HEURISTICS = {
    "EVEN_M": lambda args: args["Nq"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["Nk"] % args["BLOCK_N"] == 0,
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
def _weights(d, p, ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr):
    """Unnormalised weights `d ** p` of `d = [x - max - tau]_+`."""
    if ALPHA_IS_2:
        w = d
    elif ALPHA_IS_1_5:
        w = d * d
    else:
        w = _pow(d, p)
    return w


@triton.heuristics(_HEURISTICS)
@triton.jit
def entmax_attention_fwd_kernel(
    q, k, v, o, row_max, tau, s,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Nq, Nk, D, Dv, scale, alpha, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MAX_STEPS: tl.constexpr, TOL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    ALPHA_IS_2: tl.constexpr, ALPHA_IS_1_5: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    i_hkv = i_h // GROUP  # GQA: the group's K/V are read in place, never repeated
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh
    o += i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh

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

    # Pass 1: the row max.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_n = k
    for start_n in range(0, key_end, BLOCK_N):
        x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                         IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
        m_i = tl.maximum(m_i, tl.max(x, 1))
        k_n += BLOCK_N * stride_kn
    empty = m_i == float("-inf")  # no key: weight 0 everywhere
    m_i = tl.where(empty, 0.0, m_i)

    # Newton passes on G(t) = ||[x - m - t]_+||_p = 1 from t = -1: t += (mass - mass^(1-1/p)) / slope,
    # mass = sum d^p, slope = sum d^(p-1). Every step stays left of the root, so d only shrinks.
    t = tl.full([BLOCK_M], -1.0, dtype=tl.float32)
    step_max = tl.full([], TOL + 1.0, dtype=tl.float32)  # tensors: loop-carried values keep one type
    n_steps = tl.full([], 0, dtype=tl.int32)
    while (step_max > TOL) & (n_steps < MAX_STEPS):
        mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_n = k
        for start_n in range(0, key_end, BLOCK_N):
            x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                             IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # masked keys: -inf -> 0
            if ALPHA_IS_2:  # Michelot's support refinement
                mass += tl.sum(d, 1)
                slope += tl.sum((d > 0).to(tl.float32), 1)
            elif ALPHA_IS_1_5:
                mass += tl.sum(d * d, 1)
                slope += tl.sum(d, 1)
            else:
                d_pm1 = _pow(d, p - 1.0)
                mass += tl.sum(d_pm1 * d, 1)
                slope += tl.sum(d_pm1, 1)
            k_n += BLOCK_N * stride_kn
        if ALPHA_IS_2:
            root = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        elif ALPHA_IS_1_5:
            root = tl.sqrt(mass)
        else:
            root = _pow(mass, 1.0 - 1.0 / p)
        delta = tl.where(slope > 0, (mass - root) / tl.where(slope > 0, slope, 1.0), 0.0)
        t += delta
        step_max = tl.max(tl.abs(delta), 0)  # a NaN row never holds the loop
        n_steps += 1

    if ALPHA_IS_1_5:  # on the support S found above, sum_S (x_j - m - tau)^2 = 1 is a quadratic
        s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        size = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_n = k
        for start_n in range(0, key_end, BLOCK_N):
            x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                             IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
            d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)
            s1 += tl.sum(d, 1)
            s2 += tl.sum(d * d, 1)
            size += tl.sum((d > 0).to(tl.float32), 1)
            k_n += BLOCK_N * stride_kn
        size_safe = tl.where(size > 0, size, 1.0)
        t += tl.where(size > 0, (s1 - tl.sqrt(tl.maximum(s1 * s1 - size * (s2 - 1.0), 0.0))) / size_safe, 0.0)
    t = tl.where(empty, float("inf"), t)

    # Output pass: acc = sum_j d_j^p v_j, l = sum_j d_j^p; key tiles with no weight are skipped.
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_n, v_n = k, v
    for start_n in range(0, key_end, BLOCK_N):
        x = _tile_logits(b_q, k_n + offs_k, x_scale, offs_m, start_n + offs_n, mask_d, Nk, causal_offset,
                         IS_CAUSAL, EVEN_N, EVEN_D, DOT_PRECISION)
        d = tl.maximum((x - m_i[:, None]) - t[:, None], 0.0)  # empty rows: t = +inf -> 0
        if tl.max(tl.max(d, 1), 0) > 0:
            w = _weights(d, p, ALPHA_IS_2, ALPHA_IS_1_5)
            b_v = load_tile(v_n + offs_v, start_n + offs_n < Nk, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            l_i += tl.sum(w, 1)
            # [BM, BDV] += [BM, BN] @ [BN, BDV]
            acc += tl.dot(w.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        k_n += BLOCK_N * stride_kn
        v_n += BLOCK_N * stride_vn

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rounding leaves l a few ulps off 1; empty rows stay 0
    p_o = o + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    store_tile(p_o, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask_m, mask_dv, EVEN_M, EVEN_D)
    tl.store(row_max + i_bh.to(tl.int64) * Nq + offs_m, m_i, mask=mask_m)
    tl.store(tau + i_bh.to(tl.int64) * Nq + offs_m, t, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launcher and entry
# ----------------------------------------------------------------------------------------------


def entmax_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alpha: float,
    causal_offset: int | None, length_scale=None, max_newton_steps: int = MAX_NEWTON_STEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q` (B, Hq, Nq, D), `k` (B, Hkv, Nk, D), `v` (B, Hkv, Nk, Dv), any strides; `alpha` > 1
    (2: sparsemax). `causal_offset`: None (no mask) or key j allowed for row i iff
    j <= i + causal_offset. `length_scale`: None, a float or a `()` / `(Hq,)` tensor.
    `max_newton_steps` caps the Newton passes (the tests lower it to count them).

    Returns `out` (B, Hq, Nq, Dv) in q's dtype and, for the backward, `row_max` and `tau`
    (B, Hq, Nq) in fp32, both in entmax units: the weights are
    `[x - row_max - tau]_+ ** (1 / (alpha - 1))`, normalised; a row with no key has 0 and +inf."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    row_max = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    tau = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    if B * Hq * Nq == 0:
        return out, row_max, tau
    is_causal, offset = _causal_args(causal_offset, Nq, Nk)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_M, BLOCK_N, num_warps, num_stages = tile_config(max(BLOCK_D, BLOCK_DV), q.dtype)
    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    entmax_attention_fwd_kernel[grid](
        q, k, v, out, row_max, tau, _length_scale_vector(length_scale, Hq, q.device),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, Nk, D, Dv, float(scale), float(alpha), offset,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        IS_CAUSAL=is_causal, DOT_PRECISION=dot_precision(q.dtype),
        MAX_STEPS=max_newton_steps, TOL=NEWTON_TOL,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, row_max, tau


def entmax_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    alpha: float = 1.5,
    is_causal: bool = False,
    causal_offset: int | None = None,
    length_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha-entmax attention by the tiled Triton kernel, forward only: no autograd yet (the
    backward is the next step), so with grad enabled inputs that require grad are refused.

    Args:
        q: `(B, Hq, Nq, D)`; k: `(B, Hkv, Nk, D)`; v: `(B, Hkv, Nk, Dv)`, `Hq` a multiple of `Hkv`
            (query head h reads kv head `h // (Hq // Hkv)`), `D, Dv <= 256`, float16, bfloat16
            (GPU only) or float32, any strides.
        scale: logit scale, default `D ** -0.5`.
        alpha: the entmax parameter, in `(1, 2]`; 2 is sparsemax, 1.5 is entmax15.
        is_causal: top-left causal mask, `j <= i`; same as `causal_offset=0`.
        causal_offset: key j allowed for row i iff `j <= i + causal_offset`; implies causal.
        length_scale: SSMax `s` (Nakanishi 2025): row i of head h has its `q . k` multiplied by
            `s_h * ln(n_i)`, `n_i` the keys it may see. A float, or a `()` / `(Hq,)` tensor.

    Returns:
        `(B, Hq, Nq, Dv)` in q's dtype. A row with no key gives 0.
    """
    _check_inputs(q, k, v)
    if not 1.0 < float(alpha) <= 2.0:
        raise ValueError(f"alpha must be in (1, 2]; got {alpha}")
    needs_grad = any(torch.is_tensor(t) and t.requires_grad for t in (q, k, v, length_scale))
    if needs_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "the Triton entmax kernel has no backward yet: inputs that require grad are refused "
            "(under torch.no_grad() they are taken as constants)"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    with torch.no_grad():
        out, _, _ = entmax_attention_fwd(q, k, v, scale, float(alpha), causal_offset, length_scale)
    return out
