"""CPU attention: longattn's backend="torch" against torch SDPA, the reference and the `entmax`
package on materialised logits. Prints a markdown table and writes a CSV.

    python benchmarks/cpu_attention.py                      # N in {1k, 4k, 16k}, B=1, H=8, D=64
    python benchmarks/cpu_attention.py --lengths 1024 --repeats 3

Times are medians of `--repeats` wall-clock runs after one warm-up (none from N = 16384 on),
measured side by side in one process; ratios are against SDPA softmax measured in the same run.
Peak memory is the growth of the peak resident set of a fresh process that runs the case once
(`--memory`).
Inputs are standard normal, so logits `q.k / sqrt(D)` are about N(0, 1). Benchmarks never
assert timings.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import longattn
from longattn.attention import normalizers

# name -> (normalizer, alpha)
NORMALIZERS = {
    "softmax": ("softmax", 1.5),
    "ssmax": ("ssmax", 1.5),
    "sparsemax": ("sparsemax", 2.0),
    "entmax1.5": ("entmax", 1.5),
    "entmax1.3": ("entmax", 1.3),
    # one alpha per head, as a learned alpha is: evenly from 1.2 to 1.8, its gradient computed
    "entmax-heads": ("entmax", "heads"),
}
# The reference and the entmax package build the (B, H, N, N) scores: only where they fit.
MATERIALISING_MAX_N = 4096


def is_plain_softmax(name):
    """Whether the label `name` is softmax without a length scale, the one setting SDPA computes."""
    record, _, length_scale = normalizers.canonical(*NORMALIZERS[name], None)
    return record is normalizers.SOFTMAX and length_scale is None


# the label of plain softmax: SDPA's setting, timed first, the baseline of the ratios
SOFTMAX_LABEL = next(name for name in NORMALIZERS if is_plain_softmax(name))


def alpha_of(alpha, q):
    """The alpha of a setting: its float, or for "heads" one per query head (requiring grad)."""
    if alpha != "heads":
        return alpha
    return torch.linspace(1.2, 1.8, q.shape[1]).requires_grad_(q.requires_grad)


def sdpa(q, k, v, name):
    return F.scaled_dot_product_attention(q, k, v)


def longattn_torch(q, k, v, name):
    normalizer, alpha = NORMALIZERS[name]
    return longattn.scaled_dot_product_attention(q, k, v, normalizer=normalizer, alpha=alpha_of(alpha, q),
                                                 backend="torch")


def longattn_reference(q, k, v, name):
    normalizer, alpha = NORMALIZERS[name]
    return longattn.scaled_dot_product_attention(
        q, k, v, normalizer=normalizer, alpha=alpha_of(alpha, q), backend="reference"
    )


def entmax_package(q, k, v, name):
    import entmax

    z = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    _, alpha, _ = normalizers.canonical(*NORMALIZERS[name], None)  # entmax, at this alpha
    if alpha == "heads":
        heads = alpha_of(alpha, q).view(1, -1, 1, 1).expand(*z.shape[:-1], 1)
        p = entmax.entmax_bisect(z, alpha=heads, dim=-1)
    elif alpha == 2.0:
        p = entmax.sparsemax(z, dim=-1)
    elif alpha == 1.5:
        p = entmax.entmax15(z, dim=-1)
    else:
        p = entmax.entmax_bisect(z, alpha=alpha, dim=-1)
    return p @ v


PROVIDERS = {
    "sdpa": (sdpa, [SOFTMAX_LABEL]),
    "longattn": (longattn_torch, list(NORMALIZERS)),
    "reference": (longattn_reference, list(NORMALIZERS)),
    "entmax-pkg": (entmax_package, ["sparsemax", "entmax1.5", "entmax1.3", "entmax-heads"]),
}


def make_inputs(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3)]


def run_once(fn, inputs, name, backward):
    if backward:
        out = fn(*inputs, name)
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None
    else:
        with torch.no_grad():
            fn(*inputs, name)


def median_time(fn, inputs, name, backward, repeats):
    if inputs[0].shape[2] < 16384:  # warm-up (allocator, BLAS kernels); long runs amortise it
        run_once(fn, inputs, name, backward)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once(fn, inputs, name, backward)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(provider, name, b, h, n, d, backward):
    """Growth of the peak RSS of a fresh process that runs the case once."""
    cmd = [sys.executable, __file__, "--one", provider, name,
           str(b), str(h), str(n), str(d), str(int(backward))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_mib(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _one(provider, name, b, h, n, d, backward):
    inputs = make_inputs(b, h, n, d)
    before = _memory_mib("VmRSS")
    run_once(PROVIDERS[provider][0], inputs, name, backward)
    print(_memory_mib("VmHWM") - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--materialised-repeats", type=int, default=1,
                        help="repeats for the reference and the entmax package, which are slow")
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS), choices=list(NORMALIZERS))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS),
                        help="what to time (SDPA, the baseline of the ratios, always runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    parser.add_argument("--long", type=int, default=32768, help="length of the memory run at H=2 (0: skip)")
    parser.add_argument("--csv", default="benchmarks/results/cpu_attention.csv")
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        provider, name, *sizes = args.one
        b, h, n, d, backward = map(int, sizes)
        _one(provider, name, b, h, n, d, bool(backward))
        return

    torch.manual_seed(0)
    b, h, d = args.batch, args.heads, args.head_dim
    rows = []
    print(f"# CPU attention, B={b} H={h} D={d} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    header = ("| N | normalizer | provider | fwd s | fwd / SDPA | fwd+bwd s | fwd+bwd / SDPA "
              "| peak MiB fwd+bwd |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for n in args.lengths:
        inputs = make_inputs(b, h, n, d)
        base = {bw: median_time(sdpa, inputs, SOFTMAX_LABEL, bw, args.repeats) for bw in (False, True)}
        for name in [SOFTMAX_LABEL] + [x for x in args.normalizers if not is_plain_softmax(x)]:
            for provider, (fn, names) in PROVIDERS.items():
                if provider not in args.providers:
                    continue
                if name not in names or (provider == "sdpa" and not is_plain_softmax(name)):
                    continue
                if provider in ("reference", "entmax-pkg") and n > MATERIALISING_MAX_N:
                    continue
                materialising = provider in ("reference", "entmax-pkg")
                repeats = args.materialised_repeats if materialising else args.repeats
                fwd = base[False] if provider == "sdpa" else median_time(fn, inputs, name, False, repeats)
                both = base[True] if provider == "sdpa" else median_time(fn, inputs, name, True, repeats)
                mem = float("nan") if args.no_memory else peak_memory_mib(provider, name, b, h, n, d, True)
                row = dict(n=n, normalizer=name, provider=provider, fwd_s=fwd, fwd_ratio=fwd / base[False],
                           fwdbwd_s=both, fwdbwd_ratio=both / base[True], peak_mib=mem)
                rows.append(row)
                print(f"| {n} | {name} | {provider} | {fwd:.3f} | {fwd / base[False]:.2f} | {both:.3f} | "
                      f"{both / base[True]:.2f} | {mem:.0f} |", flush=True)

    if args.long and not args.no_memory:
        n, h_long = args.long, 2
        print(f"\n# Peak memory growth, forward+backward, N={n} H={h_long} D={d} fp32 "
              f"(the float32 score matrix alone: {b * h_long * n * n * 4 / 2**30:.0f} GiB)\n")
        print("| normalizer | peak MiB |\n|---|---|")
        for name in args.normalizers:
            mem = peak_memory_mib("longattn", name, b, h_long, n, d, True)
            rows.append(dict(n=n, normalizer=name, provider="longattn-long", peak_mib=mem))
            print(f"| {name} | {mem:.0f} |", flush=True)

    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["n", "normalizer", "provider", "fwd_s", "fwd_ratio",
                                               "fwdbwd_s", "fwdbwd_ratio", "peak_mib"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
