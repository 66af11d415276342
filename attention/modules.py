"""`nn.Module` layers to swap into existing models."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from ..kernels.common import MIN_ALPHA  # host side only: compiles no kernel
from . import checks, normalizers
from .functional import scaled_dot_product_attention

LEARNABLE = "learnable"


def alpha_logit(alpha) -> float:
    """The `alpha_logit` at which a learnable alpha, `MIN_ALPHA + (2 - MIN_ALPHA) *
    sigmoid(alpha_logit)`, equals `alpha` (strictly inside `(MIN_ALPHA, 2)`)."""
    if not checks.is_real_number(alpha) or not MIN_ALPHA < alpha < 2.0:
        raise ValueError(f"initial_alpha must be a float in ({MIN_ALPHA}, 2), where a learnable alpha "
                         f"lives; got {alpha!r}")
    fraction = (float(alpha) - MIN_ALPHA) / (2.0 - MIN_ALPHA)
    return math.log(fraction / (1.0 - fraction))


class ScaledDotProductAttention(nn.Module):
    """The attention function as a layer that owns its normalizer settings.

    ``forward`` takes SDPA's arguments in SDPA's order, so ``self.attn = ScaledDotProductAttention(...)``
    replaces a call to ``F.scaled_dot_product_attention`` one for one. For ``"ssmax"``, or any
    normalizer given a ``length_scale``, the layer holds the per-head scale ``s`` of length
    scaling: a ``Parameter`` of shape ``(num_heads,)`` initialised to ``length_scale`` (1.0 for
    SSMax by default), or a fixed float with ``learn_length_scale=False``.

    With ``alpha="learnable"`` (entmax), each head learns its own alpha, as in Correia et al.'s
    adaptively sparse Transformers: the ``Parameter`` ``alpha_logit`` of shape ``(num_heads,)``
    gives ``alpha = 1.01 + 0.99 * sigmoid(alpha_logit)`` (the property ``alpha``), inside the
    accepted ``[1.01, 2]`` however training moves it; it starts at ``initial_alpha``. Equivalent
    to::

        alpha = MIN_ALPHA + (2 - MIN_ALPHA) * torch.sigmoid(self.alpha_logit)   # (num_heads,)
        out = longattn.scaled_dot_product_attention(q, k, v, normalizer="entmax", alpha=alpha)

    Args:
        normalizer: ``"softmax"``, ``"ssmax"``, ``"sparsemax"``, ``"entmax"`` or another registered
            name (``longattn.attention.normalizers``).
        num_heads: query heads; needed for a learnable ``s`` or alpha.
        alpha: the entmax parameter, in ``[1.01, 2]``, or ``"learnable"``.
        length_scale: initial ``s``; ``None`` means no length scaling (1.0 for ``"ssmax"``).
        learn_length_scale: make ``s`` a per-head ``Parameter``.
        backend: passed to :func:`longattn.scaled_dot_product_attention`.
        initial_alpha: where a learnable alpha starts, in ``(1.01, 2)``.
    """

    def __init__(
        self,
        normalizer: str = "softmax",
        num_heads: int | None = None,
        alpha: float | str = 1.5,
        length_scale: float | None = None,
        learn_length_scale: bool = True,
        backend: str = "auto",
        initial_alpha: float = 1.5,
    ):
        super().__init__()
        self.normalizer = checks.check_normalizer(normalizer)
        self.backend = checks.check_backend(backend)
        checks.check_flag("learn_length_scale", learn_length_scale)
        if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads must be a positive int or None; got {num_heads!r}")
        self.num_heads = num_heads
        record = normalizers.get(self.normalizer)
        learnable = isinstance(alpha, str) and alpha == LEARNABLE
        if isinstance(alpha, str) and not learnable:
            raise ValueError(f"alpha must be a float in [{MIN_ALPHA}, 2] or 'learnable'; got {alpha!r}")
        self.fixed_alpha = None if learnable else checks.check_alpha(alpha)
        if learnable:
            if not record.takes_alpha:
                raise ValueError(f"alpha='learnable' is for normalizer='entmax'; {self.normalizer!r} reads "
                                 "no alpha")
            if num_heads is None:
                raise ValueError("num_heads is needed for a learnable per-head alpha")
            self.alpha_logit = nn.Parameter(torch.full((num_heads,), alpha_logit(initial_alpha)))

        scaled = record.length_scaled or length_scale is not None
        if length_scale is not None and not checks.is_real_number(length_scale):
            raise TypeError(
                f"length_scale of a layer must be a float (its initial value); got {length_scale!r}"
            )
        default = record.length_scale if record.length_scaled else 1.0
        init = checks.check_length_scale(default if length_scale is None else length_scale, 1, None)
        if scaled and learn_length_scale:
            if num_heads is None:
                raise ValueError("num_heads is needed for a learnable per-head length_scale")
            self.length_scale = nn.Parameter(torch.full((num_heads,), init))
        else:
            self.length_scale = init if scaled else None

    @property
    def alpha(self) -> float | torch.Tensor:
        """The fixed float, or the learnable one: `(num_heads,)`, differentiable."""
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return MIN_ALPHA + (2.0 - MIN_ALPHA) * torch.sigmoid(self.alpha_logit)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        *,
        causal_offset: int | str | None = None,
        seqused_k: torch.Tensor | None = None,
        window_size: tuple[int, int] | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        sink: torch.Tensor | None = None,
        context_parallel=None,
    ) -> torch.Tensor:
        """``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)`` -> ``(B, Hq, Nq, Dv)``;
        ``causal_offset`` (``"bottom_right"`` when decoding with a KV cache), ``seqused_k``,
        ``window_size``, ``softcap``, ``alibi_slopes`` and ``sink`` as
        :func:`longattn.scaled_dot_product_attention`. With ``context_parallel`` (a
        :class:`longattn.distributed.ContextParallel`) the inputs are this rank's shards of
        one sequence, attended by :func:`longattn.distributed.context_parallel_attention`,
        which takes the causal mask and its offset, the scale and GQA but no other mask or
        modifier."""
        if context_parallel is not None:
            others = {"attn_mask": attn_mask, "seqused_k": seqused_k, "window_size": window_size,
                      "softcap": softcap, "alibi_slopes": alibi_slopes, "sink": sink,
                      "dropout_p": dropout_p or None}
            given = [name for name, value in others.items() if value is not None]
            if given:
                raise ValueError(f"context-parallel attention takes no {', '.join(given)}; it takes the "
                                 "causal mask and its offset, the scale and GQA")
            return context_parallel.attention(
                query, key, value, is_causal=is_causal, causal_offset=causal_offset, scale=scale,
                enable_gqa=enable_gqa, normalizer=self.normalizer, alpha=self.alpha,
                length_scale=self.length_scale, backend=self.backend)
        return scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            normalizer=self.normalizer, alpha=self.alpha, length_scale=self.length_scale,
            causal_offset=causal_offset, seqused_k=seqused_k, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, sink=sink, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"normalizer={self.normalizer!r}"]
        if normalizers.get(self.normalizer).takes_alpha:
            parts.append(f"alpha={self.fixed_alpha}" if self.fixed_alpha is not None else "alpha='learnable'")
        if self.num_heads is not None:
            parts.append(f"num_heads={self.num_heads}")
        if isinstance(self.length_scale, float):
            parts.append(f"length_scale={self.length_scale}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class MultiheadAttention(nn.Module):
    """Self-attention with projections, grouped-query heads and a choice of normalizer.

    ``forward(x)`` maps ``(B, N, embed_dim)`` to ``(B, N, embed_dim)``. With ``num_kv_heads <
    num_heads`` (GQA), ``num_heads // num_kv_heads`` query heads share each key/value head.
    Positional encodings are the model's business (see ``longattn.models``).

    Args:
        embed_dim: model width; a multiple of ``num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads, dividing ``num_heads``; default ``num_heads``.
        normalizer, alpha, length_scale, learn_length_scale, backend, initial_alpha: as
            :class:`ScaledDotProductAttention` (``alpha="learnable"``: one per head).
        dropout: attention-weight dropout, applied in training mode only.
        bias: whether the projections have biases.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        normalizer: str = "softmax",
        alpha: float | str = 1.5,
        length_scale: float | None = None,
        learn_length_scale: bool = True,
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
        initial_alpha: float = 1.5,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = checks.check_dropout(dropout)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **factory)
        self.attention = ScaledDotProductAttention(
            normalizer, num_heads, alpha, length_scale, learn_length_scale, backend, initial_alpha
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``(B, N, embed_dim)`` -> ``(B, N, embed_dim)``; ``attn_mask``, ``is_causal`` and
        ``window_size`` as :func:`longattn.scaled_dot_product_attention`."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, N, {self.embed_dim}); got {shape}")
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.num_kv_heads)
        out = self.attention(
            q, k, v, attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
            window_size=window_size,
        )
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
