"""Helpers shared by the kernel families: tile loads and stores, block sizes, dot precision."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Padded head dims stay at least 16: tl.dot needs every block dim >= 16 on tensor cores.
MIN_BLOCK = 16
MAX_HEAD_DIM = 256


def padded_dim(d: int) -> int:
    """The head-dim block: `d` rounded up to a power of two, at least 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(d))


def tile_config(d_pad: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """`(BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages)` for a program that keeps one block of
    rows on chip and streams blocks of the other side through it.

    Chosen by compiling every kernel for sm_80 and sm_90 (ptxas -v, no GPU timing): none spills
    registers (fp16 D=256 on sm_80: 16 bytes) and none needs more than 98 KB of shared memory.
    """
    if dtype == torch.float32:  # full-precision fp32 dots run on FMA units and hold more in registers
        return (32, 32, 8, 2) if d_pad <= 128 else (32, 16, 8, 2)
    if d_pad <= 64:
        # backward: with 2 stages ptxas spilled 8 bytes in dK/dV on sm_80 (uneven lengths); 3 do not
        return (64, 32, 4, 3) if backward else (64, 32, 4, 2)
    if d_pad <= 128:
        return 64, 32, 8, 2
    return 32, 32, 8, 2


def device_capability(device: torch.device) -> int | None:
    """The CUDA compute capability as one number (80 for sm_80), None off CUDA (the interpreter):
    for the few tile choices that differ between GPU generations."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (torch's default); tf32 would err ~1e-3."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_tile(ptrs, mask_rows, mask_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile, zero-filled past the end; masked only along dims that may run past it."""
    if EVEN_ROWS and EVEN_COLS:
        tile = tl.load(ptrs)
    elif EVEN_ROWS:
        tile = tl.load(ptrs, mask=mask_cols[None, :], other=0.0)
    elif EVEN_COLS:
        tile = tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)
    return tile


@triton.jit
def store_tile(ptrs, tile, mask_rows, mask_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Stores a 2-D tile, skipping elements past the end (masked only where needed)."""
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, tile)
    elif EVEN_ROWS:
        tl.store(ptrs, tile, mask=mask_cols[None, :])
    elif EVEN_COLS:
        tl.store(ptrs, tile, mask=mask_rows[:, None])
    else:
        tl.store(ptrs, tile, mask=mask_rows[:, None] & mask_cols[None, :])
