"""GPU softmax attention: longattn's Triton kernels against torch SDPA's flash backend and, when
installed, flash-attn. First checks bf16 correctness, then times; prints markdown tables and
writes a CSV.

    python benchmarks/gpu_softmax.py                 # N in {1k, 2k, 4k, 8k, 16k}, D in {64, 128}
    python benchmarks/gpu_softmax.py --lengths 4096 --head-dims 128

longattn runs through the public API, `longattn.scaled_dot_product_attention(..., backend="triton")`.
Times are medians of `triton.testing.do_bench` (`--warmup` / `--rep` milliseconds each), every
configuration measured once, the providers side by side in one process; ratios are longattn's
time over SDPA flash's. FLOPs: forward `4 B H N^2 D` (halved when causal), backward 2.5x that,
so forward+backward counts 3.5x the forward. Inputs are bf16 standard normal, layout
(B, H, N, D) (flash-attn gets (B, N, H, D) copies), H = 16 heads, B = 16384 // N sequences
(about 16k tokens per batch). On a CPU-only machine the script says so and exits 0.
Benchmarks never assert timings; a failed correctness check is printed and sets exit code 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

DEVICE, DTYPE = "cuda", None  # DTYPE: torch.bfloat16, set in main() (torch is imported there)
TOKENS = 16384
HEADS = 16
SSMAX_S = 0.43  # a typical learned SSMax scale

# (B, Hq, Hkv, N, D, causal, length_scale): odd lengths, GQA, SSMax as a float and per head
CHECKS = [
    (2, 8, 8, 1000, 64, False, None),
    (2, 8, 8, 1024, 128, True, None),
    (2, 8, 2, 777, 128, True, None),
    (1, 8, 4, 2048, 64, False, None),
    (2, 4, 4, 1000, 64, True, "float"),
    (1, 8, 2, 1030, 128, True, "per_head"),
    (1, 8, 8, 2048, 128, False, "per_head"),
]
# bf16 kernels may err at most twice what torch's own bf16 path errs against float64, plus this
ATOL = 2e-3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--csv", default="benchmarks/results/gpu_softmax.csv")
    p.add_argument("--skip-check", action="store_true", help="time without the correctness check")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_with_grads(sdpa, q, k, v, s, dout, causal, backend, **normalizer):
    """Output and the gradients of q, k, v (and s) under `backend`, on leaf copies of the inputs;
    `normalizer` holds extra keywords (normalizer=, alpha=)."""
    import torch

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s_leaf = s.detach().clone().requires_grad_() if torch.is_tensor(s) else s
    out = sdpa(*leaves, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1], length_scale=s_leaf,
               backend=backend, **normalizer)
    wrt = leaves + ([s_leaf] if torch.is_tensor(s_leaf) else [])
    grads = torch.autograd.grad(out, wrt, dout.to(out.dtype))
    return [out.detach(), *grads]


def check_correctness(torch, sdpa):
    """bf16 triton vs float64 reference, held to twice the error of longattn's bf16 torch path
    (torch's fused SDPA, SSMax's factor folded into the query) plus ATOL. Returns all passed."""
    print("## bf16 correctness (relative error vs float64 reference)\n")
    print("| case | tensor | triton | torch bf16 | limit | |\n|---|---|---|---|---|---|")
    all_ok = True
    for B, Hq, Hkv, N, D, causal, ls in CHECKS:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, N, D, device=DEVICE)
        k, v = (torch.randn(B, Hkv, N, D, device=DEVICE) for _ in range(2))
        dout = torch.randn(B, Hq, N, D, device=DEVICE)
        s = {None: None, "float": SSMAX_S, "per_head": torch.rand(Hq, device=DEVICE) + 0.2}[ls]
        name = f"B{B}-Hq{Hq}-Hkv{Hkv}-N{N}-D{D}{'-causal' if causal else ''}{'-ssmax_' + ls if ls else ''}"
        # the bf16 inputs, seen exactly by every path
        qb, kb, vb = (t.to(DTYPE) for t in (q, k, v))
        ref = run_with_grads(sdpa, qb.double(), kb.double(), vb.double(),
                             s.double() if torch.is_tensor(s) else s, dout.to(DTYPE).double(), causal,
                             "reference")
        try:
            tri = run_with_grads(sdpa, qb, kb, vb, s, dout, causal, "triton")
        except Exception as e:  # a crash is a failure, reported with the case
            print(f"| {name} | all | {type(e).__name__}: {e} | | | FAIL |")
            all_ok = False
            continue
        base = run_with_grads(sdpa, qb, kb, vb, s, dout, causal, "torch")
        labels = ["out", "dq", "dk", "dv", "ds"][:len(ref)]
        for label, t, b, r in zip(labels, tri, base, ref):
            e_t, e_b = rel_err(t, r), rel_err(b, r)
            ok = math.isfinite(e_t) and e_t <= 2 * e_b + ATOL
            all_ok &= ok
            verdict = "pass" if ok else "FAIL"
            print(f"| {name} | {label} | {e_t:.2e} | {e_b:.2e} | {2 * e_b + ATOL:.2e} | {verdict} |")
        del ref, tri, base
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\ncorrectness: {'PASS' if all_ok else 'FAIL'}\n")
    return all_ok


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def longattn_triton(sdpa):
    def make(q, k, v, causal, s=None):
        leaves = [t for t in (q, k, v, s) if t is not None]
        return (lambda: sdpa(q, k, v, is_causal=causal, length_scale=s, backend="triton")), leaves
    make.__name__ = "longattn"
    return make


def providers(torch, sdpa):
    """name -> make(q, k, v, causal, length_scale) giving `(fn, leaves)`: fn runs the forward on
    the leaves and returns the output, in (B, H, N, D) or (B, N, H, D)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q, k, v, causal, s=None):
        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises rather than fall back
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn, [q, k, v]

    found = {"longattn": longattn_triton(sdpa), "sdpa_flash": sdpa_flash}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        print("flash-attn is not installed (pip install -e '.[flash]'): its column stays empty\n")
        return found

    def flash_attn(q, k, v, causal, s=None):
        # flash-attn's layout is (B, N, H, D); the copies are made here, outside the timed call
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        return (lambda: flash_attn_func(qt, kt, vt, causal=causal)), [qt, kt, vt]

    found["flash_attn"] = flash_attn
    return found


def time_provider(torch, do_bench, make, q, k, v, causal, s, args):
    """(forward ms, forward+backward ms), medians; NaN with the reason printed if it fails."""
    try:
        fn, leaves = make(q, k, v, causal, s)
        out = fn()
        dout = torch.randn_like(out)

        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            fn().backward(dout)

        ms_f = do_bench(fwd, warmup=args.warmup, rep=args.rep, return_mode="median")
        ms_fb = do_bench(fwd_bwd, warmup=args.warmup, rep=args.rep, grad_to_none=leaves, return_mode="median")
        for t in leaves:
            t.grad = None
        return ms_f, ms_fb
    except Exception as e:  # e.g. a backend that does not support a shape: recorded, not fatal
        first_line = str(e).splitlines()[0] if str(e) else ""
        print(f"  {getattr(make, '__name__', make)}: {type(e).__name__}: {first_line}")
        return math.nan, math.nan


def fwd_flops(B, H, N, D, causal):
    return 4 * B * H * N * N * D / (2 if causal else 1)


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms == ms else math.nan


def fmt(x, digits=2):
    return "-" if x != x else f"{x:.{digits}f}"


def benchmark(torch, sdpa, args):
    from triton.testing import do_bench

    makers = providers(torch, sdpa)
    rows = []
    for D in args.head_dims:
        for N in args.lengths:
            for causal in (False, True):
                B = max(1, TOKENS // N)
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, HEADS, N, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
                           for _ in range(3))
                flops = fwd_flops(B, HEADS, N, D, causal)
                for name, make in makers.items():
                    ms_f, ms_fb = time_provider(torch, do_bench, make, q, k, v, causal, None, args)
                    rows.append({"provider": name, "B": B, "H": HEADS, "N": N, "D": D, "causal": causal,
                                 "length_scale": False, "fwd_ms": ms_f, "fwd_tflops": tflops(flops, ms_f),
                                 "fwdbwd_ms": ms_fb, "fwdbwd_tflops": tflops(3.5 * flops, ms_fb)})
                print(f"timed N={N} D={D} causal={causal}", file=sys.stderr)
                del q, k, v
                torch.cuda.empty_cache()
    return rows


def ssmax_cost(torch, sdpa, args, N=4096, D=128, causal=True):
    """longattn with a (H,) length_scale tensor (SSMax, gradient included) against plain softmax."""
    from triton.testing import do_bench

    B = max(1, TOKENS // N)
    q, k, v = (torch.randn(B, HEADS, N, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    s = torch.full((HEADS,), SSMAX_S, device=DEVICE, requires_grad=True)

    flops = fwd_flops(B, HEADS, N, D, causal)
    rows = []
    for label, scale in (("softmax", None), ("ssmax", s)):
        ms_f, ms_fb = time_provider(torch, do_bench, longattn_triton(sdpa), q, k, v, causal, scale, args)
        rows.append({"provider": f"longattn_{label}", "B": B, "H": HEADS, "N": N, "D": D, "causal": causal,
                     "length_scale": scale is not None, "fwd_ms": ms_f, "fwd_tflops": tflops(flops, ms_f),
                     "fwdbwd_ms": ms_fb, "fwdbwd_tflops": tflops(3.5 * flops, ms_fb)})
    return rows


def print_tables(rows, ssmax_rows):
    by = {(r["provider"], r["N"], r["D"], r["causal"]): r for r in rows}
    names = [n for n in ("longattn", "sdpa_flash", "flash_attn") if any(r["provider"] == n for r in rows)]
    for mode, label in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        print(f"\n## {label}: ms (TFLOP/s), bf16, H={HEADS}, B*N={TOKENS}\n")
        head = " | ".join(names)
        print(f"| N | B | D | causal | {head} | longattn / sdpa_flash |")
        print("|---|---|---|---|" + "---|" * len(names) + "---|")
        for key in sorted({(r["N"], r["D"], r["causal"]) for r in rows}, key=lambda t: (t[1], t[2], t[0])):
            N, D, causal = key
            cells, times = [], {}
            for n in names:
                r = by[(n, N, D, causal)]
                times[n] = r[f"{mode}_ms"]
                cells.append(f"{fmt(r[f'{mode}_ms'], 3)} ({fmt(r[f'{mode}_tflops'], 0)})")
            ratio = times["longattn"] / times["sdpa_flash"] if "sdpa_flash" in times else math.nan
            B = by[("longattn", N, D, causal)]["B"]
            print(f"| {N} | {B} | {D} | {causal} | {' | '.join(cells)} | {fmt(ratio)} |")
    if len(ssmax_rows) == 2:
        plain, scaled = ssmax_rows
        print(f"\n## SSMax cost (length_scale tensor of shape (H,), its gradient included): "
              f"N={plain['N']}, D={plain['D']}, B={plain['B']}, causal={plain['causal']}\n")
        print("| | softmax ms | ssmax ms | ssmax / softmax |\n|---|---|---|---|")
        for mode, label in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
            a, b = plain[f"{mode}_ms"], scaled[f"{mode}_ms"]
            print(f"| {label} | {fmt(a, 3)} | {fmt(b, 3)} | {fmt(b / a if a == a else math.nan)} |")


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")


def gpu_or_reason(script: str, title: str):
    """`(torch, sdpa, None)` on a CUDA machine with compiled kernels, after printing the run's
    header; otherwise `(None, None, exit code)` with the reason printed."""
    import torch

    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device here (torch.cuda.is_available() is False); this benchmark "
              "needs an NVIDIA GPU. Nothing was run.")
        return None, None, 0
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print(f"{script}: TRITON_INTERPRET is set, so the kernels would run in the interpreter; "
              "unset it to benchmark the compiled kernels.")
        return None, None, 1
    import triton

    import longattn

    print(f"# {title}\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, longattn {longattn.__version__}\n")
    return torch, longattn.scaled_dot_product_attention, None


def main() -> int:
    args = parse_args()
    torch, sdpa, code = gpu_or_reason("gpu_softmax.py", "longattn GPU softmax benchmark")
    if torch is None:
        return code
    global DTYPE
    DTYPE = torch.bfloat16
    ok = True if args.skip_check else check_correctness(torch, sdpa)
    rows = benchmark(torch, sdpa, args)
    ssmax_rows = ssmax_cost(torch, sdpa, args)
    print_tables(rows, ssmax_rows)
    write_csv(args.csv, rows + ssmax_rows)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
