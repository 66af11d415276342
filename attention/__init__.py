"""Public attention API: the function, the layers and the reference that defines them."""

from .functional import scaled_dot_product_attention
from .modules import MultiheadAttention, ScaledDotProductAttention
from .varlen import varlen_attention

__all__ = [
    "scaled_dot_product_attention", "varlen_attention", "ScaledDotProductAttention", "MultiheadAttention",
]
