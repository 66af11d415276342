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
from .backends import AUTO_ORDER, BACKENDS, REFERENCE, Backend
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
        call = call.key_lengths_as_mask()
    return implementation(backend, call.normalizer)(call)


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
    *settings)`: a tensor length scale beside the tensors (it may require grad), a float one among
    the settings."""
    d, s = call.docs, call.length_scale
    tensor_s = s if torch.is_tensor(s) else None
    return (call.query, call.key, call.value, d.cu_seqlens_q, d.cu_seqlens_k, tensor_s,
            None if tensor_s is not None else s, backend.name, call.normalizer.name, call.alpha, call.scale,
            call.causal_offset, d.max_seqlen_q, d.max_seqlen_k, d.causal_from_end)


def _op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, length_scale_value, backend, normalizer,
             alpha, scale, causal_offset, max_seqlen_q, max_seqlen_k,
             causal_from_end) -> tuple[AttentionCall, Backend]:
    """The call and the backend of `_op_args`, rebuilt inside the ops."""
    docs = PackedDocs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None, causal_from_end)
    call = AttentionCall(q, k, v, name=normalizer, normalizer=normalizers.get(normalizer), alpha=alpha,
                         length_scale=length_scale_value if length_scale is None else length_scale,
                         scale=scale, causal_offset=causal_offset, docs=docs)
    return call, BACKENDS[backend]


@torch.library.custom_op("longattn::packed_documents_fwd", mutates_args=())
def _documents_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    length_scale: torch.Tensor | None, length_scale_value: float | None, backend: str, normalizer: str,
    alpha: float, scale: float, causal_offset: int | None, max_seqlen_q: int, max_seqlen_k: int,
    causal_from_end: bool,
) -> torch.Tensor:
    return _run_documents(*_op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, length_scale_value,
                                    backend, normalizer, alpha, scale, causal_offset, max_seqlen_q,
                                    max_seqlen_k, causal_from_end))


@_documents_fwd.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("longattn::packed_documents_bwd", mutates_args=())
def _documents_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, length_scale: torch.Tensor | None, length_scale_value: float | None,
    backend: str, normalizer: str, alpha: float, scale: float, causal_offset: int | None, max_seqlen_q: int,
    max_seqlen_k: int, causal_from_end: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dq`, `dk`, `dv` and the length scale's gradient (empty without a tensor one)."""
    settings = (length_scale_value, backend, normalizer, alpha, scale, causal_offset, max_seqlen_q,
                max_seqlen_k, causal_from_end)

    def forward(q, k, v, length_scale=None):
        return _run_documents(*_op_call(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, *settings))

    primals = (q, k, v) if length_scale is None else (q, k, v, length_scale)
    _, vjp = torch.func.vjp(forward, *primals)
    dq, dk, dv, *ds = vjp(grad_out)
    return dq, dk, dv, ds[0] if ds else q.new_empty(0)


@_documents_bwd.register_fake
def _(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, *args):
    ds = q.new_empty(0) if length_scale is None else length_scale.new_empty(length_scale.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _documents_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale, *settings = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale)
    ctx.settings = settings


def _documents_backward(ctx, grad_out):
    q, k, v, cu_seqlens_q, cu_seqlens_k, length_scale = ctx.saved_tensors
    with torch.no_grad():
        grads = torch.ops.longattn.packed_documents_bwd(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                        length_scale, *ctx.settings)
    dq, dk, dv, ds = first_order_only("longattn::packed_documents_bwd", grads,
                                      (grad_out, q, k, v, length_scale))
    return dq, dk, dv, None, None, ds if ctx.needs_input_grad[5] else None, *(None,) * len(ctx.settings)


_documents_fwd.register_autograd(_documents_backward, setup_context=_documents_setup)


# ---------------------------------------------------------------------------------------------
# The capability tables, as the README shows them


def capability_table() -> str:
    """Markdown: which backend serves which normalizer, then what each backend is."""
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
    return "\n".join(lines)
