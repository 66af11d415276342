"""Independent float64 oracles for the tests: torch SDPA for softmax, the `entmax` package
for sparsemax and entmax, on explicitly materialised logits. Written apart from
`attention/reference.py` so that a change of semantics there shows up here."""

from __future__ import annotations

import entmax
import torch
import torch.nn.functional as F

MASKED = -1e6  # finite, so the entmax package sees no -inf; every normalizer gives it weight 0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64; 0 when both are zero."""
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def allowed_mask(n_q, n_k, attn_mask=None, is_causal=False):
    """Which keys each query may see: the causal rule (j <= i) and the bool / float masks."""
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    allowed = (j <= i) if is_causal else torch.ones(n_q, n_k, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:  # -inf and the dtype's lowest finite value (Hugging Face's "masked") both mask
            lowest = torch.finfo(attn_mask.dtype).min
            allowed = allowed & (attn_mask != float("-inf")) & (attn_mask != lowest)
    return allowed


def attention_oracle(q, k, v, *, normalizer="softmax", alpha=1.5, attn_mask=None, is_causal=False,
                     scale=None, length_scale=None):
    """Attention by its definition, float64, with the normalizer taken from an outside library."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[-3] // k.shape[-3]
    k = torch.repeat_interleave(k, groups, dim=-3)
    v = torch.repeat_interleave(v, groups, dim=-3)
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    allowed = allowed_mask(n_q, n_k, attn_mask, is_causal)
    allowed = allowed.expand(*q.shape[:-1], n_k)
    dots = torch.einsum("...id,...jd->...ij", q, k)
    if normalizer == "ssmax" and length_scale is None:
        length_scale = 1.0
    if length_scale is not None:
        s = torch.as_tensor(length_scale, dtype=torch.float64)
        s = s.expand(q.shape[-3]).reshape(-1, 1, 1)
        n = allowed.sum(-1, keepdim=True).double()
        dots = dots * s * torch.log(torch.clamp(n, min=1))
    z = scale * dots
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        z = z + torch.where(allowed, attn_mask.double(), torch.zeros((), dtype=torch.float64))
    empty = ~allowed.any(-1, keepdim=True)
    z = torch.where(allowed, z, torch.full_like(z, MASKED))
    z = torch.where(empty, torch.zeros_like(z), z)
    if normalizer in ("softmax", "ssmax"):
        p = torch.softmax(z, dim=-1)
    elif normalizer == "entmax" and torch.is_tensor(alpha):  # one per query head (or one for all)
        alpha = alpha.double().expand(q.shape[-3]).reshape(-1, 1, 1).expand(*z.shape[:-1], 1)
        p = entmax.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)
    elif normalizer == "sparsemax" or (normalizer == "entmax" and alpha == 2.0):
        p = entmax.sparsemax(z, dim=-1)
    elif normalizer == "entmax" and alpha == 1.5:
        p = entmax.entmax15(z, dim=-1)
    elif normalizer == "entmax":
        p = entmax.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)
    else:
        raise ValueError(normalizer)
    p = torch.where(empty, torch.zeros_like(p), p)
    return p @ v


def sdpa_oracle(q, k, v, **kwargs):
    """torch's own SDPA in float64. A float mask goes in as float64 too: torch 2.13's CPU
    kernel silently misreads a (B, H, Nq, Nk) float32 mask beside float64 inputs."""
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype.is_floating_point:
        kwargs = {**kwargs, "attn_mask": mask.double()}
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)


def grads(out, inputs, grad_out):
    """Gradients of <out, grad_out> with respect to each input (None where it has none)."""
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def make_mask(kind, shape, generator=None):
    """`kind`: None, "bool" (True = attend, ~70% True), "float" (added), "neginf" (float with -inf)."""
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(shape, generator=generator) < 0.7
    bias = 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "neginf":
        bias = bias.masked_fill(torch.rand(shape, generator=generator) < 0.3, float("-inf"))
    return bias


def case_id(B, Hq, Hkv, Nq, Nk, D, Dv=None, causal=False, mask=None, extra=""):
    parts = [f"B{B}", f"H{Hq}" + (f"-{Hkv}" if Hkv != Hq else ""), f"N{Nq}" + (f"-{Nk}" if Nk != Nq else ""),
             f"D{D}" + (f"-{Dv}" if Dv not in (None, D) else "")]
    if causal:
        parts.append("causal")
    if mask:
        parts.append(mask)
    if extra:
        parts.append(extra)
    return "-".join(parts)
