"""The reference: attention with the full score matrix, written to be read.

This file defines what every other path computes. It is the oracle of the tests and the only
code in longattn allowed to build the `(B, H, Nq, Nk)` score matrix. Inputs are taken as the
public API has already checked them (see `attention/checks.py`); arithmetic runs in float32,
or float64 for float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bisection halves a bracket narrower than 1 each step: 64 steps reach float64 rounding.
_BISECT_STEPS = 64


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    normalizer: str = "softmax",
    alpha: float = 1.5,
    length_scale: float | torch.Tensor | None = None,
    causal_offset: int = 0,
) -> torch.Tensor:
    """Materialising attention. `query` is `(B, Hq, Nq, D)`, `key` `(B, Hkv, Nk, D)`, `value`
    `(B, Hkv, Nk, Dv)`, with `Hq` a multiple of `Hkv`; returns `(B, Hq, Nq, Dv)`.

    `normalizer` is "softmax", "sparsemax" or "entmax" (SSMax is softmax with `length_scale`).
    With `is_causal`, key `j` is allowed for row `i` iff `j <= i + causal_offset`.
    """
    out_dtype = query.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute_dtype) for t in (query, key, value))
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)  # query head h reads key head h // group
    v = v.repeat_interleave(group, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    allowed, bias = split_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device, compute_dtype, causal_offset)
    scores = q @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if length_scale is not None:
        scores = scores * length_factor(length_scale, allowed, q.shape[-3], compute_dtype)
    logits = scale * scores
    if bias is not None:
        logits = logits + bias

    empty = ~allowed.any(dim=-1, keepdim=True)  # rows with no key: output 0, gradient 0
    logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
    probs = normalize(logits, normalizer, alpha).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return (probs @ v).to(out_dtype)


def split_mask(attn_mask, is_causal, n_q, n_k, device, dtype, causal_offset=0):
    """Returns `allowed` (bool, broadcastable to the scores) and the additive `bias` (or None).

    A key is allowed when the causal mask (`j <= i + causal_offset`; 0 is SDPA's top-left), a
    boolean mask (True = attend) and a float mask (not -inf) all allow it.
    """
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed.tril(diagonal=causal_offset)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            bias = attn_mask.to(dtype)
            allowed = allowed & (bias != float("-inf"))
            bias = bias.masked_fill(~allowed, 0.0)  # -inf is carried by `allowed`, not by the sum
    return allowed, bias


def length_factor(length_scale, allowed, num_heads, dtype):
    """`s_h * ln(n_i)`, shaped to multiply `(B, H, Nq, Nk)` scores; `n_i` counts allowed keys."""
    n = allowed.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)  # (..., Nq, 1)
    s = torch.as_tensor(length_scale, dtype=dtype, device=allowed.device)
    s = s.expand(num_heads).reshape(num_heads, 1, 1)
    return s * torch.log(n)


def normalize(logits: torch.Tensor, normalizer: str, alpha: float) -> torch.Tensor:
    """The normalizer along the last dim. Masked logits are -inf; no row is all -inf."""
    if logits.numel() == 0:
        return logits.clone()
    if normalizer == "softmax":
        return torch.softmax(logits, dim=-1)
    if normalizer == "sparsemax":
        alpha = 2.0
    elif normalizer != "entmax":
        raise ValueError(f"normalizer must be 'softmax', 'sparsemax' or 'entmax', got {normalizer!r}")
    return _Entmax.apply(logits, float(alpha))


def entmax_threshold(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """`tau` with `sum_j [x_j - tau]_+ ** (1 / (alpha - 1)) = 1`, for `x = (alpha - 1) * z`.

    Sparsemax (alpha = 2) is solved exactly by sorting; other alpha by bisection inside the
    bracket `[max - 1, max - n ** (1 - alpha)]`, where the sum is >= 1 at the left end and
    <= 1 at the right end (Blondel et al. 2019). Returns shape `x.shape[:-1] + (1,)`.
    """
    x_max = x.max(dim=-1, keepdim=True).values
    if alpha == 2.0:
        x_sorted = x.sort(dim=-1, descending=True).values
        cumsum = x_sorted.cumsum(dim=-1)
        k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
        in_support = 1 + k * x_sorted > cumsum  # a prefix of the sorted row
        support = in_support.sum(dim=-1, keepdim=True).clamp(min=1)  # 0 only for a NaN row
        return (cumsum.gather(-1, support - 1) - 1) / support.to(x.dtype)
    n = (x > float("-inf")).sum(dim=-1, keepdim=True).to(x.dtype)
    lo, hi = x_max - 1, x_max - n ** (1 - alpha)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        mass = (x - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(dim=-1, keepdim=True)
        lo = torch.where(mass >= 1, mid, lo)
        hi = torch.where(mass >= 1, hi, mid)
    return lo


class _Entmax(torch.autograd.Function):
    """alpha-entmax, `p = [(alpha - 1) z - tau]_+ ** (1 / (alpha - 1))`, as `entmax_bisect`."""

    @staticmethod
    def forward(ctx, logits, alpha):
        x = (alpha - 1) * logits
        x = x - x.max(dim=-1, keepdim=True).values  # huge logits lose nothing to the shift
        tau = entmax_threshold(x, alpha)
        p = (x - tau).clamp(min=0).pow(1 / (alpha - 1))
        if alpha != 2.0:
            p = p / p.sum(dim=-1, keepdim=True)  # bisection leaves rounding in the sum
        ctx.save_for_backward(p)
        ctx.alpha = alpha
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        # dp_j/dz_j = p_j ** (2 - alpha) on the support, zero off it (the indicator for sparsemax)
        u = torch.where(p > 0, p.pow(2 - ctx.alpha), torch.zeros_like(p))
        delta = (u * grad_p).sum(dim=-1, keepdim=True) / u.sum(dim=-1, keepdim=True)
        return u * (grad_p - delta), None
