"""A few lines of longattn: the four normalizers through one call, and a layer with learnable SSMax."""

import torch

import longattn

q, k, v = (torch.randn(2, 8, 1024, 64) for _ in range(3))  # (B, H, N, D)
for normalizer in ("softmax", "ssmax", "sparsemax", "entmax"):
    out = longattn.scaled_dot_product_attention(q, k, v, is_causal=True, normalizer=normalizer, alpha=1.5)
    print(f"{normalizer:>9}: out {tuple(out.shape)}")

attn = longattn.MultiheadAttention(512, num_heads=8, num_kv_heads=2, normalizer="ssmax")  # GQA + SSMax
x = torch.randn(2, 1024, 512)
print("MultiheadAttention:", tuple(attn(x, is_causal=True).shape),
      "learnable s:", tuple(attn.attention.length_scale.shape))
