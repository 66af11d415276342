"""The host side both kernel families share (the `@triton.jit` side is `kernels/program.py`):
block sizes and dot precision, the launch arguments (shapes, strides, the causal offset, the
length-scale vector, the heuristics' flags), the checks of what the kernels cannot do, the
shapes the custom ops' fake implementations return, and the autograd functions' bookkeeping
(the varlen trailing arguments, the gradient of the length scale)."""

from __future__ import annotations

import os

import torch
import triton

# Padded head dims stay at least 16: tl.dot needs every block dim >= 16 on tensor cores.
MIN_BLOCK = 16
MAX_HEAD_DIM = 256
# The smallest entmax alpha taken, here and by the public checks: the weights' power
# 1 / (alpha - 1) amplifies float32 rounding, and the fp32 error against float64 entmax_bisect
# grows as ~1.3e-8 / (alpha - 1) on every path (N = 64 to 4096): 1.8e-6 at 1.01, 1.3e-5 at
# 1.001, 1.3e-3 at 1.00001.
MIN_ALPHA = 1.01


def padded_dim(d: int) -> int:
    """The head-dim block: `d` rounded up to a power of two, at least 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(d))


def tile_config(d_pad: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """`(BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages)` for a program that keeps one block of
    rows on chip and streams blocks of the other side through it.

    Chosen by compiling every kernel for sm_80 and sm_90 (ptxas -v, no GPU timing): none spills
    registers (fp16 D=256 on sm_80: 16 bytes) and none needs more than 98 KB of shared memory.
    """
    if dtype == torch.float32:  # full-precision fp32 dots run on FMA units and hold more in registers
        return (32, 32, 8, 2) if d_pad <= 128 else (32, 16, 8, 2)
    if d_pad <= 64:
        # backward: with 2 stages ptxas spilled 8 bytes in dK/dV on sm_80 (uneven lengths); 3 do not
        return (64, 32, 4, 3) if backward else (64, 32, 4, 2)
    if d_pad <= 128:
        return 64, 32, 8, 2
    return 32, 32, 8, 2


def device_capability(device: torch.device) -> int | None:
    """The CUDA compute capability as one number (80 for sm_80), None off CUDA (the interpreter):
    for the few tile choices that differ between GPU generations."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (torch's default); tf32 would err ~1e-3."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Launch arguments
# ----------------------------------------------------------------------------------------------

# Flags derived from the arguments, for `@triton.heuristics`: the common case compiles without
# masks or dead branches.
HEURISTICS = {
    # Varlen: the sequences are the documents of one packed batch, their offsets and lengths
    # read from cu_seqlens in-kernel, so no length is known to divide a block.
    "IS_VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "EVEN_M": lambda args: args["cu_seqlens_q"] is None and args["Nq"] % args["BLOCK_M"] == 0,
    # Key lengths (`seqused_k`, dense only): each batch's Nk is read in-kernel too, so it is not
    # known to divide a block either.
    "HAS_KEY_LENGTHS": lambda args: args["seqused_k"] is not None,
    "EVEN_N": lambda args: (args["cu_seqlens_q"] is None and args["seqused_k"] is None
                            and args["Nk"] % args["BLOCK_N"] == 0),
    "EVEN_D": lambda args: args["D"] == args["BLOCK_D"] and args["Dv"] == args["BLOCK_DV"],
    "HAS_LENGTH_SCALE": lambda args: args["s"] is not None,
}


def length_scale_vector(length_scale, num_heads: int, device) -> torch.Tensor | None:
    """None, a float, or a `()` / `(Hq,)` tensor -> None or a contiguous `(Hq,)` fp32 tensor."""
    if length_scale is None:
        return None
    s = torch.as_tensor(length_scale, dtype=torch.float32, device=device).detach()
    return s.expand(num_heads).contiguous()


def window_bounds(causal_offset: int | None, window: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """`(causal_offset, window_offset)`: the causal rule `j <= i + causal_offset` with a window's
    right edge folded in, and the window's left edge `j >= i + window_offset` (None: none). The
    window is centred on the causal diagonal `i + causal_offset`, or on `i` (top-left) without
    one; its right edge bounds only what the causal rule would not."""
    if window is None:
        return causal_offset, None
    left, right = window
    centre = 0 if causal_offset is None else causal_offset
    window_offset = None if left < 0 else centre - left
    if right >= 0:
        causal_offset = centre + right if causal_offset is None else min(causal_offset, centre + right)
    return causal_offset, window_offset


def causal_args(causal_offset: int | None, Nq: int, Nk: int,
                from_end: bool = False) -> tuple[bool, int, bool]:
    """`(IS_CAUSAL, offset, CAUSAL_FROM_END)`. Without the mask every row sees every key, as with
    an offset of Nk: the kernels' bounds then need no branch. Clamping to [-Nq, Nk] changes no
    row and keeps the kernels' index arithmetic in int32. `from_end` (varlen): the offset counts
    from each document's bottom-right corner (the kernels add its `Nk - Nq`); it needs the mask."""
    if causal_offset is None:
        return False, Nk, False
    return True, _clamp_offset(causal_offset, Nq, Nk, from_end), from_end


def window_args(window_offset: int | None, Nq: int, Nk: int, from_end: bool = False) -> tuple[bool, int]:
    """`(HAS_WINDOW, offset)` of a sliding window's left edge, key j allowed for row i iff
    `j >= i + window_offset` (None: no window; the kernels then read no offset), clamped as
    `causal_args` clamps; `from_end` as there."""
    if window_offset is None:
        return False, 0
    return True, _clamp_offset(window_offset, Nq, Nk, from_end)


# ALiBi's diagonal is not clamped to the lengths, which would move a sink's weight against the keys';
# it is bounded only to keep the kernels' int32 distances from overflowing.
ALIBI_OFFSET_BOUND = 1 << 30


def bound_alibi_offset(offset: int) -> int:
    return max(-ALIBI_OFFSET_BOUND, min(offset, ALIBI_OFFSET_BOUND))


def logit_modifiers(softcap: float | None, alibi_slopes: torch.Tensor | None, alibi_offset: int | None,
                    B: int, Hq: int, Nq: int, Nk: int, from_end: bool, unit: float, device) -> dict:
    """The kernels' softcap and ALiBi arguments, in their logit units: softmax's base 2 (`unit =
    log2 e`) or entmax's `x = (alpha - 1) z` (`unit = alpha - 1`), which scale the cap and the
    slopes alike (`c tanh(z / c)` in units `u` is `uc tanh(uz / uc)`). The slopes become a
    contiguous fp32 `(B, Hq)` tensor (B counts documents in varlen mode); the diagonal is only
    bounded to +-2^30, keeping the int32 distances in range (clamping it to the lengths, as
    `causal_args` clamps, would move a sink's weight)."""
    has_alibi = alibi_slopes is not None
    slopes = None
    if has_alibi:
        slopes = (alibi_slopes.detach().to(device, torch.float32).reshape(-1, Hq) * unit).expand(B, Hq)
        slopes = slopes.contiguous()
    return {
        "softcap": 0.0 if softcap is None else float(softcap) * unit, "alibi": slopes,
        "alibi_offset": bound_alibi_offset(alibi_offset or 0) if has_alibi else 0,
        "HAS_SOFTCAP": softcap is not None, "HAS_ALIBI": has_alibi,
    }


def sink_vector(sink: torch.Tensor | None, num_heads: int, device) -> torch.Tensor | None:
    """None, or attention sinks as the kernels read them: a contiguous fp32 `(Hq,)` tensor of
    logits (natural units; each kernel converts to its own)."""
    if sink is None:
        return None
    return sink.detach().to(device, torch.float32).reshape(num_heads).contiguous()


def _clamp_offset(offset: int, Nq: int, Nk: int, from_end: bool) -> int:
    """`offset` in `[-Nq, Nk]`, which changes no row. Counted from each document's end, the
    kernels add `n_k - n_q` to it: `[-Nk, Nq]` (the packed lengths bound every document's) is the
    range where that changes no row."""
    low, high = (Nk, Nq) if from_end else (Nq, Nk)
    return max(-low, min(int(offset), high))


def key_lengths(seqused_k: torch.Tensor | None, k: torch.Tensor, varlen: bool) -> torch.Tensor | None:
    """`seqused_k` as the kernels read it: int32 `(B,)`, each batch's used key length, never read on
    the host (no sync; the kernels clamp it to `[0, Nk]`). Dense mode only: varlen's documents
    have their key lengths in cu_seqlens_k."""
    if seqused_k is None:
        return None
    if varlen:
        raise ValueError("seqused_k is for dense (B, H, N, D) inputs; in varlen mode each document's key "
                         "length is given by cu_seqlens_k")
    if seqused_k.shape != (k.shape[0],) or seqused_k.dtype != torch.int32 or seqused_k.device != k.device:
        raise ValueError(f"seqused_k must be an int32 ({k.shape[0]},) tensor on {k.device}; got "
                         f"{seqused_k.dtype} {tuple(seqused_k.shape)} on {seqused_k.device}")
    return seqused_k.contiguous()


def shapes(q, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """`(B, Hq, Nq, D, Hkv, Nk, Dv, grid_nq, grid_nk)`. Varlen (`cu_seqlens_q` given): `q` is
    `(total_q, Hq, D)`, `v` `(total_k, Hkv, Dv)`; B counts the documents, Nq and Nk are the packed
    lengths (the kernels read each document's own), and the grids span the longest document."""
    if cu_seqlens_q is None:
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
        return B, Hq, Nq, D, Hkv, Nk, Dv, Nq, Nk
    (Nq, Hq, D), (Nk, Hkv, Dv) = q.shape, v.shape
    return cu_seqlens_q.numel() - 1, Hq, Nq, D, Hkv, Nk, Dv, max_seqlen_q, max_seqlen_k


def strides(t: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """Strides in the kernels' (B, H, N, D) order. A packed `(total, H, D)` tensor has batch
    stride 0: its documents are placed by cu_seqlens, not by the batch index."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else t.stride()


def forward_shapes(q, v, varlen: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the forward's output and of each per-row statistic (lse, row max, tau):
    `(B, Hq, Nq, Dv)` and `(B, Hq, Nq)`, or in varlen mode `(total_q, Hq, Dv)` and
    `(Hq, total_q)`. For the launchers and the custom ops' fake implementations alike."""
    if varlen:
        Nq, Hq, _ = q.shape
        return (Nq, Hq, v.shape[-1]), (Hq, Nq)
    B, Hq, Nq, _ = q.shape
    return (B, Hq, Nq, v.shape[-1]), (B, Hq, Nq)


def per_head_from_rows(ds_row: torch.Tensor, varlen: bool) -> torch.Tensor:
    """A per-head gradient (the length scale's, the sink's) from each row's share (the dQ
    kernels' `ds_row`), summed on the host so that the result is deterministic: `(Hq,)` from
    `(B, Hq, Nq)` or varlen's `(Hq, total_q)`."""
    return ds_row.sum(dim=1) if varlen else ds_row.sum(dim=(0, 2))


# ----------------------------------------------------------------------------------------------
# Checks, custom ops and autograd
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether the Triton interpreter is on, read at each call: a test may switch it after the
    kernels were imported."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_inputs(q, k, v, varlen: bool = False) -> None:
    """What the kernels cannot do; the general argument checks live in `attention/checks.py`.
    The heads are dim 1 in both layouts, (B, H, N, D) and varlen's (total, H, D)."""
    ndim, layout = (3, "(total, H, D)") if varlen else (4, "(B, H, N, D)")
    if not q.dim() == k.dim() == v.dim() == ndim:
        raise ValueError(f"q, k, v must be {layout}; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if q.dtype == torch.bfloat16 and interpreting():
        # Triton 3.9's interpreter multiplies the raw bits of bfloat16 operands in tl.dot: the
        # output errs by ~1e9 relative, silently.
        raise TypeError("bfloat16 is not supported under the Triton interpreter (TRITON_INTERPRET=1): its "
                        "tl.dot multiplies the raw bfloat16 bits, so the results would be garbage; use "
                        "float16 or float32 here, or bfloat16 on a GPU with the interpreter off")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be at most {MAX_HEAD_DIM}; got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def check_window_size(window_size) -> tuple[int, int] | None:
    """flash-attn's `(left, right)`, each -1 (unbounded) or >= 0, or None; `(-1, -1)` as None."""
    if window_size is None:
        return None
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be None or a pair (left, right) of ints, each -1 (unbounded) or "
                         f">= 0; got {window_size!r}")
    return None if tuple(window_size) == (-1, -1) else (window_size[0], window_size[1])


def check_modifiers(q: torch.Tensor, softcap, alibi_slopes, sink, batch: int) -> None:
    """The entries' softcap (a finite number above 0), ALiBi slopes (`(Hq,)` or `(batch, Hq)`)
    and sink (`(Hq,)`); `attention/checks.py` checks the public API's more fully."""
    heads = q.shape[1]
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite number above 0; got {softcap!r}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}); got "
                         f"{tuple(alibi_slopes.shape)}")
    if sink is not None and tuple(sink.shape) != (heads,):
        raise ValueError(f"sink must have shape ({heads},); got {tuple(sink.shape)}")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """The logit scale, `D ** -0.5` unless given."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def op_optional_grad(q: torch.Tensor, ds: torch.Tensor | None) -> torch.Tensor:
    """A custom op cannot return None: an empty tensor stands for "no length scale" or "no sink"."""
    return q.new_empty(0, dtype=torch.float32) if ds is None else ds


def fake_gradients(q, k, v, length_scale, sink=None, grad_mask=None):
    """What a backward op returns, as its fake implementation: `dq`, `dk`, `dv` like the inputs,
    the `(Hq,)` fp32 `ds` and `dsink` (empty without length scaling, without a sink) and `dmask`
    like `grad_mask`, the float mask whose gradient is wanted (empty without one)."""
    ds = q.new_empty(0 if length_scale is None else q.shape[1], dtype=torch.float32)
    dsink = q.new_empty(0 if sink is None else q.shape[1], dtype=torch.float32)
    dmask = q.new_empty(0, dtype=torch.float32) if grad_mask is None else grad_mask.new_empty(grad_mask.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds, dsink, dmask


def vmap_by_loop(op):
    """A `register_vmap` rule for a custom op, which has no batched form of its own: the op on each
    slice of the vmapped dim (the unbatched arguments shared by every slice), the results stacked
    at dim 0. One launch per slice, but correct for every op, mode and argument batched; with it
    the autograd functions' `generate_vmap_rule` batches forward and backward alike."""

    def rule(info, in_dims, *args, **kwargs):
        if info.batch_size == 0:
            raise ValueError("vmap over a dim of size 0 is not supported by the kernels' custom ops")
        fronts = [a if d is None else a.movedim(d, 0) for a, d in zip(args, in_dims, strict=True)]
        results = [op(*(a if d is None else a[i] for a, d in zip(fronts, in_dims, strict=True)), **kwargs)
                   for i in range(info.batch_size)]
        stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
        return stacked, (0,) * len(stacked)

    return rule


class FirstOrderOnly(torch.autograd.Function):
    """The identity on a backward's gradients, tied to the tensors they were computed from, whose
    own backward raises: the kernels' gradients (and the torch path's sparse ones) are not
    differentiable, so a second derivative through them (double backward, `torch.func.grad` of a
    gradient) fails loudly. Not
    `once_differentiable`: that returns gradients without a graph when the upstream gradient
    needs none (`out.sum()`), and a second derivative through them then comes out silently
    incomplete. `forward(op_name, n, *tensors)` returns the first n tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op_name, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward through {ctx.op_name} is not supported: its gradients are "
                           "first-order only, not differentiable (backend='reference' has second "
                           "derivatives outside torch.compile)")


def first_order_only(op_name: str, grads: tuple, sources: tuple) -> tuple:
    """A backward's `grads`, as they are unless autograd records the backward itself
    (create_graph, and every torch.func.grad): then tied by `FirstOrderOnly` to `sources`, the
    tensors (None allowed) they were computed from."""
    if not torch.is_grad_enabled():
        return grads
    return FirstOrderOnly.apply(op_name, len(grads), *grads, *sources)


# The autograd functions' trailing varlen arguments in dense mode, where they only carry
# `causal_from_end` (the bounds counted from each batch's key length)
DENSE_FROM_END = (None, None, 0, 0, True)


def save_varlen_args(ctx, varlen: tuple) -> tuple:
    """An autograd function's trailing arguments, `(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, causal_from_end)` in varlen mode and none otherwise: keeps the scalars on `ctx`
    and returns the cu_seqlens, to be saved with the tensors."""
    ctx.varlen_scalars = varlen[2:]
    return varlen[:2]


def varlen_launch_args(ctx, cu_seqlens) -> tuple:
    """The saved varlen arguments, in the launchers' order (empty in dense mode)."""
    return (*cu_seqlens, *ctx.varlen_scalars)


def varlen_no_grads(ctx, cu_seqlens) -> tuple:
    """The trailing varlen arguments' gradients: None each."""
    return (None,) * (len(cu_seqlens) + len(ctx.varlen_scalars))


def sink_grad(sink: torch.Tensor | None, dsink: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """The sink's gradient as given (its shape and dtype) from the kernels' `(Hq,)` fp32 one."""
    if sink is None or not needed:
        return None
    return dsink.to(sink.dtype)


def save_length_scale_meta(ctx, length_scale) -> None:
    """Remembers a tensor length scale's shape and dtype, for `length_scale_grad`."""
    ctx.length_scale_meta = None
    if torch.is_tensor(length_scale):
        ctx.length_scale_meta = (length_scale.shape, length_scale.dtype)


def length_scale_grad(ctx, ds: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """The gradient of the length scale as given (a `()` or `(Hq,)` tensor) from the kernels'
    `(Hq,)` fp32 `ds`; None for a float or None, or when autograd does not need it."""
    if ctx.length_scale_meta is None or not needed:
        return None
    shape, dtype = ctx.length_scale_meta
    return ds.sum_to_size(shape).to(dtype)  # () sums over heads
