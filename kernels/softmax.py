"""Tiled online-softmax attention (FlashAttention-2, Dao 2023), forward and backward, with causal
offsets, grouped-query heads and fused length scaling (SSMax, Nakanishi 2025).

Layers, as in fla: `@triton.jit` kernels; host launchers `softmax_attention_fwd` and
`softmax_attention_bwd`, wrapped as the torch custom ops `longattn::softmax_attention_fwd` /
`_bwd` (with fake implementations) so that `torch.compile(fullgraph=True)` treats them as opaque
calls; `SoftmaxAttentionFunction`, the one place that wires them into autograd (so the ops carry
no `register_autograd` formula of their own); and the entry `softmax_attention`.
Semantics are `attention/reference.py` with normalizer "softmax"::

    n_i = Nk if not causal else clamp(i + causal_offset + 1, 0, Nk)   # keys j <= i + causal_offset
    z_ij = scale * (s_h * ln(n_i) if length_scale is not None else 1) * q_i . k_j
    out_i = softmax_j(z_ij) @ v, lse_i = logsumexp_j(z_ij); a row with n_i = 0 gives 0 and -inf.

Varlen mode (`IS_VARLEN`, set when the launchers get `cu_seqlens_q` / `cu_seqlens_k`): the inputs
are packed `(total, H, D)` documents, program id 1 is `doc * H + head`, and each program reads its
document's offsets and lengths from cu_seqlens, so the above holds per document with rows and
keys counted from the document's start (`softmax_varlen_attention`). It compiles away otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import MAX_HEAD_DIM, dot_precision, load_tile, padded_dim, store_tile, tile_config

LOG2E = tl.constexpr(math.log2(math.e))  # logits go to base 2 so the kernels can use exp2
LN2 = tl.constexpr(math.log(2.0))

# Flags derived from the arguments: the common case compiles without masks or dead branches.
_HEURISTICS = {
    # Varlen: the sequences are the documents of one packed batch, their offsets and lengths
    # read from cu_seqlens in-kernel, so no length is known to divide a block.
    "IS_VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "EVEN_M": lambda args: args["cu_seqlens_q"] is None and args["Nq"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["cu_seqlens_q"] is None and args["Nk"] % args["BLOCK_N"] == 0,
    "EVEN_D": lambda args: args["D"] == args["BLOCK_D"] and args["Dv"] == args["BLOCK_DV"],
    "HAS_LENGTH_SCALE": lambda args: args["s"] is not None,
}


# ----------------------------------------------------------------------------------------------
# Kernels. Without a causal mask the launchers pass causal_offset = Nk (every row sees every key),
# so loop bounds and n_i need no branch; IS_CAUSAL only switches the mask on.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_scales(s, i_h, offs_m, Nk, scale, causal_offset,
                BLOCK_M: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr):
    """Per-row logit factor `scale * f_i` (f_i = s_h ln(n_i), or 1) and, for the gradient of s,
    `scale * ln(n_i)`; both [BM]. Rows that see no key use n_i = 1 (they are masked anyway)."""
    f_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    ln_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LENGTH_SCALE:
        n_keys = tl.minimum(offs_m + causal_offset + 1, Nk)
        ln_n = tl.log(tl.maximum(n_keys, 1).to(tl.float32))
        f_scale = f_scale * tl.load(s + i_h) * ln_n
    return f_scale, scale * ln_n


@triton.jit
def _doc_span(cu_seqlens_q, cu_seqlens_k, i_doc):
    """Varlen: document `i_doc`'s first query row and first key in the packed sequences (int64)
    and its numbers of queries and keys."""
    bos_q = tl.load(cu_seqlens_q + i_doc)
    bos_k = tl.load(cu_seqlens_k + i_doc)
    len_q = tl.load(cu_seqlens_q + i_doc + 1) - bos_q
    len_k = tl.load(cu_seqlens_k + i_doc + 1) - bos_k
    return bos_q.to(tl.int64), bos_k.to(tl.int64), len_q, len_k


@triton.jit
def _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M: tl.constexpr):
    """One past the last key any row of query block `i_m` may see: later key blocks are skipped."""
    end = tl.minimum((i_m + 1) * BLOCK_M, Nq) + causal_offset
    return tl.maximum(tl.minimum(end, Nk), 0)


@triton.jit
def _allowed(offs_m, offs_n, Nk, causal_offset, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr):
    """[BM, BN] (or [1, BN]) mask of the keys each row may see."""
    if IS_CAUSAL:
        allowed = offs_n[None, :] <= offs_m[:, None] + causal_offset
        if not EVEN_N:
            allowed = allowed & (offs_n[None, :] < Nk)
    else:
        allowed = offs_n[None, :] < Nk
    return allowed


@triton.heuristics(_HEURISTICS)
@triton.jit
def softmax_attention_fwd_kernel(
    q, k, v, o, lse, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Nq, Nk, D, Dv, scale, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq  # varlen: i_b is the document (the batch strides are 0)
    i_hkv = i_h // GROUP  # GQA: the group's K/V are read in place, never repeated
    q += i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k += i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh
    o += i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    if IS_VARLEN:  # lse is (1, Hq, total_q): Nq is the packed length until it becomes the doc's
        bos_q, bos_k, len_q, len_k = _doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        lse += i_h.to(tl.int64) * Nq + bos_q
        Nq, Nk = len_q, len_k
        if i_m * BLOCK_M >= Nq:
            return
        q += bos_q * stride_qm
        o += bos_q * stride_om
        k += bos_k * stride_kn
        v += bos_k * stride_vn

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < Nq, offs_d < D, offs_dv < Dv
    offs_m64 = offs_m.to(tl.int64)
    # Tile offsets stay int32 and loop-invariant; the scalar base pointers k, v advance instead.
    offs_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    p_q = q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = load_tile(p_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
    f_scale, _ = _row_scales(s, i_h, offs_m, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
    row_scale = f_scale * LOG2E  # [BM], logits in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(z - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        mask_n = start_n + offs_n < Nk
        b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
        b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
        # [BM, BN] = [BM, BD] @ [BD, BN]
        z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * row_scale[:, None]
        if IS_CAUSAL or not EVEN_N:
            z = tl.where(_allowed(offs_m, start_n + offs_n, Nk, causal_offset, IS_CAUSAL, EVEN_N), z,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # A row with no allowed key so far keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(z - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # [BM, BDV] += [BM, BN] @ [BN, BDV]
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        m_i = m_new
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn

    empty = l_i == 0.0  # no key allowed: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    p_o = o + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    store_tile(p_o, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask_m, mask_dv, EVEN_M, EVEN_D)
    b_lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    if not IS_VARLEN:
        lse += i_bh.to(tl.int64) * Nq
    tl.store(lse + offs_m, b_lse, mask=mask_m)


@triton.jit
def softmax_attention_bwd_preprocess_kernel(
    o, do, delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Nq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id, the row term of the softmax gradient."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Nq)[:, None] & (offs_dv < Dv)[None, :]
    offs_m64 = offs_m.to(tl.int64)
    p_o = o + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh \
        + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    p_do = do + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh \
        + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_o = tl.load(p_o, mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * Nq + offs_m, tl.sum(b_o * b_do, 1), mask=offs_m < Nq)


@triton.jit
def _load_row_stats(lse, delta, offs_m, mask_m):
    """lse in base 2 and delta, both [BM]. Rows past the end get lse = +inf, so their P is 0.
    (A row that sees no key has lse = -inf, but every one of its keys is masked.)"""
    b_lse = tl.load(lse + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    b_delta = tl.load(delta + offs_m, mask=mask_m, other=0.0)
    return b_lse, b_delta


@triton.heuristics(_HEURISTICS)
@triton.jit
def softmax_attention_bwd_kernel_dkdv(
    q, k, v, do, lse, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Nq, Nk, D, Dv, scale, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group in this
    program: deterministic, no atomics. Works on transposed tiles, [BN, BM]."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bh // Hkv, i_bh % Hkv
    if IS_VARLEN:  # lse, delta are (1, Hq, total_q): row of head h is h * total_q + bos_q + i
        bos_q, bos_k, len_q, len_k = _doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        stride_lse_h = Nq
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
            row_h = i_h.to(tl.int64) * stride_lse_h + bos_q
        else:
            row_h = (i_b * Hq + i_h).to(tl.int64) * Nq  # row offset into lse / delta
        for m0 in range(start_m, Nq, BLOCK_M):
            rows = m0 + offs_m
            mask_m = rows < Nq
            b_q = load_tile(q_h + offs_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
            b_do = load_tile(do_h + offs_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
            b_lse, b_delta = _load_row_stats(lse + row_h, delta + row_h, rows, mask_m)
            f_scale, _ = _row_scales(s, i_h, rows, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
            # [BN, BM] = [BN, BD] @ [BD, BM]
            qk_t = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
            p_t = tl.exp2(qk_t * (f_scale * LOG2E)[None, :] - b_lse[None, :])
            if IS_CAUSAL:  # keys past Nk need no mask: their rows of dK, dV are never stored
                p_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
            # [BN, BDV] += [BN, BM] @ [BM, BDV]
            b_dv += tl.dot(p_t.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
            # [BN, BM] = [BN, BDV] @ [BDV, BM]
            dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
            # dz_ij = P_ij (dP_ij - delta_i); dk_j = sum_i dz_ij scale f_i q_i
            ds_t = p_t * (dp_t - b_delta[None, :]) * f_scale[None, :]
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
def softmax_attention_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Nq, Nk, D, Dv, scale, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dQ of one query block, and with length scaling each row's share of ds_h:
    `scale ln(n_i) sum_j dz_ij q_i.k_j`, summed over rows on the host (deterministic)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    i_hkv = i_h // GROUP
    if IS_VARLEN:  # lse, delta, ds_row are (1, Hq, total_q)
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
    k += i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v += i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < Nq, offs_d < D, offs_dv < Dv
    offs_m64 = offs_m.to(tl.int64)
    offs_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh \
        + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    p_do = do + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh \
        + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_q = load_tile(p_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
    b_do = load_tile(p_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
    if not IS_VARLEN:
        row = i_bh.to(tl.int64) * Nq
    b_lse, b_delta = _load_row_stats(lse + row, delta + row, offs_m, mask_m)
    f_scale, ln_scale = _row_scales(s, i_h, offs_m, Nk, scale, causal_offset, BLOCK_M, HAS_LENGTH_SCALE)
    row_scale = f_scale * LOG2E

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_ds = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dz_ij q_i.k_j
    for start_n in range(0, _key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        mask_n = start_n + offs_n < Nk
        b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
        b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
        qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BM, BN]
        p = tl.exp2(qk * row_scale[:, None] - b_lse[:, None])
        if IS_CAUSAL or not EVEN_N:
            p = tl.where(_allowed(offs_m, start_n + offs_n, Nk, causal_offset, IS_CAUSAL, EVEN_N), p, 0.0)
        dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN] = [BM, BDV] @ [BDV, BN]
        dz = p * (dp - b_delta[:, None])
        b_dq += tl.dot(dz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [BM, BD]
        if HAS_LENGTH_SCALE:
            # Summed directly, not recovered from dQ: that would divide by f_i, 0 when n_i = 1.
            b_ds += tl.sum(dz * qk, 1)
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn

    p_dq = dq + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh \
        + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    store_tile(p_dq, (b_dq * f_scale[:, None]).to(dq.dtype.element_ty), mask_m, mask_d, EVEN_M, EVEN_D)
    if HAS_LENGTH_SCALE:
        tl.store(ds_row + row + offs_m, b_ds * ln_scale, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _length_scale_vector(length_scale, num_heads: int, device) -> torch.Tensor | None:
    """None, a float, or a `()` / `(Hq,)` tensor -> None or a contiguous `(Hq,)` fp32 tensor."""
    if length_scale is None:
        return None
    s = torch.as_tensor(length_scale, dtype=torch.float32, device=device).detach()
    return s.expand(num_heads).contiguous()


def _causal_args(causal_offset: int | None, Nq: int, Nk: int) -> tuple[bool, int]:
    """`(IS_CAUSAL, offset)`. Without the mask every row sees every key, as with an offset of Nk:
    the kernels' bounds then need no branch. Clamping to [-Nq, Nk] changes no row and keeps the
    kernels' index arithmetic in int32."""
    if causal_offset is None:
        return False, Nk
    return True, max(-Nq, min(int(causal_offset), Nk))


def _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """`(B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk)`. Varlen (`cu_seqlens_q` given): `q` is
    `(total_q, Hq, D)`, `v` `(total_k, Hkv, Dv)`; B counts the documents, Nq and Nk are the packed
    lengths (the kernels read each document's own), and the grids span the longest document."""
    if cu_seqlens_q is None:
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
        return B, Hq, Nq, D, Hkv, Nk, Dv, Nq, Nk
    (Nq, Hq, D), (Nk, Hkv, Dv) = q.shape, v.shape
    return cu_seqlens_q.numel() - 1, Hq, Nq, D, Hkv, Nk, Dv, max_seqlen_q, max_seqlen_k


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """Strides in the kernels' (B, H, N, D) order. A packed `(total, H, D)` tensor has batch
    stride 0: its documents are placed by cu_seqlens, not by the batch index."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else t.stride()


def softmax_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    causal_offset: int | None, length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q` (B, Hq, Nq, D), `k` (B, Hkv, Nk, D), `v` (B, Hkv, Nk, Dv), any strides.
    `causal_offset`: None (no mask) or key j allowed for row i iff j <= i + causal_offset.
    `length_scale`: None, a float or a `()` / `(Hq,)` tensor.
    Returns `out` (B, Hq, Nq, Dv) in q's dtype and the natural-log `lse` (B, Hq, Nq) in fp32.

    Varlen, with `cu_seqlens_q`, `cu_seqlens_k` (int32, `(num_docs + 1,)`, checked by the caller)
    and the longest document's lengths `max_seqlen_q`, `max_seqlen_k`: `q` (total_q, Hq, D), `k`
    (total_k, Hkv, D), `v` (total_k, Hkv, Dv); each document is a sequence of its own, rows and
    keys counted from its start (so `causal_offset` applies per document). Returns `out`
    (total_q, Hq, Dv) and `lse` (Hq, total_q)."""
    varlen = cu_seqlens_q is not None
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, _ = _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if varlen:
        out = torch.empty(Nq, Hq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(Hq, Nq, dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    if B * Hq * grid_nq == 0:
        return out, lse
    is_causal, offset = _causal_args(causal_offset, Nq, Nk)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_M, BLOCK_N, num_warps, num_stages = tile_config(max(BLOCK_D, BLOCK_DV), q.dtype)
    grid = (triton.cdiv(grid_nq, BLOCK_M), B * Hq)
    softmax_attention_fwd_kernel[grid](
        q, k, v, out, lse, _length_scale_vector(length_scale, Hq, q.device), cu_seqlens_q, cu_seqlens_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, offset,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        IS_CAUSAL=is_causal, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def softmax_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale=None, dlse: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of `softmax_attention_fwd` from the upstream `do` (and `dlse`, the gradient of
    the lse, if any). `out` and `lse` may come from elsewhere, e.g. merged over key shards: P is
    recomputed as exp(z - lse). Returns `dq`, `dk`, `dv` in the inputs' dtypes and `ds`, the
    gradient of the `(Hq,)` length scale in fp32 (None without length scaling). Varlen as in
    `softmax_attention_fwd`, the tensors in its packed layouts."""
    varlen = cu_seqlens_q is not None
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk = _shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    is_causal, offset = _causal_args(causal_offset, Nq, Nk)
    s = _length_scale_vector(length_scale, Hq, q.device)
    do = do.to(q.dtype)  # the kernels' dots take one dtype; autograd already hands q's
    lse = lse.float().contiguous()
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages = tile_config(
        max(BLOCK_D, BLOCK_DV), q.dtype, backward=True
    )
    common = {"BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "IS_CAUSAL": is_causal,
              "DOT_PRECISION": dot_precision(q.dtype), "num_warps": num_warps, "num_stages": num_stages}

    # delta is row-wise: varlen runs it over the packed rows as one sequence, (1, Hq, total_q).
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if delta.numel() > 0:
        softmax_attention_bwd_preprocess_kernel[(triton.cdiv(Nq, BLOCK_HELD), delta.numel() // Nq)](
            out, do, delta, *_strides(out, varlen), *_strides(do, varlen), Hq, Nq, Dv,
            BLOCK_M=BLOCK_HELD, BLOCK_DV=BLOCK_DV,
        )
        if dlse is not None:  # d lse_i / d z_ij = P_ij: folds into the row term
            delta -= dlse.float()

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * Hkv * grid_nk > 0:
        softmax_attention_bwd_kernel_dkdv[(triton.cdiv(grid_nk, BLOCK_HELD), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen),
            Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, scale, offset,
            BLOCK_M=BLOCK_STREAMED, BLOCK_N=BLOCK_HELD, **common,
        )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ds_row = None if s is None else torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if B * Hq * grid_nq * D > 0:
        softmax_attention_bwd_kernel_dq[(triton.cdiv(grid_nq, BLOCK_HELD), B * Hq)](
            q, k, v, do, lse, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dq, varlen),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, offset,
            BLOCK_M=BLOCK_HELD, BLOCK_N=BLOCK_STREAMED, **common,
        )
    if s is None:
        return dq, dk, dv, None
    return dq, dk, dv, ds_row.sum(dim=1) if varlen else ds_row.sum(dim=(0, 2))


# ----------------------------------------------------------------------------------------------
# torch custom ops: torch.compile traces through them without graph breaks
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::softmax_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_attention_fwd(q, k, v, scale, causal_offset, length_scale,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@_fwd_op.register_fake
def _(q, k, v, scale, causal_offset, length_scale, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0):
    if cu_seqlens_q is not None:  # varlen: (total_q, Hq, Dv) and (Hq, total_q)
        Nq, Hq, _ = q.shape
        return q.new_empty(Nq, Hq, v.shape[-1]), q.new_empty(Hq, Nq, dtype=torch.float32)
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("longattn::softmax_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, ds = softmax_attention_bwd(do, q, k, v, out, lse, scale, causal_offset, length_scale, dlse,
                                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # A custom op cannot return None: an empty ds stands for "no length scale".
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if ds is None else ds


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, causal_offset, length_scale, dlse, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    ds = q.new_empty(0 if length_scale is None else q.shape[1], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


# ----------------------------------------------------------------------------------------------
# Autograd and the entry point
# ----------------------------------------------------------------------------------------------


class SoftmaxAttentionFunction(torch.autograd.Function):
    """Wires the launchers (through their custom ops) into autograd; outputs `(out, lse)`.
    The trailing arguments, `(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`, are
    given in varlen mode only."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal_offset, length_scale, *varlen):
        s = _length_scale_vector(length_scale, q.shape[1], q.device)
        out, lse = torch.ops.longattn.softmax_attention_fwd(q, k, v, scale, causal_offset, s, *varlen)
        ctx.save_for_backward(q, k, v, out, lse, s, *varlen[:2])
        ctx.scale, ctx.causal_offset, ctx.max_seqlens = scale, causal_offset, varlen[2:]
        ctx.length_scale_meta = None
        if torch.is_tensor(length_scale):
            ctx.length_scale_meta = (length_scale.shape, length_scale.dtype)
        ctx.set_materialize_grads(False)  # so an unused lse costs nothing in the backward
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, s, *cu_seqlens = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, ds = torch.ops.longattn.softmax_attention_bwd(
            dout, q, k, v, out, lse, ctx.scale, ctx.causal_offset, s, dlse, *cu_seqlens, *ctx.max_seqlens
        )
        d_length_scale = None
        if ctx.length_scale_meta is not None and ctx.needs_input_grad[5]:
            shape, dtype = ctx.length_scale_meta
            d_length_scale = ds.sum_to_size(shape).to(dtype)  # () sums over heads
        return dq, dk, dv, None, None, d_length_scale, *(None,) * (len(cu_seqlens) + len(ctx.max_seqlens))


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    is_causal: bool = False,
    causal_offset: int | None = None,
    length_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Softmax attention by the tiled Triton kernels (the Triton interpreter on CPU, with
    `TRITON_INTERPRET=1` set before longattn is imported).

    Args:
        q: `(B, Hq, Nq, D)`; k: `(B, Hkv, Nk, D)`; v: `(B, Hkv, Nk, Dv)`, `Hq` a multiple of `Hkv`
            (query head h reads kv head `h // (Hq // Hkv)`), `D, Dv <= 256`, float16, bfloat16
            or float32, any strides.
        scale: logit scale, default `D ** -0.5`.
        is_causal: top-left causal mask, `j <= i` (as SDPA); same as `causal_offset=0`.
        causal_offset: key j allowed for row i iff `j <= i + causal_offset`; implies causal.
            `Nk - Nq` aligns bottom-right (decoding with a KV cache).
        length_scale: SSMax `s` (Nakanishi 2025): row i of head h has its `q . k` multiplied by
            `s_h * ln(n_i)`, `n_i` the keys it may see. A float, or a `()` / `(Hq,)` tensor that
            may require grad.
        return_lse: also return the natural-log logsumexp of each row, `(B, Hq, Nq)` float32
            (differentiable).

    Returns:
        `(B, Hq, Nq, Dv)` in q's dtype (and the lse). A row with no key gives 0 (lse -inf) and
        gradient 0.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    out, lse = SoftmaxAttentionFunction.apply(q, k, v, scale, causal_offset, length_scale)
    return (out, lse) if return_lse else out


def softmax_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    is_causal: bool = False,
    length_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Softmax attention over packed documents (flash-attn's varlen layout) by the same kernels.

    Args:
        q: `(total_q, Hq, D)`; k: `(total_k, Hkv, D)`; v: `(total_k, Hkv, Dv)`; dtypes, head
            dims and strides as `softmax_attention`.
        cu_seqlens_q, cu_seqlens_k: int32 `(num_docs + 1,)`, the offsets of the documents in the
            packed rows, from 0 to the total; not checked here (`longattn.varlen_attention` does).
        max_seqlen_q, max_seqlen_k: at least the longest document's lengths (they size the grid).
        scale, length_scale: as `softmax_attention`; `n_i` counts the keys of row i's document.
        is_causal: top-left within each document: key j for row i iff `j <= i`, both counted
            from the document's start.
        return_lse: also return the lse, `(Hq, total_q)` float32 (differentiable).

    Returns:
        `(total_q, Hq, Dv)` in q's dtype (and the lse). Document d's queries see document d's
        keys only; a row with no key gives 0 (lse -inf) and gradient 0.
    """
    _check_inputs(q, k, v, varlen=True)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = SoftmaxAttentionFunction.apply(
        q, k, v, scale, 0 if is_causal else None, length_scale,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
    )
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, varlen: bool = False) -> None:
    """What the kernels cannot do; the general argument checks live in `attention/checks.py`.
    The heads are dim 1 in both layouts, (B, H, N, D) and varlen's (total, H, D)."""
    ndim, layout = (3, "(total, H, D)") if varlen else (4, "(B, H, N, D)")
    if not q.dim() == k.dim() == v.dim() == ndim:
        raise ValueError(f"q, k, v must be {layout}; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be at most {MAX_HEAD_DIM}; got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
