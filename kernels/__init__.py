"""Tiled Triton kernels, one file per kernel family: kernels, launchers and autograd functions.

Reached through `longattn.scaled_dot_product_attention(..., backend="triton")`.
"""
