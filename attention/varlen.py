"""Attention over packed variable-length documents (flash-attn's varlen layout): the argument
checks and the call handed to the dispatch, which runs it in one launch or document by document."""

from __future__ import annotations

import torch

from . import checks, dispatch
from .call import PackedDocs


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    is_causal: bool = False,
    causal_offset: int | str | None = None,
    scale: float | None = None,
    normalizer: str = "softmax",
    alpha: float | torch.Tensor = 1.5,
    length_scale: float | torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Attention over a batch of documents packed along one axis, each attending only to itself.

    Document ``d`` holds query rows ``cu_seqlens_q[d]:cu_seqlens_q[d+1]`` and keys
    ``cu_seqlens_k[d]:cu_seqlens_k[d+1]``. Equivalent to the following (the ``"reference"`` and
    ``"torch"`` backends run exactly this loop; ``"triton"`` and ``"flash"`` do it in one launch)::

        def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
            outs = []
            for d in range(len(cu_seqlens_q) - 1):
                qs, qe = cu_seqlens_q[d], cu_seqlens_q[d + 1]
                ks, ke = cu_seqlens_k[d], cu_seqlens_k[d + 1]
                q_d = q[qs:qe].transpose(0, 1).unsqueeze(0)               # (1, Hq, n_d, D)
                k_d = k[ks:ke].transpose(0, 1).unsqueeze(0)               # (1, Hkv, m_d, D)
                v_d = v[ks:ke].transpose(0, 1).unsqueeze(0)
                o_d = longattn.scaled_dot_product_attention(q_d, k_d, v_d, enable_gqa=True, **kw)
                outs.append(o_d[0].transpose(0, 1))                       # (n_d, Hq, Dv)
            return torch.cat(outs)

    So every semantic of :func:`longattn.scaled_dot_product_attention` holds per document:
    ``is_causal`` is top-left within each document (key ``j`` for row ``i`` iff ``j <= i``, both
    counted from the document's start, also when its query and key lengths differ), and so is
    an int ``causal_offset``; ``causal_offset="bottom_right"`` aligns each document's mask
    bottom-right, ``j <= i + m_d - n_d`` (flash-attn's varlen causal mask: queries that
    continue a cached prefix, as in chunked prefill and decoding); length scaling (SSMax,
    Nakanishi 2025) uses each row's own ``n_i``, the keys of its document it may see; a
    document with queries but no keys gives 0.

    Args:
        query: ``(total_q, Hq, D)``.
        key: ``(total_k, Hkv, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention is
            always allowed: query head ``h`` reads key head ``h // (Hq // Hkv)``).
        value: ``(total_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (Hugging Face's collators give int64; they
            are taken as int32, flash-attn's) 1-D tensors of length ``num_docs + 1`` on the
            device of ``query``: 0, then the cumulative lengths, ending at ``total_q`` /
            ``total_k``. Documents of length 0 are allowed.
        max_seqlen_q, max_seqlen_k: the longest document's lengths, an int or a 0-d integer
            tensor (read with ``int()``: a host sync where it lives on a GPU); computed when
            None. Given both, the offsets are trusted, as flash-attn trusts them: their values
            are not read, so the one-launch backends run without a host sync (and under
            ``torch.compile(fullgraph=True)``, given as ints; there the per-document loop runs
            inside custom ops, its gradients first-order only), and wrong offsets or hints below
            the true maximum give wrong results. Without both, the offsets are read and checked
            (one sync), and a hint below the true maximum raises ``ValueError``.
        is_causal, causal_offset, scale, normalizer, alpha, length_scale, window_size, softcap, sink:
            as :func:`longattn.scaled_dot_product_attention`, per document (the window centred
            on the document's causal diagonal: bottom-right with
            ``causal_offset="bottom_right"``, top-left otherwise).
        alibi_slopes: as there, ``(Hq,)`` or ``(num_docs, Hq)``, the distances counted from each
            document's causal diagonal, as the window's.
        backend: as :func:`longattn.scaled_dot_product_attention`. ``"triton"`` covers every
            normalizer in float16, bfloat16 and float32; ``"flash"`` softmax and SSMax in 16 bits
            (an int ``causal_offset`` only where every document is known to have as many
            queries as keys, ``"bottom_right"`` with any lengths); ``"auto"`` takes the first of
            them that serves a CUDA call, and the per-document loop otherwise.

    Returns:
        ``(total_q, Hq, Dv)`` in the dtype of ``query``.
    """
    _check_packed(query, key, value)
    trusted = max_seqlen_q is not None and max_seqlen_k is not None
    # one tensor for both: every document has as many queries as keys, known without a sync
    shared = cu_seqlens_k is cu_seqlens_q
    cu_seqlens_q, offsets_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, query, trusted)
    cu_seqlens_k, offsets_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, key, trusted)
    if shared:
        cu_seqlens_k = cu_seqlens_q
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same number of documents; got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    docs = PackedDocs(
        cu_seqlens_q, cu_seqlens_k, _check_max_seqlen("max_seqlen_q", max_seqlen_q, offsets_q),
        _check_max_seqlen("max_seqlen_k", max_seqlen_k, offsets_k), offsets_q, offsets_k,
    )
    causal_offset = checks.check_causal(is_causal, causal_offset)
    call = checks.make_call(
        query, key, value, normalizer=checks.check_normalizer(normalizer),
        alpha=checks.check_alpha(alpha, query.shape[1], query.device),
        length_scale=checks.check_length_scale(length_scale, query.shape[1], query.device),
        scale=checks.check_scale(scale), causal_offset=causal_offset, docs=docs,
        window=checks.check_window(window_size), softcap=checks.check_softcap(softcap),
        alibi_slopes=checks.check_alibi_slopes(alibi_slopes, query.shape[1], cu_seqlens_q.numel() - 1,
                                               query.device),
        sink=checks.check_sink(sink, query.shape[1], query.device),
    )
    return dispatch.run(call, checks.check_backend(backend))


def _check_packed(query, key, value) -> None:
    """Layout `(total, H, D)`; query heads a multiple of key heads."""
    checks.check_tensors(query, key, value, (3,), "(total, H, D), documents packed along dim 0")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key must have the same head dim; got {query.shape[2]} and {key.shape[2]}"
        )
    if query.shape[2] < 1:
        raise ValueError("query and key head dim must be at least 1; got 0")
    if key.shape[0] != value.shape[0]:
        raise ValueError(
            f"key and value must have the same total length (dim 0); got {key.shape[0]} and {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"key and value must have the same number of heads; got {key.shape[1]} and {value.shape[1]}"
        )
    h_q, h_kv = query.shape[1], key.shape[1]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")


def _check_cu_seqlens(name: str, cu_seqlens, packed: torch.Tensor,
                      trusted: bool) -> tuple[torch.Tensor, list[int] | None]:
    """int32 or int64, 1-D, on `packed`'s device and, unless `trusted`, from 0, non-decreasing,
    ending at `packed`'s length. Returns it as int32 and the offsets as ints (one host sync), or
    None for them when trusted (no sync: their values are not read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (as in flash-attn) or int64; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D of length num_docs + 1; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != packed.device:
        raise ValueError(f"{name} must be on {packed.device}; got {cu_seqlens.device}")
    # values up to the packed length, which int32 holds on any real input: the cast loses nothing
    if trusted:
        return cu_seqlens.to(torch.int32), None
    offsets = cu_seqlens.tolist()
    checks.check_offsets(name, offsets, packed.shape[0])
    return cu_seqlens.to(torch.int32), offsets


def _check_max_seqlen(name: str, max_seqlen, offsets: list[int] | None) -> int:
    """The hint as an int (the longest document's length when None), held against the longest
    document where the offsets were read."""
    if max_seqlen is None:
        return _longest(offsets)
    if isinstance(max_seqlen, torch.Tensor):  # Hugging Face passes 0-d tensors
        if max_seqlen.dim() != 0 or max_seqlen.dtype.is_floating_point or max_seqlen.dtype == torch.bool:
            raise TypeError(f"{name} must be None, an int or a 0-d integer tensor; got a tensor of "
                            f"shape {tuple(max_seqlen.shape)} and dtype {max_seqlen.dtype}")
        max_seqlen = int(max_seqlen)
    max_seqlen = checks.check_int(name, max_seqlen, "None, an int or a 0-d integer tensor")
    if offsets is not None and max_seqlen < (longest := _longest(offsets)):
        raise ValueError(f"{name} ({max_seqlen}) is below the longest document's length ({longest})")
    return max_seqlen


def _longest(offsets: list[int]) -> int:
    return max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
