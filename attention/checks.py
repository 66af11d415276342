"""Argument checks shared by every public entry point.

Each check raises `TypeError` (wrong kind of thing) or `ValueError` (right kind, wrong value)
with a message that names the argument and says what was expected. Nothing here touches CUDA.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import normalizers
from .backends import BACKEND_CHOICES
from .call import AttentionCall, PackedDocs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def check_normalizer(name) -> str:
    """A registered normalizer's name (`normalizers.py`)."""
    return normalizers.get(name).name


def check_backend(name) -> str:
    return check_choice("backend", name, BACKEND_CHOICES)


def check_causal(is_causal, causal_offset) -> int | None:
    """SDPA's flag and the offset as longattn's one encoding of causality: None (no causal
    mask) or the offset, key j allowed for row i iff `j <= i + offset`; `is_causal` is 0, SDPA's
    top-left, and an offset implies causal."""
    is_causal = check_flag("is_causal", is_causal)
    if causal_offset is not None and (not isinstance(causal_offset, int) or isinstance(causal_offset, bool)):
        raise TypeError(f"causal_offset must be None or an int; got {type(causal_offset).__name__}")
    return 0 if causal_offset is None and is_causal else causal_offset


def make_call(query, key, value, *, normalizer: str, alpha: float, length_scale, scale: float | None,
              causal_offset: int | None, attn_mask=None, dropout_p: float = 0.0,
              docs: PackedDocs | None = None) -> AttentionCall:
    """The call of checked arguments in canonical form: the normalizer rewritten to its base
    record (`normalizers.canonical`) and the scale's default, `1 / sqrt(D)`, resolved."""
    record, alpha, length_scale = normalizers.canonical(normalizer, alpha, length_scale)
    return AttentionCall(
        query, key, value, name=normalizer, normalizer=record, alpha=alpha, length_scale=length_scale,
        scale=query.shape[-1] ** -0.5 if scale is None else scale, causal_offset=causal_offset,
        attn_mask=attn_mask, dropout_p=dropout_p, docs=docs,
    )


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_alpha(alpha) -> float:
    if not is_real_number(alpha):
        raise TypeError(f"alpha must be a real number in (1, 2]; got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 1.0 < alpha <= 2.0):
        raise ValueError(f"alpha must be in (1, 2] (1 would be softmax, 2 is sparsemax); got {alpha}")
    return alpha


def check_dropout(dropout_p) -> float:
    if not is_real_number(dropout_p):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    return float(dropout_p)


def check_scale(scale) -> float | None:
    if scale is None:
        return None
    if not is_real_number(scale):
        raise TypeError(f"scale must be None or a real number; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return float(scale)


def check_tensors(query, key, value, ranks, layout: str) -> None:
    """Floating tensors of one of `ranks` (shape `layout`), sharing a rank, dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
        if t.dim() not in ranks:
            raise ValueError(f"{name} must have shape {layout}; got {tuple(t.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(
            f"query, key and value must have the same rank; got {query.dim()}, {key.dim()}, {value.dim()}"
        )
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on one device; got {query.device}, {key.device}, {value.device}"
        )


def check_qkv(query, key, value, enable_gqa: bool) -> None:
    """Layout `(B, H, N, D)` or unbatched `(H, N, D)`; query heads a multiple of key heads."""
    check_tensors(query, key, value, (3, 4), "(B, H, N, D) or unbatched (H, N, D)")
    if query.dim() == 4 and not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            "query, key and value must have the same batch size; got "
            f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same head dim; got {query.shape[-1]} and {key.shape[-1]}"
        )
    if query.shape[-1] < 1:
        raise ValueError("query and key head dim must be at least 1; got 0")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same length (dim -2); got {key.shape[-2]} and {value.shape[-2]}"
        )
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"key and value must have the same number of heads; got {key.shape[-3]} and {value.shape[-3]}"
        )
    h_q, h_kv = query.shape[-3], key.shape[-3]
    if h_q != h_kv and not enable_gqa:
        raise ValueError(
            f"query has {h_q} heads and key/value {h_kv}; pass enable_gqa=True for grouped-query attention"
        )
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")


def check_mask(attn_mask, query, key) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be None or a torch.Tensor; got {type(attn_mask).__name__}")
    if not (attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point):
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (added); got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on {query.device}; got {attn_mask.device}")
    target = (*query.shape[:-1], key.shape[-2])
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target} "
            "(B, Hq, Nq, Nk) / (Hq, Nq, Nk)"
        )


def check_length_scale(length_scale, num_heads: int, device: torch.device):
    """None, a real number, or a tensor of shape `()` or `(Hq,)` (which may require grad)."""
    if length_scale is None:
        return None
    if isinstance(length_scale, torch.Tensor):
        if not length_scale.dtype.is_floating_point:
            raise TypeError(f"length_scale tensor must be floating; got {length_scale.dtype}")
        if length_scale.shape not in ((), (num_heads,)):
            raise ValueError(
                f"length_scale must have shape ({num_heads},) (one per query head) or (); "
                f"got {tuple(length_scale.shape)}"
            )
        if length_scale.device != device:
            raise ValueError(f"length_scale must be on {device}; got {length_scale.device}")
        return length_scale
    if not is_real_number(length_scale):
        raise TypeError(
            f"length_scale must be None, a real number or a tensor; got {type(length_scale).__name__}"
        )
    if not math.isfinite(length_scale):
        raise ValueError(f"length_scale must be finite; got {length_scale}")
    return float(length_scale)
