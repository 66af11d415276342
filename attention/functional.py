"""The public attention function: argument checks, defaults and the choice of backend."""

from __future__ import annotations

import os

import torch

from . import checks, chunked, reference


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    normalizer: str = "softmax",
    alpha: float = 1.5,
    length_scale: float | torch.Tensor | None = None,
    causal_offset: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Scaled dot-product attention with a choice of normalizer.

    A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`: the positional
    arguments, the layout and their meanings are SDPA's, and with ``normalizer="softmax"`` and
    no ``length_scale`` the result equals SDPA's. Equivalent to the following (the reference,
    ``backend="reference"``; the other backends compute the same without the score matrix)::

        def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      normalizer="softmax", alpha=1.5, length_scale=None, causal_offset=None):
            scale = q.size(-1) ** -0.5 if scale is None else scale
            k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)     # GQA
            v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
            allowed = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool)
            if is_causal or causal_offset is not None:                  # j <= i + offset,
                allowed = allowed.tril(diagonal=causal_offset or 0)     # 0: top-left
            bias = 0.0
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                allowed = allowed & attn_mask                            # True = may attend
            elif attn_mask is not None:
                allowed = allowed & (attn_mask != -inf)
                bias = attn_mask.masked_fill(~allowed, 0)                # added after scaling
            scores = q @ k.transpose(-2, -1)
            if normalizer == "ssmax" or length_scale is not None:      # Nakanishi 2025
                s = torch.as_tensor(1.0 if length_scale is None else length_scale)
                n = allowed.sum(-1, keepdim=True)                       # keys row i may see
                scores = scores * s.view(-1, 1, 1) * n.log()            # s: float or (Hq,)
            z = (scale * scores + bias).masked_fill(~allowed, -inf)
            if normalizer in ("softmax", "ssmax"):
                p = torch.softmax(z, dim=-1)
            elif normalizer == "sparsemax":                             # Martins & Astudillo 2016
                p = clamp(z - tau, min=0)                               # tau: sum(p) = 1
            elif normalizer == "entmax":                                # Peters et al. 2019
                p = clamp((alpha - 1) * z - tau, min=0) ** (1 / (alpha - 1))
            p = p.masked_fill(~allowed.any(-1, keepdim=True), 0)        # empty rows give 0
            p = torch.dropout(p, dropout_p, train=True)
            return p @ v

    ``"entmax"`` is alpha-entmax exactly as ``entmax.entmax_bisect(z, alpha)`` defines it;
    ``alpha=2`` is sparsemax and ``alpha=1.5`` is ``entmax15``.

    Args:
        query: ``(B, Hq, Nq, D)``, or unbatched ``(Hq, Nq, D)``.
        key: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (needs ``enable_gqa=True`` when
            they differ).
        value: ``(B, Hkv, Nk, Dv)``.
        attn_mask: bool (True = may attend) or float (added to the logits, after length
            scaling; ``-inf`` masks), broadcastable to ``(B, Hq, Nq, Nk)``.
        dropout_p: dropout on the attention weights, applied whenever it is positive (as SDPA).
        is_causal: top-left causal mask, ``j <= i``; may be combined with ``attn_mask``.
        scale: logit scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq != Hkv``; query head ``h`` reads key head ``h // (Hq // Hkv)``.
        normalizer: ``"softmax"``, ``"ssmax"`` (Scalable-Softmax), ``"sparsemax"`` or ``"entmax"``.
        alpha: the entmax parameter, in ``(1, 2]``; used by ``"entmax"`` only.
        length_scale: ``s`` of length scaling: the ``q @ k^T`` term of row ``i`` in head ``h`` is
            multiplied by ``s_h * ln(n_i)``, ``n_i`` the number of keys row ``i`` may attend to
            after every mask. A float, or a tensor of shape ``(Hq,)`` that may require grad.
            ``"ssmax"`` defaults it to 1.0; with the other normalizers it gives their
            length-scaled variants.
        causal_offset: a shifted causal mask, key ``j`` allowed for row ``i`` iff
            ``j <= i + causal_offset`` (implies causal; ``is_causal`` is offset 0). ``Nk - Nq``
            aligns it bottom-right, as decoding with a KV cache needs; rows left with no key
            give 0.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(B, Hq, Nq, Dv)`` (or ``(Hq, Nq, Dv)``) in the dtype of ``query``. A row with no key
        to attend to gives 0, and gradient 0.
    """
    checks.check_qkv(query, key, value, checks.check_flag("enable_gqa", enable_gqa))
    checks.check_mask(attn_mask, query, key)
    is_causal = checks.check_flag("is_causal", is_causal)
    dropout_p = checks.check_dropout(dropout_p)
    scale = checks.check_scale(scale)
    normalizer = checks.check_choice("normalizer", normalizer, checks.NORMALIZERS)
    alpha = checks.check_alpha(alpha)
    length_scale = checks.check_length_scale(length_scale, query.shape[-3], query.device)
    if causal_offset is not None:
        if not isinstance(causal_offset, int) or isinstance(causal_offset, bool):
            raise TypeError(f"causal_offset must be None or an int; got {type(causal_offset).__name__}")
        is_causal = True
    backend = checks.check_choice("backend", backend, checks.BACKENDS)

    if normalizer == "ssmax":
        normalizer = "softmax"
        length_scale = 1.0 if length_scale is None else length_scale

    unbatched = query.dim() == 3
    if unbatched:  # a mask that broadcasts to (Hq, Nq, Nk) also broadcasts to (1, Hq, Nq, Nk)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)

    impl = _select_backend(backend, query, key, value, attn_mask, dropout_p, normalizer)
    out = impl(
        query, key, value, attn_mask, dropout_p, is_causal, scale,
        normalizer=normalizer, alpha=alpha, length_scale=length_scale, causal_offset=causal_offset or 0,
    )
    return out.squeeze(0) if unbatched else out


def _select_backend(backend, query, key, value, attn_mask, dropout_p, normalizer):
    """Which path runs. The paths share one signature, the reference's."""
    if backend == "reference" or query.shape[-2] == 0 or key.shape[-2] == 0:
        return reference.attention  # empty inputs: nothing to tile
    if backend == "torch":
        return chunked.attention
    why_not = _triton_unsupported(query, value, attn_mask, dropout_p)
    if backend == "triton":
        if why_not:
            raise ValueError(f"backend='triton' cannot run this call: {why_not}; use backend='torch' or 'auto'")
        return _triton_attention
    # auto: the kernels on a GPU when they cover the call, the blockwise torch path otherwise
    return _triton_attention if query.is_cuda and not why_not else chunked.attention


def _triton_unsupported(query, value, attn_mask, dropout_p) -> str:
    """Why the Triton kernels cannot serve a call, or "" when they can."""
    if attn_mask is not None:
        return "attn_mask is not supported by the kernels (is_causal is)"
    if dropout_p > 0:
        return "dropout_p > 0 is not supported by the kernels"
    if query.dtype == torch.float64:
        return "float64 is not supported by the kernels (float16, bfloat16, float32 are)"
    if max(query.shape[-1], value.shape[-1]) > 256:
        return f"head dims {query.shape[-1]}, {value.shape[-1]} exceed the kernels' 256"
    if query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on"):
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing longattn"
    return ""


def _triton_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
                      normalizer="softmax", alpha=1.5, length_scale=None, causal_offset=0):
    # triton is imported only when used
    offset = causal_offset if is_causal else None
    if normalizer == "softmax":
        from ..kernels.softmax import softmax_attention

        return softmax_attention(q, k, v, scale=scale, causal_offset=offset, length_scale=length_scale)
    from ..kernels.entmax import entmax_attention

    alpha = 2.0 if normalizer == "sparsemax" else alpha
    return entmax_attention(q, k, v, scale=scale, alpha=alpha, causal_offset=offset, length_scale=length_scale)
