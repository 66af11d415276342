"""Bad input raises ValueError or TypeError naming the argument, before any arithmetic."""

import math

import pytest
import torch

import longattn


def _qkv(B=2, Hq=4, Hkv=4, Nq=5, Nk=6, D=8, Dv=8):
    return torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, Dv)


def _call(q=None, k=None, v=None, *args, **kwargs):
    dq, dk, dv = _qkv()
    return longattn.scaled_dot_product_attention(
        dq if q is None else q, dk if k is None else k, dv if v is None else v, *args, **kwargs
    )


BAD = [
    # (id, call, exception, words the message must hold)
    ("normalizer", lambda: _call(normalizer="softmx"), ValueError, "normalizer"),
    ("normalizer-type", lambda: _call(normalizer=None), ValueError, "normalizer"),
    ("backend", lambda: _call(backend="cuda"), ValueError, "backend"),
    ("alpha-low", lambda: _call(normalizer="entmax", alpha=1.0), ValueError, "alpha"),
    ("alpha-high", lambda: _call(normalizer="entmax", alpha=2.5), ValueError, "alpha"),
    ("alpha-nan", lambda: _call(normalizer="entmax", alpha=math.nan), ValueError, "alpha"),
    ("alpha-inf", lambda: _call(normalizer="entmax", alpha=math.inf), ValueError, "alpha"),
    ("alpha-type", lambda: _call(normalizer="entmax", alpha="1.5"), TypeError, "alpha"),
    ("rank-2", lambda: _call(torch.randn(5, 8)), ValueError, "query"),
    ("rank-5", lambda: _call(k=torch.randn(1, 2, 4, 6, 8)), ValueError, "key"),
    ("rank-mixed", lambda: _call(torch.randn(4, 5, 8)), ValueError, "rank"),
    ("head-dim", lambda: _call(k=torch.randn(2, 4, 6, 7)), ValueError, "head dim"),
    ("kv-length", lambda: _call(v=torch.randn(2, 4, 7, 8)), ValueError, "length"),
    ("kv-heads", lambda: _call(v=torch.randn(2, 2, 6, 8)), ValueError, "heads"),
    ("batch", lambda: _call(k=torch.randn(3, 4, 6, 8), v=torch.randn(3, 4, 6, 8)), ValueError, "batch"),
    ("gqa-off", lambda: _call(k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8)),
     ValueError, "enable_gqa"),
    ("gqa-indivisible", lambda: _call(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8), enable_gqa=True),
     ValueError, "multiple"),
    ("dtype-mixed", lambda: _call(k=torch.randn(2, 4, 6, 8, dtype=torch.float64)), TypeError, "dtype"),
    ("dtype-int", lambda: _call(torch.ones(2, 4, 5, 8, dtype=torch.int64)), TypeError, "query"),
    ("not-a-tensor", lambda: _call(v=[[1.0]]), TypeError, "value"),
    ("device-mixed", lambda: _call(k=torch.randn(2, 4, 6, 8, device="meta")), ValueError, "device"),
    ("length-scale-shape", lambda: _call(length_scale=torch.ones(3)), ValueError, "length_scale"),
    ("length-scale-2d", lambda: _call(length_scale=torch.ones(4, 1)), ValueError, "length_scale"),
    ("length-scale-type", lambda: _call(length_scale="1"), TypeError, "length_scale"),
    ("length-scale-nan", lambda: _call(length_scale=math.nan), ValueError, "length_scale"),
    ("mask-shape", lambda: _call(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    ("mask-too-big", lambda: _call(attn_mask=torch.ones(3, 4, 5, 6, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("mask-int", lambda: _call(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError, "attn_mask"),
    ("mask-type", lambda: _call(attn_mask=[[True]]), TypeError, "attn_mask"),
    ("dropout-high", lambda: _call(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout-negative", lambda: _call(dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout-type", lambda: _call(dropout_p=None), TypeError, "dropout_p"),
    ("scale-type", lambda: _call(scale="0.1"), TypeError, "scale"),
    ("scale-nan", lambda: _call(scale=math.nan), ValueError, "scale"),
    ("is-causal-type", lambda: _call(is_causal=1), TypeError, "is_causal"),
    ("enable-gqa-type", lambda: _call(enable_gqa="yes"), TypeError, "enable_gqa"),
]


@pytest.mark.parametrize("call,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in BAD])
def test_bad_input_is_named(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="normalizer"):
        longattn.ScaledDotProductAttention("sparse")
    with pytest.raises(ValueError, match="num_heads"):
        longattn.ScaledDotProductAttention("ssmax")  # a learnable s needs the head count
    with pytest.raises(ValueError, match="alpha"):
        longattn.ScaledDotProductAttention("entmax", alpha=0.5)
    with pytest.raises(ValueError, match="embed_dim"):
        longattn.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        longattn.MultiheadAttention(32, 4, num_kv_heads=3)
    mha = longattn.MultiheadAttention(32, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        mha(torch.randn(2, 5, 16))
