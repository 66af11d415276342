"""longattn: long-context attention with a choice of normalizer.

The code lives in the repository's `attention/`, `kernels/` and `models/` folders, installed as
`longattn.attention`, `longattn.kernels` and `longattn.models`; this module re-exports the
public API.
"""

from longattn.attention import (
    BlockMap,
    MultiheadAttention,
    ScaledDotProductAttention,
    scaled_dot_product_attention,
    varlen_attention,
)

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention", "varlen_attention", "ScaledDotProductAttention", "MultiheadAttention",
    "BlockMap", "__version__",
]
