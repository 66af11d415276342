"""The probe of attention fading with no training (the first figure of the SSMax paper).

One query row of `n` logits: +3 on one key, -2 on the other `n - 1`. The weight each normalizer
gives the +3 key, as `n` grows, shows fading in its purest form: softmax dilutes it as
`1 / (1 + (n - 1) e^-5)`, SSMax multiplies the logits by `s ln n` and holds it, sparsemax and
entmax drop the -2 keys to exact zero once the gap is wide enough.

The weights come from `longattn.scaled_dot_product_attention` itself: with one query `q = [1]`,
keys `k_j = z_j`, `scale=1` and a value that is 1 on the +3 key and 0 elsewhere, the output is
exactly the weight on that key.
"""

from __future__ import annotations

import math

import torch

import longattn
from longattn.attention import normalizers

TOP, REST = 3.0, -2.0
SSMAX_S = 0.43  # the SSMax paper's s for this figure

# name -> (normalizer, alpha, length_scale)
PROBE_NORMALIZERS = {
    "softmax": ("softmax", 1.5, None),
    "ssmax": ("ssmax", 1.5, SSMAX_S),
    "sparsemax": ("sparsemax", 2.0, None),
    "entmax1.5": ("entmax", 1.5, None),
    "entmax1.5+ls": ("entmax", 1.5, SSMAX_S),
}


def default_sizes() -> list[int]:
    """n from 2 to 10^6, four per decade."""
    sizes = {2}
    for e in range(1, 25):
        sizes.add(round(10 ** (e / 4)))
    return sorted(sizes)


def max_prob(name: str, n: int) -> float:
    """The weight on the +3 key among `n` keys, computed by longattn (float64, backend torch)."""
    normalizer, alpha, s = PROBE_NORMALIZERS[name]
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.full((1, 1, n, 1), REST, dtype=torch.float64)
    k[..., 0, 0] = TOP
    v = torch.zeros(1, 1, n, 1, dtype=torch.float64)
    v[..., 0, 0] = 1.0
    out = longattn.scaled_dot_product_attention(
        q, k, v, scale=1.0, normalizer=normalizer, alpha=alpha, length_scale=s, backend="torch"
    )
    return float(out)


def closed_form(name: str, n: int) -> float:
    """The same weight by formula. With all other logits equal at gap `g` (after any length
    scaling by `c = s ln n`): softmax gives `1 / (1 + (n - 1) e^-g)`; alpha-entmax gives 1 when
    `(alpha - 1) g >= 1`, and otherwise every key is in the support, which for alpha = 1.5
    means `(x1 - tau)^2 + (n - 1)(x0 - tau)^2 = 1` with `x = z / 2`; sparsemax gives 1 when
    `g >= 1`, else `(1 + g (n - 1)) / n`."""
    record, alpha, s = normalizers.canonical(*PROBE_NORMALIZERS[name])
    c = 1.0 if s is None else s * math.log(n)
    g = (TOP - REST) * c
    if record is normalizers.SOFTMAX:
        return 1.0 / (1.0 + (n - 1) * math.exp(-g))
    if record is not normalizers.ENTMAX:
        raise ValueError(f"no closed form for normalizer {record.name!r}")
    if alpha == 2.0:  # sparsemax
        return 1.0 if g >= 1 else (1 + g * (n - 1)) / n
    if alpha != 1.5:
        raise ValueError(f"closed form only for alpha 1.5; got {alpha}")
    if g / 2 >= 1:
        return 1.0
    # d = x1 - tau > 0 and d - g/2 = x0 - tau > 0: d^2 + (n - 1)(d - g/2)^2 = 1, the larger root
    a, b, cc = n, -(n - 1) * g, (n - 1) * g * g / 4 - 1
    d = (-b + math.sqrt(b * b - 4 * a * cc)) / (2 * a)
    return d * d


def run_probe(sizes: list[int] | None = None, names=None) -> list[dict]:
    """Rows `{"normalizer", "n", "max_prob", "closed_form"}` for every name and size."""
    sizes = default_sizes() if sizes is None else sizes
    names = list(PROBE_NORMALIZERS) if names is None else names
    return [
        {"normalizer": name, "n": n, "max_prob": max_prob(name, n), "closed_form": closed_form(name, n)}
        for name in names for n in sizes
    ]
