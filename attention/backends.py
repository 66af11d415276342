"""The backends, one record each: what each can serve, and why not.

A backend record names the backend, says in one line what runs, and answers `verify(call)`: ""
when it can run a call, else the reason it cannot (fla's `verify` returning `(ok, reason)`).
Whether a normalizer has an implementation on a backend is the normalizer record's business
(`normalizers.py`); `dispatch.py` asks both. Adding a backend is one record here, its adaptors,
and an entry in the `paths` of the normalizers it serves.

The adaptors below turn an `AttentionCall` into a call of a kernel library; they import it only
when they run, so importing longattn needs neither triton's kernels nor flash-attn.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.common import MAX_HEAD_DIM as TRITON_MAX_HEAD_DIM  # host side only: compiles no kernel
from ..kernels.common import interpreting
from . import reference
from .call import AttentionCall

FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # what runs, for the README's table
    memory: str  # the extra memory it takes, likewise
    verify: Callable[[AttentionCall], str]  # "" when this backend can run the call, else why not
    packed: bool  # runs packed documents in one launch; else the dispatch runs them one by one
    auto_devices: tuple[str, ...] | None  # where "auto" may choose it (None: anywhere; (): never)
    # Takes `seqused_k` itself; for the others the dispatch folds it into the mask.
    key_lengths: bool = False
    # Takes a `BlockMap` itself (skipping the blocks it clears); for the others the dispatch
    # folds it into the mask.
    block_maps: bool = False
    # One implementation for every normalizer (the reference's, which needs only the normalizer's
    # row function); None: each normalizer record names its own in `paths`.
    run: Callable[[AttentionCall], torch.Tensor] | None = None
    # What it takes of each keyword in `FEATURES`: "yes", "no" or the condition, for the README's
    # table; `verify` is what decides (tests/test_dispatch.py holds the two together).
    features: dict[str, str] = field(default_factory=dict)

    def allowed_by_auto(self, call: AttentionCall) -> bool:
        return self.auto_devices is None or call.query.device.type in self.auto_devices


# ---------------------------------------------------------------------------------------------
# What each backend cannot do


def _anything(call: AttentionCall) -> str:
    return ""


def _triton_limits(call: AttentionCall) -> str:
    device = call.query.device
    if call.attn_mask is not None and call.docs is not None:
        return "attn_mask is not supported by the kernels with packed documents (cu_seqlens mask them)"
    if call.dropout_p > 0:
        return "dropout_p > 0 is not supported by the kernels"
    if call.query.dtype == torch.float64:
        return "float64 is not supported by the kernels (float16, bfloat16, float32 are)"
    if max(call.head_dims) > TRITON_MAX_HEAD_DIM:
        return f"head dims {call.head_dims[0]}, {call.head_dims[1]} exceed the kernels' {TRITON_MAX_HEAD_DIM}"
    if device.type == "cpu" and not interpreting():
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing longattn"
    if call.query.dtype == torch.bfloat16 and interpreting():
        # Triton 3.9's interpreter multiplies the raw bits of bfloat16 operands in tl.dot
        return "bfloat16 is not supported by the Triton interpreter (float16 and float32 are; GPUs take it)"
    if device.type not in ("cpu", "cuda"):
        return f"the kernels run on CUDA tensors (or on CPU in the Triton interpreter); got {device}"
    return ""


# Looked up once (find_spec imports nothing), so `verify` stays traceable by torch.compile.
FLASH_ATTN_2 = importlib.util.find_spec("flash_attn") is not None
FLASH_ATTN_3 = importlib.util.find_spec("flash_attn_interface") is not None  # Hopper's build


def _flash_limits(call: AttentionCall) -> str:
    if not (FLASH_ATTN_2 or FLASH_ATTN_3):
        return "flash-attn is not installed (pip install 'longattn[flash]')"
    if call.query.device.type != "cuda":
        return f"flash-attn needs CUDA tensors; got {call.query.device}"
    if call.query.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 or bfloat16; got {call.query.dtype}"
    if call.attn_mask is not None:
        return "attn_mask is not supported by flash-attn (is_causal and causal_offset are)"
    if call.block_map is not None:
        return "block_map is not supported by flash-attn (backend='triton' skips the blocks it clears)"
    if call.seqused_k is not None:
        return "seqused_k is not supported by flash-attn's dense interface"
    if call.dropout_p > 0 and not FLASH_ATTN_2:
        return "dropout_p > 0 needs flash-attn 2 (FlashAttention 3's interface has no dropout)"
    if call.sink is not None:
        return "sink is not supported by flash-attn 2's or 3's interface (backend='triton' takes it)"
    if call.alibi_slopes is not None and not FLASH_ATTN_2:
        return "alibi_slopes needs flash-attn 2 (FlashAttention 3's interface has no ALiBi)"
    d, dv = call.head_dims
    if d != dv or d > FLASH_MAX_HEAD_DIM:
        return f"flash-attn needs one head dim of at most {FLASH_MAX_HEAD_DIM} for q, k and v; got {d}, {dv}"
    return _flash_window(call)[1]


def _flash_window(call: AttentionCall) -> tuple[tuple[bool, tuple[int, int]], str]:
    """flash-attn aligns its causal mask bottom-right, `j <= i + Nk - Nq` (in each packed
    document, its own lengths); a window `(l, r)` allows `i + Nk - Nq - l <= j <= i + Nk - Nq + r`
    (-1: unbounded). So `causal_offset` and `window_offset` map to `(causal, window)` when the
    first is at least `Nk - Nq` and the second at most (0 when packed and counted from each
    document's end, or where every document has as many queries as keys). Its ALiBi counts
    distances from that diagonal too, so `alibi_offset` must be it. Returns `(causal, window)`,
    and "" or the reason it does not map."""
    offset, window_offset = call.causal_offset, call.window_offset
    if offset is None and window_offset is None and call.alibi_slopes is None:
        return (False, (-1, -1)), ""
    docs = call.docs
    if docs is None:
        bottom_right = call.key.shape[-2] - call.query.shape[-2]
        least = f"Nk - Nq = {bottom_right}"
    elif docs.causal_from_end or docs.lengths_match:
        bottom_right, least = 0, "0, counted from each document's end"
    else:
        return (False, (-1, -1)), (
            "flash-attn aligns causal masks bottom-right in each document, which equals an offset from "
            "the document's start only where every document is known to have as many queries as keys "
            "(given max_seqlen_q and max_seqlen_k, the offsets are not read); causal_offset='bottom_right' "
            "maps with any lengths")
    if offset is not None and offset < bottom_right:
        return (False, (-1, -1)), (f"flash-attn aligns causal masks bottom-right: causal_offset must be at "
                                   f"least {least}; got {offset}")
    if call.alibi_slopes is not None and call.alibi_offset != bottom_right:
        return (False, (-1, -1)), (f"flash-attn's ALiBi counts distances from the bottom-right diagonal, "
                                   f"{least}; this call's count from i + {call.alibi_offset}")
    if window_offset is not None and window_offset > bottom_right:
        return (False, (-1, -1)), (f"flash-attn's sliding window reaches left from the bottom-right "
                                   f"diagonal: its left edge, key i + {window_offset}, must not lie right "
                                   f"of it, {least}")
    left = -1 if window_offset is None else bottom_right - window_offset
    right = -1 if offset is None else offset - bottom_right
    if right == 0:
        return (True, (-1, -1) if left == -1 else (left, 0)), ""
    return (False, (left, right)), ""


# The keywords beyond SDPA's causal flag whose support differs between backends, in the order the
# README's table lists them.
FEATURES = ("causal_offset", "window_size", "seqused_k", "attn_mask", "block_map", "dropout_p", "softcap",
            "alibi_slopes", "sink", "float64")
_ALL = dict.fromkeys(FEATURES, "yes")

REFERENCE = Backend(
    "reference", "`attention/reference.py`: the materialising definition, the oracle of the tests",
    "the `B x H x Nq x Nk` scores", _anything, packed=False, auto_devices=(), run=reference.attention,
    features=_ALL,
)
TORCH = Backend(
    "torch", "`attention/chunked.py`: torch's fused SDPA for softmax, blocks of query rows for the sparse "
    "normalizers, each row's threshold by Newton's method", "one block of about 4 MiB, plus O(N)", _anything,
    packed=False, auto_devices=None, features=_ALL,
)
TRITON = Backend(
    "triton", "`kernels/`: tiled Triton kernels, forward and backward (the Triton interpreter on CPU)",
    "O(N)", _triton_limits, packed=True, auto_devices=("cuda",), key_lengths=True, block_maps=True,
    features={**_ALL, "dropout_p": "no", "float64": "no"},
)
FLASH = Backend(
    "flash", "flash-attn (FlashAttention 2, or 3's interface where present), when installed", "O(N)",
    _flash_limits, packed=True, auto_devices=("cuda",),
    features={**_ALL, "causal_offset": "at least `Nk - Nq`",
              "window_size": "left edge at or left of `i + Nk - Nq`",
              "seqused_k": "no", "attn_mask": "no", "block_map": "no", "dropout_p": "FlashAttention 2",
              "alibi_slopes": "FlashAttention 2, from `i + Nk - Nq`", "sink": "no", "float64": "no"},
)

BACKENDS = {b.name: b for b in (REFERENCE, TORCH, TRITON, FLASH)}
BACKEND_CHOICES = ("auto", *BACKENDS)
# What "auto" tries, in order: the first that may run here and can serve the call.
AUTO_ORDER = (FLASH, TRITON, TORCH)


# ---------------------------------------------------------------------------------------------
# Adaptors: an AttentionCall to the kernels' entry points


def triton_softmax(call: AttentionCall) -> torch.Tensor:
    from ..kernels.softmax import SoftmaxAttentionFunction

    out, _ = SoftmaxAttentionFunction.apply(*_triton_args(call, call.scale))
    return out


def triton_entmax(call: AttentionCall) -> torch.Tensor:
    from ..kernels.entmax import EntmaxAttentionFunction

    return EntmaxAttentionFunction.apply(*_triton_args(call, call.scale, call.alpha))[0]


def _triton_args(call: AttentionCall, *scalars) -> tuple:
    """The kernels' autograd functions' arguments, straight from the canonical call (the entry
    points' `window_size` would lose ALiBi's diagonal where a window's right edge was folded into
    the causal offset): the inputs, `scalars` (the scale, and entmax's alpha), the bounds, the
    logit modifiers and, packed, the documents (their offsets stay on the device: no sync)."""
    from ..kernels.common import DENSE_FROM_END, check_inputs

    q, k, v = call.query, call.key, call.value
    check_inputs(q, k, v, varlen=call.docs is not None)
    if call.docs is not None:
        varlen = (*_triton_docs(call.docs), call.docs.causal_from_end)
    else:  # dense: the trailing arguments only to count the bounds from each batch's key length
        varlen = DENSE_FROM_END if call.causal_from_end else ()
    block_map = call.block_map
    flags, block_size = (None, 128) if block_map is None else (block_map.flags, block_map.block_size)
    return (q, k, v, *scalars, call.causal_offset, call.length_scale, call.seqused_k, call.window_offset,
            call.softcap, call.alibi_slopes, call.alibi_offset, call.sink, call.attn_mask, flags, block_size,
            *varlen)


def _triton_docs(docs) -> tuple:
    """The varlen launchers' document arguments (the offsets stay on the device: no sync)."""
    return docs.cu_seqlens_q, docs.cu_seqlens_k, docs.max_seqlen_q, docs.max_seqlen_k


def flash_softmax(call: AttentionCall) -> torch.Tensor:
    """Softmax through flash-attn; SSMax's per-row factor `s_h ln(n_i)` folded into the query, so
    a tensor `s` gets its gradient through autograd. FlashAttention 3's interface (Hopper) is
    taken where it is installed and no dropout is asked for (it has none)."""
    (causal, window), _ = _flash_window(call)
    q, k, v = call.query, call.key, call.value
    dense = call.docs is None
    if dense:  # flash-attn's layout is (B, N, H, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if call.length_scale is not None:
        q = (q.float() * _flash_length_factor(call)).to(q.dtype)
    kwargs = {"softmax_scale": call.scale, "causal": causal}
    if window != (-1, -1):  # passed only when needed: early FlashAttention 3 builds take no window
        kwargs["window_size"] = window
    if call.softcap is not None:  # flash-attn caps the scaled logits too, before its ALiBi
        kwargs["softcap"] = call.softcap
    if call.alibi_slopes is not None:  # fp32 (nheads,) or (batch, nheads)
        kwargs["alibi_slopes"] = call.alibi_slopes.float().contiguous().squeeze(0)
    if FLASH_ATTN_3 and call.dropout_p == 0 and call.alibi_slopes is None:
        import flash_attn_interface as fa
    else:
        import flash_attn as fa

        kwargs["dropout_p"] = call.dropout_p
    if dense:
        out = fa.flash_attn_func(q, k, v, **kwargs)
    else:
        d = call.docs
        out = fa.flash_attn_varlen_func(q, k, v, d.cu_seqlens_q, d.cu_seqlens_k, d.max_seqlen_q,
                                        d.max_seqlen_k, **kwargs)
    out = out[0] if isinstance(out, tuple) else out  # some FlashAttention 3 versions also return the lse
    return out.transpose(1, 2) if dense else out


def _flash_length_factor(call: AttentionCall) -> torch.Tensor:
    """`s_h ln(n_i)` in flash-attn's layout, `(B, Nq, Hq, 1)` or packed `(total_q, Hq, 1)`;
    `n_i` (the keys row i may see) as the causal rule and the documents give it, 1 for none."""
    device, offset, docs = call.query.device, call.causal_offset, call.docs
    if docs is None:
        rows = torch.arange(call.query.shape[-2], device=device)
        n_k = torch.full_like(rows, call.key.shape[-2])
    else:  # each row's index within its document, and its document's key count; no host sync
        n_q_docs = docs.cu_seqlens_q.diff().long()
        doc = torch.repeat_interleave(torch.arange(docs.count, device=device), n_q_docs,
                                      output_size=call.query.shape[0])
        rows = torch.arange(call.query.shape[0], device=device) - docs.cu_seqlens_q[:-1].long()[doc]
        n_k = docs.cu_seqlens_k.diff().long()[doc]
        if offset is not None and docs.causal_from_end:
            offset = offset + n_k - n_q_docs[doc]
    n = n_k if offset is None else torch.minimum(rows + offset + 1, n_k)
    if call.window_offset is not None:  # counted from the same corner as the causal offset
        window_offset = call.window_offset
        if docs is not None and docs.causal_from_end:
            window_offset = window_offset + n_k - n_q_docs[doc]
        n = n - (rows + window_offset).clamp(min=0)
    ln_n = torch.log(n.clamp(min=1).float())
    s = torch.as_tensor(call.length_scale, dtype=torch.float32, device=device).expand(call.query.shape[1])
    factor = ln_n[:, None] * s[None, :]  # (Nq, Hq)
    return factor.unsqueeze(-1) if call.docs is not None else factor[None, :, :, None]
