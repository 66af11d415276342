"""One attention call, checked and in canonical form: what every backend receives.

The public functions (`functional.py`, `varlen.py`) check their arguments, resolve the defaults
and rewrite the normalizer to its canonical record (`normalizers.canonical`) once; the dispatch
and the paths read the result from here, so none of them re-derives a default or a rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .reference import float_mask_allows

if TYPE_CHECKING:
    from .block_map import BlockMap
    from .normalizers import Normalizer


def clamp_causal_offset(causal_offset: int | None, n_q: int, n_k: int) -> int | None:
    """The offset moved into `[-n_q, n_k]`, which changes no row: at `n_k` or above every row
    sees every key, at `-n_q` or below none sees any (and for a window's lower bound, `j >= i +
    offset`, the reverse). Keeps every path's index arithmetic (int64 in torch, int32 in the
    kernels) far from overflow."""
    return None if causal_offset is None else max(-n_q, min(causal_offset, n_k))


@dataclass(frozen=True)
class PackedDocs:
    """Documents packed along dim 0 (flash-attn's varlen layout): document `d` holds query rows
    `cu_seqlens_q[d]:cu_seqlens_q[d + 1]` and keys `cu_seqlens_k[d]:cu_seqlens_k[d + 1]`.

    `causal_from_end`: the call's causal offset counts from each document's bottom-right corner,
    key `j` allowed for row `i` iff `j <= i + causal_offset + n_k - n_q` (flash-attn's varlen
    alignment; `causal_offset="bottom_right"` is offset 0 with it)."""

    cu_seqlens_q: torch.Tensor  # int32 (num_docs + 1,), on the inputs' device
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    # The same offsets on the host, or None where they were not read (max_seqlen given: no sync).
    offsets_q: list[int] | None
    offsets_k: list[int] | None
    causal_from_end: bool = False

    @property
    def count(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def on_host(self) -> PackedDocs:
        """These documents with their offsets on the host, read from cu_seqlens (a host sync)
        where they were not."""
        if self.offsets_q is not None:
            return self
        return replace(self, offsets_q=self.cu_seqlens_q.tolist(), offsets_k=self.cu_seqlens_k.tolist())

    @property
    def lengths_match(self) -> bool:
        """Every document is known, without a sync, to have as many queries as keys (one
        cu_seqlens for both, or host offsets that say so)."""
        if self.cu_seqlens_q is self.cu_seqlens_k:
            return True
        if self.offsets_q is None:
            return False
        oq, ok = self.offsets_q, self.offsets_k
        return all(q1 - q0 == k1 - k0 for q0, q1, k0, k1 in zip(oq, oq[1:], ok, ok[1:]))


@dataclass(frozen=True)
class AttentionCall:
    """Dense: `query` (B, Hq, Nq, D), `key` (B, Hkv, Nk, D), `value` (B, Hkv, Nk, Dv).
    Packed (`docs` given): `(total, H, D)` each, every document attending only to itself.

    `normalizer` is the canonical record (SSMax is softmax with `length_scale`, sparsemax is
    entmax with `alpha = 2`); `name` is what the caller asked for, for messages. Causality has
    one encoding: `causal_offset` None (no causal mask) or an int, key `j` allowed for row `i`
    iff `j <= i + causal_offset` (0 is SDPA's top-left; in packed mode, per document, counted
    from its bottom-right corner where `docs.causal_from_end`). A sliding window is a lower bound
    beside it: `window_offset` None (none) or an int, key `j` allowed iff `j >= i + window_offset`,
    counted from the same corner; a window's right edge is folded into `causal_offset`
    (`checks.make_call`).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    name: str
    normalizer: Normalizer
    alpha: float
    length_scale: float | torch.Tensor | None
    scale: float
    causal_offset: int | None
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    docs: PackedDocs | None = None
    seqused_k: torch.Tensor | None = None  # int32 (B,): batch b sees its first keys only (dense)
    window_offset: int | None = None
    softcap: float | None = None  # the logits z become softcap * tanh(z / softcap)
    # ALiBi: (1 or B, Hq) slopes; -slope_h * |j - i - alibi_offset| is added to the logits
    alibi_slopes: torch.Tensor | None = None
    alibi_offset: int | None = None  # the diagonal the distances count from: the causal one, or 0
    sink: torch.Tensor | None = None  # (Hq,): a logit per head in every row's normalization, no value
    block_map: BlockMap | None = None  # dense: the blocks of (Nq, Nk) that may hold an allowed key
    # Dense, with seqused_k: the causal and window offsets and ALiBi's diagonal count from each
    # batch's bottom-right corner (Nq, seqused_k[b]) (packed calls keep theirs in `docs`)
    causal_from_end: bool = False

    @property
    def head_dims(self) -> tuple[int, int]:
        return self.query.shape[-1], self.value.shape[-1]

    @property
    def empty(self) -> bool:
        """No query or no key anywhere: nothing to tile."""
        dim = 0 if self.docs is not None else -2
        return self.query.shape[dim] == 0 or self.key.shape[dim] == 0

    def key_lengths_as_mask(self) -> AttentionCall:
        """The call with `seqused_k` folded into `attn_mask`, for the paths that take masks but
        not key lengths: a `(B, 1, 1, Nk)` key mask, combined with the call's own mask. Counted
        from each batch's end (`causal_from_end`), the causal and window bounds become a `(B, 1,
        Nq, Nk)` mask too, and ALiBi a `(B, Hq, Nq, Nk)` float bias: tensor ops, no host read."""
        n_q, n_k = self.query.shape[-2], self.key.shape[-2]
        used = self.seqused_k.clamp(0, n_k).long().view(-1, 1, 1, 1)
        keys = torch.arange(n_k, device=self.key.device)
        allowed = keys < used
        if not self.causal_from_end:
            return replace(self, attn_mask=self._mask_and(allowed), seqused_k=None)
        # j - i counted from batch b's diagonal, which its corner (Nq, used_b) moves by used_b - Nq
        gap = keys - torch.arange(n_q, device=keys.device).view(-1, 1) - (used - n_q)  # (B, 1, Nq, Nk)
        if self.causal_offset is not None:
            allowed = allowed & (gap <= self.causal_offset)
        if self.window_offset is not None:
            allowed = allowed & (gap >= self.window_offset)
        mask = self._mask_and(allowed)
        if self.alibi_slopes is not None:  # a bias beside the mask's: both are added after the cap
            wide = torch.float64 in (self.query.dtype, mask.dtype)
            dtype = torch.float64 if wide else torch.float32
            bias = -self.alibi_slopes.to(dtype)[:, :, None, None] * (gap - self.alibi_offset).abs().to(dtype)
            if mask.dtype == torch.bool:
                mask = torch.where(mask, bias, float("-inf"))
            else:  # which entries mask is read in the mask's own dtype (its finfo.min)
                mask = torch.where(float_mask_allows(mask), mask.to(dtype) + bias, float("-inf"))
        return replace(self, attn_mask=mask, seqused_k=None, causal_offset=None, window_offset=None,
                       alibi_slopes=None, alibi_offset=None, causal_from_end=False)

    def batch(self, b: int, n_k: int) -> AttentionCall:
        """Batch `b` of a dense call with key lengths counted from the end (`causal_from_end`),
        given its used key length `n_k`, as a plain dense call on its first `n_k` keys: the
        offsets moved to its own corner, the mask, the block map (folded into the mask) and the
        slopes narrowed to it."""
        call = self.block_map_as_mask() if self.block_map is not None else self
        n_q = call.query.shape[-2]
        q, k, v = (t[b:b + 1] for t in (call.query, call.key[..., :n_k, :], call.value[..., :n_k, :]))
        mask = call.attn_mask
        if mask is not None:
            mask = mask[(None,) * (4 - mask.dim())]  # as 4-D: its batch dim may be broadcast
            mask = mask[b:b + 1] if mask.shape[0] > 1 else mask
            mask = mask[..., :n_k] if mask.shape[-1] > 1 else mask
        return replace(call, query=q, key=k, value=v, attn_mask=mask, seqused_k=None, causal_from_end=False,
                       **call._sequence_bounds(b, n_k - n_q, n_q, n_k))

    def block_map_as_mask(self) -> AttentionCall:
        """The call with its block map folded into `attn_mask`, for the paths that take masks but
        not maps: the map's boolean mask (`BlockMap.as_mask`), combined with the call's own."""
        allowed = self.block_map.as_mask(self.query.shape[-2], self.key.shape[-2])
        return replace(self, attn_mask=self._mask_and(allowed), block_map=None)

    def _mask_and(self, allowed: torch.Tensor) -> torch.Tensor:
        """The call's mask restricted to the bool `allowed` (broadcastable): `allowed` itself
        without a mask; a float mask keeps its dtype, -inf where `allowed` is False (-inf masks
        the key on every path, `reference.float_mask_allows`)."""
        mask = self.attn_mask
        if mask is None:
            return allowed
        if mask.dtype == torch.bool:
            return mask & allowed
        return torch.where(allowed, mask, torch.tensor(float("-inf"), dtype=mask.dtype, device=mask.device))

    def document(self, d: int) -> AttentionCall:
        """Document `d` of a packed call (its offsets on the host: `PackedDocs.on_host`) as a
        dense call on `(1, H, n, D)` views, its causal offset counted from its own start."""
        (q0, q1), (k0, k1) = self.docs.offsets_q[d:d + 2], self.docs.offsets_k[d:d + 2]
        q, k, v = (
            t[a:b].transpose(0, 1).unsqueeze(0)
            for t, (a, b) in ((self.query, (q0, q1)), (self.key, (k0, k1)), (self.value, (k0, k1)))
        )
        shift = (k1 - k0) - (q1 - q0) if self.docs.causal_from_end else 0
        return replace(self, query=q, key=k, value=v, docs=None,
                       **self._sequence_bounds(d, shift, q1 - q0, k1 - k0))

    def _sequence_bounds(self, index: int, shift: int, n_q: int, n_k: int) -> dict:
        """The fields of sequence `index` (a document, or a batch entry) run as a dense call of
        its own: the causal and window offsets moved by `shift` (its corner's, or 0) and clamped
        to its lengths, ALiBi's diagonal moved and not clamped, its row of the slopes."""
        causal, window = (None if o is None else clamp_causal_offset(o + shift, n_q, n_k)
                          for o in (self.causal_offset, self.window_offset))
        slopes = self.alibi_slopes
        if slopes is not None and slopes.shape[0] > 1:
            slopes = slopes[index:index + 1]
        alibi = None if self.alibi_offset is None else self.alibi_offset + shift
        return {"causal_offset": causal, "window_offset": window, "alibi_offset": alibi,
                "alibi_slopes": slopes}
