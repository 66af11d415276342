"""GPU masked attention: longattn's Triton kernels reading a boolean `attn_mask` (with and without
a `BlockMap`) against FlexAttention with the same mask as a `mask_mod` and block mask, and
against longattn's own varlen kernels, which need no mask for documents. First checks bf16
correctness against longattn's float32 torch path, then times; prints a markdown table and
writes a CSV.

    python benchmarks/gpu_masks.py                          # N in {8k, 16k, 32k}, documents of 2k
    python benchmarks/gpu_masks.py --lengths 8192 --document 1024

The mask: causal attention within documents of `--document` tokens packed into one sequence of
N (a block-diagonal causal mask), bf16, D = 128, H = 16, B = 1. The dense mask is `N x N` bytes
(1 GiB at 32k); FlexAttention computes its `mask_mod` in the kernel instead, and the varlen
kernels take the documents' offsets. Times are medians of `triton.testing.do_bench`, the
providers side by side in one process; ratios are each provider's time over FlexAttention's.
FLOPs count the allowed (query, key) pairs only. On a CPU-only machine the script says so and
exits 0; a failed correctness check is printed and sets exit code 1.
"""

from __future__ import annotations

import argparse
import math
import sys

from gpu_softmax import fmt, gpu_or_reason, rel_err, tflops, time_provider, write_csv

HEADS = 16
HEAD_DIM = 128
ATOL = 2e-3  # as gpu_windows.py: at most twice the baseline's bf16 error, plus this


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--document", type=int, default=2048, help="tokens per document")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--csv", default="benchmarks/results/gpu_masks.csv")
    p.add_argument("--skip-check", action="store_true", help="time without the correctness check")
    return p.parse_args()


def document_ids(torch, n: int, document: int):
    return torch.arange(n, device="cuda") // document


def providers(torch, sdpa, n: int, document: int):
    """name -> make(q, k, v, causal, s) giving `(fn, leaves)`, as in gpu_softmax.py; the masks,
    block maps and offsets are built once per length, outside the timing."""
    from longattn import BlockMap, varlen_attention

    doc = document_ids(torch, n, document)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    block_map = BlockMap.from_mask(mask, 128)
    cu = torch.arange(0, n + 1, document, dtype=torch.int32, device="cuda")
    if cu[-1] != n:
        cu = torch.cat([cu, cu.new_tensor([n])])

    def masked(normalizer, with_map):
        def make(q, k, v, causal, s=None):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            kwargs = dict(attn_mask=mask, normalizer=normalizer, backend="triton")
            if with_map:
                kwargs["block_map"] = block_map
            return (lambda: sdpa(*leaves, **kwargs)), leaves
        return make

    def packed(normalizer):
        def make(q, k, v, causal, s=None):
            leaves = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
            return (lambda: varlen_attention(*leaves, cu, cu, max_seqlen_q=document, max_seqlen_k=document,
                                             is_causal=True, normalizer=normalizer, backend="triton")), leaves
        return make

    makers = {
        "longattn softmax, mask + map": masked("softmax", True),
        "longattn softmax, mask": masked("softmax", False),
        "longattn softmax, varlen": packed("softmax"),
        "longattn entmax, mask + map": masked("entmax", True),
        "longattn entmax, varlen": packed("entmax"),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        flex_mask = create_block_mask(document_causal, None, None, n, n, device="cuda")

        def flex(q, k, v, causal, s=None):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            return (lambda: compiled(*leaves, block_mask=flex_mask)), leaves
        makers["FlexAttention"] = flex
    except ImportError:
        print("torch.nn.attention.flex_attention is unavailable: its rows are left out")
    return makers, mask


def check_correctness(torch, sdpa) -> bool:
    """Each longattn provider's bf16 output against the float32 torch path with the same mask,
    held to twice the torch path's own bf16 error (and FlexAttention's, for softmax) plus ATOL."""
    ok = True
    torch.manual_seed(0)
    n, document = 2048, 300
    q, k, v = (torch.randn(1, 8, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    makers, mask = providers(torch, sdpa, n, document)
    print(f"correctness, N = {n}, documents of {document}, bf16 against float32:")
    for name, make in makers.items():
        normalizer = "entmax" if "entmax" in name else "softmax"
        ref = sdpa(q.float(), k.float(), v.float(), attn_mask=mask, normalizer=normalizer, backend="torch")
        base = rel_err(sdpa(q, k, v, attn_mask=mask, normalizer=normalizer, backend="torch"), ref)
        fn, _ = make(q, k, v, True)
        out = fn()
        if "varlen" in name:
            out = out.transpose(0, 1).unsqueeze(0)
        err = rel_err(out, ref)
        passed = err <= 2 * base + ATOL
        ok &= passed
        print(f"  {name}: {err:.2e} (torch path bf16 {base:.2e}) {'ok' if passed else 'FAILED'}")
    return ok


def benchmark(torch, sdpa, args):
    from triton.testing import do_bench

    rows = []
    for n in args.lengths:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        makers, mask = providers(torch, sdpa, n, args.document)
        pairs = int(mask.sum())
        del mask
        flops = 4 * HEADS * pairs * HEAD_DIM
        times = {name: time_provider(torch, do_bench, make, q, k, v, True, None, args)
                 for name, make in makers.items()}
        base = times.get("FlexAttention", (math.nan, math.nan))
        for name, (ms_f, ms_fb) in times.items():
            rows.append({
                "N": n, "document": args.document, "provider": name, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
                "fwd_tflops": tflops(flops, ms_f), "fwd_bwd_tflops": tflops(3.5 * flops, ms_fb),
                "fwd_ratio": ms_f / base[0], "fwd_bwd_ratio": ms_fb / base[1],
            })
    return rows


def print_table(rows):
    print("\n| N | document | provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd ratio | "
          "fwd+bwd ratio |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['document']} | {r['provider']} | {fmt(r['fwd_ms'], 3)} | "
              f"{fmt(r['fwd_tflops'], 1)} | {fmt(r['fwd_bwd_ms'], 3)} | {fmt(r['fwd_bwd_tflops'], 1)} | "
              f"{fmt(r['fwd_ratio'])} | {fmt(r['fwd_bwd_ratio'])} |")
    if rows:
        print("\nratios: each provider's median time over FlexAttention's, measured side by side")


def main() -> int:
    args = parse_args()
    torch, sdpa, code = gpu_or_reason("gpu_masks.py", "longattn GPU masked-attention benchmark")
    if torch is None:
        return code
    ok = True if args.skip_check else check_correctness(torch, sdpa)
    rows = benchmark(torch, sdpa, args)
    print_table(rows)
    write_csv(args.csv, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
