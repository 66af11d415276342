"""How a sequence is split across the ranks of a group, and the collectives that move it.

`"contiguous"`: rank `r` of `P` holds tokens `[r n, (r + 1) n)` of the `N = P n`. `"zigzag"`:
the sequence is cut into `2P` chunks of `c = n / 2` and rank `r` holds chunks `r` and `2P - 1 -
r`, one early and one late, so that under a causal mask every rank has the same work (ring
attention's load balancing, as in ring-flash-attn's zigzag and Megatron's context parallelism).
Every collective here is differentiable (`torch.distributed._functional_collectives`' autograd
versions: an all-gather's backward is a reduce-scatter, an all-to-all's is the reverse
all-to-all), so gradients reach each rank's shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

LAYOUTS = ("contiguous", "zigzag")
# The autograd all-gather under its current name, or the one older torch releases give it
_ALL_GATHER = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def segments(rank: int, world: int, n: int, layout: str) -> list[tuple[int, int, int]]:
    """`(local start, length, global start)` of each run of consecutive tokens in rank `rank`'s
    shard of `n` tokens: one run in the contiguous layout, two in the zigzag one."""
    if layout == "contiguous":
        return [(0, n, rank * n)]
    c = n // 2
    return [(0, c, rank * c), (c, c, (2 * world - 1 - rank) * c)]


def positions(rank: int, world: int, n: int, layout: str, device=None) -> torch.Tensor:
    """The positions in the whole sequence of rank `rank`'s `n` tokens, in shard order."""
    return torch.cat([torch.arange(g, g + m, device=device) for _, m, g in segments(rank, world, n, layout)])


def shard_sequence(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = -2) -> torch.Tensor:
    """This rank's shard of the full sequence `x` (every rank holds all of it), along `dim`: a
    view for the contiguous layout, two chunks joined for the zigzag one. No communication."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_total = x.shape[dim]
    parts = 2 * world if check_layout(layout) == "zigzag" else world
    if n_total % parts:
        raise ValueError(f"the sequence's length along dim {dim}, {n_total}, must be a multiple of "
                         f"{parts} for the {layout} layout over {world} ranks")
    return _shard_of(x, rank, world, layout, dim)


def gather_sequence(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = -2) -> torch.Tensor:
    """The full sequence from every rank's shard `x` along `dim` (the inverse of
    `shard_sequence`), in sequence order, on every rank. Differentiable: the gradient of the
    full sequence is summed over the ranks and scattered back to the shards."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    stacked = funcol.wait_tensor(_ALL_GATHER(x.movedim(dim, 0).contiguous(), 0, _group(group)))
    shards = torch.chunk(stacked, world)  # in rank order, each (n, ...)
    return in_sequence_order(list(shards), check_layout(layout), 0).movedim(0, dim)


def in_sequence_order(shards: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    """The full sequence from `shards`, rank `r`'s at index `r`, each in its local order."""
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    world = len(shards)
    halves = [s.chunk(2, dim=dim) for s in shards]  # rank r: (chunk r, chunk 2P - 1 - r)
    chunks = [halves[g][0] for g in range(world)] + [halves[world - 1 - i][1] for i in range(world)]
    return torch.cat(chunks, dim=dim)


def in_shard_order(full: torch.Tensor, world: int, layout: str, dim: int) -> list[torch.Tensor]:
    """The inverse of `in_sequence_order`: each rank's shard of `full`, in rank order."""
    return [_shard_of(full, r, world, layout, dim) for r in range(world)]


def _shard_of(full: torch.Tensor, rank: int, world: int, layout: str, dim: int) -> torch.Tensor:
    """Rank `rank`'s shard of `full` along `dim`: a view of its one run, or its runs joined."""
    runs = [full.narrow(dim, g, m) for _, m, g in segments(rank, world, full.shape[dim] // world, layout)]
    return runs[0] if len(runs) == 1 else torch.cat(runs, dim=dim)


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """`x` split into `P` equal parts along dim 0, part `g` sent to rank `g`; returns the parts
    received, stacked along dim 0 in source-rank order. Differentiable."""
    if dist.get_world_size(group) == 1:
        return x
    # waited here, as in gather_sequence, so no result stays an AsyncCollectiveTensor (torch
    # reported such collectives as unwaited at exit)
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), None, None, _group(group)))


def _group(group):
    return dist.group.WORLD if group is None else group
