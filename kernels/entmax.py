"""Tiled sparsemax / alpha-entmax attention (Peters et al. 2019; sparsemax: Martins & Astudillo
2016), forward and backward, with causal offsets, grouped-query heads, packed variable-length
documents and fused length scaling (SSMax's `s_h ln(n_i)`, Nakanishi 2025).

Layers, as in fla and `kernels/softmax.py`: the `@triton.jit` kernels (`kernels/entmax_fwd.py`,
`kernels/entmax_bwd.py`, re-exported here); the host launchers
`entmax_attention_fwd` and `entmax_attention_bwd`, wrapped as the custom ops
`longattn::entmax_attention_fwd` / `_bwd` (with fake implementations, so that
`torch.compile(fullgraph=True)` treats them as opaque calls, and vmap rules for `torch.func.vmap`);
`EntmaxAttentionFunction`, which wires them into autograd (in the form torch.func takes, its
gradients first-order only); and the entries `entmax_attention` and `entmax_varlen_attention`.
Semantics are `attention/reference.py` with normalizer "entmax" (alpha = 2 is sparsemax), the
algorithm that of `attention/chunked.py` (`entmax_threshold`), tile by tile::

    n_i = Nk if not causal else clamp(i + causal_offset + 1, 0, Nk)   # keys j <= i + causal_offset
    z_ij = scale * (s_h * ln(n_i) if length_scale is not None else 1) * q_i . k_j
    x_ij = (alpha - 1) * z_ij,  m_i = max_j x_ij                      # "entmax units"
    tau_i: sum_j [x_ij - m_i - tau_i]_+ ** (1 / (alpha - 1)) = 1
    p_ij = [x_ij - m_i - tau_i]_+ ** (1 / (alpha - 1)),  out_i = p_i @ v
    (a row with n_i = 0 gives 0 and saves m_i = 0, tau_i = +inf; one with a NaN or +inf logit,
    or only -inf ones, gives NaN, and NaN gradients where they depend on it)

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
Key lengths (`HAS_KEY_LENGTHS`, `seqused_k`) too: the tiles past a batch's are never visited,
so their flags stay clear. Masks and block maps as in `kernels/softmax.py` (the bias in entmax
units, times alpha - 1): where tiles may be skipped, the row max pass sets each tile's flag to
whether it is live, so no later pass, the backward's included, loads a skipped one.
"""

from __future__ import annotations

import torch
import triton

from .common import (
    DENSE_FROM_END,
    MIN_ALPHA,
    causal_args,
    check_inputs,
    check_modifiers,
    check_window_size,
    default_scale,
    device_capability,
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
from .entmax_bwd import entmax_attention_bwd_kernel_dkdv, entmax_attention_bwd_kernel_dq
from .entmax_fwd import entmax_attention_fwd_kernel
from .masks import count_allowed_keys, mask_args, mask_grad_args, reduce_mask_grad
from .masks import (
    count_allowed_keys_kernel as count_allowed_keys_kernel,  # its launches are this family's too
)

# Newton's method on G(t) = ||[x - max - t]_+||_p = 1 from t = -1 rises monotonically to the root
# (`attention/chunked.py`), so a program stops once no row of its block moves by more than
# NEWTON_TOL; the cap only guards against pathological rounding (a handful of passes suffice:
# `test_newton_converges_in_few_passes`).
MAX_NEWTON_STEPS = 30
NEWTON_TOL = 1e-6
# Testing hook: True replaces every Newton step by the safeguard's bisection, which real inputs
# never reach. The launcher reads it, and MAX_NEWTON_STEPS, at each call, so a test sets them with
# `monkeypatch.setattr` (tests/test_triton_entmax.py).
BISECT_ONLY = False


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _tile_blocks(D: int, Dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """`(BLOCK_M, BLOCK_N)` of the forward's tiles, the blocks its tile flags refer to."""
    return tile_config(max(padded_dim(D), padded_dim(Dv)), dtype)[:2]


def _tile_flags_shape(q, v, cu_seqlens_q=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """`(B * Hq, query blocks, key tiles)` of the forward's int8 tile flags, 1 where a (query
    block, key tile) holds a non-zero weight: Nq Nk / 2048 bytes per (batch, head) in 16 bits
    (64 x 32 tiles), Nq Nk / 1024 in fp32. Varlen: B counts documents, the blocks span the
    longest one."""
    B, Hq, _, D, _, _, Dv, grid_nq, grid_nk = shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    BLOCK_M, BLOCK_N = _tile_blocks(D, Dv, q.dtype)
    return B * Hq, triton.cdiv(grid_nq, BLOCK_M), triton.cdiv(grid_nk, BLOCK_N)


def entmax_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alpha: float,
    causal_offset: int | None, length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, alphas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q` (B, Hq, Nq, D), `k` (B, Hkv, Nk, D), `v` (B, Hkv, Nk, Dv), any strides; `alpha` in
    (1, 2] (2: sparsemax), or `alphas`, one per query head (`(Hq,)` fp32, read in-kernel, so a
    changing alpha never recompiles; `alpha` is then not read). `causal_offset`: None (no mask)
    or key j allowed for row i iff j <= i + causal_offset.
    `length_scale`: None, a float or a `()` / `(Hq,)` tensor. The Newton
    passes stop at `MAX_NEWTON_STEPS` (read at each call, as is the testing hook `BISECT_ONLY`).
    `seqused_k`: the key lengths, as `softmax_attention_fwd`'s (the tiles past them are never
    visited and stay unflagged), and `window_offset`, a sliding window's left edge, likewise;
    `softcap` and ALiBi (`alibi_slopes`, `alibi_offset`) as `softmax_attention_fwd`'s. `sink`:
    None or `(Hq,)` logits, one more term of every row's sum with no value (it joins the max
    and the threshold search, its weight goes nowhere). `attn_mask` and the block map
    (`block_map`, `map_block`) as `softmax_attention_fwd`'s: the tiles they skip are never
    flagged, so no pass of the forward or backward visits them.

    Returns `out` (B, Hq, Nq, Dv) in q's dtype and, for the backward, `row_max` and `tau`
    (B, Hq, Nq) in fp32, both in entmax units: the weights are
    `[x - row_max - tau]_+ ** (1 / (alpha - 1))`, normalised; a row with no key has 0 and +inf;
    and the int8 `tile_flags` (`_tile_flags_shape`) of the tiles with a non-zero weight.
    Varlen as in `softmax_attention_fwd` (`causal_from_end` too): packed `(total, H, D)` inputs,
    `out` (total_q, Hq, Dv), `row_max` and `tau` (Hq, total_q)."""
    varlen = cu_seqlens_q is not None
    seqused_k = key_lengths(seqused_k, k, varlen)
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, _ = shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out_shape, row_shape = forward_shapes(q, v, varlen)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    row_max = torch.empty(row_shape, dtype=torch.float32, device=q.device)
    tau = torch.empty(row_shape, dtype=torch.float32, device=q.device)
    # zeros: tiles no program visits (past a causal block's last key) read as empty
    flags_shape = _tile_flags_shape(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    tile_flags = torch.zeros(flags_shape, dtype=torch.int8, device=q.device)
    if B * Hq * grid_nq == 0:
        return out, row_max, tau, tile_flags
    is_causal, offset, from_end = causal_args(causal_offset, Nq, Nk, causal_from_end)
    has_window, window = window_args(window_offset, Nq, Nk, from_end)
    # per-head alphas: the programs scale the cap and the slopes by their own head's
    unit = alpha - 1.0 if alphas is None else 1.0
    mods = logit_modifiers(softcap, alibi_slopes, alibi_offset, B, Hq, Nq, Nk, from_end, unit, q.device)
    alibi, modifier_args = mods.pop("alibi"), (mods.pop("alibi_offset"), mods.pop("softcap"))
    sink = sink_vector(sink, Hq, q.device)
    masking = mask_args(attn_mask, block_map, map_block, B, Hq, Nq, Nk, q.device, varlen)
    counts = count_allowed_keys(masking, seqused_k, B, Hq, Nq, Nk, is_causal, offset, from_end, has_window,
                                window, q.device)
    BLOCK_D, BLOCK_DV = padded_dim(D), padded_dim(Dv)
    BLOCK_M, BLOCK_N, num_warps, num_stages = tile_config(max(BLOCK_D, BLOCK_DV), q.dtype)
    if q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) == 128:
        # 8 warps capped ptxas at 128 registers here and spilled 8-56 bytes on sm_80 (the tile
        # flags' branches keep more alive than softmax's loop); 4 warps take 198-208, no spill.
        num_warps = 4
    capability = device_capability(q.device)
    modified = softcap is not None or alibi_slopes is not None or sink is not None
    if ((varlen or seqused_k is not None or modified) and capability is not None and capability < 90
            and q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) <= 64):
        # Varlen before Hopper, D <= 64 in 16 bits: 4 warps left a 24-byte stack frame on sm_80
        # (alpha 1.25, causal, length scaling; 168 registers); 8 warps take 123, none. The
        # blocks, which the tile flags refer to, stay. Key lengths likewise (sparsemax, bf16:
        # 128 registers and an 8-byte frame with 4 warps), and softcapping, ALiBi and sinks
        # (alpha 1.25, bf16: 168 registers and a 16-byte frame).
        num_warps = 8
    if masking.mask is not None and q.dtype != torch.float32:
        # A mask tile is loaded in the dot's layout, 16 entries a thread at 4 warps: ptxas spilled
        # 24-360 bytes (sm_80 and sm_90, D = 64 and 128); 8 warps take 203-246 registers, none.
        num_warps = 8
    entmax_attention_fwd_kernel[(triton.cdiv(grid_nq, BLOCK_M), B * Hq)](
        q, k, v, out, row_max, tau, tile_flags, length_scale_vector(length_scale, Hq, q.device),
        cu_seqlens_q, cu_seqlens_k, seqused_k, alibi, sink, alphas,
        *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(out, varlen),
        Hq, Hq // Hkv, Nq, Nk, D, Dv, float(scale), float(alpha), offset, window, *modifier_args,
        *flags_shape[1:],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        IS_CAUSAL=is_causal, CAUSAL_FROM_END=from_end, HAS_WINDOW=has_window,
        DOT_PRECISION=dot_precision(q.dtype), HAS_SINK=sink is not None, **mods,
        **masking.kernel_args(counts),
        MAX_STEPS=MAX_NEWTON_STEPS, TOL=NEWTON_TOL, BISECT_ONLY=BISECT_ONLY,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, row_max, tau, tile_flags


def entmax_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_max: torch.Tensor, tau: torch.Tensor, tile_flags: torch.Tensor, scale: float, alpha: float,
    causal_offset: int | None,
    length_scale=None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, mask_grad: bool = False,
    alphas: torch.Tensor | None = None, alpha_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `entmax_attention_fwd` from the upstream `do`, the weights recomputed from
    the saved `row_max` and `tau`, the tiles without weight (`tile_flags` clear) skipped. Returns
    `dq`, `dk`, `dv` in the inputs' dtypes, `ds`, the gradient of the `(Hq,)` length scale in
    fp32 (None without length scaling), `dsink`, the sink's (None without one), and `dmask`, with
    `mask_grad` a float mask's, in its shape and dtype (None otherwise). Varlen, `seqused_k`,
    `window_offset`, `softcap`, ALiBi, `sink`, `attn_mask` and the block map as in
    `entmax_attention_fwd`, the tensors in its packed layouts (the keys outside the first two get
    gradient 0; the slopes get none). `alphas` as the forward's; with `alpha_grad`, the last
    result is their `(Hq,)` fp32 gradient (None otherwise)."""
    varlen = cu_seqlens_q is not None
    seqused_k = key_lengths(seqused_k, k, varlen)
    B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk = shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    is_causal, offset, from_end = causal_args(causal_offset, Nq, Nk, causal_from_end)
    has_window, window = window_args(window_offset, Nq, Nk, from_end)
    unit = alpha - 1.0 if alphas is None else 1.0  # as the forward's
    mods = logit_modifiers(softcap, alibi_slopes, alibi_offset, B, Hq, Nq, Nk, from_end, unit, q.device)
    alibi, modifier_args = mods.pop("alibi"), (mods.pop("alibi_offset"), mods.pop("softcap"))
    sink = sink_vector(sink, Hq, q.device)
    s = length_scale_vector(length_scale, Hq, q.device)
    # The tiles the mask and map skip are unflagged: the passes below visit none of them. n_i
    # only scales the logits: without length scaling the backward needs no count.
    masking = mask_args(attn_mask, block_map, map_block, B, Hq, Nq, Nk, q.device, varlen)
    counts = None if s is None else count_allowed_keys(masking, seqused_k, B, Hq, Nq, Nk, is_causal, offset,
                                                       from_end, has_window, window, q.device)
    dmask, dmask_args = mask_grad_args(attn_mask, mask_grad, B, Hq, Nq, Nk)
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
    common = {"BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "IS_CAUSAL": is_causal, "CAUSAL_FROM_END": from_end,
              "HAS_WINDOW": has_window, "DOT_PRECISION": dot_precision(q.dtype), "num_warps": num_warps,
              "num_stages": num_stages, **mods, **masking.kernel_args(counts)}
    scalars = (float(scale), float(alpha), offset, window, *modifier_args)
    qkv_strides = (*strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(do, varlen))

    delta = torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ds_row = None if s is None else torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    dsink_row = None if sink is None else torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    alpha_grad = alpha_grad and alphas is not None
    dalpha_row = torch.empty(row_max.shape, dtype=torch.float32, device=q.device) if alpha_grad else None
    capability = device_capability(q.device)
    if B * Hq * grid_nq > 0:  # first: it stores delta for dK/dV
        # dQ at D <= 64 in 16 bits: 4 warps spilled 8 bytes on sm_80 (uneven lengths, length
        # scaling); 8 warps take 170 registers and none
        dq_warps = 8 if q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) <= 64 else num_warps
        # The float mask's gradient at D = 128 in 16 bits: holding 64 rows spilled 96-112 bytes
        # (alpha 1.25, causal, length scaling; 1 or 2 stages, 4 or 8 warps alike); 32 rows,
        # within the forward's 64-row flag blocks, take 216, none, but are too few for Hopper's
        # wgmma (64 a warpgroup): this one dQ runs on mma.sync there.
        dq_rows = BLOCK_HELD
        if dmask is not None and q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) == 128:
            dq_rows = 32
        # Alpha's gradient (three more row sums and a log per element) at D = 128 in 16 bits:
        # 64 rows took 255 registers and an 8-byte stack frame on sm_80, dense and varlen alike;
        # 32 rows build clean there. sm_90 keeps 64 (no spill, and its wgmma needs them).
        if (alpha_grad and q.dtype != torch.float32 and max(BLOCK_D, BLOCK_DV) == 128
                and capability is not None and capability < 90):
            dq_rows = 32
        row_grid = (triton.cdiv(grid_nq, dq_rows), B * Hq)
        entmax_attention_bwd_kernel_dq[row_grid](
            q, k, v, do, row_max, tau, tile_flags, delta, dq, ds_row, dsink_row, dalpha_row, s, cu_seqlens_q,
            cu_seqlens_k, seqused_k, alibi, sink, alphas, *qkv_strides, *strides(dq, varlen),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, *scalars, *n_blocks,
            BLOCK_M=dq_rows, BLOCK_N=BLOCK_STREAMED, HAS_SINK=sink is not None, ALPHA_GRAD=alpha_grad,
            **{**common, "num_warps": dq_warps}, **dmask_args, FLAG_BLOCK_M=BLOCK_HELD,
        )

    # with key lengths, the key blocks past a batch's return at once: their dK, dV stay 0
    new_grad = torch.empty if seqused_k is None else torch.zeros
    dk = new_grad(k.shape, dtype=k.dtype, device=k.device)
    dv = new_grad(v.shape, dtype=v.dtype, device=v.device)
    # Before Hopper, dK/dV holds 32 keys rather than 64 at D <= 64 in 16 bits: with 64, ptxas
    # spilled 8-16 bytes on sm_80 for every alpha (u and the support test keep more alive than
    # softmax's p). sm_90 keeps 64, which its warpgroup MMA needs and which builds without spills
    # there (tests/test_kernel_builds.py checks both).
    keys_held, rows_streamed = BLOCK_HELD, BLOCK_STREAMED
    if (capability is not None and capability < 90 and q.dtype != torch.float32
            and max(BLOCK_D, BLOCK_DV) <= 64):
        keys_held = 32
    # Varlen on Hopper, D = 128 in 16 bits: dK/dV spilled 8 bytes at 255 registers (alpha 1.25,
    # causal, length scaling) with 4 or 8 warps and 1-3 stages alike; streaming 16 query rows
    # rather than 32 takes 216, none, and keeps wgmma (64 keys held). 16 divides the flags'
    # FLAG_BLOCK_M rows, so the flags still cover each streamed tile. Softcapping and ALiBi
    # likewise (24 bytes of stack at 255 registers, alpha 1.25, causal, length scaling, bf16).
    modified = softcap is not None or alibi_slopes is not None
    if masking.mask is not None and q.dtype != torch.float32:
        rows_streamed = 16  # the mask's transposed tile: 32 rows spilled 8 bytes (sm_80, sparsemax, bf16)
    if ((varlen or modified) and capability is not None and capability >= 90 and q.dtype != torch.float32
            and max(BLOCK_D, BLOCK_DV) == 128):
        rows_streamed = 16
    if B * Hkv * grid_nk > 0:
        entmax_attention_bwd_kernel_dkdv[(triton.cdiv(grid_nk, keys_held), B * Hkv)](
            q, k, v, do, row_max, tau, tile_flags, delta, dk, dv, s, cu_seqlens_q, cu_seqlens_k,
            seqused_k, alibi, alphas, *qkv_strides, *strides(dk, varlen), *strides(dv, varlen),
            Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, *scalars, *n_blocks,
            BLOCK_M=rows_streamed, BLOCK_N=keys_held, FLAG_BLOCK_M=BLOCK_HELD, FLAG_BLOCK_N=BLOCK_STREAMED,
            **common,
        )
    ds = None if s is None else per_head_from_rows(ds_row, varlen)
    dsink = None if sink is None else per_head_from_rows(dsink_row, varlen)
    dalpha = None if dalpha_row is None else per_head_from_rows(dalpha_row, varlen)
    return dq, dk, dv, ds, dsink, reduce_mask_grad(dmask, attn_mask), dalpha


# ----------------------------------------------------------------------------------------------
# torch custom ops: torch.compile traces through them without graph breaks
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::entmax_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alpha: float, causal_offset: int | None,
    length_scale: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    causal_from_end: bool = False, seqused_k: torch.Tensor | None = None, window_offset: int | None = None,
    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, alphas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return entmax_attention_fwd(q, k, v, scale, alpha, causal_offset, length_scale,
                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal_from_end,
                                seqused_k=seqused_k, window_offset=window_offset, softcap=softcap,
                                alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, sink=sink,
                                attn_mask=attn_mask, block_map=block_map, map_block=map_block, alphas=alphas)


@_fwd_op.register_fake
def _(q, k, v, scale, alpha, causal_offset, length_scale, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0, causal_from_end=False, *modifiers):
    out_shape, row_shape = forward_shapes(q, v, cu_seqlens_q is not None)
    flags = q.new_empty(_tile_flags_shape(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k), dtype=torch.int8)
    return (q.new_empty(out_shape), q.new_empty(row_shape, dtype=torch.float32),
            q.new_empty(row_shape, dtype=torch.float32), flags)


@torch.library.custom_op("longattn::entmax_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_max: torch.Tensor,
    tau: torch.Tensor, tile_flags: torch.Tensor, scale: float, alpha: float, causal_offset: int | None,
    length_scale: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, causal_from_end: bool = False,
    seqused_k: torch.Tensor | None = None, window_offset: int | None = None, softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, alibi_offset: int | None = None,
    sink: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None, map_block: int = 128, mask_grad: bool = False,
    alphas: torch.Tensor | None = None, alpha_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, ds, dsink, dmask, dalpha = entmax_attention_bwd(
        do, q, k, v, row_max, tau, tile_flags, scale, alpha, causal_offset, length_scale, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal_from_end, seqused_k=seqused_k,
        window_offset=window_offset, softcap=softcap, alibi_slopes=alibi_slopes, alibi_offset=alibi_offset,
        sink=sink, attn_mask=attn_mask, block_map=block_map, map_block=map_block, mask_grad=mask_grad,
        alphas=alphas, alpha_grad=alpha_grad)
    return (dq, dk, dv, op_optional_grad(q, ds), op_optional_grad(q, dsink), op_optional_grad(q, dmask),
            op_optional_grad(q, dalpha))


@_bwd_op.register_fake
def _(do, q, k, v, row_max, tau, tile_flags, scale, alpha, causal_offset, length_scale, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, causal_from_end=False, seqused_k=None,
      window_offset=None, softcap=None, alibi_slopes=None, alibi_offset=None, sink=None, attn_mask=None,
      block_map=None, map_block=128, mask_grad=False, alphas=None, alpha_grad=False):
    dalpha = q.new_empty(q.shape[1] if alpha_grad and alphas is not None else 0, dtype=torch.float32)
    return (*fake_gradients(q, k, v, length_scale, sink, attn_mask if mask_grad else None), dalpha)


_fwd_op.register_vmap(vmap_by_loop(_fwd_op))
_bwd_op.register_vmap(vmap_by_loop(_bwd_op))


# ----------------------------------------------------------------------------------------------
# Autograd and the entry points
# ----------------------------------------------------------------------------------------------


class EntmaxAttentionFunction(torch.autograd.Function):
    """Wires the launchers (through their custom ops) into autograd. `seqused_k` (dense mode's key
    lengths), `window_offset`, `softcap`, `alibi_slopes`, `alibi_offset`, `sink`, `attn_mask` and
    `block_map` may be None (the last two dense only; a float mask may require grad); the
    trailing arguments, `(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    causal_from_end)`, are given in varlen mode, and in dense mode as `DENSE_FROM_END` for
    bounds counted from each batch's end only.
    Forward and `setup_context` apart, as torch.func needs; its vmap rule is generated from the
    ops' (`vmap_by_loop`). The forward returns the backward's statistics too (torch.func saves
    only what `setup_context` sees); they are not differentiable, and `entmax_attention` returns
    the output alone."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, alpha, causal_offset, length_scale, seqused_k, window_offset, softcap,
                alibi_slopes, alibi_offset, sink, attn_mask, block_map, map_block, *varlen):
        s = length_scale_vector(length_scale, q.shape[1], q.device)
        alphas = alpha_vector(alpha, q.shape[1], q.device)
        return torch.ops.longattn.entmax_attention_fwd(q, k, v, scale, _float_alpha(alpha), causal_offset, s,
                                                       *varlen, seqused_k=seqused_k,
                                                       window_offset=window_offset, softcap=softcap,
                                                       alibi_slopes=alibi_slopes, alibi_offset=alibi_offset,
                                                       sink=sink, attn_mask=attn_mask, block_map=block_map,
                                                       map_block=map_block, alphas=alphas)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, alpha, causal_offset, length_scale, seqused_k, window_offset, softcap, alibi_slopes, \
            alibi_offset, sink, attn_mask, block_map, map_block, *varlen = inputs
        _, row_max, tau, tile_flags = output
        s = length_scale_vector(length_scale, q.shape[1], q.device)  # (Hq,): cheaper to redo than return
        alphas = alpha_vector(alpha, q.shape[1], q.device)
        ctx.save_for_backward(q, k, v, row_max, tau, tile_flags, s, alphas, seqused_k, alibi_slopes, sink,
                              attn_mask, block_map, *save_varlen_args(ctx, tuple(varlen)))
        ctx.scale, ctx.alpha = scale, _float_alpha(alpha)
        ctx.alpha_meta = (alpha.shape, alpha.dtype) if torch.is_tensor(alpha) else None
        ctx.causal_offset, ctx.window_offset = causal_offset, window_offset
        ctx.softcap, ctx.alibi_offset, ctx.map_block = softcap, alibi_offset, map_block
        save_length_scale_meta(ctx, length_scale)
        ctx.mark_non_differentiable(row_max, tau, tile_flags)

    @staticmethod
    def backward(ctx, dout, _drow_max, _dtau, _dflags):
        q, k, v, row_max, tau, tile_flags, s, alphas, seqused_k, alibi_slopes, sink, attn_mask, block_map, \
            *cu_seqlens = ctx.saved_tensors
        mask_grad = bool(ctx.needs_input_grad[13]) and attn_mask is not None and attn_mask.is_floating_point()
        alpha_grad = ctx.alpha_meta is not None and bool(ctx.needs_input_grad[4])
        # No graph through the op: custom ops wrap themselves for autograd in a Function
        # torch.func refuses. first_order_only gives the gradients theirs.
        with torch.no_grad():
            grads = torch.ops.longattn.entmax_attention_bwd(
                dout, q, k, v, row_max, tau, tile_flags, ctx.scale, ctx.alpha, ctx.causal_offset, s,
                *varlen_launch_args(ctx, cu_seqlens), seqused_k=seqused_k, window_offset=ctx.window_offset,
                softcap=ctx.softcap, alibi_slopes=alibi_slopes, alibi_offset=ctx.alibi_offset, sink=sink,
                attn_mask=attn_mask, block_map=block_map, map_block=ctx.map_block, mask_grad=mask_grad,
                alphas=alphas, alpha_grad=alpha_grad,
            )
        dq, dk, dv, ds, dsink, dmask, dalpha = first_order_only(
            "longattn::entmax_attention_bwd", grads, (dout, q, k, v, s, sink, attn_mask, alphas))
        d_length_scale = length_scale_grad(ctx, ds, ctx.needs_input_grad[6])
        d_alpha = None
        if alpha_grad:
            shape, dtype = ctx.alpha_meta
            d_alpha = dalpha.sum_to_size(shape).to(dtype)  # () sums over heads
        return (dq, dk, dv, None, d_alpha, None, d_length_scale, None, None, None, None, None,
                sink_grad(sink, dsink, ctx.needs_input_grad[12]), dmask if mask_grad else None, None, None,
                *varlen_no_grads(ctx, cu_seqlens))


def alpha_vector(alpha, num_heads: int, device) -> torch.Tensor | None:
    """None for a float alpha (a launch argument, its special cases compiled in), or a tensor
    alpha as the kernels read it: a contiguous fp32 `(Hq,)` tensor, one per query head."""
    if not torch.is_tensor(alpha):
        return None
    return alpha.detach().to(device, torch.float32).expand(num_heads).contiguous()


def _float_alpha(alpha) -> float:
    """The launch's float alpha: 0 (not read) where the kernels read per-head alphas."""
    return 0.0 if torch.is_tensor(alpha) else float(alpha)


def _check_alpha(alpha, num_heads: int):
    """A float in `[MIN_ALPHA, 2]`, or a `()` / `(Hq,)` floating tensor (its values not read on
    the host: the public functions check them)."""
    if torch.is_tensor(alpha):
        if not alpha.dtype.is_floating_point:
            raise TypeError(f"alpha tensor must be floating; got {alpha.dtype}")
        if alpha.shape not in ((), (num_heads,)):
            raise ValueError(f"alpha must have shape ({num_heads},) (one per query head) or (); got "
                             f"{tuple(alpha.shape)}")
        return alpha
    alpha = float(alpha)
    if not MIN_ALPHA <= alpha <= 2.0:
        raise ValueError(f"alpha must be in [{MIN_ALPHA}, 2] (closer to 1, float32 cannot resolve the "
                         f"threshold: use softmax); got {alpha}")
    return alpha


def entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    alpha: float | torch.Tensor = 1.5,
    is_causal: bool = False,
    causal_offset: int | None = None,
    length_scale: float | torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    map_block: int = 128,
    causal_from_end: bool = False,
) -> torch.Tensor:
    """alpha-entmax attention (sparsemax at alpha = 2) by the tiled Triton kernels (the Triton
    interpreter on CPU, with `TRITON_INTERPRET=1` set before longattn is imported).

    Args:
        q: `(B, Hq, Nq, D)`; k: `(B, Hkv, Nk, D)`; v: `(B, Hkv, Nk, Dv)`, `Hq` a multiple of `Hkv`
            (query head h reads kv head `h // (Hq // Hkv)`), `D, Dv <= 256`, float16, bfloat16
            or float32, any strides.
        scale: logit scale, default `D ** -0.5`.
        alpha: the entmax parameter, any float in `[1.01, 2]` (MIN_ALPHA); 2 is sparsemax, 1.5 is entmax15
            (those two need no pow per element). Or a `()` / `(Hq,)` floating tensor, one per query
            head, that may require grad (its values are not checked here: the public functions do).
        is_causal: top-left causal mask, `j <= i`; same as `causal_offset=0`.
        causal_offset: key j allowed for row i iff `j <= i + causal_offset`; implies causal.
            `Nk - Nq` aligns bottom-right (decoding with a KV cache).
        length_scale: `s` of length scaling (SSMax's, Nakanishi 2025): row i of head h has its
            `q . k` multiplied by `s_h * ln(n_i)`, `n_i` the keys it may see. A float, or a
            `()` / `(Hq,)` tensor that may require grad.
        seqused_k, causal_from_end: the key lengths, as `softmax_attention`'s: int32 `(B,)`,
            batch b attending to its first `clamp(seqused_k[b], 0, Nk)` keys only, and the
            bounds counted from each batch's end.
        window_size, softcap, alibi_slopes, sink: a sliding window, logit soft-capping, ALiBi
            and attention sinks, as `softmax_attention`'s; the sink enters the threshold search
            like any other logit.
        attn_mask, block_map, map_block: a mask and a block map, as `softmax_attention`'s.

    Returns:
        `(B, Hq, Nq, Dv)` in q's dtype. A row with no key gives 0 and gradient 0.
    """
    check_inputs(q, k, v)
    check_modifiers(q, softcap, alibi_slopes, sink, q.shape[0])
    scale = default_scale(q, scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    alibi_offset = causal_offset or 0  # ALiBi counts from the causal diagonal, as the window does
    causal_offset, window_offset = window_bounds(causal_offset, check_window_size(window_size))
    from_end = DENSE_FROM_END if causal_from_end else ()
    return EntmaxAttentionFunction.apply(q, k, v, scale, _check_alpha(alpha, q.shape[1]), causal_offset,
                                         length_scale,
                                         seqused_k, window_offset, softcap, alibi_slopes, alibi_offset,
                                         sink, attn_mask, block_map, map_block, *from_end)[0]


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
    causal_offset: int | None = None,
    causal_from_end: bool = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha-entmax attention over packed documents (flash-attn's varlen layout): arguments as
    `softmax_varlen_attention`, plus `alpha` as `entmax_attention`. Returns `(total_q, Hq, Dv)`."""
    check_inputs(q, k, v, varlen=True)
    check_modifiers(q, softcap, alibi_slopes, sink, cu_seqlens_q.numel() - 1)
    scale = default_scale(q, scale)
    if causal_offset is None and is_causal:
        causal_offset = 0
    alibi_offset = causal_offset or 0
    causal_offset, window_offset = window_bounds(causal_offset, check_window_size(window_size))
    return EntmaxAttentionFunction.apply(
        q, k, v, scale, _check_alpha(alpha, q.shape[1]), causal_offset, length_scale, None, window_offset,
        softcap,
        alibi_slopes, alibi_offset, sink, None, None, 128,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal_from_end),
    )[0]
