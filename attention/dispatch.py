"""Which backend runs a call, and why not: the one dispatch of the dense and the packed entry points.

A backend serves a call when the normalizer has an implementation there (`normalizers.py`) and
the backend's `verify` finds nothing it cannot do (`backends.py`). "auto" takes the first of
`AUTO_ORDER` that may run on the call's device and serves it; an explicit backend that cannot
serve a call raises a ValueError naming the normalizer, the backend and the missing feature.
Nothing falls through to another path.

`capability_table()` gives the tables the README shows (a test holds the two together).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels.common import first_order_only  # host side only: compiles no kernel
from . import checks, normalizers
from .backends import AUTO_ORDER, BACKENDS, FEATURES, REFERENCE, Backend
from .call import AttentionCall, PackedDocs
from .normalizers import Normalizer


def implementation(backend: Backend, normalizer: Normalizer):
    """The function that runs `normalizer` (a canonical record) on `backend`, or None."""
    if backend.run is not None:
        return backend.run if normalizer.normalize is not None else None
    return normalizer.paths.get(backend.name)


def why_not(backend: Backend, call: AttentionCall) -> str:
    """"" when `backend` can run `call`, else the reason it cannot."""
    if implementation(backend, call.normalizer) is None:
        return f"normalizer {call.name!r} has no {backend.name} implementation"
    return backend.verify(call)


def select(call: AttentionCall, backend: str) -> Backend:
    """The backend that runs `call` when the caller asked for `backend` (a checked choice)."""
    if backend == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            if candidate.allowed_by_auto(call):
                reason = why_not(candidate, call)
                if not reason:
                    return candidate
                reasons.append(f"{candidate.name}: {reason}")
        raise ValueError(
            f"backend='auto' has no backend for normalizer {call.name!r} on {call.query.device} ("
            + "; ".join(reasons) + "); backend='reference' serves every normalizer"
        )
    chosen = BACKENDS[backend]
    reason = why_not(chosen, call)
    if reason:
        others = [name for name, b in BACKENDS.items() if b is not chosen and not why_not(b, call)]
        hint = f"; use backend={' or '.join(map(repr, others))}" if others else ""
        raise ValueError(f"backend={backend!r} cannot run this call: {reason}{hint}")
    return chosen


def run(call: AttentionCall, backend: str) -> torch.Tensor:
    """Runs a checked call on the backend `select` picks. Packed documents go to the backend in
    one launch when it takes them (`Backend.packed`), else one document at a time (under
    torch.compile, inside custom ops: `_run_documents_op`). Autocast is off inside: the call's
    tensors are already in its dtype (`checks.make_call`), and each path chooses its own compute
    dtype."""
    device_type = call.query.device.type
    if checks.autocast_dtype(device_type) is None:
        return _run(call, backend)
    with torch.autocast(device_type, enabled=False):
        return _run(call, backend)


def _run(call: AttentionCall, backend: str) -> torch.Tensor:
    chosen = select(call, backend)
    if call.docs is None:
        return _run_dense(call, chosen)
    if chosen.packed and not call.empty:
        return implementation(chosen, call.normalizer)(call)
    if torch.compiler.is_compiling():
        return _run_documents_op(call, chosen)
    return _run_documents(call, chosen)


def _run_dense(call: AttentionCall, backend: Backend) -> torch.Tensor:
    if call.empty:  # no query or no key: nothing to tile
        backend = REFERENCE
    if call.seqused_k is not None and not backend.key_lengths:
        if call.causal_from_end and backend is not REFERENCE and not torch.compiler.is_compiling():
            return _run_batches(call, backend)
        call = call.key_lengths_as_mask()
    if call.block_map is not None and not backend.block_maps:
        call = call.block_map_as_mask()
    return implementation(backend, call.normalizer)(call)


def _run_batches(call: AttentionCall, backend: Backend) -> torch.Tensor:
    """A dense call whose key lengths set each batch's causal corner, one batch at a time on
    its own keys (one host read of the lengths), so a blockwise path keeps its memory bound;
    the reference, and any path under torch.compile, takes the lengths as a mask instead
    (`AttentionCall.key_lengths_as_mask`)."""
    used = call.seqused_k.clamp(0, call.key.shape[-2]).tolist()
    if not used:  # no batch: nothing to loop over
        return _run_dense(call.key_lengths_as_mask(), backend)
    return torch.cat([_run_dense(call.batch(b, n_k), backend) for b, n_k in enumerate(used)])


def _run_documents(call: AttentionCall, backend: Backend) -> torch.Tensor:
    """A packed call one document at a time, each a dense call on `backend`; the offsets are
    read on the host (one sync) where they were not, and then checked (`varlen_attention`
    checked those it read), since slicing by wrong ones would silently give other documents."""
    if call.docs.offsets_q is None:
        call = replace(call, docs=call.docs.on_host())
        checks.check_offsets("cu_seqlens_q", call.docs.offsets_q, call.query.shape[0])
        checks.check_offsets("cu_seqlens_k", call.docs.offsets_k, call.key.shape[0])
    q, v = call.query, call.value
    outs = [q.new_empty(0, q.shape[1], v.shape[2])]  # for zero documents
    for d in range(call.docs.count):
        outs.append(_run_dense(call.document(d), backend)[0].transpose(0, 1))  # (n_d, Hq, Dv)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# The per-document loop under torch.compile. The loop reads the offsets on the host, which a
# traced graph cannot (its lengths would be data), so there it runs inside custom ops: opaque to
# the compiler, shaped by their fake implementations. Eager calls keep the plain loop above,
# whose autograd graph needs no recompute and has second derivatives.


def _run_documents_op(call: AttentionCall, backend: Backend) -> torch.Tensor:
    """`_run_documents` through `longattn::packed_documents_fwd`, whose backward,
    `longattn::packed_documents_bwd`, recomputes each document's forward under `torch.func.vjp`
    (inside an op autograd records nothing; torch.func's transforms still do). Its gradients are
    first-order only."""
    return torch.ops.longattn.packed_documents_fwd(*_op_args(call, backend))


def _op_args(call: AttentionCall, backend: Backend) -> tuple:
    """A packed call as the ops' arguments, `(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale,
    alpha, sink, alibi_slopes, *settings)`: a tensor length scale and a tensor alpha beside the
    tensors (they may require grad, as the sink may), a float one among the settings, and every
    other field of the call."""
    d, s, a = call.docs, call.length_scale, call.alpha
    tensor_s = s if torch.is_tensor(s) else None
    tensor_a = a if torch.is_tensor(a) else None
    return (call.query, call.key, call.value, d.cu_seqlens_q, d.cu_seqlens_k, tensor_s, tensor_a,
            call.sink, call.alibi_slopes, None if tensor_s is not None else s, backend.name,
            call.normalizer.name, 0.0 if tensor_a is not None else a, call.scale, call.causal_offset,
            call.window_offset, call.softcap, call.alibi_offset, d.max_seqlen_q, d.max_seqlen_k,
            d.causal_from_end)


def _op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink, alibi_slopes,
             length_scale_value, backend, normalizer, alpha, scale, causal_offset, window_offset, softcap,
             alibi_offset, max_seqlen_q, max_seqlen_k, causal_from_end) -> tuple[AttentionCall, Backend]:
    """The call and the backend of `_op_args`, rebuilt inside the ops."""
    docs = PackedDocs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None, causal_from_end)
    alpha = alpha if alphas is None else alphas
    call = AttentionCall(q, k, v, name=normalizer, normalizer=normalizers.get(normalizer), alpha=alpha,
                         length_scale=length_scale_value if length_scale is None else length_scale,
                         scale=scale, causal_offset=causal_offset, docs=docs, window_offset=window_offset,
                         softcap=softcap, alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, sink=sink)
    return call, BACKENDS[backend]


@torch.library.custom_op("longattn::packed_documents_fwd", mutates_args=())
def _documents_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    length_scale: torch.Tensor | None, alphas: torch.Tensor | None, sink: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, length_scale_value: float | None, backend: str, normalizer: str,
    alpha: float, scale: float, causal_offset: int | None, window_offset: int | None, softcap: float | None,
    alibi_offset: int | None, max_seqlen_q: int, max_seqlen_k: int, causal_from_end: bool,
) -> torch.Tensor:
    return _run_documents(*_op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink,
                                    alibi_slopes, length_scale_value, backend, normalizer, alpha, scale,
                                    causal_offset, window_offset, softcap, alibi_offset, max_seqlen_q,
                                    max_seqlen_k, causal_from_end))


@_documents_fwd.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("longattn::packed_documents_bwd", mutates_args=())
def _documents_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, length_scale: torch.Tensor | None, alphas: torch.Tensor | None,
    sink: torch.Tensor | None, alibi_slopes: torch.Tensor | None, length_scale_value: float | None,
    backend: str, normalizer: str, alpha: float, scale: float, causal_offset: int | None,
    window_offset: int | None, softcap: float | None, alibi_offset: int | None, max_seqlen_q: int,
    max_seqlen_k: int, causal_from_end: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dq`, `dk`, `dv` and the length scale's, alpha's and the sink's gradients (empty without
    them)."""
    settings = (length_scale_value, backend, normalizer, alpha, scale, causal_offset, window_offset, softcap,
                alibi_offset, max_seqlen_q, max_seqlen_k, causal_from_end)
    optional = (length_scale, alphas, sink)
    differentiable = [t for t in optional if t is not None]

    def forward(q, k, v, *extra):
        extra = iter(extra)
        s, a, sk = (next(extra) if t is not None else None for t in optional)
        return _run_documents(*_op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, s, a, sk, alibi_slopes,
                                        *settings))

    _, vjp = torch.func.vjp(forward, q, k, v, *differentiable)
    dq, dk, dv, *rest = vjp(grad_out)
    ds, dalpha, dsink = (rest.pop(0) if t is not None else q.new_empty(0) for t in optional)
    return dq, dk, dv, ds, dalpha, dsink


@_documents_bwd.register_fake
def _(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink, *args):
    optional = (length_scale, alphas, sink)
    ds, dalpha, dsink = (q.new_empty(0) if t is None else t.new_empty(t.shape) for t in optional)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds, dalpha, dsink


def _documents_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink, alibi_slopes, *settings = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink, alibi_slopes)
    ctx.settings = settings


def _documents_backward(ctx, grad_out):
    q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, alphas, sink, alibi_slopes = ctx.saved_tensors
    with torch.no_grad():
        grads = torch.ops.longattn.packed_documents_bwd(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                        length_scale, alphas, sink, alibi_slopes,
                                                        *ctx.settings)
    dq, dk, dv, ds, dalpha, dsink = first_order_only("longattn::packed_documents_bwd", grads,
                                                     (grad_out, q, k, v, length_scale, alphas, sink))
    needed = ctx.needs_input_grad
    return (dq, dk, dv, None, None, ds if needed[5] else None, dalpha if needed[6] else None,
            dsink if needed[7] else None, None, *(None,) * len(ctx.settings))


_documents_fwd.register_autograd(_documents_backward, setup_context=_documents_setup)


# ---------------------------------------------------------------------------------------------
# The capability tables, as the README shows them


def capability_table() -> str:
    """Markdown: which backend serves which normalizer, what each backend is, and which keywords
    each takes (`Backend.features`)."""
    names = list(BACKENDS)
    lines = ["| normalizer | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for name in normalizers.names():
        record, _, _ = normalizers.canonical(name, 1.5, None)
        marks = ["yes" if implementation(BACKENDS[n], record) is not None else "no" for n in names]
        lines.append(f"| `{name}` | " + " | ".join(marks) + " |")
    lines += ["", "| `backend=` | what runs | extra memory | packed documents | `\"auto\"` takes it |",
              "|---|---|---|---|---|"]
    for name, b in BACKENDS.items():
        auto = "anywhere" if b.auto_devices is None else ", ".join(b.auto_devices) or "never"
        packed = "one launch" if b.packed else "one at a time"
        lines.append(f"| `{name}` | {b.summary} | {b.memory} | {packed} | {auto} |")
    lines += ["", "| keyword | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for feature in FEATURES:
        lines.append(f"| `{feature}` | " + " | ".join(BACKENDS[n].features[feature] for n in names) + " |")
    return "\n".join(lines)
