"""Public attention API: the functions, the layers, the normalizer registry and the reference
that defines them."""

from . import normalizers
from .block_map import BlockMap
from .functional import attention_weights, scaled_dot_product_attention
from .modules import MultiheadAttention, ScaledDotProductAttention
from .varlen import varlen_attention

__all__ = [
    "BlockMap", "MultiheadAttention", "ScaledDotProductAttention", "attention_weights", "normalizers",
    "scaled_dot_product_attention", "varlen_attention",
]
