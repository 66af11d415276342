"""Softmax through longattn equals torch SDPA, outputs and every gradient, over SDPA's features."""

import pytest
import torch

import longattn

from oracles import case_id, grads, make_mask, rel_err, sdpa_oracle

# (B, Hq, Hkv, Nq, Nk, D, Dv, is_causal, mask kind, mask shape, scale)
CASES = [
    (2, 4, 4, 17, 17, 16, 16, False, None, None, None),
    (1, 2, 2, 17, 17, 40, 40, True, None, None, None),
    (2, 2, 2, 5, 13, 8, 8, True, None, None, None),  # top-left causal, Nq < Nk
    (1, 2, 2, 13, 5, 8, 8, True, None, None, None),  # Nq > Nk: late rows see every key
    (2, 8, 2, 9, 11, 16, 24, False, None, None, None),  # GQA, Dv != D
    (1, 6, 3, 10, 10, 8, 8, True, None, None, None),  # GQA + causal
    (2, 3, 3, 7, 19, 12, 12, False, "bool", "full", None),
    (2, 3, 3, 7, 19, 12, 12, False, "bool", "2d", None),
    (2, 3, 3, 7, 19, 12, 12, False, "float", "full", None),
    (1, 2, 2, 16, 16, 8, 8, False, "neginf", "head", None),
    (1, 2, 2, 16, 16, 8, 8, True, "bool", "2d", None),  # causal and a mask together
    (2, 2, 2, 9, 9, 32, 32, False, None, None, 0.3),  # custom scale
    (1, 1, 1, 1, 1, 1, 1, False, None, None, None),  # N = 1, D = 1
    (1, 1, 1, 1, 7, 4, 4, True, None, None, None),  # one query, causal: sees only key 0
    (3, 1, 1, 130, 63, 20, 20, False, None, None, None),
]


def _mask_shape(shape_kind, B, Hq, Nq, Nk):
    return {"full": (B, Hq, Nq, Nk), "2d": (Nq, Nk), "head": (1, Hq, Nq, Nk)}[shape_kind]


def _inputs(case, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask_kind, mask_shape, scale = case
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64)
    mask = make_mask(mask_kind, _mask_shape(mask_shape, B, Hq, Nq, Nk)) if mask_kind else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=Hq != Hkv)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], kwargs


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(*c[:8], mask=c[8])) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_softmax_matches_sdpa(case, dtype, backend):
    (q, k, v), kwargs = _inputs(case, dtype)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
    ref = sdpa_oracle(q, k, v, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    do = torch.randn_like(ref)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(out, ref) < tol
    for g, g_ref in zip(grads(out, (q, k, v), do.to(dtype)), grads(ref, (q, k, v), do)):
        assert rel_err(g, g_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_within_twice_torch(dtype, backend):
    """Half inputs accumulate in float32: no worse than 2x SDPA run in the same dtype."""
    (q, k, v), kwargs = _inputs((2, 4, 2, 33, 47, 32, 32, True, None, None, None), dtype)
    ref = sdpa_oracle(q, k, v, **kwargs)
    do = torch.randn_like(ref)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
    base = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-3
    for g, g_base, g_ref in zip(
        grads(out, (q, k, v), do.to(dtype)), grads(base, (q, k, v), do.to(dtype)), grads(ref, (q, k, v), do)
    ):
        assert rel_err(g, g_ref) <= 2 * rel_err(g_base, g_ref) + 1e-3


def test_unbatched_input(backend):
    q, k, v = (torch.randn(3, 6, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(6, 6) < 0.8
    out = longattn.scaled_dot_product_attention(q, k, v, mask, backend=backend)
    assert out.shape == (3, 6, 8)
    assert rel_err(out, sdpa_oracle(q, k, v, attn_mask=mask)) < 1e-12


@pytest.mark.parametrize("normalizer", ["softmax", "entmax"])
def test_dropout_is_unbiased(normalizer, backend):
    """Dropout drops weights and rescales by 1/(1-p): its mean over many draws is the output."""
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    kwargs = dict(normalizer=normalizer, backend=backend)
    clean = longattn.scaled_dot_product_attention(q, k, v, **kwargs)
    many = [t.expand(4000, -1, -1, -1) for t in (q, k, v)]  # 4000 independent draws at once
    draws = longattn.scaled_dot_product_attention(*many, dropout_p=0.3, **kwargs)
    assert not torch.allclose(draws[0], clean[0])
    assert rel_err(draws.mean(0, keepdim=True), clean) < 0.03


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=case_id(*c[:8])) for c in CASES if c[8] is None and c[3] > 1]
)
@pytest.mark.parametrize("length_scale", [None, 0.43], ids=["softmax", "ssmax"])
def test_triton_backend_through_the_api(case, length_scale):
    """backend="triton" (the interpreter here) behind the public function: SDPA's answer for
    softmax, the oracle's for SSMax, in float32."""
    from oracles import attention_oracle

    (q, k, v), kwargs = _inputs(case, torch.float32)
    out = longattn.scaled_dot_product_attention(
        q, k, v, **kwargs, length_scale=length_scale, backend="triton"
    )
    kwargs.pop("enable_gqa")
    ref = attention_oracle(q, k, v, **kwargs, length_scale=length_scale)
    do = torch.randn_like(ref)
    assert rel_err(out, ref) < 2e-6
    for g, g_ref in zip(grads(out, (q, k, v), do.float()), grads(ref, (q, k, v), do)):
        assert rel_err(g, g_ref) < 2e-6
