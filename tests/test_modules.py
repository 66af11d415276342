"""The layers compute what the function computes and hold the learnable length scale."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import longattn
from longattn.attention import normalizers

from oracles import attention_oracle, rel_err


def test_sdpa_layer_is_a_drop_in_for_torch_sdpa():
    """Called with SDPA's positional arguments, the default layer gives SDPA's answer."""
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    mask = torch.rand(9, 9) < 0.8
    layer = longattn.ScaledDotProductAttention()
    expected = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.2)
    torch.testing.assert_close(layer(q, k, v, mask, 0.0, False, scale=0.2), expected)
    assert len(list(layer.parameters())) == 0


@pytest.mark.parametrize("normalizer,alpha", [("ssmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5)])
def test_length_scale_parameter_learns(normalizer, alpha):
    length_scale = None if normalizers.get(normalizer).length_scaled else 0.5
    layer = longattn.ScaledDotProductAttention(
        normalizer, num_heads=4, alpha=alpha, length_scale=length_scale
    )
    assert isinstance(layer.length_scale, torch.nn.Parameter) and layer.length_scale.shape == (4,)
    assert torch.all(layer.length_scale == (1.0 if length_scale is None else length_scale))
    q, k, v = (torch.randn(1, 4, 7, 8, dtype=torch.float64) for _ in range(3))
    layer = layer.double()
    out = layer(q, k, v, is_causal=True)
    expected = attention_oracle(q, k, v, normalizer=normalizer, alpha=alpha, is_causal=True,
                                length_scale=layer.length_scale.detach())
    assert rel_err(out, expected) < 1e-10
    out.square().sum().backward()
    assert layer.length_scale.grad is not None and (layer.length_scale.grad != 0).all()


def test_fixed_length_scale():
    layer = longattn.ScaledDotProductAttention("ssmax", length_scale=0.43, learn_length_scale=False)
    assert layer.length_scale == 0.43 and len(list(layer.parameters())) == 0
    assert "length_scale=0.43" in repr(layer)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("normalizer", ["softmax", "entmax"])
def test_multihead_attention_by_hand(num_kv_heads, normalizer):
    torch.manual_seed(1)
    mha = longattn.MultiheadAttention(
        32, 4, num_kv_heads=num_kv_heads, normalizer=normalizer, bias=True
    ).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    out = mha(x, is_causal=True)
    assert out.shape == (2, 11, 32)
    q = rearrange(mha.q_proj(x), "b n (h d) -> b h n d", h=4)
    k = rearrange(mha.k_proj(x), "b n (h d) -> b h n d", h=num_kv_heads)
    v = rearrange(mha.v_proj(x), "b n (h d) -> b h n d", h=num_kv_heads)
    ref = attention_oracle(q, k, v, normalizer=normalizer, is_causal=True)
    ref = mha.out_proj(rearrange(ref, "b h n d -> b n (h d)"))
    assert rel_err(out, ref) < 1e-10
    out.sum().backward()
    assert all(p.grad is not None for p in mha.parameters())


def test_multihead_dropout_only_in_training():
    mha = longattn.MultiheadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))
