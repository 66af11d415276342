"""Random shapes and settings: every CPU backend agrees with the float64 oracle on all of them."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.attention import normalizers

from conftest import CPU_BACKENDS
from oracles import attention_oracle, make_mask, rel_err


@st.composite
def problems(draw):
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Nq, Nk, D, Dv = (draw(st.integers(1, 12)) for _ in range(4))
    normalizer = draw(st.sampled_from(normalizers.names()))
    alpha = draw(st.floats(1.05, 2.0)) if normalizers.get(normalizer).takes_alpha else 1.5
    mask_kind = draw(st.sampled_from([None, "bool", "float", "neginf"]))
    mask_shape = draw(st.sampled_from([(Nq, Nk), (B, 1, Nq, Nk), (1, Hkv * group, 1, Nk)]))
    return dict(
        shapes=(B, Hkv * group, Hkv, Nq, Nk, D, Dv), normalizer=normalizer, alpha=alpha,
        is_causal=draw(st.booleans()), mask=(mask_kind, mask_shape),
        length_scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0), st.just("tensor"))),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_backends_match_oracle(p):
    g = torch.Generator().manual_seed(p["seed"])
    B, Hq, Hkv, Nq, Nk, D, Dv = p["shapes"]
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    mask = make_mask(*p["mask"], generator=g)
    s = p["length_scale"]
    if s == "tensor":
        s = (0.1 + torch.rand(Hq, generator=g, dtype=torch.float64)).requires_grad_()
    kwargs = dict(attn_mask=mask, is_causal=p["is_causal"], scale=p["scale"])
    ref = attention_oracle(q, k, v, **kwargs, normalizer=p["normalizer"], alpha=p["alpha"], length_scale=s)
    inputs = [q, k, v] + ([s] if isinstance(s, torch.Tensor) else [])
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, inputs, do)
    for backend in CPU_BACKENDS:
        out = longattn.scaled_dot_product_attention(
            q, k, v, **kwargs, enable_gqa=True, normalizer=p["normalizer"], alpha=p["alpha"],
            length_scale=s, backend=backend,
        )
        assert rel_err(out, ref) < 1e-9, backend
        for a, b in zip(torch.autograd.grad(out, inputs, do), ref_grads):
            assert rel_err(a, b) < 1e-8, backend
