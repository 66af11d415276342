"""torch.autograd.gradcheck in float64 for every normalizer, the length_scale gradient included."""

import pytest
import torch
from torch.autograd import gradcheck

import longattn

SETTINGS = [
    pytest.param("softmax", 1.5, False, id="softmax"),
    pytest.param("ssmax", 1.5, True, id="ssmax"),
    pytest.param("sparsemax", 2.0, False, id="sparsemax"),
    pytest.param("sparsemax", 2.0, True, id="sparsemax-scaled"),
    pytest.param("entmax", 1.5, False, id="entmax1.5"),
    pytest.param("entmax", 1.25, True, id="entmax1.25-scaled"),
    pytest.param("entmax", 1.75, False, id="entmax1.75"),
]


@pytest.mark.parametrize("normalizer,alpha,scaled", SETTINGS)
def test_gradcheck(normalizer, alpha, scaled, backend):
    q = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    s = (0.5 + torch.rand(4, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(5, 6) < 0.8
    mask[3] = False  # one empty row: its gradient is 0, and finite

    def f(q, k, v, s):
        return longattn.scaled_dot_product_attention(
            q, k, v, mask, is_causal=True, enable_gqa=True, normalizer=normalizer, alpha=alpha,
            length_scale=s if scaled else None, backend=backend,
        )

    assert gradcheck(f, (q, k, v, s), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalizer,alpha", [("softmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5)])
def test_gradcheck_with_dropout(normalizer, alpha, backend):
    """Dropout's mask is drawn from the global generator: reseeding makes each call the same
    function, whose gradient must match finite differences (the backward replays the mask)."""
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        torch.manual_seed(7)
        return longattn.scaled_dot_product_attention(
            q, k, v, dropout_p=0.3, is_causal=True, normalizer=normalizer, alpha=alpha, backend=backend
        )

    assert not torch.equal(f(q, k, v), longattn.scaled_dot_product_attention(
        q, k, v, is_causal=True, normalizer=normalizer, alpha=alpha, backend=backend))
    assert gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)
