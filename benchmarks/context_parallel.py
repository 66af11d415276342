"""Context parallelism: what each mode sends and holds per rank, on paper and measured.

    python benchmarks/context_parallel.py                                  # the model's table only
    torchrun --standalone --nproc-per-node 2 benchmarks/context_parallel.py --lengths 2048 8192

The model (`traffic`) counts, per rank and attention layer, the bytes a rank sends in the
forward and the backward and the attention tensors it holds at its peak, from `B, N, P, Hq,
Hkv, D, Dv` and the element size; it is printed for N = 128k to 4M tokens and P = 8 to 256
ranks (Llama-3-8B's attention: Hq = 32, Hkv = 8, D = 128, bf16), where no cluster is at hand.
All-gathers and reduce-scatters are counted as ring collectives
(each rank sends `(P - 1) / P` of the whole), as NCCL and gloo run them.

Under torchrun each mode is also timed: forward and forward + backward of a causal sequence in
the zigzag layout, medians of `--repeats` runs after one warm-up, the slowest rank's time each
run, beside the single-process call on the whole sequence measured in the same run (on rank 0,
the others waiting). Benchmarks never assert timings.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

GIB = 1024 ** 3


def traffic(mode: str, B: int, N: int, P: int, Hq: int, Hkv: int, D: int, Dv: int,
            element: int) -> dict | None:
    """`{"sent_fwd", "sent_bwd", "held"}` in bytes for one rank and one attention layer, or None
    where the mode cannot serve the shape (Ulysses needs P to divide Hq).
    - allgather: K and V are all-gathered (`(P-1)/P` of them sent); the backward reduce-scatters
      dK and dV (as much again). A rank holds all of K and V and, in the backward, their
      gradients before the reduce-scatter, beside its own q, out, dq, dout.
    - ulysses: q, k, v go to head shards by all-to-all and the output comes back (`(P-1)/P` of
      each shard sent); the backward sends dout forward and dq, dk, dv back. Under GQA a rank
      takes the key heads its query heads read: `max(Hkv, P)` key heads are sent in all. A rank
      holds its heads over the whole sequence: q, out, k, v and their gradients.
    - ring: the K/V shard goes once around the ring in the forward (`P - 1` sends); the
      backward sends K/V around again (`P - 1`) and the float32 dK/dV accumulators `P` hops. A
      rank holds two K/V shards (the one it computes on and the one arriving) and, in the
      backward, two float32 accumulators (its own and the one arriving)."""
    n, kv = N // P, Hkv * (D + Dv)
    share = (P - 1) / P
    if mode == "allgather":
        sent = share * B * N * kv
        held = B * N * kv * 2 + B * n * Hq * (D + Dv) * 2
        return {"sent_fwd": sent * element, "sent_bwd": sent * element, "held": held * element}
    if mode == "ulysses":
        if Hq % P:
            return None
        kv_sent = max(Hkv, P) * (D + Dv)
        fwd = share * B * n * (Hq * D + kv_sent + Hq * Dv)
        heads_q, heads_kv = Hq // P, max(1, Hkv // P)
        held = B * N * (heads_q * (D + Dv) + heads_kv * (D + Dv)) * 2
        return {"sent_fwd": fwd * element, "sent_bwd": fwd * element, "held": held * element}
    if mode == "ring":
        shard = B * n * kv
        held = 2 * shard * element + 2 * shard * 4 + B * n * Hq * (D + Dv) * 2 * element
        return {"sent_fwd": (P - 1) * shard * element, "sent_bwd": ((P - 1) * element + P * 4) * shard,
                "held": held}
    raise ValueError(f"unknown mode {mode!r}")


def model_table(B=1, Hq=32, Hkv=8, D=128, element=2) -> list[dict]:
    rows = []
    for N in (128 * 1024, 512 * 1024, 1024 * 1024, 4 * 1024 * 1024):
        for P in (8, 32, 128, 256):
            for mode in ("allgather", "ulysses", "ring"):
                t = traffic(mode, B, N, P, Hq, Hkv, D, D, element)
                rows.append({"N": N, "P": P, "mode": mode, **({} if t is None else t)})
    return rows


def print_model(rows) -> None:
    print("Per rank and attention layer (B = 1, Hq = 32, Hkv = 8, D = Dv = 128, bf16); GiB sent "
          "forward + backward, and GiB of attention tensors held:\n")
    print("| N | P | allgather sent | allgather held | ulysses sent | ulysses held | ring sent | ring held |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 3):
        cells = []
        for r in rows[i:i + 3]:
            if "held" not in r:
                cells += ["n/a (P > Hq)", "n/a"]
            else:
                cells += [f"{(r['sent_fwd'] + r['sent_bwd']) / GIB:.3f}", f"{r['held'] / GIB:.3f}"]
        print(f"| {rows[i]['N'] // 1024}k | {rows[i]['P']} | " + " | ".join(cells) + " |")


def time_modes(lengths, repeats, heads, head_dim) -> list[dict]:
    import torch.distributed as dist

    import longattn
    from longattn.distributed import context_parallel_attention, shard_sequence

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()

    def timed(fn, backward):
        """The slowest rank's seconds of each run (one warm-up first), their median."""
        runs = []
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            out = fn()
            if backward:
                out.backward(torch.ones_like(out))
            if cuda:
                torch.cuda.synchronize()
            took = torch.tensor(time.perf_counter() - start, device=device)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            runs += [took.item()] if i else []
        return statistics.median(runs)

    rows = []
    for N in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, heads, N, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, heads // 2, N, head_dim, device=device, dtype=dtype) for _ in range(2))
        for normalizer in ("softmax", "entmax"):
            kwargs = dict(is_causal=True, enable_gqa=True, normalizer=normalizer)
            whole = [t.clone().requires_grad_() for t in (q, k, v)]
            mine = [shard_sequence(t, layout="zigzag").detach().requires_grad_() for t in (q, k, v)]

            def one_process(whole=whole, kwargs=kwargs):
                if rank:  # the others wait at the all-reduce: rank 0's time is the run's
                    return torch.zeros((), device=device, requires_grad=True)
                return longattn.scaled_dot_product_attention(*whole, **kwargs)

            for backward in (False, True):
                base = timed(one_process, backward)
                rows.append({"N": N, "P": world, "normalizer": normalizer, "mode": "one process",
                             "pass": "fwd+bwd" if backward else "fwd", "seconds": base, "ratio": 1.0})
                for mode in ("allgather", "ulysses", "ring"):
                    if mode == "ring" and normalizer != "softmax":
                        continue

                    def sharded(mode=mode, mine=mine, kwargs=kwargs):
                        return context_parallel_attention(*mine, mode=mode, layout="zigzag", **kwargs)

                    seconds = timed(sharded, backward)
                    rows.append({"N": N, "P": world, "normalizer": normalizer, "mode": mode,
                                 "pass": "fwd+bwd" if backward else "fwd", "seconds": seconds,
                                 "ratio": seconds / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=8, help="query heads (key heads: half)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--csv", default=None, help="where rank 0 writes the timings")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        print_model(model_table())
    if not distributed:
        return
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rows = time_modes(args.lengths, args.repeats, args.heads, args.head_dim)
    if rank == 0:
        device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads a rank"
        print(f"\nMeasured on {dist.get_world_size()} ranks ({device}), Hq = {args.heads}, Hkv = "
              f"{args.heads // 2}, D = {args.head_dim}, causal, zigzag; medians of {args.repeats}:\n")
        print("| N | normalizer | pass | one process (s) | allgather (s) | ratio | ulysses (s) | ratio "
              "| ring (s) | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        runs = {}
        for r in rows:
            runs.setdefault((r["N"], r["normalizer"], r["pass"]), {})[r["mode"]] = r
        for (n, normalizer, which), by_mode in runs.items():
            cells = [f"{by_mode['one process']['seconds']:.4f}"]
            for mode in ("allgather", "ulysses", "ring"):
                r = by_mode.get(mode)
                cells += ["", ""] if r is None else [f"{r['seconds']:.4f}", f"{r['ratio']:.2f}"]
            print(f"| {n} | {normalizer} | {which} | " + " | ".join(cells) + " |")
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
