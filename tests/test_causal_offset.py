"""A shifted causal mask (`causal_offset`): bottom-right for decoding with a KV cache, and any
offset, on every backend, against the oracle given the same rule as an explicit mask."""

import pytest
import torch

import longattn

from conftest import CPU_BACKENDS
from oracles import attention_oracle, grads, rel_err

SETTINGS = [
    pytest.param("softmax", 1.5, None, id="softmax"),
    pytest.param("ssmax", 1.5, "tensor", id="ssmax"),
    pytest.param("sparsemax", 2.0, None, id="sparsemax"),
    pytest.param("entmax", 1.5, 0.7, id="entmax1.5-scaled"),
    pytest.param("entmax", 1.3, None, id="entmax1.3"),
]
# (Nq, Nk, offset): bottom-right decoding steps, a prefix longer than the keys, negative offsets
SHAPES = [(1, 9, 8), (4, 19, 15), (7, 7, 0), (12, 5, -7), (6, 10, -3), (5, 8, 20), (3, 4, -9)]


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,s", SETTINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{a}-{b}-off{c}" for a, b, c in SHAPES])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_causal_offset_is_the_shifted_mask(normalizer, alpha, s, shape, backend):
    n_q, n_k, offset = shape
    dtype = torch.float32 if backend == "triton" else torch.float64
    q = (2 * torch.randn(2, 4, n_q, 8, dtype=torch.float64)).to(dtype).requires_grad_()
    k = torch.randn(2, 2, n_k, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, n_k, 6, dtype=dtype, requires_grad=True)
    inputs = [q, k, v]
    if s == "tensor":
        s = (0.3 + torch.rand(4, dtype=torch.float64)).to(dtype).requires_grad_()
        inputs.append(s)
    kwargs = dict(enable_gqa=True, causal_offset=offset, normalizer=normalizer, alpha=alpha, length_scale=s)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
    rule = torch.arange(n_k).view(1, -1) <= torch.arange(n_q).view(-1, 1) + offset
    ref = attention_oracle(q, k, v, attn_mask=rule, normalizer=normalizer, alpha=alpha, length_scale=s)
    do = torch.randn_like(ref)
    assert (out[:, :, ~rule.any(-1)] == 0).all()  # rows left with no key
    pairs = zip([out, *grads(out, inputs, do.to(dtype))], [ref, *grads(ref, inputs, do)])
    if dtype == torch.float64:
        for x, x_ref in pairs:
            assert rel_err(x, x_ref) < 1e-10
        return
    # float32 kernels: at most twice the error of the float32 reference path, plus 1e-5
    base = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="reference")
    for (x, x_ref), x_base in zip(pairs, [base, *grads(base, inputs, do.to(dtype))]):
        assert rel_err(x, x_ref) <= 2 * rel_err(x_base, x_ref) + 1e-5


def test_causal_offset_must_be_an_int():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="causal_offset"):
        longattn.scaled_dot_product_attention(q, q, q, causal_offset=1.5)
