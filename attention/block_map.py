"""Block maps: which blocks of the `(Nq, Nk)` plane may hold an allowed key, so that the kernels
skip the rest (FlexAttention's `BlockMask` in spirit, as flags rather than index lists).

A document mask, a causal one over packed documents, or any structured mask leaves most blocks
empty; given with the mask, a block map lets the kernels cost in proportion to the blocks it
keeps. It is part of the call's mask: a key in a cleared block is masked on every backend, so a
map that clears a block the mask allows changes the result the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import float_mask_allows

# A block is a whole number of the kernels' largest tile (`kernels/masks.MAP_BLOCK_MULTIPLE`).
BLOCK_MULTIPLE = 64


@dataclass(frozen=True)
class BlockMap:
    """`flags`: bool, broadcastable to `(B, Hq, cdiv(Nq, block_size), cdiv(Nk, block_size))`;
    `flags[..., I, J]` False masks the block of rows `I * block_size` to `(I + 1) * block_size
    - 1` and keys `J * block_size` to `(J + 1) * block_size - 1`. `block_size`: a multiple of
    64."""

    flags: torch.Tensor
    block_size: int = 128

    @classmethod
    def from_mask(cls, attn_mask: torch.Tensor, block_size: int = 128) -> BlockMap:
        """The map of an `attn_mask` (bool, True = attend, or float, `reference.float_mask_allows`):
        a block is kept when any of its entries allows a key. Dims the mask broadcasts along (size
        1) stay size 1. One pass over a boolean copy of the mask, padded to whole blocks."""
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor; got {type(attn_mask).__name__}")
        allowed = attn_mask if attn_mask.dtype == torch.bool else float_mask_allows(attn_mask)
        allowed = allowed.reshape((1,) * max(0, 2 - allowed.dim()) + tuple(allowed.shape))
        *front, n_q, n_k = allowed.shape
        rows, cols = -(-n_q // block_size), -(-n_k // block_size)
        pad_q = 0 if n_q == 1 else rows * block_size - n_q
        allowed = torch.nn.functional.pad(allowed, (0, cols * block_size - n_k, 0, pad_q))
        row_blocks, row_size = (1, 1) if n_q == 1 else (rows, block_size)
        blocks = allowed.reshape(*front, row_blocks, row_size, cols, block_size)
        return cls(blocks.any(dim=-1).any(dim=-2), block_size)

    def as_mask(self, n_q: int, n_k: int) -> torch.Tensor:
        """The boolean mask the map stands for, `(..., Nq, Nk)` (or size 1 where the flags
        broadcast): each flag repeated over its block. It materialises `Nq x Nk` per batch and
        head the flags vary over, for the paths that take masks rather than maps."""
        mask = self.flags
        for dim, n in ((-2, n_q), (-1, n_k)):
            if mask.shape[dim] > 1 or n <= self.block_size:
                mask = mask.repeat_interleave(self.block_size, dim=dim).narrow(dim, 0, n)
        return mask
