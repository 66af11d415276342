"""The normalizers of attention, one record each: the one place in longattn that knows their names.

A record holds a normalizer's name, its parameters, its canonical form and its implementations:
the reference row function (weights from rows of logits, `reference.py`) and, per backend, the
path that computes the same without the score matrix (`paths`, keyed by backend name). The
checks, the dispatch, the layers, the model's config, the study's setting parser, the probe and
the test matrix read this registry; nothing else compares a normalizer's name to a string.

Two names are rewrites of others, done once here (`canonical`): "ssmax" is softmax with a length
scale (`s = 1` by default), "sparsemax" is entmax with `alpha = 2`.

Adding a normalizer: write its row function `normalize(logits, alpha)` (logits `(..., N)` with
masked keys at -inf and no row all -inf; differentiable), `register(Normalizer(name, summary,
normalize))`, and it runs on backend="reference"; add entries to `paths` as kernels for it
appear. The other backends refuse it, by name, until then.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import backends, chunked, reference
from .call import AttentionCall

Path = Callable[[AttentionCall], torch.Tensor]


@dataclass(frozen=True)
class Normalizer:
    name: str
    summary: str  # the weights' formula and where it comes from
    normalize: Callable[[torch.Tensor, float], torch.Tensor] | None = None  # the reference's row function
    paths: Mapping[str, Path] = field(default_factory=dict)  # backend name -> implementation
    takes_alpha: bool = False  # reads the `alpha` argument
    base: str | None = None  # a rewrite of this record, with the fixed values below
    alpha: float | None = None  # fixed alpha of a rewrite (sparsemax: 2)
    length_scale: float | None = None  # default s of a length-scaled rewrite (SSMax: 1)

    @property
    def length_scaled(self) -> bool:
        """Length-scaled by definition (SSMax): `length_scale` defaults to a number, not None."""
        return self.length_scale is not None


_REGISTRY: dict[str, Normalizer] = {}


def register(record: Normalizer) -> Normalizer:
    """Adds a normalizer; its name must be new. A rewrite names a registered base; any other
    record brings its reference row function."""
    if not isinstance(record, Normalizer):
        raise TypeError(f"register takes a Normalizer; got {type(record).__name__}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", record.name):
        raise ValueError(f"a normalizer's name is lower-case letters, digits and _; got {record.name!r}")
    if record.name in _REGISTRY:
        raise ValueError(f"normalizer {record.name!r} is registered already")
    if record.base is not None:
        if record.base not in _REGISTRY or _REGISTRY[record.base].base is not None:
            raise ValueError(
                f"normalizer {record.name!r}: base {record.base!r} must be a registered canonical one"
            )
    elif record.normalize is None:
        raise ValueError(f"normalizer {record.name!r} needs its reference row function, normalize")
    _REGISTRY[record.name] = record
    return record


def unregister(name: str) -> None:
    """Removes a normalizer added by `register` (tests register their own)."""
    if any(r.base == name for r in _REGISTRY.values()):
        raise ValueError(f"normalizer {name!r} is the base of another; unregister that first")
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name) -> Normalizer:
    """The record of `name`; a ValueError naming the argument and the choices otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"normalizer must be one of {', '.join(map(repr, _REGISTRY))}; got {name!r}")
    return _REGISTRY[name]


def canonical(name: str, alpha: float, length_scale):
    """`(record, alpha, length_scale)` with a rewrite resolved to its base: the one place where
    SSMax becomes length-scaled softmax and sparsemax becomes entmax at alpha 2."""
    record = get(name)
    if record.base is None:
        return record, alpha, length_scale
    if record.alpha is not None:
        alpha = record.alpha
    if length_scale is None and record.length_scaled:
        length_scale = record.length_scale
    return _REGISTRY[record.base], alpha, length_scale


SOFTMAX = register(Normalizer(
    "softmax", "`p_j = exp(z_j) / sum_k exp(z_k)`: the standard",
    normalize=reference.softmax,
    paths={"torch": chunked.softmax_attention, "triton": backends.triton_softmax,
           "flash": backends.flash_softmax},
))
SSMAX = register(Normalizer(
    "ssmax", "softmax of `s * ln(n) * z`, `s` learnable per head: Scalable-Softmax, Nakanishi 2025",
    base="softmax", length_scale=1.0,
))
ENTMAX = register(Normalizer(
    "entmax", "`p_j = [(alpha - 1) z_j - tau]_+ ^ (1 / (alpha - 1))`, `sum_j p_j = 1`, `alpha` in [1.01, 2]: "
    "Peters et al. 2019",
    normalize=reference.entmax, takes_alpha=True,
    paths={"torch": chunked.entmax_attention, "triton": backends.triton_entmax},
))
SPARSEMAX = register(Normalizer(
    "sparsemax", "`p_j = [z_j - tau]_+`, `tau` such that `sum_j p_j = 1`: Martins & Astudillo 2016",
    base="entmax", alpha=2.0,
))
