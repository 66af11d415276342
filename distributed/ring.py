"""Ring attention (Liu et al. 2023) for softmax and SSMax: each rank keeps its queries while the
key/value shards travel around the ring, one step a shard, the next transfer overlapped with
the current block's compute. Each block gives a partial output and its log-sum-exp, which merge
exactly: `lse = logaddexp(lse_a, lse_b)`, `out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)`.
The backward sends the shards around again (none is kept), overlapped with the blocks as in the
forward, with each shard's float32 dK/dV accumulator travelling beside it (a hop after each step,
not overlapped: the next step adds to it) and, after the last step, returning to its owner.

Precision: the merge and the accumulators are float32 (float64 for float64 inputs), so float32
and float64 runs equal one device's to rounding. In 16 bits each block's partial output and
gradients come back rounded to the inputs' dtype before they are merged, as in ring-flash-attn,
and SSMax's factor is folded into 16-bit queries (as the flash-attn adaptor folds it): errors of
a few roundings a row, growing with P, where one device rounds once.

SSMax's factor `s_h ln(n_i)`, with `n_i` the keys row i sees in the whole sequence, is folded
into the queries before the ring (`length_factor`), so autograd takes `s` its gradient.

A block is computed by the Triton kernels (`softmax_attention_fwd` returns the lse, and
`softmax_attention_bwd` takes an outside output and lse) or, on CPUs, by `torch_block_fwd` /
`torch_block_bwd`, which hold one block of rows' scores at a time.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..attention.chunked import BLOCK_ELEMENTS, _band_block
from .layout import positions, segments

BACKENDS = ("auto", "torch", "triton")


def ring_attention(q, k, v, *, scale: float, causal: int | None, group, layout: str, backend: str):
    """This rank's shard of softmax attention over the ring (`causal`: None, or the offset of
    the causal mask in global positions)."""
    return _RingAttention.apply(q, k, v, scale, causal, group, layout, _block_functions(backend, q, k, v))


def length_factor(length_scale, causal, rank, world, n_q, n_k_total, layout, num_heads, dtype, device):
    """`(Hq, n_q, 1)` in `dtype`: `s_h ln(n_i)` of this rank's query rows, `n_i` the keys row `i`
    sees in the whole sequence (`clamp(g_i + causal + 1, 0, N_k)` at global row `g_i`, all N_k
    without a causal mask), 1 counted for a row with none."""
    rows = positions(rank, world, n_q, layout, device)
    n = torch.full_like(rows, n_k_total) if causal is None else (rows + causal + 1).clamp(0, n_k_total)
    s = torch.as_tensor(length_scale, dtype=dtype, device=device).expand(num_heads)
    return s.view(-1, 1, 1) * torch.log(n.clamp(min=1).to(dtype)).view(1, -1, 1)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, blocks):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        block_fwd, _ = blocks
        rows = segments(rank, world, q.shape[-2], layout) if causal is not None else [(0, q.shape[-2], 0)]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=acc)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=acc)
        shard = (k, v)
        for step in range(world):
            src = (rank - step) % world
            transfer = _pass_on(shard, group) if step < world - 1 else None  # overlaps the blocks below
            for (qs, ql, _), (ks, kl, _), offset in _pairs(rows, src, world, k.shape[-2], layout, causal):
                o_b, lse_b = block_fwd(q[..., qs:qs + ql, :], shard[0][..., ks:ks + kl, :],
                                       shard[1][..., ks:ks + kl, :], scale, offset)
                _merge(out[..., qs:qs + ql, :], lse[..., qs:qs + ql], o_b.to(acc), lse_b.to(acc))
            if transfer is not None:
                shard = _received(transfer)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.group, ctx.layout = scale, causal, group, layout
        ctx.blocks, ctx.rows = blocks, rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, causal, rows = ctx.group, ctx.layout, ctx.causal, ctx.rows
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        _, block_bwd = ctx.blocks
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros_like(q, dtype=acc)
        grads = (torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc))  # the shard held's
        shard = (k, v)
        lse_in = lse.float() if acc == torch.float32 else lse
        for step in range(world):
            src = (rank - step) % world
            transfer = _pass_on(shard, group) if step < world - 1 else None
            for (qs, ql, _), (ks, kl, _), offset in _pairs(rows, src, world, k.shape[-2], layout, causal):
                run = slice(qs, qs + ql)
                k_b, v_b = shard[0][..., ks:ks + kl, :], shard[1][..., ks:ks + kl, :]
                dq_b, dk_b, dv_b = block_bwd(dout[..., run, :], q[..., run, :], k_b, v_b, out[..., run, :],
                                             lse_in[..., run], ctx.scale, offset)
                dq[..., qs:qs + ql, :] += dq_b
                grads[0][..., ks:ks + kl, :] += dk_b
                grads[1][..., ks:ks + kl, :] += dv_b
            if transfer is not None:
                shard = _received(transfer)
            # the accumulator of shard src goes on with it; after the last step, home to src
            grads = _received(_pass_on(grads, group)) if world > 1 else grads
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None, None


def _pairs(rows, src, world, n_k, layout, causal):
    """`(query run, key run, causal offset)` of each pair of this rank's query runs and shard
    `src`'s key runs that has a key to attend to: the offset None where every row sees every
    key of the run, skipped where none does."""
    keys = segments(src, world, n_k, layout) if causal is not None else [(0, n_k, 0)]
    for qrun in rows:
        for krun in keys:
            if causal is None:
                yield qrun, krun, None
                continue
            offset = causal + qrun[2] - krun[2]  # key j (run-local) allowed for row i iff j <= i + offset
            if offset + qrun[1] - 1 < 0:
                continue  # not even the last row sees the run's first key
            yield qrun, krun, None if offset >= krun[1] - 1 else offset


def _merge(out, lse, out_b, lse_b):
    """In place: `(out, lse)` and a block's `(out_b, lse_b)` merged through their log-sum-exp.
    Rows with no key in either keep weight 0 (their lse stays -inf)."""
    new = torch.logaddexp(lse, lse_b)
    finite = torch.isfinite(new)
    keep = torch.where(finite, torch.exp(lse - new), 0.0).unsqueeze(-1)
    take = torch.where(finite, torch.exp(lse_b - new), 0.0).unsqueeze(-1)
    out.copy_(out * keep + out_b * take)
    lse.copy_(new)


def _pass_on(tensors, group):
    """Starts sending `tensors` to the next rank of the ring and receiving the previous rank's
    into fresh buffers: `(buffers, requests)`."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    to, source = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
    sent = [t.contiguous() for t in tensors]  # kept alive until the requests complete
    buffers = tuple(torch.empty_like(t) for t in sent)
    ops = [dist.P2POp(dist.isend, t, to, group) for t in sent]
    ops += [dist.P2POp(dist.irecv, b, source, group) for b in buffers]
    return buffers, dist.batch_isend_irecv(ops), sent


def _received(transfer):
    buffers, requests, _ = transfer
    for request in requests:
        request.wait()
    return buffers


def _global(group, rank):
    return rank if group is None else dist.get_global_rank(group, rank)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"mode='ring' computes its blocks on backend 'torch' or 'triton' ('auto' picks); "
                         f"got backend={backend!r}")


def _block_functions(backend, q, k, v):
    """`(forward, backward)` of one block, by `backend`: the Triton kernels (`"triton"`, which
    refuses what they cannot do, and `"auto"` on CUDA where they serve the inputs) or the torch
    blocks (`"torch"`, and `"auto"` elsewhere)."""
    from ..kernels.common import MAX_HEAD_DIM, check_inputs  # host side only: compiles no kernel

    check_backend(backend)
    if backend == "triton":
        check_inputs(q, k, v)
        return triton_block_fwd, triton_block_bwd
    kernels_serve = (q.dtype in (torch.float16, torch.bfloat16, torch.float32)
                     and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM)
    if backend == "auto" and q.is_cuda and kernels_serve:
        return triton_block_fwd, triton_block_bwd
    return torch_block_fwd, torch_block_bwd


def triton_block_fwd(q, k, v, scale, offset):
    from ..kernels.softmax import softmax_attention_fwd

    return softmax_attention_fwd(q, k, v, scale, offset, None)


def triton_block_bwd(do, q, k, v, out, lse, scale, offset):
    from ..kernels.softmax import softmax_attention_bwd

    dq, dk, dv, *_ = softmax_attention_bwd(do, q, k, v, out, lse.float().contiguous(), scale, offset, None)
    return dq, dk, dv


def torch_block_fwd(q, k, v, scale, offset):
    """`(out, lse)` of softmax attention of q against one key block (`offset`: key j allowed for
    row i iff `j <= i + offset`, None for all), a block of rows at a time; float32 (float64 for
    float64 inputs). GQA: key head `h // G` for query head `h`."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    n, m = q.shape[-2], k.shape[-2]
    out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=dtype)
    lse = q.new_empty(q.shape[:-1], dtype=dtype)
    step = max(1, BLOCK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * m))  # scores of `step` rows: ~1M
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        p, row_lse = _block_probs(q[..., r0:r1, :].to(dtype), k, scale, offset, r0, r1, None)
        out[..., r0:r1, :] = p @ v
        lse[..., r0:r1] = row_lse
    return out, lse


def torch_block_bwd(do, q, k, v, out, lse, scale, offset):
    """`(dq, dk, dv)` of one block given the whole row's `out` and `lse` (merged over every
    block): `P = exp(z - lse)`, `dS = P (dO V^T - rowsum(dO * out))`."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group, h_kv = q.shape[1] // k.shape[1], k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    do, out = do.to(dtype), out.to(dtype)
    delta = (do * out).sum(-1, keepdim=True)
    n, m = q.shape[-2], k.shape[-2]
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    step = max(1, BLOCK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * m))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qb = q[..., r0:r1, :].to(dtype)
        p, _ = _block_probs(qb, k, scale, offset, r0, r1, lse[..., r0:r1].to(dtype))
        dv += p.transpose(-2, -1) @ do[..., r0:r1, :]
        ds = p * (do[..., r0:r1, :] @ v.transpose(-2, -1) - delta[..., r0:r1, :])
        dq[..., r0:r1, :] = scale * (ds @ k)
        dk += scale * (ds.transpose(-2, -1) @ qb)
    fold = (q.shape[0], h_kv, group, m)
    return dq, dk.view(*fold, -1).sum(2), dv.view(*fold, -1).sum(2)


def _block_probs(q, k, scale, offset, r0, r1, lse):
    """Rows `r0:r1`' weights on the block's keys, `exp(z - lse)` (0 where masked, and in rows
    whose lse is -inf), with the lse: the given one, or these keys' own."""
    z = scale * (q @ k.transpose(-2, -1))
    allowed = _band_block(offset, None, r0, r1, 0, k.shape[-2], q.device)
    if allowed is not None:
        z = z.masked_fill(~allowed, -math.inf)
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    return torch.where(torch.isfinite(lse).unsqueeze(-1), p, 0.0), lse
