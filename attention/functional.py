"""The public attention function (argument checks, defaults, the call handed to the dispatch)
and the attention weights it computes."""

from __future__ import annotations

import torch

from . import checks, dispatch, reference
from .block_map import BlockMap


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
    alpha: float | torch.Tensor = 1.5,
    length_scale: float | torch.Tensor | None = None,
    causal_offset: int | str | None = None,
    seqused_k: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    block_map: BlockMap | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Scaled dot-product attention with a choice of normalizer.

    A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`: the positional
    arguments, the layout and their meanings are SDPA's, and with ``normalizer="softmax"`` and
    no ``length_scale`` the result equals SDPA's. Equivalent to the following, which runs as
    written (the backends compute the same; all but ``"reference"`` without the score matrix)::

        import torch
        from torch import clamp, inf

        def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      normalizer="softmax", alpha=1.5, length_scale=None, causal_offset=None,
                      seqused_k=None, window_size=None, softcap=None, alibi_slopes=None, sink=None,
                      block_map=None):
            scale = q.size(-1) ** -0.5 if scale is None else scale
            k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)     # GQA
            v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
            i, j = torch.arange(q.size(-2)).view(-1, 1), torch.arange(k.size(-2))
            n_k = k.size(-2) if seqused_k is None else seqused_k.clamp(0, k.size(-2)).view(-1, 1, 1, 1)
            c = n_k - q.size(-2) if causal_offset == "bottom_right" else causal_offset or 0
            allowed = j < n_k                                           # batch b: its first keys
            if is_causal or causal_offset is not None:                  # j <= i + c, 0: top-left
                allowed = allowed & (j <= i + c)
            if window_size is not None:                                 # (left, right), -1: unbounded
                left, right = window_size                               # around the causal diagonal
                allowed = allowed & ((left < 0) | (j >= i + c - left)) & ((right < 0) | (j <= i + c + right))
            if block_map is not None:                                   # its cleared blocks: masked
                allowed = allowed & block_map.as_mask(q.size(-2), k.size(-2))
            bias = 0.0
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                allowed = allowed & attn_mask                            # True = may attend
            elif attn_mask is not None:                                  # -inf and finfo.min mask
                allowed = allowed & ~(attn_mask <= torch.finfo(attn_mask.dtype).min)
                bias = attn_mask.masked_fill(~allowed, 0)                # added after scaling
            scores = q @ k.transpose(-2, -1)
            if normalizer == "ssmax" or length_scale is not None:      # Nakanishi 2025
                s = torch.as_tensor(1.0 if length_scale is None else length_scale, dtype=q.dtype)
                n = allowed.sum(-1, keepdim=True).to(q.dtype)           # keys row i may see
                scores = scores * s.view(-1, 1, 1) * n.clamp(min=1).log()   # s: float or (Hq,)
            z = scale * scores
            if softcap is not None:                                     # Gemma 2's cap
                z = softcap * torch.tanh(z / softcap)
            if alibi_slopes is not None:                                # (Hq,) or (B, Hq)
                z = z - alibi_slopes.view(-1, q.size(-3), 1, 1) * (j - i - c).abs()
            z = (z + bias).masked_fill(~allowed, -inf)
            if sink is not None:                                        # a logit per head, no value
                z = torch.cat([z, sink.view(-1, 1, 1).expand(*z.shape[:-1], 1)], dim=-1)
            if normalizer in ("softmax", "ssmax"):
                p = torch.softmax(z, dim=-1)
            else:  # sparsemax (Martins & Astudillo 2016) is entmax at alpha 2 (Peters et al. 2019)
                a = torch.as_tensor(2.0 if normalizer == "sparsemax" else alpha, dtype=q.dtype)
                a = a.view(-1, 1, 1)                                    # alpha: float or (Hq,)
                x = (a - 1) * (z - z.amax(-1, keepdim=True))            # row max at 0
                lo, hi = torch.full_like(x[..., :1], -1.0), torch.zeros_like(x[..., :1])
                for _ in range(100):                                    # bisect for tau:
                    tau = (lo + hi) / 2                                 # sum_j p_j = 1
                    above = (clamp(x - tau, min=0) ** (1 / (a - 1))).sum(-1, keepdim=True) >= 1
                    lo, hi = torch.where(above, tau, lo), torch.where(above, hi, tau)
                p = clamp(x - tau, min=0) ** (1 / (a - 1))
                p = p / p.sum(-1, keepdim=True)
            p = p[..., :k.size(-2)]                                     # the sink's share: no value
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
            scaling), broadcastable to ``(B, Hq, Nq, Nk)``. A float entry of ``-inf`` or of its
            dtype's lowest finite value, ``torch.finfo(attn_mask.dtype).min`` (Hugging Face's
            padding), masks its key: weight 0, not counted in ``n_i``. A float mask that
            requires grad gets its gradient. The kernels read it tile by tile through its
            strides (a broadcast dim costs nothing) and skip the tiles a bool mask wholly masks.
        dropout_p: dropout on the attention weights, applied whenever it is positive (as SDPA).
        is_causal: top-left causal mask, ``j <= i``; may be combined with ``attn_mask``.
        scale: logit scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq != Hkv``; query head ``h`` reads key head ``h // (Hq // Hkv)``.
        normalizer: ``"softmax"``, ``"ssmax"`` (Scalable-Softmax), ``"sparsemax"``, ``"entmax"``,
            or any name added to the registry (``longattn.attention.normalizers``).
        alpha: the entmax parameter, in ``[1.01, 2]`` (closer to 1, use softmax); read by
            ``"entmax"`` only. A float, or a tensor of shape ``()`` or ``(Hq,)``, one per query
            head, that may require grad (its gradient is exact). A float 1.5 or 2 takes the
            cheap special paths; a tensor takes the general one whatever its values.
        length_scale: ``s`` of length scaling: the ``q @ k^T`` term of row ``i`` in head ``h`` is
            multiplied by ``s_h * ln(n_i)``, ``n_i`` the number of keys row ``i`` may attend to
            after every mask. A float, or a tensor of shape ``(Hq,)`` that may require grad.
            ``"ssmax"`` defaults it to 1.0; with the other normalizers it gives their
            length-scaled variants.
        causal_offset: a shifted causal mask, key ``j`` allowed for row ``i`` iff
            ``j <= i + causal_offset`` (implies causal; ``is_causal`` is offset 0). ``Nk - Nq``,
            or ``"bottom_right"`` for short, aligns it bottom-right, as decoding with a KV cache
            needs (with ``seqused_k``, each batch's ``seqused_k[b] - Nq``); rows left with no
            key give 0.
        seqused_k: per-batch key lengths (flash-attn's ``seqused_k``), an int32 or int64 tensor
            of shape ``(B,)`` (``(1,)`` unbatched) on the inputs' device: batch ``b`` attends to
            its first ``seqused_k[b]`` keys only (values are clamped to ``[0, Nk]`` and not read
            on the host). A right-padded batch or a partly filled KV cache without a dense mask;
            the other masks apply too, and the causal offset counts from the tensors' start
            unless it is ``"bottom_right"``.
        window_size: a sliding window, flash-attn's ``(left, right)``: row ``i`` attends to keys
            ``i + c - left <= j <= i + c + right``, ``c`` the causal offset (0 without one, so
            ``is_causal=True, window_size=(w - 1, 0)`` is Mistral's window of ``w`` keys), ``-1``
            for a side without bound; combined with every other mask. The paths visit only the
            keys inside it, so the cost grows as ``N * w``, and ``n_i`` counts the keys in it.
        softcap: logit soft-capping (Gemma 2): the logits ``z`` (after the scale and length
            scaling) become ``softcap * tanh(z / softcap)`` before any mask or bias is added.
        alibi_slopes: ALiBi (Press et al. 2022), flash-attn's form: a float tensor of shape
            ``(Hq,)`` or ``(B, Hq)`` on the inputs' device, adding ``-slope_h * |j - i - c|`` to
            the logits (``c`` as for ``window_size``: the causal offset, 0 without one), computed
            in place on the kernels rather than read from a mask. The slopes are constants, as
            in flash-attn: one that requires grad is refused.
        sink: attention sinks (gpt-oss; FlashAttention 4's learnable sink): a float tensor of
            shape ``(Hq,)`` on the inputs' device, one logit per head that joins every row's
            normalization (sparsemax's and entmax's threshold search too) and carries no value,
            so a row may give its weight to nothing. It may require grad.
        block_map: a :class:`longattn.BlockMap`, one flag per block of ``block_size`` rows and
            keys (FlexAttention's ``BlockMask`` in spirit): a cleared block is masked, and the
            kernels skip it without reading K, V or the mask, so a document or other structured
            mask costs in proportion to the blocks it keeps. ``BlockMap.from_mask(attn_mask)``
            builds it from a mask once, for every layer that shares the mask. Paths without
            block skipping fold it into the mask (as ``BlockMap.as_mask``).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"flash"``
            (flash-attn, when installed: softmax and SSMax on CUDA in 16 bits). ``"auto"`` takes
            the first of flash-attn and the Triton kernels that serves a CUDA call, else
            ``"torch"``. A backend that cannot serve a call raises a ``ValueError`` saying why.

    Returns:
        ``(B, Hq, Nq, Dv)`` (or ``(Hq, Nq, Dv)``) in the dtype of ``query``. A row with no key
        to attend to gives 0, and gradient 0.
    """
    checks.check_qkv(query, key, value, checks.check_flag("enable_gqa", enable_gqa))
    checks.check_mask(attn_mask, query, key)
    causal_offset = checks.check_causal(is_causal, causal_offset)
    call = checks.make_call(
        _batched(query), _batched(key), _batched(value),
        normalizer=checks.check_normalizer(normalizer),
        alpha=checks.check_alpha(alpha, query.shape[-3], query.device),
        length_scale=checks.check_length_scale(length_scale, query.shape[-3], query.device),
        scale=checks.check_scale(scale), causal_offset=causal_offset, attn_mask=attn_mask,
        dropout_p=checks.check_dropout(dropout_p),
        seqused_k=checks.check_seqused_k(seqused_k, _batched(query)), window=checks.check_window(window_size),
        softcap=checks.check_softcap(softcap),
        alibi_slopes=_check_alibi(alibi_slopes, query),
        sink=checks.check_sink(sink, query.shape[-3], query.device),
        block_map=checks.check_block_map(block_map, _batched(query), key),
    )
    out = dispatch.run(call, checks.check_backend(backend))
    return out.squeeze(0) if query.dim() == 3 else out


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    normalizer: str = "softmax",
    alpha: float | torch.Tensor = 1.5,
    length_scale: float | torch.Tensor | None = None,
    causal_offset: int | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights `p` of :func:`scaled_dot_product_attention` (no dropout), computed
    by the reference: ``(B, Hq, Nq, Nk)`` (or ``(Hq, Nq, Nk)``) in float32, or float64 for
    float64 inputs; a row with no key to attend to is 0. It builds the score
    matrix, so it is for inspecting and measuring attention (a study's rows), not for long
    sequences. Arguments as :func:`scaled_dot_product_attention`."""
    checks.check_qkv(query, key, key, checks.check_flag("enable_gqa", enable_gqa))  # no value: key stands in
    checks.check_mask(attn_mask, query, key)
    causal_offset = checks.check_causal(is_causal, causal_offset)
    call = checks.make_call(
        _batched(query), _batched(key), _batched(key), normalizer=checks.check_normalizer(normalizer),
        alpha=checks.check_alpha(alpha, query.shape[-3], query.device), scale=checks.check_scale(scale),
        causal_offset=causal_offset,
        length_scale=checks.check_length_scale(length_scale, query.shape[-3], query.device),
        attn_mask=attn_mask, window=checks.check_window(window_size), softcap=checks.check_softcap(softcap),
        alibi_slopes=_check_alibi(alibi_slopes, query),
        sink=checks.check_sink(sink, query.shape[-3], query.device),
    )
    weights = reference.weights(call)
    return weights.squeeze(0) if query.dim() == 3 else weights


def _check_alibi(alibi_slopes, query: torch.Tensor):
    return checks.check_alibi_slopes(alibi_slopes, query.shape[-3], _batched(query).shape[0], query.device)


def _batched(t: torch.Tensor) -> torch.Tensor:
    """Unbatched `(H, N, D)` as `(1, H, N, D)`: a mask that broadcasts to `(Hq, Nq, Nk)` also
    broadcasts to `(1, Hq, Nq, Nk)`."""
    return t.unsqueeze(0) if t.dim() == 3 else t
