"""Degenerate sizes, empty rows, huge logits and non-finite inputs, for every normalizer."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import longattn

from conftest import NORMALIZER_CASES
from oracles import attention_oracle, rel_err

ALL = [
    pytest.param(dict(normalizer=n, alpha=a), id=c.id) for c in NORMALIZER_CASES for n, a in [c.values]
] + [
    pytest.param(dict(normalizer="entmax", alpha=1.5, length_scale=0.8), id="entmax1.5-scaled"),
]


@pytest.mark.parametrize("settings", ALL)
def test_single_key_gives_its_value(settings, backend):
    """N = 1 and D = 1: one key gets all the weight, whatever its logit."""
    q, k = torch.randn(2, 3, 1, 1), 100 * torch.randn(2, 3, 1, 1)
    v = torch.randn(2, 3, 1, 1)
    out = longattn.scaled_dot_product_attention(q, k, v, **settings, backend=backend)
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("settings", ALL)
@pytest.mark.parametrize("mask_kind", ["bool", "neginf"])
def test_fully_masked_rows_give_zero_output_and_gradient(settings, mask_kind, backend):
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    allowed = torch.rand(6, 6) < 0.7
    allowed[:, 0] = True
    allowed[[1, 4]] = False
    mask = allowed if mask_kind == "bool" else torch.zeros(6, 6).masked_fill(~allowed, float("-inf"))
    out = longattn.scaled_dot_product_attention(q, k, v, mask, **settings, backend=backend)
    assert torch.isfinite(out).all() and (out[:, :, [1, 4]] == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, [1, 4]] == 0).all()


@pytest.mark.parametrize("settings", ALL)
def test_no_keys_at_all(settings):
    """Nk = 0: every row is empty; Nq = 0: an empty output."""
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 5)
    out = longattn.scaled_dot_product_attention(q, k, v, **settings)
    assert out.shape == (1, 2, 3, 5) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    empty = longattn.scaled_dot_product_attention(
        q[:, :, :0], torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), **settings
    )
    assert empty.shape == (1, 2, 0, 5)


@pytest.mark.parametrize("settings", ALL)
def test_huge_logits_stay_finite(settings, backend):
    """Logits near 1e4 in float32: finite outputs and gradients, equal to the float64 oracle."""
    q = torch.randn(1, 2, 9, 8)
    k = torch.randn(1, 2, 11, 8)
    q = (q / q.norm(dim=-1, keepdim=True) * 1e4 ** 0.5 * 8 ** 0.25).requires_grad_()
    k = (k / k.norm(dim=-1, keepdim=True) * 1e4 ** 0.5 * 8 ** 0.25).requires_grad_()
    v = torch.randn(1, 2, 11, 8, requires_grad=True)
    out = longattn.scaled_dot_product_attention(q, k, v, **settings, backend=backend)
    z = (q @ k.transpose(-1, -2)).abs().max() * 8 ** -0.5
    assert z > 5e3
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert rel_err(out, attention_oracle(q, k, v, **settings)) < 1e-4


@pytest.mark.parametrize("settings", ALL)
def test_nan_and_inf_propagate_like_sdpa(settings, backend):
    """A NaN in a query row, or an Inf in a key, spoils the rows SDPA spoils, and no more.

    The definition follows SDPA's math backend. Softmax on backend="torch" *is* SDPA's fused
    CPU kernel, which returns 0 for a query row holding a NaN; that path inherits it."""
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 7, 4), torch.randn(1, 1, 7, 4)
    q[0, 0, 2, 1] = float("nan")
    k[0, 0, 3, 0] = float("inf")
    q[0, 0, 3, 0] = 0.0  # 0 * inf = nan in row 3 for every normalizer
    out = longattn.scaled_dot_product_attention(q, k, v, **settings, backend=backend)
    fused_sdpa = backend == "torch" and settings["normalizer"] in ("softmax", "ssmax")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if fused_sdpa else SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan().any(-1), ref.isnan().any(-1))
    # rows 1 and 4 see +inf, row 3 has 0 * inf, row 2 holds the NaN
    assert out.isnan().any(-1).sum() == (3 if fused_sdpa else 4)
