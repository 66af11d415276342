"""Public attention API: the function, the layers and the reference that defines them."""

from .functional import scaled_dot_product_attention
from .modules import MultiheadAttention, ScaledDotProductAttention

__all__ = ["scaled_dot_product_attention", "ScaledDotProductAttention", "MultiheadAttention"]
