"""Argument checks shared by every public entry point.

Each check raises `TypeError` (wrong kind of thing) or `ValueError` (right kind, wrong value)
with a message that names the argument and says what was expected. Nothing here touches CUDA.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import replace

import numpy as np
import torch

from ..kernels.common import (  # host side only: compiles no kernel
    MIN_ALPHA,
    bound_alibi_offset,
    window_bounds,
)
from . import normalizers
from .backends import BACKEND_CHOICES
from .call import AttentionCall, PackedDocs, clamp_causal_offset

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The causal offset that aligns the mask bottom-right: `Nk - Nq`, or in each packed document its own.
BOTTOM_RIGHT = "bottom_right"


def is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


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


def check_causal(is_causal, causal_offset) -> int | str | None:
    """SDPA's flag and the offset as longattn's one encoding of causality: None (no causal
    mask), the offset, key j allowed for row i iff `j <= i + offset`, or `"bottom_right"`
    (`make_call` resolves it from the lengths); `is_causal` is 0, SDPA's top-left, and an offset
    implies causal. Any size of offset is taken (`make_call` clamps it)."""
    is_causal = check_flag("is_causal", is_causal)
    expected = f"None, an int or {BOTTOM_RIGHT!r}"
    if isinstance(causal_offset, str):
        if causal_offset != BOTTOM_RIGHT:
            raise ValueError(f"causal_offset must be {expected}; got {causal_offset!r}")
        return causal_offset
    if causal_offset is not None:
        causal_offset = check_int("causal_offset", causal_offset, expected)
    return 0 if causal_offset is None and is_causal else causal_offset


def check_window(window_size) -> tuple[int, int] | None:
    """None, or flash-attn's `window_size=(left, right)`: two ints, each -1 (unbounded) or at least
    0; `(-1, -1)` is no window, returned as None."""
    if window_size is None:
        return None
    expected = "None or a pair (left, right) of ints, each -1 (unbounded) or >= 0"
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be {expected}; got {window_size!r}")
    left, right = (check_int(f"window_size[{i}]", w, "an int") for i, w in enumerate(window_size))
    if left < -1 or right < -1:
        raise ValueError(f"window_size must be {expected}; got {(left, right)}")
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap) -> float | None:
    """None, or the logit cap `c > 0` of `c * tanh(z / c)` (Gemma 2's)."""
    if softcap is None:
        return None
    if not is_real_number(softcap):
        raise TypeError(f"softcap must be None or a positive real number; got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number above 0; got {softcap}")
    return float(softcap)


def check_alibi_slopes(alibi_slopes, num_heads: int, batch: int,
                       device: torch.device) -> torch.Tensor | None:
    """None, or ALiBi's per-head slopes: a floating `(Hq,)` or `(batch, Hq)` tensor on the
    inputs' device (`batch` the batch size, or the number of packed documents), returned as
    `(1 or batch, Hq)` (each path computes the bias in its own compute dtype). They are
    constants, as in flash-attn: one that requires grad is refused rather than silently given
    none."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be None or a torch.Tensor; got {type(alibi_slopes).__name__}")
    if not alibi_slopes.dtype.is_floating_point:
        raise TypeError(f"alibi_slopes must be floating; got {alibi_slopes.dtype}")
    if alibi_slopes.shape not in ((num_heads,), (batch, num_heads)):
        raise ValueError(f"alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}); got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on {device}; got {alibi_slopes.device}")
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes get no gradient (they are constants, as in flash-attn); pass "
                         "alibi_slopes.detach(), or a float attn_mask for a learned bias")
    return alibi_slopes.reshape(-1, num_heads)


def check_sink(sink, num_heads: int, device: torch.device) -> torch.Tensor | None:
    """None, or attention sinks: a floating `(Hq,)` tensor on the inputs' device, one logit per
    query head (it may require grad)."""
    if sink is None:
        return None
    if not isinstance(sink, torch.Tensor):
        raise TypeError(f"sink must be None or a torch.Tensor; got {type(sink).__name__}")
    if not sink.dtype.is_floating_point:
        raise TypeError(f"sink must be floating; got {sink.dtype}")
    if sink.shape != (num_heads,):
        raise ValueError(f"sink must have shape ({num_heads},), one logit per query head; got "
                         f"{tuple(sink.shape)}")
    if sink.device != device:
        raise ValueError(f"sink must be on {device}; got {sink.device}")
    return sink


def check_seqused_k(seqused_k, query: torch.Tensor) -> torch.Tensor | None:
    """None, or per-batch key lengths: an int32 or int64 `(B,)` tensor on the query's device, as
    int32. Its values are not read (no host sync): the paths clamp them to `[0, Nk]`."""
    if seqused_k is None:
        return None
    if not isinstance(seqused_k, torch.Tensor):
        raise TypeError(f"seqused_k must be None or a torch.Tensor; got {type(seqused_k).__name__}")
    if seqused_k.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seqused_k must be int32 or int64; got {seqused_k.dtype}")
    if seqused_k.shape != (query.shape[0],):
        raise ValueError(f"seqused_k must have shape ({query.shape[0]},), one length per batch entry; got "
                         f"{tuple(seqused_k.shape)}")
    if seqused_k.device != query.device:
        raise ValueError(f"seqused_k must be on {query.device}; got {seqused_k.device}")
    return seqused_k.to(torch.int32)


def make_call(query, key, value, *, normalizer: str, alpha: float, length_scale, scale: float | None,
              causal_offset: int | str | None, attn_mask=None, dropout_p: float = 0.0,
              docs: PackedDocs | None = None, seqused_k: torch.Tensor | None = None,
              window: tuple[int, int] | None = None, softcap: float | None = None,
              alibi_slopes: torch.Tensor | None = None, sink: torch.Tensor | None = None,
              block_map=None) -> AttentionCall:
    """The call of checked arguments in canonical form: the normalizer rewritten to its base
    record (`normalizers.canonical`), the scale's default, `1 / sqrt(D)`, resolved, the causal
    offset resolved (`"bottom_right"`: `Nk - Nq`, per document when packed, per batch with
    `seqused_k`), the sliding window (`check_window`) turned into bounds around it
    (`window_bounds`), both clamped to the lengths (`clamp_causal_offset`), ALiBi's distances
    counted from the causal diagonal too (from `i` without one; not clamped: beside a sink a
    shifted diagonal would move weight), and, under `torch.autocast`, the inputs in its dtype
    (`_autocast`)."""
    if isinstance(alpha, torch.Tensor) and not normalizers.get(normalizer).takes_alpha:
        raise ValueError(f"a tensor alpha is read by normalizer='entmax' only; normalizer={normalizer!r} "
                         "reads none (sparsemax is entmax at alpha = 2)")
    record, alpha, length_scale = normalizers.canonical(normalizer, alpha, length_scale)
    query, key, value = _autocast(query, key, value)
    causal_from_end = False
    if docs is None:
        lengths = query.shape[-2], key.shape[-2]
        if causal_offset == BOTTOM_RIGHT and seqused_k is None:
            causal_offset = key.shape[-2] - query.shape[-2]
        elif causal_offset == BOTTOM_RIGHT:  # each batch's own corner, (Nq, seqused_k[b]): no host read
            causal_offset, causal_from_end, lengths = 0, True, lengths[::-1]
    else:
        if causal_offset == BOTTOM_RIGHT:
            causal_offset, docs = 0, replace(docs, causal_from_end=True)
        lengths = docs.max_seqlen_q, docs.max_seqlen_k
        if docs.causal_from_end:  # as `offset + n_k - n_q`, it changes no row in [-max_k, max_q] instead
            lengths = lengths[::-1]
    alibi_offset = None if alibi_slopes is None else bound_alibi_offset(causal_offset or 0)
    causal_offset, window_offset = window_bounds(causal_offset, window)
    causal_offset = clamp_causal_offset(causal_offset, *lengths)
    window_offset = clamp_causal_offset(window_offset, *lengths)
    return AttentionCall(
        query, key, value, name=normalizer, normalizer=record, alpha=alpha, length_scale=length_scale,
        scale=query.shape[-1] ** -0.5 if scale is None else scale, causal_offset=causal_offset,
        attn_mask=attn_mask, dropout_p=dropout_p, docs=docs, seqused_k=seqused_k, window_offset=window_offset,
        softcap=softcap, alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, sink=sink, block_map=block_map,
        causal_from_end=causal_from_end,
    )


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype `torch.autocast` casts to on this device type, None when it is off (or the
    device type has no autocast, as `meta`)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast(*tensors):
    """Under autocast, q, k and v cast as torch casts SDPA's: float16, bfloat16 and float32 to the
    autocast dtype, float64 left alone. So every normalizer returns what SDPA would, and inside,
    with autocast off (`dispatch.run`), the dtype rule is longattn's own."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def check_offsets(name: str, offsets: list[int], total: int) -> None:
    """Packed documents' offsets on the host: from 0, non-decreasing, ending at the packed length."""
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0; got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing; got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}; got {offsets[-1]}")


def check_flag(name: str, value) -> bool:
    """A bool, or numpy's bool, as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return bool(value)


def check_int(name: str, value, expected: str = "an int") -> int:
    """An integer (Python's or numpy's, anything with `__index__` but a bool) as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__}")
    return operator.index(value)


def check_alpha(alpha, num_heads: int | None = None, device: torch.device | None = None):
    """alpha in `[MIN_ALPHA, 2]`: below MIN_ALPHA, float32 cannot resolve entmax's threshold.

    A real number, or (with the query's head count and device) a floating tensor of shape `()`
    or `(Hq,)`, one alpha per query head, which may require grad. A tensor's values are checked
    on the host where that costs no synchronisation (a CPU tensor, eagerly: a ValueError);
    on an accelerator and under torch.compile by `torch._assert_async`, which raises (on CUDA,
    a device-side assertion) at the next synchronisation instead of stalling this call."""
    if isinstance(alpha, torch.Tensor) and num_heads is not None:
        return _check_alpha_tensor(alpha, num_heads, device)
    if not is_real_number(alpha):
        expected = "a real number or a () / (Hq,) tensor" if num_heads is not None else "a real number"
        raise TypeError(f"alpha must be {expected} in [{MIN_ALPHA}, 2]; got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 1.0 < alpha <= 2.0):
        raise ValueError(f"alpha must be in [{MIN_ALPHA}, 2] (1 is softmax, 2 is sparsemax); got {alpha}")
    if alpha < MIN_ALPHA:
        raise ValueError(
            f"alpha must be at least {MIN_ALPHA}; got {alpha}. Closer to 1, entmax's weights "
            "[(alpha - 1) z - tau]_+ ** (1 / (alpha - 1)) amplify float32 rounding by 1 / (alpha - 1), and "
            "at 1.01 its output is already within a few percent of softmax's: use normalizer='softmax'"
        )
    return alpha


def _check_alpha_tensor(alpha: torch.Tensor, num_heads: int, device: torch.device) -> torch.Tensor:
    if not alpha.dtype.is_floating_point:
        raise TypeError(f"alpha tensor must be floating; got {alpha.dtype}")
    if alpha.shape not in ((), (num_heads,)):
        raise ValueError(f"alpha must have shape ({num_heads},) (one per query head) or (); got "
                         f"{tuple(alpha.shape)}")
    if alpha.device != device:
        raise ValueError(f"alpha must be on {device}; got {alpha.device}")
    inside = ((alpha >= MIN_ALPHA) & (alpha <= 2.0)).all()
    message = f"alpha must be in [{MIN_ALPHA}, 2] (1 is softmax, 2 is sparsemax) for every head"
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(inside):
            raise ValueError(f"{message}; got {alpha.detach().tolist()}")
    elif alpha.device.type != "meta":
        torch._assert_async(inside, message)
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


def check_block_map(block_map, query, key):
    """None or a `BlockMap` whose flags are bool, on the inputs' device and broadcastable to
    `(B, Hq, cdiv(Nq, block_size), cdiv(Nk, block_size))` (`query` batched)."""
    from .block_map import BLOCK_MULTIPLE, BlockMap

    if block_map is None:
        return None
    if not isinstance(block_map, BlockMap):
        raise TypeError(f"block_map must be None or a longattn.BlockMap; got {type(block_map).__name__}")
    size, flags = block_map.block_size, block_map.flags
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % BLOCK_MULTIPLE:
        raise ValueError(f"block_map.block_size must be a positive multiple of {BLOCK_MULTIPLE}; "
                         f"got {size!r}")
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool:
        raise TypeError(f"block_map.flags must be a bool tensor; got "
                        f"{flags.dtype if isinstance(flags, torch.Tensor) else type(flags).__name__}")
    if flags.device != query.device:
        raise ValueError(f"block_map.flags must be on {query.device}; got {flags.device}")
    target = (*query.shape[:-2], -(-query.shape[-2] // size), -(-key.shape[-2] // size))
    try:
        ok = flags.dim() <= 4 and torch.broadcast_shapes(flags.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"block_map.flags of shape {tuple(flags.shape)} does not broadcast to {target}, "
                         f"(B, Hq, cdiv(Nq, {size}), cdiv(Nk, {size}))")
    return block_map


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
