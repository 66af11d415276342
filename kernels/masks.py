"""`attn_mask` and block maps in the kernels of both families: what the launchers hand them, the
kernel that counts each row's allowed keys, and the float mask's gradient.

A mask reaches the kernels as it is, read tile by tile through the strides of its broadcast view
`(B, Hq, Nq, Nk)` (stride 0 along each broadcast dim: a `(B, 1, 1, Nk)` padding mask costs
`B * Nk` bytes however many heads and rows read it). A boolean mask goes as bytes; a float mask
in its own dtype, its masked entries being those `reference.float_mask_allows` names (float64
masks are converted to float32 first, with their masked entries kept masked: the kernels'
scalars are float32).

A block map is one flag per `(map_block x map_block)` block of the `(Nq, Nk)` plane, per batch
and head (broadcast like the mask): a clear flag says no key of the block is allowed, and the
kernels skip every tile inside it without loading K or V. `map_block` is a multiple of 64,
hence of every tile the launchers pick (`tile_config`), so one flag covers a whole tile.

SSMax's `n_i` and the rows' emptiness depend on every allowed key of a row, which no bound
gives once a mask or map is in play: `count_allowed_keys_kernel` counts them in one pass over the
mask (no K, no V), and the attention kernels read the counts (`program.row_keys`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .program import allowed_keys, key_end, key_start, mask_tile, program_prologue, tile_live

MAP_BLOCK_MULTIPLE = 64  # the largest tile side of `tile_config`: every tile lies in one map block
_COUNT_BLOCK_M, _COUNT_BLOCK_N = 32, 64


@triton.jit
def count_allowed_keys_kernel(
    key_counts, mask, block_map, seqused_k,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    Hq, Nq, Nk, causal_offset, window_offset, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MAP_BLOCK: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, CAUSAL_FROM_END: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_BLOCK_MAP: tl.constexpr,
):
    """n_i of one block of rows of one (batch, query head): the keys the causal rule, the window,
    the key length, the mask and the block map all allow, as int32 in the lse's layout."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, _, _, _, Nq, Nk, causal_offset, window_offset, _, row, _ = program_prologue(
        i_m, i_bh, None, None, seqused_k, Hq, 1, Nq, Nk, causal_offset, window_offset, 0, BLOCK_M, False,
        False, HAS_KEY_LENGTHS, CAUSAL_FROM_END, HAS_WINDOW, False)
    if HAS_MASK:
        mask += i_b.to(tl.int64) * stride_mb + i_h.to(tl.int64) * stride_mh
    if HAS_BLOCK_MAP:
        block_map += i_b.to(tl.int64) * stride_bb + i_h.to(tl.int64) * stride_bh
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_start = key_start(i_m, Nk, window_offset, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for start_n in range(n_start, key_end(i_m, Nq, Nk, causal_offset, BLOCK_M), BLOCK_N):
        cols = start_n + offs_n
        allowed = allowed_keys(offs_m, cols, Nk, causal_offset, window_offset, IS_CAUSAL, False, HAS_WINDOW)
        allowed = allowed & (offs_m < Nq)[:, None]
        if HAS_MASK:
            in_mask, _bias = mask_tile(mask, offs_m[:, None], cols[None, :], Nq, Nk, stride_mm, stride_mn,
                                       mask_floor, MASK_IS_BOOL)
            allowed = allowed & in_mask
        if HAS_BLOCK_MAP:
            live = tile_live(block_map, mask, i_m * BLOCK_M, start_n, offs_m[:, None], cols[None, :], Nq, Nk,
                             stride_bm, stride_bn, stride_mm, stride_mn, MAP_BLOCK, True, False, False)
            allowed = allowed & live
        count += tl.sum(allowed.to(tl.int32), 1)
    tl.store(key_counts + row + offs_m, count, mask=offs_m < Nq)


class MaskArgs(NamedTuple):
    """What a kernel launch takes of a mask and a block map: the two pointers (None where absent),
    their strides over `(B, Hq, rows, cols)`, the float mask's floor, and the constexprs."""

    mask: torch.Tensor | None
    block_map: torch.Tensor | None
    strides: tuple[int, ...]
    floor: float
    constexprs: dict

    @property
    def present(self) -> bool:
        return self.mask is not None or self.block_map is not None

    def kernel_args(self, key_counts: torch.Tensor | None) -> dict:
        """The attention kernels' keyword arguments: these and the rows' key counts."""
        names = ("stride_mb", "stride_mh", "stride_mm", "stride_mn", "stride_bb", "stride_bh", "stride_bm",
                 "stride_bn")
        return {"key_counts": key_counts, "mask": self.mask, "block_map": self.block_map,
                **dict(zip(names, self.strides, strict=True)), "mask_floor": self.floor,
                "HAS_KEY_COUNTS": key_counts is not None, **self.constexprs}


def _broadcast_view(t: torch.Tensor, shape: tuple[int, int, int, int], name: str, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor; got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")
    try:
        fits = t.dim() <= 4 and torch.broadcast_shapes(t.shape, shape) == torch.Size(shape)
    except RuntimeError:  # no common shape at all
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {shape}")
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)


def mask_args(attn_mask: torch.Tensor | None, block_map: torch.Tensor | None, map_block: int,
              B: int, Hq: int, Nq: int, Nk: int, device, varlen: bool = False) -> MaskArgs:
    """The launch arguments of `attn_mask` (bool, or float of any dtype; broadcastable to
    `(B, Hq, Nq, Nk)`) and `block_map` (bool, broadcastable to `(B, Hq, cdiv(Nq, map_block),
    cdiv(Nk, map_block))`), both as broadcast views: nothing of either's size is copied but a
    float64 mask's conversion. Dense calls only."""
    if varlen and (attn_mask is not None or block_map is not None):
        raise ValueError("attn_mask and block_map are dense-only: packed documents take cu_seqlens (and "
                         "window_size, alibi_slopes) instead")
    mask, floor, is_bool = None, 0.0, False
    mask_strides = (0, 0, 0, 0)
    if attn_mask is not None:
        if isinstance(attn_mask, torch.Tensor) and not (attn_mask.dtype == torch.bool
                                                        or attn_mask.is_floating_point()):
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (added); "
                            f"got {attn_mask.dtype}")
        is_bool = attn_mask.dtype == torch.bool
        if attn_mask.dtype == torch.float64:
            from ..attention.reference import float_mask_allows

            # masked entries stay masked in float32, and allowed ones below its range stay allowed
            # (just above its lowest value, which masks): counted in n_i, with weight 0
            least = torch.nextafter(torch.tensor(torch.finfo(torch.float32).min), torch.tensor(0.0)).item()
            attn_mask = torch.where(float_mask_allows(attn_mask), attn_mask.float().clamp(min=least),
                                    float("-inf"))
        if attn_mask.dim() and attn_mask.stride(-1) * (attn_mask.shape[-1] - 1) >= 2**31:
            attn_mask = attn_mask.contiguous()  # the kernels' key offsets are int32; rows' are int64
        mask = _broadcast_view(attn_mask, (B, Hq, Nq, Nk), "attn_mask", device)
        if is_bool:
            mask = mask.view(torch.uint8)
        else:
            floor = float(torch.finfo(mask.dtype).min)
        mask_strides = mask.stride()
    flags, map_strides = None, (0, 0, 0, 0)
    if block_map is not None:
        if isinstance(map_block, bool) or not isinstance(map_block, int) or map_block <= 0 \
                or map_block % MAP_BLOCK_MULTIPLE:
            raise ValueError(f"map_block must be a positive multiple of {MAP_BLOCK_MULTIPLE}; "
                             f"got {map_block!r}")
        if isinstance(block_map, torch.Tensor) and block_map.dtype != torch.bool:
            raise TypeError(f"block_map must be a bool tensor (True = the block may hold an allowed key); "
                            f"got {block_map.dtype}")
        grid = (B, Hq, triton.cdiv(Nq, map_block), triton.cdiv(Nk, map_block))
        flags = _broadcast_view(block_map, grid, f"block_map (blocks of {map_block})",
                                device).view(torch.uint8)
        map_strides = flags.stride()
    constexprs = {"HAS_MASK": mask is not None, "MASK_IS_BOOL": is_bool, "HAS_BLOCK_MAP": flags is not None,
                  "MAP_BLOCK": map_block if flags is not None else MAP_BLOCK_MULTIPLE}
    return MaskArgs(mask, flags, (*mask_strides, *map_strides), floor, constexprs)


def count_allowed_keys(masking: MaskArgs, seqused_k, B, Hq, Nq, Nk, is_causal, causal_offset, from_end,
                       has_window, window_offset, device) -> torch.Tensor | None:
    """n_i of every row, int32 `(B, Hq, Nq)`, where a mask or a block map is in play; else None
    (the kernels derive n_i from the bounds). The bounds as the launchers pass them (`from_end`:
    counted from each batch's `(Nq, seqused_k[b])` corner)."""
    if not masking.present:
        return None
    counts = torch.empty(B, Hq, Nq, dtype=torch.int32, device=device)
    if counts.numel() == 0:
        return counts
    count_allowed_keys_kernel[(triton.cdiv(Nq, _COUNT_BLOCK_M), B * Hq)](
        counts, masking.mask, masking.block_map, seqused_k, *masking.strides,
        Hq, Nq, Nk, causal_offset, window_offset, masking.floor,
        BLOCK_M=_COUNT_BLOCK_M, BLOCK_N=_COUNT_BLOCK_N, IS_CAUSAL=is_causal, HAS_WINDOW=has_window,
        HAS_KEY_LENGTHS=seqused_k is not None, CAUSAL_FROM_END=from_end, **masking.constexprs,
    )
    return counts


def mask_grad_args(attn_mask: torch.Tensor | None, wanted: bool, B: int, Hq: int, Nq: int,
                   Nk: int) -> tuple[torch.Tensor | None, dict]:
    """`(buffer, dQ kernel keywords)` for the float mask's gradient (`(None, keywords)` where none
    is `wanted`): float32 zeros of the mask's own shape (4-D), which the dQ kernels add each
    logit's gradient into through the strides of its broadcast view over `(B, Hq, Nq, Nk)`:
    atomically where heads or batches share an entry, each tile summed first along the rows
    or keys the mask broadcasts along. No buffer outgrows the mask."""
    buffer, strides, sums = None, (0, 0, 0, 0), (False, False)
    if attn_mask is not None and attn_mask.dtype != torch.bool and wanted:
        shape4 = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        buffer = torch.zeros(shape4, dtype=torch.float32, device=attn_mask.device)
        strides = buffer.expand(B, Hq, Nq, Nk).stride()
        sums = (shape4[2] == 1, shape4[3] == 1)
    names = ("stride_gb", "stride_gh", "stride_gm", "stride_gn")
    return buffer, {"dmask": buffer, **dict(zip(names, strides, strict=True)),
                    "MASK_GRAD": buffer is not None,
                    "MASK_GRAD_SUM_ROWS": sums[0], "MASK_GRAD_SUM_KEYS": sums[1]}


def reduce_mask_grad(buffer: torch.Tensor | None, attn_mask: torch.Tensor) -> torch.Tensor | None:
    """The gradient in the mask's shape and dtype."""
    return None if buffer is None else buffer.reshape(attn_mask.shape).to(attn_mask.dtype)
