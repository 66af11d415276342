"""Tiled Triton kernels: one module per kernel family, with its kernels, launchers and autograd
functions (`softmax.py`; `entmax.py`, its kernels in `entmax_fwd.py` and `entmax_bwd.py`), on a
layer both share: `common.py` on the host, `program.py` in the kernels.

Reached through `longattn.scaled_dot_product_attention(..., backend="triton")`.
"""
