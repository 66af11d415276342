"""One attention call, checked and in canonical form: what every backend receives.

The public functions (`functional.py`, `varlen.py`) check their arguments, resolve the defaults
and rewrite the normalizer to its canonical record (`normalizers.canonical`) once; the dispatch
and the paths read the result from here, so none of them re-derives a default or a rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .normalizers import Normalizer


@dataclass(frozen=True)
class PackedDocs:
    """Documents packed along dim 0 (flash-attn's varlen layout): document `d` holds query rows
    `offsets_q[d]:offsets_q[d + 1]` and keys `offsets_k[d]:offsets_k[d + 1]`."""

    cu_seqlens_q: torch.Tensor  # int32 (num_docs + 1,), on the inputs' device
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    offsets_q: list[int]  # the same offsets on the host
    offsets_k: list[int]

    @property
    def count(self) -> int:
        return len(self.offsets_q) - 1


@dataclass(frozen=True)
class AttentionCall:
    """Dense: `query` (B, Hq, Nq, D), `key` (B, Hkv, Nk, D), `value` (B, Hkv, Nk, Dv).
    Packed (`docs` given): `(total, H, D)` each, every document attending only to itself.

    `normalizer` is the canonical record (SSMax is softmax with `length_scale`, sparsemax is
    entmax with `alpha = 2`); `name` is what the caller asked for, for messages. Causality has
    one encoding: `causal_offset` None (no causal mask) or an int, key `j` allowed for row `i`
    iff `j <= i + causal_offset` (0 is SDPA's top-left; in packed mode, per document).
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

    @property
    def head_dims(self) -> tuple[int, int]:
        return self.query.shape[-1], self.value.shape[-1]

    @property
    def empty(self) -> bool:
        """No query or no key anywhere: nothing to tile."""
        dim = 0 if self.docs is not None else -2
        return self.query.shape[dim] == 0 or self.key.shape[dim] == 0

    def document(self, d: int) -> AttentionCall:
        """Document `d` of a packed call as a dense call on `(1, H, n, D)` views."""
        (q0, q1), (k0, k1) = self.docs.offsets_q[d:d + 2], self.docs.offsets_k[d:d + 2]
        q, k, v = (
            t[a:b].transpose(0, 1).unsqueeze(0)
            for t, (a, b) in ((self.query, (q0, q1)), (self.key, (k0, k1)), (self.value, (k0, k1)))
        )
        return replace(self, query=q, key=k, value=v, docs=None)
