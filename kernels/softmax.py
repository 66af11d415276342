"""Tiled online-softmax attention (FlashAttention-2, Dao 2023), forward and backward, with causal
offsets, grouped-query heads and fused length scaling (SSMax, Nakanishi 2025).

Layers, as in fla: `@triton.jit` kernels; host launchers `softmax_attention_fwd` and
`softmax_attention_bwd`, wrapped as the torch custom ops `longattn::softmax_attention_fwd` /
`_bwd` (with fake implementations, so that `torch.compile(fullgraph=True)` treats them as opaque
calls, and vmap rules, so that `torch.func.vmap` batches them); `SoftmaxAttentionFunction`, the
one place that wires them into autograd (so the ops carry no `register_autograd` formula of their
own; in the form torch.func takes, its gradients first-order only); and the entry
`softmax_attention`.
Semantics are `attention/reference.py` with normalizer "softmax"::

    n_i = Nk if not causal else clamp(i + causal_offset + 1, 0, Nk)   # keys j <= i + causal_offset
    z_ij = scale * (s_h * ln(n_i) if length_scale is not None else 1) * q_i . k_j
    out_i = softmax_j(z_ij) @ v, lse_i = logsumexp_j(z_ij); a row with n_i = 0 gives 0 and -inf,
    one with a NaN or +inf logit, or only -inf ones, gives NaN (and NaN gradients where they
    depend on it), as the definition does.

Varlen mode (`IS_VARLEN`, set when the launchers get `cu_seqlens_q` / `cu_seqlens_k`): the inputs
are packed `(total, H, D)` documents, program id 1 is `doc * H + head`, and each program reads its
document's offsets and lengths from cu_seqlens, so the above holds per document with rows and
keys counted from the document's start (`softmax_varlen_attention`); with `CAUSAL_FROM_END` the
causal offset counts from its bottom-right corner, each program adding its document's
`Nk - Nq` (`program_prologue`). It compiles away otherwise.

Key lengths (`HAS_KEY_LENGTHS`, set when the launchers get `seqused_k`, dense mode only): each
program takes its batch's `clamp(seqused_k[b], 0, Nk)` as Nk (`program_prologue`), so the keys
past it are outside every loop bound, mask and `n_i`, as flash-attn's `seqused_k`; the dK/dV
programs past it return at once, the launcher having zero-filled dK and dV.

Masks (`HAS_MASK`, dense only; `kernels/masks.py`): an `attn_mask` is read tile by tile through
the strides of its broadcast view, bool or float (its bias added after the cap, in base 2 like
the logits), and a float mask's gradient, each logit's `dz`, is added atomically by the dQ
programs. A tile a boolean mask masks wholly, or that a block map (`HAS_BLOCK_MAP`) clears, is
skipped without loading K or V; `n_i` then comes from the count kernel (`HAS_KEY_COUNTS`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    DENSE_FROM_END,
    HEURISTICS,
    causal_args,
    check_inputs,
    check_modifiers,
    check_window_size,
    default_scale,
    dot_precision,
    fake_gradients,
    first_order_only,
    forward_shapes,
    key_lengths,
    length_scale_grad,
    length_scale_vector,
    logit_modifiers,
    op_optional_grad,
    padded_dim,
    per_head_from_rows,
    save_length_scale_meta,
    save_varlen_args,
    shapes,
    sink_grad,
    sink_vector,
    strides,
    tile_config,
    varlen_launch_args,
    varlen_no_grads,
    vmap_by_loop,
    window_args,
    window_bounds,
)
from .common import MAX_HEAD_DIM as MAX_HEAD_DIM  # re-exported: longattn.kernels.softmax.MAX_HEAD_DIM
from .masks import count_allowed_keys, mask_args, mask_grad_args, reduce_mask_grad
from .masks import (
    count_allowed_keys_kernel as count_allowed_keys_kernel,  # its launches are this family's too
)
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
    row_keys,
    row_scales,
    sequence_offset,
    softcap_slope,
    store_tile,
    tile_live,
)

LOG2E = tl.constexpr(math.log2(math.e))  # logits go to base 2 so the kernels can use exp2
LN2 = tl.constexpr(math.log(2.0))
LOG2E_FLOAT = math.log2(math.e)  # the host's, for the launchers


# ----------------------------------------------------------------------------------------------
# Kernels. Without a causal mask the launchers pass causal_offset = Nk (every row sees every key),
# so loop bounds and n_i need no branch; IS_CAUSAL only switches the mask on.
# ----------------------------------------------------------------------------------------------


@triton.heuristics(HEURISTICS)
@triton.jit
def softmax_attention_fwd_kernel(
    q, k, v, o, lse, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi, sink,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Nq, Nk, D, Dv, scale, causal_offset, window_offset, alibi_offset, softcap,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr, HAS_KEY_COUNTS: tl.constexpr,
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
    lse += row

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
    f_scale, _ = row_scales(s, i_h, offs_m, Nk, scale, causal_offset, window_offset, BLOCK_M,
                            HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row, Nq, HAS_KEY_COUNTS)
    row_scale = f_scale * LOG2E  # [BM], logits in base 2
    head_slope = alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI)
    if HAS_MASK:
        mask += sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
    if HAS_BLOCK_MAP:
        block_map += sequence_offset(i_b, i_h, 0, stride_bb, stride_bh, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(z - m_i)
    if HAS_SINK:  # the sink's logit starts every row's sums: exp2(sink - max) = 1, no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sink + i_h) * LOG2E
        l_i += 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_start = key_start(i_m, Nk, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW:  # the tiles left of the window are never loaded
        k += n_start.to(tl.int64) * stride_kn
        v += n_start.to(tl.int64) * stride_vn
    for start_n in range(n_start, key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        cols = start_n + offs_n
        # a tile the block map clears, or a boolean mask wholly, is skipped: no K or V is read
        if tile_live(block_map, mask, i_m * BLOCK_M, start_n, offs_m[:, None], cols[None, :], Nq, Nk,
                     stride_bm,
                     stride_bn, stride_mm, stride_mn, MAP_BLOCK, HAS_BLOCK_MAP, HAS_MASK, MASK_IS_BOOL):
            mask_n = cols < Nk
            b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
            b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            # [BM, BN] = [BM, BD] @ [BD, BN]
            z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * row_scale[:, None]
            if HAS_SOFTCAP or HAS_ALIBI:
                distance = cols[None, :] - offs_m[:, None] - alibi_offset
                z = modify_logits(z, distance, head_slope, softcap, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_MASK:  # the mask's bias after the cap, as the reference adds it
                in_mask, bias = mask_tile(mask, offs_m[:, None], cols[None, :], Nq, Nk, stride_mm, stride_mn,
                                          mask_floor, MASK_IS_BOOL)
                z = tl.where(in_mask, z + bias * LOG2E, float("-inf"))
            if IS_CAUSAL or HAS_WINDOW or not EVEN_N:
                allowed = allowed_keys(offs_m, cols, Nk, causal_offset, window_offset, IS_CAUSAL, EVEN_N,
                                       HAS_WINDOW)
                z = tl.where(allowed, z, float("-inf"))
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

    # l = 0: no key allowed (output 0, lse -inf), or every allowed logit is -inf. The latter's
    # weights are 0 / 0, NaN in the definition: its output is NaN, its lse log 0 = -inf, and the
    # backward's exp(z - lse) = exp(-inf + inf) makes its gradients NaN. (A NaN or +inf logit
    # makes l NaN by itself.)
    no_weight = l_i == 0.0
    l_safe = tl.where(no_weight, 1.0, l_i)
    n_seen = row_keys(key_counts, row, offs_m, Nq, Nk, causal_offset, window_offset, HAS_WINDOW,
                      HAS_KEY_COUNTS)
    undefined = no_weight & (n_seen > 0)
    b_o = tl.where(undefined[:, None], float("nan"), acc / l_safe[:, None])
    p_o = o + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    store_tile(p_o, b_o.to(o.dtype.element_ty), mask_m, mask_dv, EVEN_M, EVEN_D)
    b_lse = tl.where(no_weight, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
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
    # row-wise, so varlen runs it over the packed rows as one sequence: never IS_VARLEN
    i_b, i_h, _, bos_q, _, _, _, _, _, _, row, _ = program_prologue(
        i_m, i_bh, None, None, None, Hq, 1, Nq, 0, 0, 0, 0, BLOCK_M, False, False, False, False, False, False)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Nq)[:, None] & (offs_dv < Dv)[None, :]
    offs_m64 = offs_m.to(tl.int64)
    p_o = o + sequence_offset(i_b, i_h, bos_q, stride_ob, stride_oh, stride_om) \
        + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    p_do = do + sequence_offset(i_b, i_h, bos_q, stride_dob, stride_doh, stride_dom) \
        + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_o = tl.load(p_o, mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + row + offs_m, tl.sum(b_o * b_do, 1), mask=offs_m < Nq)


@triton.jit
def _load_row_stats(lse, delta, offs_m, mask_m):
    """lse in base 2 and delta, both [BM]. Rows past the end get lse = +inf, so their P is 0.
    (A row that sees no key has lse = -inf, but every one of its keys is masked.)"""
    b_lse = tl.load(lse + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    b_delta = tl.load(delta + offs_m, mask=mask_m, other=0.0)
    return b_lse, b_delta


@triton.heuristics(HEURISTICS)
@triton.jit
def softmax_attention_bwd_kernel_dkdv(
    q, k, v, do, lse, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Nq, Nk, D, Dv, scale, causal_offset, window_offset, alibi_offset, softcap,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr, HAS_KEY_COUNTS: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group in this
    program: deterministic, no atomics. Works on transposed tiles, [BN, BM]."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    stride_rows_h = Nq  # a head's rows in lse, delta: (B, Hq, Nq), or (Hq, total_q) in varlen mode
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
        row_h = head_row(i_b, i_h, Hq, stride_rows_h, bos_q, IS_VARLEN)  # row offset into lse / delta
        mask_h, block_map_h = mask, block_map
        if HAS_MASK:
            mask_h = mask + sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
        if HAS_BLOCK_MAP:
            block_map_h = block_map + sequence_offset(i_b, i_h, 0, stride_bb, stride_bh, 0)
        for m0 in range(start_m, end_m, BLOCK_M):
            rows = m0 + offs_m
            if tile_live(block_map_h, mask_h, m0, i_n * BLOCK_N, rows[None, :], offs_n[:, None], Nq, Nk,
                         stride_bm, stride_bn, stride_mm, stride_mn, MAP_BLOCK, HAS_BLOCK_MAP, HAS_MASK,
                         MASK_IS_BOOL):
                mask_m = rows < Nq
                b_q = load_tile(q_h + offs_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
                b_do = load_tile(do_h + offs_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
                b_lse, b_delta = _load_row_stats(lse + row_h, delta + row_h, rows, mask_m)
                f_scale, _ = row_scales(s, i_h, rows, Nk, scale, causal_offset, window_offset, BLOCK_M,
                                        HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row_h, Nq, HAS_KEY_COUNTS)
                # [BN, BM] = [BN, BD] @ [BD, BM]
                qk_t = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
                z_t = qk_t * (f_scale * LOG2E)[None, :]
                if HAS_SOFTCAP or HAS_ALIBI:
                    z_raw = z_t
                    z_t = modify_logits(z_t, offs_n[:, None] - rows[None, :] - alibi_offset,
                                        alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI), softcap, HAS_SOFTCAP,
                                        HAS_ALIBI)
                if HAS_MASK:
                    in_mask, bias_t = mask_tile(mask_h, rows[None, :], offs_n[:, None], Nq, Nk, stride_mm,
                                                stride_mn, mask_floor, MASK_IS_BOOL)
                    z_t = z_t + bias_t * LOG2E
                p_t = tl.exp2(z_t - b_lse[None, :])
                if HAS_MASK:
                    p_t = tl.where(in_mask, p_t, 0.0)
                if IS_CAUSAL:  # keys past Nk need no mask: their rows of dK, dV are never stored
                    p_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
                if HAS_WINDOW:
                    p_t = tl.where(offs_n[:, None] >= rows[None, :] + window_offset, p_t, 0.0)
                # [BN, BDV] += [BN, BM] @ [BM, BDV]
                b_dv += tl.dot(p_t.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
                # [BN, BM] = [BN, BDV] @ [BDV, BM]
                dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
                # dz_ij = P_ij (dP_ij - delta_i); dk_j = sum_i dz_ij scale f_i q_i
                ds_t = p_t * (dp_t - b_delta[None, :]) * f_scale[None, :]
                if HAS_SOFTCAP:  # through the cap, to the uncapped logits
                    ds_t = ds_t * softcap_slope(z_raw, softcap)
                b_dk += tl.dot(ds_t.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)  # [BN, BD]
            q_h += BLOCK_M * stride_qm
            do_h += BLOCK_M * stride_dom

    p_dk = dk + sequence_offset(i_b, i_hkv, bos_k, stride_dkb, stride_dkh, stride_dkn) \
        + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    p_dv = dv + sequence_offset(i_b, i_hkv, bos_k, stride_dvb, stride_dvh, stride_dvn) \
        + offs_n64[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    store_tile(p_dk, b_dk.to(dk.dtype.element_ty), mask_n, mask_d, EVEN_N, EVEN_D)
    store_tile(p_dv, b_dv.to(dv.dtype.element_ty), mask_n, mask_dv, EVEN_N, EVEN_D)


@triton.heuristics(HEURISTICS)
@triton.jit
def softmax_attention_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Nq, Nk, D, Dv, scale, causal_offset, window_offset, alibi_offset, softcap,
    key_counts, mask, block_map, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, mask_floor,
    dmask, stride_gb, stride_gh, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    CAUSAL_FROM_END: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr, MAP_BLOCK: tl.constexpr, HAS_KEY_COUNTS: tl.constexpr,
    MASK_GRAD: tl.constexpr, MASK_GRAD_SUM_ROWS: tl.constexpr, MASK_GRAD_SUM_KEYS: tl.constexpr,
):
    """dQ of one query block, and with length scaling each row's share of ds_h:
    `scale ln(n_i) sum_j dz_ij q_i.k_j`, summed over rows on the host (deterministic). With
    MASK_GRAD, each logit's gradient dz_ij is the float mask's at (i, j), added into `dmask`
    through its broadcast strides (atomically: heads or batches that share a mask entry meet)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, row, done = \
        program_prologue(i_m, i_bh, cu_seqlens_q, cu_seqlens_k, seqused_k, Hq, GROUP, Nq, Nk, causal_offset,
                         window_offset, alibi_offset, BLOCK_M, False, IS_VARLEN, HAS_KEY_LENGTHS,
                         CAUSAL_FROM_END, HAS_WINDOW, HAS_ALIBI)
    if done:
        return
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

    p_q = q + sequence_offset(i_b, i_h, bos_q, stride_qb, stride_qh, stride_qm) \
        + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    p_do = do + sequence_offset(i_b, i_h, bos_q, stride_dob, stride_doh, stride_dom) \
        + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_q = load_tile(p_q, mask_m, mask_d, EVEN_M, EVEN_D)  # [BM, BD]
    b_do = load_tile(p_do, mask_m, mask_dv, EVEN_M, EVEN_D)  # [BM, BDV]
    b_lse, b_delta = _load_row_stats(lse + row, delta + row, offs_m, mask_m)
    f_scale, ln_scale = row_scales(s, i_h, offs_m, Nk, scale, causal_offset, window_offset, BLOCK_M,
                                   HAS_LENGTH_SCALE, HAS_WINDOW, key_counts, row, Nq, HAS_KEY_COUNTS)
    row_scale = f_scale * LOG2E
    head_slope = alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI)
    if HAS_MASK:
        mask += sequence_offset(i_b, i_h, 0, stride_mb, stride_mh, 0)
    if HAS_BLOCK_MAP:
        block_map += sequence_offset(i_b, i_h, 0, stride_bb, stride_bh, 0)
    if MASK_GRAD:
        dmask += sequence_offset(i_b, i_h, 0, stride_gb, stride_gh, 0)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_ds = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dz_ij q_i.k_j
    n_start = key_start(i_m, Nk, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW:
        k += n_start.to(tl.int64) * stride_kn
        v += n_start.to(tl.int64) * stride_vn
    for start_n in range(n_start, key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        cols = start_n + offs_n
        if tile_live(block_map, mask, i_m * BLOCK_M, start_n, offs_m[:, None], cols[None, :], Nq, Nk,
                     stride_bm,
                     stride_bn, stride_mm, stride_mn, MAP_BLOCK, HAS_BLOCK_MAP, HAS_MASK, MASK_IS_BOOL):
            mask_n = cols < Nk
            b_k = load_tile(k + offs_k, mask_n, mask_d, EVEN_N, EVEN_D)  # [BN, BD]
            b_v = load_tile(v + offs_v, mask_n, mask_dv, EVEN_N, EVEN_D)  # [BN, BDV]
            qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BM, BN]
            z = qk * row_scale[:, None]
            if HAS_SOFTCAP or HAS_ALIBI:
                z_raw = z
                distance = cols[None, :] - offs_m[:, None] - alibi_offset
                z = modify_logits(z, distance, head_slope, softcap, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_MASK:
                in_mask, bias = mask_tile(mask, offs_m[:, None], cols[None, :], Nq, Nk, stride_mm, stride_mn,
                                          mask_floor, MASK_IS_BOOL)
                z = z + bias * LOG2E
            p = tl.exp2(z - b_lse[:, None])
            if HAS_MASK:
                p = tl.where(in_mask, p, 0.0)
            if IS_CAUSAL or HAS_WINDOW or not EVEN_N:
                allowed = allowed_keys(offs_m, cols, Nk, causal_offset, window_offset, IS_CAUSAL, EVEN_N,
                                       HAS_WINDOW)
                p = tl.where(allowed, p, 0.0)
            # [BM, BN] = [BM, BDV] @ [BDV, BN]
            dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
            dz = p * (dp - b_delta[:, None])
            if MASK_GRAD:  # the bias is added after the cap: its gradient is dz itself
                add_mask_grad(dmask, dz, offs_m, cols, mask_m, mask_n, stride_gm, stride_gn,
                              MASK_GRAD_SUM_ROWS,
                              MASK_GRAD_SUM_KEYS)
            if HAS_SOFTCAP:  # through the cap, to the uncapped logits
                dz = dz * softcap_slope(z_raw, softcap)
            b_dq += tl.dot(dz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [BM, BD]
            if HAS_LENGTH_SCALE:
                # Summed directly, not recovered from dQ: that would divide by f_i, 0 when n_i = 1.
                b_ds += tl.sum(dz * qk, 1)
        k += BLOCK_N * stride_kn
        v += BLOCK_N * stride_vn

    p_dq = dq + sequence_offset(i_b, i_h, bos_q, stride_dqb, stride_dqh, stride_dqm) \
        + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    store_tile(p_dq, (b_dq * f_scale[:, None]).to(dq.dtype.element_ty), mask_m, mask_d, EVEN_M, EVEN_D)
    if HAS_LENGTH_SCALE:
        tl.store(ds_row + row + offs_m, b_ds * ln_scale, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def softmax_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    causal_offset: int | None, length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q` (B, Hq, Nq, D), `k` (B, Hkv, Nk, D), `v` (B, Hkv, Nk, Dv), any strides.
    `causal_offset`: None (no mask) or key j allowed for row i iff j <= i + causal_offset.
    `length_scale`: None, a float or a `()` / `(Hq,)` tensor.
    `seqused_k` (dense only): int32 `(B,)`, batch b attending to its first
    `clamp(seqused_k[b], 0, Nk)` keys only, as flash-attn's (the rest have weight 0, are not
    counted in n_i, and their tiles are skipped); with `causal_from_end` the causal offset, the
    window and ALiBi's diagonal count from its bottom-right corner, `(Nq, seqused_k[b])`.
    `window_offset`: None, or a sliding window's left edge, key j allowed for row i iff
    `j >= i + window_offset` (its right edge is part of `causal_offset`); the tiles outside it
    are skipped.
    `softcap`: None or `c`, the logits `z` capped to `c tanh(z / c)` before any bias (Gemma 2).
    `alibi_slopes`: None or `(Hq,)` / `(B, Hq)` slopes, `-slope_h |j - i - alibi_offset|` added
    to the logits (flash-attn's ALiBi), computed in the kernel.
    `sink`: None or `(Hq,)` logits, one more term of every row's softmax with no value (gpt-oss):
    the lse counts it, so a row's weights on its keys sum to less than 1.
    `attn_mask` (dense only): None, or a bool (True = attend) or float (added to the logits after
    the cap; -inf and the dtype's lowest value mask) tensor broadcastable to (B, Hq, Nq, Nk),
    read through its strides; tiles a boolean mask wholly masks are skipped.
    `block_map` (dense only): None, or bool flags broadcastable to (B, Hq, cdiv(Nq, map_block),
    cdiv(Nk, map_block)), `map_block` a multiple of 64: the blocks it clears are masked, and
    their tiles skipped (`kernels/masks.py`).
    Returns `out` (B, Hq, Nq, Dv) in q's dtype and the natural-log `lse` (B, Hq, Nq) in fp32.

    Varlen, with `cu_seqlens_q`, `cu_seqlens_k` (int32, `(num_docs + 1,)`, checked by the caller)
    and the longest document's lengths `max_seqlen_q`, `max_seqlen_k`: `q` (total_q, Hq, D), `k`
    (total_k, Hkv, D), `v` (total_k, Hkv, Dv); each document is a sequence of its own, rows and
    keys counted from its start (so `causal_offset` applies per document; with `causal_from_end`
    it counts from the document's bottom-right corner, `j <= i + causal_offset + n_k - n_q`).
    Returns `out` (total_q, Hq, Dv) and `lse` (Hq, total_q)."""
    varlen = cu_seqlens_q is not None
    seqused_k = key_lengths(seqused_k, k, varlen)
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, _ = shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out_shape, row_shape = forward_shapes(q, v, varlen)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(row_shape, dtype=torch.float32, device=q.device)
    if B * Hq * grid_nq == 0:
        return out, lse
    is_causal, offset, from_end = causal_args(causal_offset, Nq, Nk, causal_from_end)
    has_window, window = window_args(window_offset, Nq, Nk, from_end)
    mods = logit_modifiers(softcap, alibi_slopes, alibi_offset, B, Hq, Nq, Nk, from_end, LOG2E_FLOAT,
                           q.device)
    alibi = mods.pop("alibi")
    masking = mask_args(attn_mask, block_map, map_block, B, Hq, Nq, Nk, q.device, varlen)
    counts = count_allowed_keys(masking, seqused_k, B, Hq, Nq, Nk, is_causal, offset, from_end, has_window,
                                window, q.device)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_M, BLOCK_N, num_warps, num_stages = tile_config(max(BLOCK_D, BLOCK_DV), q.dtype)
    grid = (triton.cdiv(grid_nq, BLOCK_M), B * Hq)
    if masking.mask is not None and q.dtype != torch.float32:
        # A mask tile is loaded in the dot's layout, 16 entries a thread at 4 warps: ptxas spilled
        # (255 registers and 72 bytes of stack on sm_80, D = 64, fp16, causal, length-scaled);
        # 8 warps halve the entries a thread holds and take 232, no spill.
        num_warps = 8
    softmax_attention_fwd_kernel[grid](
        q, k, v, out, lse, length_scale_vector(length_scale, Hq, q.device), cu_seqlens_q, cu_seqlens_k,
        seqused_k, alibi, sink_vector(sink, Hq, q.device), *strides(q, varlen), *strides(k, varlen),
        *strides(v, varlen), *strides(out, varlen),
        Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, offset, window,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        IS_CAUSAL=is_causal, CAUSAL_FROM_END=from_end, HAS_WINDOW=has_window,
        DOT_PRECISION=dot_precision(q.dtype), HAS_SINK=sink is not None, **mods,
        **masking.kernel_args(counts),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def softmax_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale=None, dlse: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, mask_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """Gradients of `softmax_attention_fwd` from the upstream `do` (and `dlse`, the gradient of
    the lse, if any). `out` and `lse` may come from elsewhere, e.g. merged over key shards: P is
    recomputed as exp(z - lse). Returns `dq`, `dk`, `dv` in the inputs' dtypes, `ds`, the
    gradient of the `(Hq,)` length scale in fp32 (None without length scaling), and `dsink`, the
    sink's, `-sum_i exp(sink - lse_i) delta_i` (None without one), and `dmask`, with
    `mask_grad` a float mask's, in its shape and dtype (None otherwise). Varlen as in
    `softmax_attention_fwd`, the tensors in its packed layouts; `seqused_k`, `window_offset`,
    `softcap`, the ALiBi arguments, `attn_mask` and the block map as there (the keys outside
    the first two get gradient 0; the slopes get none)."""
    varlen = cu_seqlens_q is not None
    seqused_k = key_lengths(seqused_k, k, varlen)
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk = shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    is_causal, offset, from_end = causal_args(causal_offset, Nq, Nk, causal_from_end)
    has_window, window = window_args(window_offset, Nq, Nk, from_end)
    mods = logit_modifiers(softcap, alibi_slopes, alibi_offset, B, Hq, Nq, Nk, from_end, LOG2E_FLOAT,
                           q.device)
    alibi = mods.pop("alibi")
    s = length_scale_vector(length_scale, Hq, q.device)
    masking = mask_args(attn_mask, block_map, map_block, B, Hq, Nq, Nk, q.device, varlen)
    # n_i only scales the logits: without length scaling the backward needs no count
    counts = None if s is None else count_allowed_keys(masking, seqused_k, B, Hq, Nq, Nk, is_causal, offset,
                                                       from_end, has_window, window, q.device)
    dmask, dmask_args = mask_grad_args(attn_mask, mask_grad, B, Hq, Nq, Nk)
    do = do.to(q.dtype)  # the kernels' dots take one dtype; autograd already hands q's
    lse = lse.float().contiguous()
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages = tile_config(
        max(BLOCK_D, BLOCK_DV), q.dtype, backward=True
    )
    rows_streamed = BLOCK_STREAMED
    if masking.mask is not None and q.dtype != torch.float32:
        # As the forward's: 4 warps spilled 24-56 bytes on sm_80 (D = 64, bf16), and dK/dV, whose
        # mask tile is transposed, 48-72 bytes streaming 32 rows (sm_80 D = 64, sm_90 D = 128);
        # 8 warps and 16 rows take 177-255 registers, none.
        num_warps, rows_streamed = 8, 16
    common = {"BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "IS_CAUSAL": is_causal, "CAUSAL_FROM_END": from_end,
              "HAS_WINDOW": has_window, "DOT_PRECISION": dot_precision(q.dtype), "num_warps": num_warps,
              "num_stages": num_stages, **mods, **masking.kernel_args(counts)}

    # delta is row-wise: varlen runs it over the packed rows as one sequence, (1, Hq, total_q).
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if delta.numel() > 0:
        softmax_attention_bwd_preprocess_kernel[(triton.cdiv(Nq, BLOCK_HELD), delta.numel() // Nq)](
            out, do, delta, *strides(out, varlen), *strides(do, varlen), Hq, Nq, Dv,
            BLOCK_M=BLOCK_HELD, BLOCK_DV=BLOCK_DV,
        )
        if dlse is not None:  # d lse_i / d z_ij = P_ij: folds into the row term
            delta -= dlse.float()

    # with key lengths, the key blocks past a batch's return at once: their dK, dV stay 0
    new_grad = torch.empty if seqused_k is None else torch.zeros
    dk = new_grad(k.shape, dtype=k.dtype, device=k.device)
    dv = new_grad(v.shape, dtype=v.dtype, device=v.device)
    if B * Hkv * grid_nk > 0:
        softmax_attention_bwd_kernel_dkdv[(triton.cdiv(grid_nk, BLOCK_HELD), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi,
            *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(do, varlen),
            *strides(dk, varlen), *strides(dv, varlen),
            Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, scale, offset, window,
            BLOCK_M=rows_streamed, BLOCK_N=BLOCK_HELD, **common,
        )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ds_row = None if s is None else torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if B * Hq * grid_nq * D > 0:
        softmax_attention_bwd_kernel_dq[(triton.cdiv(grid_nq, BLOCK_HELD), B * Hq)](
            q, k, v, do, lse, delta, dq, ds_row, s, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi,
            *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(do, varlen),
            *strides(dq, varlen),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, offset, window,
            BLOCK_M=BLOCK_HELD, BLOCK_N=BLOCK_STREAMED, **common, **dmask_args,
        )
    dsink = None
    if sink is not None:  # d out_i / d sink = -p_sink,i out_i, so dsink = -sum_i p_sink,i delta_i
        sink_rows = sink_vector(sink, Hq, q.device).view(-1, 1)  # against (B, Hq, Nq) or (Hq, total_q)
        p_sink = torch.exp(sink_rows - lse).masked_fill(lse == float("-inf"), 0.0)  # no weight at all: 0
        dsink = per_head_from_rows(-p_sink * delta, varlen)
    return (dq, dk, dv, None if s is None else per_head_from_rows(ds_row, varlen), dsink,
            reduce_mask_grad(dmask, attn_mask))


# ----------------------------------------------------------------------------------------------
# torch custom ops: torch.compile traces through them without graph breaks
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::softmax_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    causal_from_end: bool = False, seqused_k: torch.Tensor | None = None, window_offset: int | None = None,
    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_attention_fwd(q, k, v, scale, causal_offset, length_scale,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal_from_end,
                                 seqused_k=seqused_k, window_offset=window_offset, softcap=softcap,
                                 alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, sink=sink,
                                 attn_mask=attn_mask, block_map=block_map, map_block=map_block)


@_fwd_op.register_fake
def _(q, k, v, scale, causal_offset, length_scale, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0, causal_from_end=False, *modifiers):
    out_shape, row_shape = forward_shapes(q, v, cu_seqlens_q is not None)
    return q.new_empty(out_shape), q.new_empty(row_shape, dtype=torch.float32)


@torch.library.custom_op("longattn::softmax_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, scale: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, mask_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, ds, dsink, dmask = softmax_attention_bwd(
        do, q, k, v, out, lse, scale, causal_offset, length_scale, dlse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal_from_end, seqused_k=seqused_k, window_offset=window_offset,
        softcap=softcap, alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, sink=sink, attn_mask=attn_mask,
        block_map=block_map, map_block=map_block, mask_grad=mask_grad)
    return dq, dk, dv, op_optional_grad(q, ds), op_optional_grad(q, dsink), op_optional_grad(q, dmask)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, causal_offset, length_scale, dlse, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, causal_from_end=False, seqused_k=None,
      window_offset=None, softcap=None, alibi_slopes=None, alibi_offset=None, sink=None, attn_mask=None,
      block_map=None, map_block=128, mask_grad=False):
    return fake_gradients(q, k, v, length_scale, sink, attn_mask if mask_grad else None)


_fwd_op.register_vmap(vmap_by_loop(_fwd_op))
_bwd_op.register_vmap(vmap_by_loop(_bwd_op))


# ----------------------------------------------------------------------------------------------
# Autograd and the entry point
# ----------------------------------------------------------------------------------------------


class SoftmaxAttentionFunction(torch.autograd.Function):
    """Wires the launchers (through their custom ops) into autograd; outputs `(out, lse)`.
    `seqused_k` (dense mode's key lengths), `window_offset`, `softcap`, `alibi_slopes`,
    `alibi_offset`, `sink`, `attn_mask` and `block_map` may be None (the last two dense only; a
    float mask may require grad); the trailing arguments, `(cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, causal_from_end)`, are given in varlen mode, and in dense mode
    as `DENSE_FROM_END` for bounds counted from each batch's end only. Forward and
    `setup_context` apart, as torch.func needs; its vmap rule is generated from the ops'
    (`vmap_by_loop`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, causal_offset, length_scale, seqused_k, window_offset, softcap, alibi_slopes,
                alibi_offset, sink, attn_mask, block_map, map_block, *varlen):
        s = length_scale_vector(length_scale, q.shape[1], q.device)
        return torch.ops.longattn.softmax_attention_fwd(q, k, v, scale, causal_offset, s, *varlen,
                                                        seqused_k=seqused_k, window_offset=window_offset,
                                                        softcap=softcap, alibi_slopes=alibi_slopes,
                                                        alibi_offset=alibi_offset, sink=sink,
                                                        attn_mask=attn_mask, block_map=block_map,
                                                        map_block=map_block)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal_offset, length_scale, seqused_k, window_offset, softcap, alibi_slopes, \
            alibi_offset, sink, attn_mask, block_map, map_block, *varlen = inputs
        out, lse = output
        s = length_scale_vector(length_scale, q.shape[1], q.device)  # (Hq,): cheaper to redo than return
        ctx.save_for_backward(q, k, v, out, lse, s, seqused_k, alibi_slopes, sink, attn_mask, block_map,
                              *save_varlen_args(ctx, tuple(varlen)))
        ctx.scale, ctx.causal_offset, ctx.window_offset = scale, causal_offset, window_offset
        ctx.softcap, ctx.alibi_offset, ctx.map_block = softcap, alibi_offset, map_block
        save_length_scale_meta(ctx, length_scale)
        ctx.set_materialize_grads(False)  # so an unused lse costs nothing in the backward

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, s, seqused_k, alibi_slopes, sink, attn_mask, block_map, *cu_seqlens = \
            ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        mask_grad = bool(ctx.needs_input_grad[12]) and attn_mask is not None and attn_mask.is_floating_point()
        # No graph through the op: custom ops wrap themselves for autograd in a Function
        # torch.func refuses. first_order_only gives the gradients theirs.
        with torch.no_grad():
            dq, dk, dv, ds, dsink, dmask = torch.ops.longattn.softmax_attention_bwd(
                dout, q, k, v, out, lse, ctx.scale, ctx.causal_offset, s, dlse,
                *varlen_launch_args(ctx, cu_seqlens), seqused_k=seqused_k, window_offset=ctx.window_offset,
                softcap=ctx.softcap, alibi_slopes=alibi_slopes, alibi_offset=ctx.alibi_offset, sink=sink,
                attn_mask=attn_mask, block_map=block_map, map_block=ctx.map_block, mask_grad=mask_grad,
            )
        dq, dk, dv, ds, dsink, dmask = first_order_only(
            "longattn::softmax_attention_bwd", (dq, dk, dv, ds, dsink, dmask),
            (dout, dlse, q, k, v, out, lse, s, sink, attn_mask))
        d_length_scale = length_scale_grad(ctx, ds, ctx.needs_input_grad[5])
        return (dq, dk, dv, None, None, d_length_scale, None, None, None, None, None,
                sink_grad(sink, dsink, ctx.needs_input_grad[11]), dmask if mask_grad else None, None, None,
                *varlen_no_grads(ctx, cu_seqlens))


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    is_causal: bool = False,
    causal_offset: int | None = None,
    length_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
    seqused_k: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    map_block: int = 128,
    causal_from_end: bool = False,
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
        seqused_k: the key lengths, as flash-attn's: int32 `(B,)` on the inputs' device, batch b
            attending to its first `clamp(seqused_k[b], 0, Nk)` keys only (the rest get weight
            0 and gradient 0 and are not counted in `n_i`); read in the kernels, never on the
            host. Combines with the causal mask, keys still counted from the tensor's start
            unless `causal_from_end`.
        window_size: a sliding window, flash-attn's `(left, right)`: keys
            `i + c - left <= j <= i + c + right`, `c` the causal offset (0 without one), -1 for
            a side without bound. Only the key tiles inside it are visited.
        softcap: None or `c > 0`: the logits `z` (after the scale and length scaling) become
            `c * tanh(z / c)` (Gemma 2), with its gradient.
        alibi_slopes: None or a float `(Hq,)` / `(B, Hq)` tensor: `-slope_h * |j - i - c|` is
            added to the logits (flash-attn's ALiBi, `c` as for the window), in the kernel. The
            slopes get no gradient.
        sink: None or a float `(Hq,)` tensor: one more logit per head in every row's softmax,
            with no value (gpt-oss's attention sinks); it may require grad.
        attn_mask: None, a bool mask (True = attend) or a float one (added to the logits after
            the cap; its -inf and lowest-value entries mask), broadcastable to `(B, Hq, Nq, Nk)`
            and read tile by tile through its strides, never expanded; a float mask may require
            grad. Tiles a boolean mask wholly masks are skipped.
        block_map, map_block: None, or bool flags broadcastable to `(B, Hq, cdiv(Nq, map_block),
            cdiv(Nk, map_block))`, `map_block` a multiple of 64 (FlexAttention's `BlockMask`
            in spirit): the blocks it clears are masked, and their tiles never visited.
        causal_from_end: with `seqused_k` and a causal mask, the offset (and the window and
            ALiBi's diagonal with it) counts from each batch's bottom-right corner instead, `j
            <= i + causal_offset + seqused_k[b] - Nq` (flash-attn's `cache_seqlens` with
            `causal=True` at offset 0: decoding into caches of different fill).

    Returns:
        `(B, Hq, Nq, Dv)` in q's dtype (and the lse). A row with no key gives 0 (lse -inf) and
        gradient 0.
    """
    check_inputs(q, k, v)
    check_modifiers(q, softcap, alibi_slopes, sink, q.shape[0])
    scale = default_scale(q, scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    alibi_offset = causal_offset or 0  # ALiBi counts from the causal diagonal, as the window does
    causal_offset, window_offset = window_bounds(causal_offset, check_window_size(window_size))
    from_end = DENSE_FROM_END if causal_from_end else ()
    out, lse = SoftmaxAttentionFunction.apply(q, k, v, scale, causal_offset, length_scale, seqused_k,
                                              window_offset, softcap, alibi_slopes, alibi_offset, sink,
                                              attn_mask, block_map, map_block, *from_end)
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
    causal_offset: int | None = None,
    causal_from_end: bool = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
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
        causal_offset: key j allowed for row i iff `j <= i + causal_offset`, per document;
            implies causal.
        causal_from_end: with a causal mask, the offset counts from each document's bottom-right
            corner instead, `j <= i + causal_offset + n_k - n_q` (`is_causal=True,
            causal_from_end=True` is flash-attn's varlen causal mask).
        window_size, softcap, alibi_slopes, sink: as `softmax_attention`, per document, around its
            causal diagonal (from its bottom-right corner with `causal_from_end`); the slopes
            `(Hq,)` or `(num_docs, Hq)`.

    Returns:
        `(total_q, Hq, Dv)` in q's dtype (and the lse). Document d's queries see document d's
        keys only; a row with no key gives 0 (lse -inf) and gradient 0.
    """
    check_inputs(q, k, v, varlen=True)
    check_modifiers(q, softcap, alibi_slopes, sink, cu_seqlens_q.numel() - 1)
    scale = default_scale(q, scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    alibi_offset = causal_offset or 0
    causal_offset, window_offset = window_bounds(causal_offset, check_window_size(window_size))
    out, lse = SoftmaxAttentionFunction.apply(
        q, k, v, scale, causal_offset, length_scale, None, window_offset, softcap, alibi_slopes,
        alibi_offset, sink, None, None, 128,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal_from_end),
    )
    return (out, lse) if return_lse else out
