"""Which backend runs a call, and why not: the one dispatch of the dense and the packed entry points.

A backend serves a call when the normalizer has an implementation there (`normalizers.py`) and
the backend's `verify` finds nothing it cannot do (`backends.py`). "auto" takes the first of
`AUTO_ORDER` that may run on the call's device and serves it; an explicit backend that cannot
serve a call raises a ValueError naming the normalizer, the backend and the missing feature.
Nothing falls through to another path.

`capability_table()` gives the tables the README shows (a test holds the two together).
"""

from __future__ import annotations

import torch

from . import normalizers
from .backends import AUTO_ORDER, BACKENDS, REFERENCE, Backend
from .call import AttentionCall
from .checks import autocast_dtype
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
    one launch when it takes them (`Backend.packed`), else one document at a time. Autocast is
    off inside: the call's tensors are already in its dtype (`checks.make_call`), and each path
    chooses its own compute dtype."""
    device_type = call.query.device.type
    if autocast_dtype(device_type) is None:
        return _run(call, backend)
    with torch.autocast(device_type, enabled=False):
        return _run(call, backend)


def _run(call: AttentionCall, backend: str) -> torch.Tensor:
    chosen = select(call, backend)
    if call.docs is None:
        return _run_dense(call, chosen)
    if chosen.packed and not call.empty:
        return implementation(chosen, call.normalizer)(call)
    q, v = call.query, call.value
    outs = [q.new_empty(0, q.shape[1], v.shape[2])]  # for zero documents
    for d in range(call.docs.count):
        outs.append(_run_dense(call.document(d), chosen)[0].transpose(0, 1))  # (n_d, Hq, Dv)
    return torch.cat(outs)


def _run_dense(call: AttentionCall, backend: Backend) -> torch.Tensor:
    if call.empty:  # no query or no key: nothing to tile
        backend = REFERENCE
    return implementation(backend, call.normalizer)(call)


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
