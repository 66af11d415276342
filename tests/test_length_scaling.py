"""SSMax and length-scaled sparsemax/entmax against the formula written out row by row."""

import math

import entmax
import pytest
import torch

import longattn


def _row_by_row(q, k, v, s, normalizer, alpha, allowed, bias, scale):
    """out[h, i] = sum_j p_ij v_j with z_ij = s_h ln(n_i) scale q_i.k_j + bias_ij over allowed j."""
    H, Nq, _ = q.shape
    out = torch.zeros(H, Nq, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        for i in range(Nq):
            keys = [j for j in range(k.shape[1]) if allowed[i, j]]
            if not keys:
                continue  # a row with nothing to attend to stays 0
            n = len(keys)
            z = torch.stack([s[h] * math.log(n) * scale * (q[h, i] @ k[h, j]) + bias[i, j] for j in keys])
            if normalizer == "ssmax":
                p = torch.softmax(z, 0)
            elif normalizer == "sparsemax":
                p = entmax.sparsemax(z, dim=0)
            else:
                p = entmax.entmax_bisect(z, alpha=alpha, dim=0, n_iter=100)
            out[h, i] = p @ v[h, keys]
    return out


@pytest.mark.parametrize(
    "normalizer,alpha", [("ssmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5), ("entmax", 1.3)]
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_length_scaling_by_the_formula(normalizer, alpha, is_causal, backend):
    H, Nq, Nk, D = 3, 9, 12, 5
    q, k, v = (torch.randn(H, n, D, dtype=torch.float64) for n in (Nq, Nk, Nk))
    s = torch.tensor([0.43, 1.0, 1.7], dtype=torch.float64)
    bias = 0.3 * torch.randn(Nq, Nk, dtype=torch.float64)
    bias[2, :] = float("-inf")  # a fully masked row
    bias[4, 5:] = float("-inf")  # a row with 5 keys (4 under the causal mask)
    bias[0, 1:] = float("-inf")  # causal row 0 keeps key 0, n = 1: ln(1) = 0, weight 1
    out = longattn.scaled_dot_product_attention(
        q, k, v, bias, is_causal=is_causal, normalizer=normalizer, alpha=alpha, length_scale=s,
        backend=backend,
    )
    allowed = bias != float("-inf")
    if is_causal:
        allowed &= torch.ones(Nq, Nk, dtype=torch.bool).tril()
    expected = _row_by_row(q, k, v, s, normalizer, alpha, allowed, bias.masked_fill(~allowed, 0), D**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert (out[:, 2] == 0).all()


def test_ssmax_sharpens_with_length():
    """The point of SSMax: the weight on one outstanding key stays up as keys are added."""
    weights = {}
    for n in (16, 4096):
        q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        k = torch.full((1, 1, n, 1), -2.0, dtype=torch.float64)
        k[..., 0, :] = 3.0
        v = torch.zeros(1, 1, n, 1, dtype=torch.float64)
        v[..., 0, :] = 1.0  # the output is the weight on key 0
        for norm in ("softmax", "ssmax"):
            weights[norm, n] = longattn.scaled_dot_product_attention(
                q, k, v, scale=1.0, normalizer=norm, length_scale=0.43 if norm == "ssmax" else None
            ).item()
    assert weights["softmax", 4096] < 0.05 < 0.5 < weights["ssmax", 4096]
    # softmax: e^3 / (e^3 + (n-1) e^-2), in closed form
    assert math.isclose(
        weights["softmax", 16], math.exp(3) / (math.exp(3) + 15 * math.exp(-2)), rel_tol=1e-12
    )
