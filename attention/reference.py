"""The reference: attention with the full score matrix, written to be read.

This file defines what every other path computes. It is the oracle of the tests and the only
code in longattn allowed to build the `(B, H, Nq, Nk)` score matrix. It takes calls as the
public functions have checked them (`attention/call.py`); arithmetic runs in float32, or float64
for float64 inputs. The normalizers' own row functions (`softmax`, `entmax`) are here too: the
registry (`normalizers.py`) names them as each normalizer's reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .call import AttentionCall

# Bisection halves a bracket narrower than 1 each step: 64 steps reach float64 rounding.
_BISECT_STEPS = 64


def attention(call: AttentionCall) -> torch.Tensor:
    """Materialising attention of a dense call: `(B, Hq, Nq, Dv)` in the query's dtype."""
    probs = weights(call)
    if call.dropout_p > 0.0:
        probs = F.dropout(probs, call.dropout_p, training=True)
    v = call.value.to(probs.dtype).repeat_interleave(call.query.shape[-3] // call.key.shape[-3], dim=-3)
    return (probs @ v).to(call.query.dtype)


def weights(call: AttentionCall) -> torch.Tensor:
    """The attention weights `(B, Hq, Nq, Nk)` of a dense call, in the compute dtype; a row
    with no key to attend to is 0. With a sink, its logit joins each row's and takes its share
    of the weight, which goes to no value: the keys' weights sum to less than 1."""
    compute_dtype = torch.float64 if call.query.dtype == torch.float64 else torch.float32
    q, k = call.query.to(compute_dtype), call.key.to(compute_dtype)
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # query head h reads key head h // group

    n_q, n_k = q.shape[-2], k.shape[-2]
    allowed, bias = split_mask(call.attn_mask, call.causal_offset, n_q, n_k, q.device, compute_dtype,
                               call.window_offset)
    scores = q @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if call.length_scale is not None:
        scores = scores * length_factor(call.length_scale, allowed, q.shape[-3], compute_dtype)
    logits = call.scale * scores
    if call.softcap is not None:  # Gemma 2's cap, before any bias
        logits = call.softcap * torch.tanh(logits / call.softcap)
    if bias is not None:
        logits = logits + bias
    if call.alibi_slopes is not None:
        logits = logits + alibi_bias(call.alibi_slopes, call.alibi_offset, 0, n_q, 0, n_k, compute_dtype)

    empty = ~allowed.any(dim=-1, keepdim=True)  # rows with no key: output 0, gradient 0
    alpha = call.alpha  # a float, or one per query head: (Hq, 1, 1) against the rows
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(compute_dtype).reshape(-1, 1, 1)
    if call.sink is not None:  # one more logit per row, the head's (0 in the empty rows: any will do)
        logits = logits.masked_fill(~allowed, float("-inf"))
        sink = call.sink.to(compute_dtype).view(-1, 1, 1).expand(*logits.shape[:-1], 1).masked_fill(empty,
                                                                                                    0.0)
        probs = call.normalizer.normalize(torch.cat((logits, sink), dim=-1), alpha)[..., :n_k]
        return probs.masked_fill(empty, 0.0)
    logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
    if logits.numel() == 0:
        return logits.clone()
    return call.normalizer.normalize(logits, alpha).masked_fill(empty, 0.0)


def split_mask(attn_mask, causal_offset, n_q, n_k, device, dtype, window_offset=None):
    """Returns `allowed` (bool, broadcastable to the scores) and the additive `bias` (or None).

    A key is allowed when the causal rule (`j <= i + causal_offset`, none when None; 0 is SDPA's
    top-left), the sliding window's left edge (`j >= i + window_offset`, none when None), a
    boolean mask (True = attend) and a float mask (`float_mask_allows`) all allow it.
    """
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if causal_offset is not None:
        allowed = allowed.tril(diagonal=causal_offset)
    if window_offset is not None:
        allowed = allowed.triu(diagonal=window_offset)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            allowed = allowed & float_mask_allows(attn_mask)
            bias = attn_mask.to(dtype).masked_fill(~allowed, 0.0)  # masking is `allowed`'s, not the sum's
    return allowed, bias


def float_mask_allows(attn_mask: torch.Tensor) -> torch.Tensor:
    """Where a float mask lets a key be attended: everywhere but its `-inf` entries and those at
    the lowest finite value of its dtype, `torch.finfo(dtype).min`, which Hugging Face and others
    write for "masked" (it adds to a logit without overflowing). A masked key has weight 0 and is
    not counted in `n_i`, on every backend, whatever the mask's and the inputs' dtypes. A NaN
    entry is not masked: it makes its row NaN, as any NaN logit does."""
    return ~(attn_mask <= torch.finfo(attn_mask.dtype).min)


def alibi_bias(slopes, offset, r0, r1, k0, k1, dtype):
    """ALiBi's bias (Press et al. 2022) of rows `r0:r1` and keys `k0:k1`, `-slope_h * |j - i -
    offset|` (flash-attn's form, symmetric about the diagonal `j = i + offset`), as `(Bs, Hq,
    rows, keys)` from `(Bs, Hq)` slopes."""
    rows = torch.arange(r0, r1, device=slopes.device).view(-1, 1)
    distance = (torch.arange(k0, k1, device=slopes.device).view(1, -1) - rows - offset).abs()
    return -slopes.to(dtype)[:, :, None, None] * distance.to(dtype)


def length_factor(length_scale, allowed, num_heads, dtype):
    """`s_h * ln(n_i)`, shaped to multiply `(B, H, Nq, Nk)` scores; `n_i` counts allowed keys."""
    n = allowed.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)  # (..., Nq, 1)
    s = torch.as_tensor(length_scale, dtype=dtype, device=allowed.device)
    s = s.expand(num_heads).reshape(num_heads, 1, 1)
    return s * torch.log(n)


# ---------------------------------------------------------------------------------------------
# The normalizers' row functions: weights along the last dim. Masked logits are -inf; no row is
# all -inf. `alpha` is read by entmax only.


def softmax(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def entmax(logits: torch.Tensor, alpha) -> torch.Tensor:
    """alpha-entmax, exactly as `entmax.entmax_bisect(logits, alpha)`; alpha = 2 is sparsemax.
    `alpha` is a float, or a tensor that broadcasts against `logits[..., :1]` (one alpha per
    row or head), whose gradient is exact (`_Entmax.backward`)."""
    return _Entmax.apply(logits, alpha if isinstance(alpha, torch.Tensor) else float(alpha))


def entmax_threshold(x: torch.Tensor, alpha) -> torch.Tensor:
    """`tau` with `sum_j [x_j - tau]_+ ** (1 / (alpha - 1)) = 1`, for `x = (alpha - 1) * z`.

    Sparsemax (a float alpha = 2) is solved exactly by sorting; other alpha, and a tensor of
    them, by bisection inside the bracket `[max - 1, max - n ** (1 - alpha)]`, where the sum is
    >= 1 at the left end and <= 1 at the right end (Blondel et al. 2019). Returns shape
    `x.shape[:-1] + (1,)`.
    """
    x_max = x.max(dim=-1, keepdim=True).values
    if not isinstance(alpha, torch.Tensor) and alpha == 2.0:
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


def entmax_alpha_grad(p: torch.Tensor, grad_p: torch.Tensor, delta: torch.Tensor,
                      alpha) -> torch.Tensor:
    """`sum_j grad_p_j dp_j / d alpha` per row (`(..., 1)`), at fixed logits z, given the
    logits' gradient's `delta = sum_j grad_p_j g_j` (below).

    From the threshold's implicit function (Peters et al. 2019; Correia et al. 2019): on the
    support `ln p_j = ln((alpha - 1) z_j - tau) / (alpha - 1)`, and `sum_j dp_j / d alpha = 0`
    fixes `d tau / d alpha`, which gives, with `g = u / sum u` (`u = p ** (2 - alpha)` on the
    support) and `H = sum_j p_j ln p_j`,

        dp_j / d alpha = (p_j - g_j) / (alpha - 1)^2 - (p_j ln p_j - g_j H) / (alpha - 1).

    So the row's share is `(sum dp p - delta) / (alpha - 1)^2 - (sum dp p ln p - delta H) /
    (alpha - 1)`, with `delta = sum dp g`, the term the logits' gradient subtracts too. A sink's
    column counts as any other (its grad_p is 0)."""
    p_log_p = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    entropy = p_log_p.sum(dim=-1, keepdim=True)
    mean = (p * grad_p).sum(dim=-1, keepdim=True)
    mean_log = (p_log_p * grad_p).sum(dim=-1, keepdim=True)
    return (mean - delta) / (alpha - 1) ** 2 - (mean_log - delta * entropy) / (alpha - 1)


class _Entmax(torch.autograd.Function):
    """alpha-entmax, `p = [(alpha - 1) z - tau]_+ ** (1 / (alpha - 1))`, as `entmax_bisect`; in
    the form torch.func takes (`setup_context`, and plain torch ops to vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, alpha):
        x = (alpha - 1) * logits
        x = x - x.max(dim=-1, keepdim=True).values  # huge logits lose nothing to the shift
        tau = entmax_threshold(x, alpha)
        p = (x - tau).clamp(min=0).pow(1 / (alpha - 1))
        if isinstance(alpha, torch.Tensor) or alpha != 2.0:
            p = p / p.sum(dim=-1, keepdim=True)  # bisection leaves rounding in the sum
        return p

    @staticmethod
    def setup_context(ctx, inputs, output):
        alpha = inputs[1]
        if isinstance(alpha, torch.Tensor):
            ctx.save_for_backward(output, alpha)
            ctx.alpha = None
        else:
            ctx.save_for_backward(output)
            ctx.alpha = alpha

    @staticmethod
    def backward(ctx, grad_p):
        p, *tensor_alpha = ctx.saved_tensors
        alpha = tensor_alpha[0] if tensor_alpha else ctx.alpha
        # dp_j/dz_j = p_j ** (2 - alpha) on the support, zero off it (the indicator for sparsemax);
        # the pow never sees a 0, whose infinite slope would make a second derivative NaN
        support = p > 0
        u = torch.where(support, torch.where(support, p, 1.0).pow(2 - alpha), 0.0)
        delta = (u * grad_p).sum(dim=-1, keepdim=True) / u.sum(dim=-1, keepdim=True)
        grad_alpha = None
        if tensor_alpha and ctx.needs_input_grad[1]:
            grad_alpha = entmax_alpha_grad(p, grad_p, delta, alpha).sum_to_size(alpha.shape)
        return u * (grad_p - delta), grad_alpha
