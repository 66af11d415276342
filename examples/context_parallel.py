"""Context parallelism: one causal sequence sharded over the ranks of a torch.distributed group,
attention by each mode and normalizer, checked against the whole sequence on one rank.

    torchrun --nproc-per-node 2 examples/context_parallel.py

On CPUs the ranks talk through gloo, on GPUs through NCCL (one GPU a rank: as many GPUs as
`--nproc-per-node`; in bf16 the errors are bf16's). Each rank holds
`N / P` tokens in the zigzag layout (two chunks, one early and one late, so causal work is
even); rank 0 prints each mode's error against the single-process call and its time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import longattn
from longattn.distributed import context_parallel_attention, shard_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="tokens of the whole sequence")
    parser.add_argument("--heads", type=int, default=4, help="query heads (key heads: half)")
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same whole sequence on every rank, to check against
    shape = (1, args.heads, args.length, args.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype)
    k, v = (torch.randn(1, args.heads // 2, args.length, args.head_dim, device=device, dtype=dtype)
            for _ in range(2))
    mine = [shard_sequence(t, layout="zigzag") for t in (q, k, v)]  # (1, H, N / P, D) each
    if rank == 0:
        print(f"{world} ranks, N = {args.length}, Hq = {args.heads}, Hkv = {args.heads // 2}, "
              f"D = {args.head_dim}, {dtype}, causal, zigzag layout")
    for normalizer in ("softmax", "entmax"):
        whole = longattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                      normalizer=normalizer)
        for mode in ("allgather", "ulysses", "ring") if normalizer == "softmax" else ("allgather", "ulysses"):
            dist.barrier()
            start = time.perf_counter()
            out = context_parallel_attention(*mine, mode=mode, layout="zigzag", is_causal=True,
                                             enable_gqa=True, normalizer=normalizer)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            want = shard_sequence(whole, layout="zigzag")
            err = torch.tensor((out.float() - want.float()).abs().max().item(), device=device)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"{normalizer:8s} {mode:10s} max abs err vs one process {err.item():.1e}, "
                      f"{seconds * 1e3:7.1f} ms")
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
