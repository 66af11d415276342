"""GPU sparsemax / entmax attention: longattn's Triton kernels against AdaSplash (when installed),
torch SDPA's flash backend (softmax) and longattn's own softmax kernel. First checks bf16
correctness, then times; prints markdown tables and writes a CSV.

    python benchmarks/gpu_entmax.py                  # N in {1k ... 32k}, D in {64, 128}, alpha 1.5 and 2
    python benchmarks/gpu_entmax.py --lengths 8192 16384 --head-dims 128 --alphas 1.5
    pip install adasplash                            # adds the AdaSplash column

longattn runs through the public API, `longattn.scaled_dot_product_attention(...,
normalizer="entmax", alpha=..., backend="triton")`. Times are medians of `triton.testing.do_bench`,
every configuration measured once, the providers side by side in one process. Layout (B, H, N, D),
bf16, H = 16, B = 16384 // N (about 16k tokens per batch), causal unless `--non-causal`.

Inputs. Random normal q and k give rows whose supports are scattered over every key tile, so no
tile can be skipped: the worst case for a sparse kernel, and not what trained attention looks
like. The timed inputs have the structure of real attention maps instead (`structured_qk`): the
sequence is cut into segments of 256 tokens, each with its own random direction; a key carries
its segment's direction, a query its own segment's and that of one earlier segment (the one it
"retrieves"), on top of standard normal noise, scaled so that a matching logit `q.k / sqrt(D)`
is about 4 against noise of about N(0, 1). The script measures and prints the sparsity this
gives (the mean support per row and the share of (64-query, 32-key) tiles with a non-zero
weight, from exact thresholds on sampled query blocks), and times the random case at one size
for comparison.

AdaSplash (Goncalves et al. 2025) is timed through `adasplash.adasplash(q, k, v, alpha=...,
is_causal=...)`, its public dispatcher, on the cases it supports (power-of-two lengths, equal
query and key heads, scale 1/sqrt(D)). On a CPU-only machine the script says so and exits 0.
Benchmarks never assert timings; a failed correctness check is printed and sets exit code 1.
"""

from __future__ import annotations

import argparse
import math
import sys

from gpu_softmax import (
    fmt,
    fwd_flops,
    gpu_or_reason,
    rel_err,
    run_with_grads,
    tflops,
    time_provider,
    write_csv,
)

DEVICE, DTYPE = "cuda", None  # DTYPE: torch.bfloat16, set in main() (torch is imported there)
TOKENS = 16384
HEADS = 16
SEGMENT = 256  # tokens per segment of the structured inputs
MATCH_LOGIT = 4.0  # q.k / sqrt(D) of a query and a key that share a segment direction

# (B, Hq, Hkv, N, D, causal, alpha, length_scale): odd lengths, GQA, every alpha kind, scaling
CHECKS = [
    (2, 8, 8, 1000, 64, False, 1.5, None),
    (2, 8, 2, 777, 128, True, 2.0, None),
    (1, 8, 4, 1030, 128, True, 1.25, None),
    (2, 4, 4, 1024, 64, True, 1.5, "per_head"),
    (1, 8, 8, 2048, 128, False, 2.0, "per_head"),
]
ATOL = 2e-3  # bf16: at most twice the error of longattn's bf16 torch path, plus this


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--alphas", type=float, nargs="+", default=[1.5, 2.0])
    p.add_argument("--non-causal", action="store_true", help="time without the causal mask")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--csv", default="benchmarks/results/gpu_entmax.csv")
    p.add_argument("--skip-check", action="store_true", help="time without the correctness check")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Inputs and their sparsity
# ----------------------------------------------------------------------------------------------


def structured_qk(torch, B, H, N, D, seed=0, device="cpu", dtype=None):
    """(q, k) with segment structure (see the module docstring); float32 unless `dtype`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_seg = math.ceil(N / SEGMENT)
    directions = torch.nn.functional.normalize(torch.randn(B, H, n_seg, D, generator=g), dim=-1)
    seg = torch.arange(N) // SEGMENT
    # each segment retrieves one earlier segment (segment 0 itself)
    target = (torch.rand(n_seg, generator=g) * torch.arange(n_seg)).long()
    c = (MATCH_LOGIT * D ** 0.5) ** 0.5  # c^2 t.t / sqrt(D) = MATCH_LOGIT
    k = torch.randn(B, H, N, D, generator=g) + c * directions[:, :, seg]
    q = torch.randn(B, H, N, D, generator=g) + c * (directions[:, :, seg] + directions[:, :, target[seg]])
    return (t.to(device=device, dtype=dtype or torch.float32) for t in (q, k))


def measured_sparsity(torch, q, k, alpha, causal, blocks=8, block_m=64, block_n=32):
    """`(mean support per row, share of visited tiles)` of head (0, 0), from exact thresholds on
    `blocks` query blocks spread over the sequence: a tile is visited when any of its weights is
    non-zero (the output pass skips the others)."""
    from longattn.attention.reference import entmax_threshold

    N, D = q.shape[2], q.shape[3]
    starts = sorted({min(N - 1, i * N // blocks) // block_m * block_m for i in range(blocks)})
    supports, visited, tiles = [], 0, 0
    for r0 in starts:
        rows = torch.arange(r0, min(N, r0 + block_m), device=q.device)
        x = (alpha - 1) * (q[0, 0, rows].double() @ k[0, 0].double().T) * D ** -0.5
        if causal:
            x = x.masked_fill(torch.arange(N, device=q.device)[None, :] > rows[:, None], -math.inf)
        x = x - x.amax(-1, keepdim=True)
        nonzero = x > entmax_threshold(x, alpha)
        supports.append(nonzero.sum(-1).double())
        key_end = int(rows[-1]) + 1 if causal else N
        per_tile = nonzero[:, :key_end].any(0)
        n_tiles = math.ceil(key_end / block_n)
        padded = torch.nn.functional.pad(per_tile, (0, n_tiles * block_n - key_end))
        visited += int(padded.view(n_tiles, block_n).any(-1).sum())
        tiles += n_tiles
    return torch.cat(supports).mean().item(), visited / tiles


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


def check_correctness(torch, sdpa):
    """bf16 triton vs float64 reference, held to twice the error of longattn's bf16 torch path
    plus ATOL. Returns whether all passed."""
    print("## bf16 correctness (relative error vs float64 reference)\n")
    print("| case | tensor | triton | torch bf16 | limit | |\n|---|---|---|---|---|---|")
    all_ok = True
    for B, Hq, Hkv, N, D, causal, alpha, ls in CHECKS:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, N, D, device=DEVICE)
        k, v = (torch.randn(B, Hkv, N, D, device=DEVICE) for _ in range(2))
        dout = torch.randn(B, Hq, N, D, device=DEVICE)
        s = None if ls is None else torch.rand(Hq, device=DEVICE) + 0.2
        name = (f"B{B}-Hq{Hq}-Hkv{Hkv}-N{N}-D{D}{'-causal' if causal else ''}"
                f"-a{alpha}{'-scaled' if ls else ''}")
        normalizer = {"normalizer": "entmax", "alpha": alpha}
        qb, kb, vb = (t.to(DTYPE) for t in (q, k, v))  # the bf16 inputs, seen exactly by every path
        ref = run_with_grads(sdpa, qb.double(), kb.double(), vb.double(), None if s is None else s.double(),
                             dout.to(DTYPE).double(), causal, "reference", **normalizer)
        try:
            tri = run_with_grads(sdpa, qb, kb, vb, s, dout, causal, "triton", **normalizer)
        except Exception as e:  # a crash is a failure, reported with the case
            print(f"| {name} | all | {type(e).__name__}: {e} | | | FAIL |")
            all_ok = False
            continue
        base = run_with_grads(sdpa, qb, kb, vb, s, dout, causal, "torch", **normalizer)
        for label, t, b, r in zip(["out", "dq", "dk", "dv", "ds"], tri, base, ref):
            e_t, e_b = rel_err(t, r), rel_err(b, r)
            ok = math.isfinite(e_t) and e_t <= 2 * e_b + ATOL
            all_ok &= ok
            verdict = "pass" if ok else "FAIL"
            print(f"| {name} | {label} | {e_t:.2e} | {e_b:.2e} | {2 * e_b + ATOL:.2e} | {verdict} |")
        del ref, tri, base
        torch.cuda.empty_cache()
    print(f"\ncorrectness: {'PASS' if all_ok else 'FAIL'}\n")
    return all_ok


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def providers(torch, sdpa, alpha):
    """name -> make(q, k, v, causal, s) giving `(fn, leaves)`, as in gpu_softmax.py."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def longattn_entmax(q, k, v, causal, s=None):
        def fn():
            return sdpa(q, k, v, is_causal=causal, normalizer="entmax", alpha=alpha, backend="triton")
        return fn, [q, k, v]

    def longattn_softmax(q, k, v, causal, s=None):
        return (lambda: sdpa(q, k, v, is_causal=causal, backend="triton")), [q, k, v]

    def sdpa_flash(q, k, v, causal, s=None):
        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises rather than fall back
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn, [q, k, v]

    found = {"longattn_entmax": longattn_entmax}
    try:
        import adasplash
    except ImportError:
        print("AdaSplash is not installed (pip install adasplash): its column stays empty\n")
    else:
        def adasplash_entmax(q, k, v, causal, s=None):
            return (lambda: adasplash.adasplash(q, k, v, alpha=alpha, is_causal=causal)), [q, k, v]
        found["adasplash"] = adasplash_entmax
    found.update(longattn_softmax=longattn_softmax, sdpa_flash=sdpa_flash)
    return found


def benchmark(torch, sdpa, args):
    from triton.testing import do_bench

    causal = not args.non_causal
    rows, softmax_done = [], {}
    for alpha in args.alphas:
        makers = providers(torch, sdpa, alpha)
        for D in args.head_dims:
            for N in args.lengths:
                B = max(1, TOKENS // N)
                for inputs in ("structured", "random") if (N, D) == (4096, 128) else ("structured",):
                    if inputs == "structured":
                        q, k = structured_qk(torch, B, HEADS, N, D, seed=0, device=DEVICE, dtype=DTYPE)
                    else:
                        q, k = (torch.randn(B, HEADS, N, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
                    v = torch.randn(B, HEADS, N, D, device=DEVICE, dtype=DTYPE)
                    q, k, v = (t.requires_grad_() for t in (q, k, v))
                    support, visited = measured_sparsity(torch, q.detach(), k.detach(), alpha, causal)
                    flops = fwd_flops(B, HEADS, N, D, causal)
                    for name, make in makers.items():
                        key = (name, N, D, inputs)
                        if name in ("longattn_softmax", "sdpa_flash") and key in softmax_done:
                            ms_f, ms_fb = softmax_done[key]  # no alpha: measured once per shape
                        else:
                            ms_f, ms_fb = time_provider(torch, do_bench, make, q, k, v, causal, None, args)
                            softmax_done[key] = (ms_f, ms_fb)
                        rows.append({"provider": name, "alpha": alpha, "inputs": inputs, "B": B, "H": HEADS,
                                     "N": N, "D": D, "causal": causal, "mean_support": support,
                                     "visited_tiles": visited, "fwd_ms": ms_f,
                                     "fwd_tflops": tflops(flops, ms_f), "fwdbwd_ms": ms_fb,
                                     "fwdbwd_tflops": tflops(3.5 * flops, ms_fb)})
                    print(f"timed alpha={alpha} N={N} D={D} {inputs}", file=sys.stderr)
                    del q, k, v
                    torch.cuda.empty_cache()
    return rows


def print_tables(rows):
    names = [n for n in ("longattn_entmax", "adasplash", "longattn_softmax", "sdpa_flash")
             if any(r["provider"] == n for r in rows)]
    by = {(r["provider"], r["alpha"], r["N"], r["D"], r["inputs"]): r for r in rows}
    configs = sorted({(r["alpha"], r["D"], r["N"], r["inputs"]) for r in rows})
    for mode, label in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        print(f"\n## {label}: ms, bf16, H={HEADS}, B*N={TOKENS}, causal={rows[0]['causal']}\n")
        print(f"| alpha | D | N | inputs | support / row | visited tiles | {' | '.join(names)} | "
              "entmax / adasplash | entmax / sdpa_flash |")
        print("|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
        for alpha, D, N, inputs in configs:
            times = {n: by[(n, alpha, N, D, inputs)][f"{mode}_ms"] for n in names}
            first = by[(names[0], alpha, N, D, inputs)]
            mine = times["longattn_entmax"]
            vs_ada = mine / times["adasplash"] if "adasplash" in times else math.nan
            vs_flash = mine / times["sdpa_flash"]
            cells = " | ".join(fmt(times[n], 3) for n in names)
            print(f"| {alpha} | {D} | {N} | {inputs} | {first['mean_support']:.0f} | "
                  f"{100 * first['visited_tiles']:.1f}% | {cells} | {fmt(vs_ada)} | {fmt(vs_flash)} |")


def main() -> int:
    args = parse_args()
    torch, sdpa, code = gpu_or_reason("gpu_entmax.py", "longattn GPU sparsemax / entmax benchmark")
    if torch is None:
        return code
    global DTYPE
    DTYPE = torch.bfloat16
    ok = True if args.skip_check else check_correctness(torch, sdpa)
    rows = benchmark(torch, sdpa, args)
    print_tables(rows)
    write_csv(args.csv, rows)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
