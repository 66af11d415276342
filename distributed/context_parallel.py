"""Context parallelism: one sequence sharded across the ranks of a `torch.distributed` group,
attention computed as on one device (the same arithmetic, to rounding), for every normalizer.

Three modes, each a trade of memory against communication (P ranks, N tokens, H heads, D dims):
- `"allgather"`: K and V are all-gathered once, each rank attends with its own queries to
  every key, and the backward reduce-scatters dK and dV. Each rank sends `(P - 1) / P` of the
  keys and values, `2 N Hkv D (P - 1) / P` elements, and holds them all: cheap under GQA, where
  K and V are `Hkv / Hq` of the queries' size. Every row sees all of its keys on one rank, so
  the threshold of sparsemax and entmax is exact, as is SSMax's `n_i`.
- `"ulysses"` (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns the sequence shards
  into head shards, each rank attends over the whole sequence for `Hq / P` heads, and a second
  all-to-all turns the output back. Each rank sends `(P - 1) / P` of its q, k, v and output
  shards, and holds full-length tensors for its heads only. `P` must divide the query heads.
- `"ring"` (softmax and SSMax; `ring.py`): the key/value shards travel around the ring, and each
  block's partial rows merge through their log-sum-exp. Each rank sends `P - 1` K/V shards
  (as much as the all-gather) and in the backward those and their gradients again, and holds
  two shards at a time, however long the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention import checks, normalizers
from ..attention.functional import scaled_dot_product_attention
from . import ring
from .layout import (
    all_to_all,
    check_layout,
    gather_sequence,
    in_sequence_order,
    in_shard_order,
    positions,
    segments,
    shard_sequence,
)

MODES = ("allgather", "ulysses", "ring")


@dataclass(frozen=True)
class ContextParallel:
    """How a model runs context-parallel: the group its sequence is sharded over, the mode of
    its attention and the layout of its shards. Layers take it as `context_parallel=` (the
    reference Transformer, `ScaledDotProductAttention`)."""

    group: dist.ProcessGroup | None = None
    mode: str | None = None
    layout: str = "contiguous"  # as every function here defaults; "zigzag" evens out causal work
    check_shards: bool = True  # `context_parallel_attention`'s: one shape all-gather (a host sync) a call

    def __post_init__(self):
        check_layout(self.layout)
        _check_mode(self.mode)

    def shard(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This rank's shard of the whole sequence `x` along `dim`."""
        return shard_sequence(x, self.group, self.layout, dim)

    def gather(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """The whole sequence from every rank's shard `x` along `dim` (differentiable)."""
        return gather_sequence(x, self.group, self.layout, dim)

    def positions(self, n: int, device=None) -> torch.Tensor:
        """The positions in the whole sequence of this rank's `n` tokens, in shard order."""
        return positions(dist.get_rank(self.group), dist.get_world_size(self.group), n, self.layout, device)

    def attention(self, query, key, value, **kwargs) -> torch.Tensor:
        """`context_parallel_attention` over this group, mode and layout."""
        return context_parallel_attention(query, key, value, group=self.group, mode=self.mode,
                                          layout=self.layout, check_shards=self.check_shards, **kwargs)


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str | None = None,
    layout: str = "contiguous",
    is_causal: bool = False,
    causal_offset: int | str | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    normalizer: str = "softmax",
    alpha: float | torch.Tensor = 1.5,
    length_scale: float | torch.Tensor | None = None,
    backend: str = "auto",
    check_shards: bool = True,
) -> torch.Tensor:
    r"""Attention over a sequence sharded across the ranks of `group` (dim -2 of each input),
    returning this rank's shard of the output. Equivalent to the following, where
    ``gather_sequence`` joins the shards and ``shard_sequence`` takes this rank's part::

        def context_parallel_attention(q, k, v, *, group=None, layout="contiguous", **kw):
            q, k, v = (gather_sequence(t, group, layout) for t in (q, k, v))  # (B, H, N, D)
            out = longattn.scaled_dot_product_attention(q, k, v, **kw)    # the whole sequence
            return shard_sequence(out, group, layout)

    but no rank holds the whole score matrix, nor (in ``"ulysses"`` mode) all heads of the
    sequence. Every semantic of :func:`longattn.scaled_dot_product_attention` holds for the
    whole sequence: the causal mask and its offset count global positions, SSMax's ``n_i``
    counts every key a row may see, and sparsemax's and entmax's thresholds are exact. The
    backward gives each rank the gradient of its own shards; a tensor ``length_scale``'s or
    ``alpha``'s gradient is this rank's share, which summed over the ranks (as data parallelism's
    all-reduce sums it) is the whole sequence's.

    Args:
        query: ``(B, Hq, n_q, D)``, this rank's shard of the queries; every rank's shards have
            the same shapes (checked, with one small all-gather).
        key, value: ``(B, Hkv, n_k, D)`` and ``(B, Hkv, n_k, Dv)``, this rank's shards.
        group: the process group the sequence is sharded over (default: the world).
        mode: ``"allgather"`` (every normalizer, any head count), ``"ulysses"`` (every
            normalizer; the group's size must divide ``Hq``, and the heads of each rank must
            read whole key heads or share one) or ``"ring"`` (softmax and SSMax; the blocks on
            backend ``"torch"`` or ``"triton"``, ``"auto"`` picking the kernels on CUDA); None
            picks ``"allgather"``.
        layout: ``"contiguous"`` (rank ``r`` holds tokens ``[r n, (r + 1) n)``) or
            ``"zigzag"`` (chunks ``r`` and ``2P - 1 - r`` of ``2P``, which balances causal
            work; ``n`` must be even). ``shard_sequence`` and ``gather_sequence`` convert.
        is_causal, causal_offset, scale, enable_gqa, normalizer, alpha, length_scale, backend:
            as :func:`longattn.scaled_dot_product_attention`, over the whole sequence
            (``"bottom_right"`` is ``N_k - N_q`` of the whole sequence).
        check_shards: all-gather every rank's shapes first, so that mismatched shards raise
            a ``ValueError`` on every rank rather than hang a collective; it reads them on the
            host, a sync per call. ``False`` skips it where the caller guarantees equal shards.

    Returns:
        ``(B, Hq, n_q, Dv)``: this rank's shard of the output, in the layout of the query.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_attention needs torch.distributed initialised "
                         "(torch.distributed.init_process_group) before it is called")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    layout, mode = check_layout(layout), _check_mode(mode)
    normalizer = checks.check_normalizer(normalizer)
    if checks.check_flag("check_shards", check_shards):
        _check_same_shapes(query, key, value, group)  # first: every later check then agrees on all ranks
    checks.check_qkv(query, key, value, checks.check_flag("enable_gqa", enable_gqa))
    if query.dim() != 4:
        raise ValueError(f"query, key and value must be batched (B, H, n, D) shards; got query of shape "
                         f"{tuple(query.shape)}")
    if layout == "zigzag" and (query.shape[-2] % 2 or key.shape[-2] % 2):
        raise ValueError(f"layout='zigzag' needs shards of even length (two chunks each); got n_q = "
                         f"{query.shape[-2]}, n_k = {key.shape[-2]}")
    if mode == "ring":
        _check_ring(normalizer, backend)
    causal = checks.check_causal(is_causal, causal_offset)
    length_scale = checks.check_length_scale(length_scale, query.shape[1], query.device)
    alpha = checks.check_alpha(alpha, query.shape[1], query.device)
    world = dist.get_world_size(group)
    if mode == "ulysses":
        _check_heads(query.shape[1], key.shape[1], world)
    if causal == checks.BOTTOM_RIGHT:
        causal = world * (key.shape[-2] - query.shape[-2])
    kwargs = dict(scale=scale, enable_gqa=enable_gqa, normalizer=normalizer, alpha=alpha, backend=backend)
    if mode == "ulysses":
        return _ulysses(query, key, value, group, layout, causal, length_scale, kwargs)
    if mode == "ring":
        return _ring(query, key, value, group, layout, causal, length_scale, kwargs)
    return _allgather(query, key, value, group, layout, causal, length_scale, kwargs)


def _allgather(q, k, v, group, layout, causal, length_scale, kwargs):
    """Every key on every rank; each run of this rank's queries shifts the causal offset by its
    global start."""
    k_all, v_all = gather_sequence(k, group, layout), gather_sequence(v, group, layout)
    if causal is None:
        return scaled_dot_product_attention(q, k_all, v_all, length_scale=length_scale, **kwargs)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    outs = [
        scaled_dot_product_attention(q.narrow(-2, start, n), k_all, v_all, causal_offset=causal + first,
                                     length_scale=length_scale, **kwargs)
        for start, n, first in segments(rank, world, q.shape[-2], layout)
    ]
    return torch.cat(outs, dim=-2)


def _ulysses(q, k, v, group, layout, causal, length_scale, kwargs):
    """Heads `[r a, (r + 1) a)` of the whole sequence on rank `r` (`a = Hq / P`), with the key
    heads they read; the output's heads sent back to their sequence shards."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    h_q, h_kv = q.shape[1], k.shape[1]
    per_rank, group_size = h_q // world, h_q // h_kv
    kv_per_rank = max(1, per_rank // group_size)  # one key head shared, or whole groups
    q_heads = [g * per_rank for g in range(world)]
    kv_heads = [g * per_rank // group_size for g in range(world)]
    q_all = _heads_to_sequence(q, q_heads, per_rank, group, layout)  # (B, a, N, D)
    k_all = _heads_to_sequence(k, kv_heads, kv_per_rank, group, layout)
    v_all = _heads_to_sequence(v, kv_heads, kv_per_rank, group, layout)
    if torch.is_tensor(length_scale) and length_scale.dim() == 1:
        length_scale = length_scale[rank * per_rank:(rank + 1) * per_rank]
    alpha = kwargs["alpha"]  # one per head: this rank's heads' own
    if torch.is_tensor(alpha) and alpha.dim() == 1:
        alpha = alpha[rank * per_rank:(rank + 1) * per_rank]
    kwargs = dict(kwargs, alpha=alpha, enable_gqa=kwargs["enable_gqa"] or per_rank != kv_per_rank)
    out = scaled_dot_product_attention(q_all, k_all, v_all, causal_offset=causal, length_scale=length_scale,
                                       **kwargs)
    shards = torch.stack(in_shard_order(out, world, layout, dim=-2))  # (P, B, a, n, Dv), by rank
    mine = all_to_all(shards, group)  # [g]: heads of rank g, this rank's tokens
    return mine.transpose(0, 1).flatten(1, 2)  # (B, Hq, n, Dv)


def _ring(q, k, v, group, layout, causal, length_scale, kwargs):
    """Softmax's partial rows merged through their lse as the key shards go around; SSMax's
    factor, from the whole sequence's `n_i`, folded into the queries first."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    scale = q.shape[-1] ** -0.5 if kwargs["scale"] is None else kwargs["scale"]
    _, _, length_scale = normalizers.canonical(kwargs["normalizer"], kwargs["alpha"], length_scale)
    if length_scale is not None:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        factor = ring.length_factor(length_scale, causal, rank, world, q.shape[-2], world * k.shape[-2],
                                    layout, q.shape[1], dtype, q.device)
        q = (q.to(dtype) * factor).to(q.dtype)
    return ring.ring_attention(q, k, v, scale=scale, causal=causal, group=group, layout=layout,
                          backend=kwargs["backend"])


def _heads_to_sequence(x, first_heads, count, group, layout):
    """`x[:, first_heads[g]:first_heads[g] + count]` sent to rank `g`; returns this rank's heads
    over the whole sequence, `(B, count, N, D)`."""
    parts = torch.stack([x[:, h:h + count] for h in first_heads])  # (P, B, count, n, D)
    received = all_to_all(parts, group)  # [g]: rank g's tokens
    return in_sequence_order(list(received.unbind(0)), layout, dim=-2)


def _check_mode(mode) -> str:
    if mode is None:
        return "allgather"
    if mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}; got {mode!r}")
    return mode


def _check_ring(normalizer: str, backend: str) -> None:
    """The ring merges partial rows through their log-sum-exp: softmax's family only."""
    if normalizers.canonical(normalizer, 1.5, None)[0] is not normalizers.SOFTMAX:
        raise ValueError(f"mode='ring' serves softmax and SSMax, whose partial rows merge through their "
                         f"log-sum-exp; normalizer={normalizer!r} needs every key of a row at once: use "
                         "mode='allgather' or mode='ulysses'")
    ring.check_backend(backend)


def _check_heads(h_q: int, h_kv: int, world: int) -> None:
    """Ulysses gives each rank `a = Hq / P` query heads and the key heads they read: `P` must
    divide `Hq`, and the `a` heads must read whole groups of `Hq / Hkv` or lie in one."""
    if h_q % world:
        raise ValueError(f"mode='ulysses' needs the group's size, {world}, to divide the query heads, {h_q}; "
                         "mode='allgather' serves any head count")
    per_rank, group_size = h_q // world, h_q // h_kv
    if per_rank % group_size and group_size % per_rank:
        raise ValueError(f"mode='ulysses' gives each of the {world} ranks {per_rank} query heads, which "
                         f"would split a group of {group_size} heads sharing a key head ({h_q} query heads, "
                         f"{h_kv} key heads); mode='allgather' serves any head count")


def _check_same_shapes(q, k, v, group) -> None:
    """Every rank's shards have the same shapes: one all-gather of their sizes, read on the host
    (a sync), before any other check, so that every rank raises or none does, and every
    collective after it matches."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return
    padded = [[t.dim(), *t.shape[:4], *[-1] * (4 - min(t.dim(), 4))] for t in (q, k, v)]
    mine = torch.tensor(sum(padded, []), dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    shapes = [t.tolist() for t in everyone]
    for other, theirs in enumerate(shapes):
        if theirs != shapes[rank]:
            q_r, k_r, v_r = (tuple(x for x in theirs[i + 1:i + 5] if x >= 0) for i in (0, 5, 10))
            raise ValueError(
                f"every rank's shards must have the same shapes; rank {other} has query {q_r}, key "
                f"{k_r}, value {v_r}, rank {rank} has {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
