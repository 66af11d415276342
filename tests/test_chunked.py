"""backend="torch": many small blocks, long rows, the threshold search and its memory bound."""

import subprocess
import sys
import textwrap

import pytest
import torch

import longattn
from longattn.attention import chunked, reference

from oracles import make_mask, rel_err

SPARSE = [
    pytest.param("sparsemax", 2.0, id="sparsemax"),
    pytest.param("entmax", 1.5, id="entmax1.5"),
    pytest.param("entmax", 1.3, id="entmax1.3"),
]

# (B, Hq, Hkv, Nq, Nk, mask shape or None, is_causal or a causal offset, length-scaled)
BLOCKED = [
    pytest.param((2, 4, 2, 23, 17, (1, 4, 23, 17), False, True), id="GQA-head-mask-scaled"),
    pytest.param((2, 6, 3, 19, 19, None, True, False), id="GQA-causal"),
    pytest.param((3, 2, 1, 9, 31, (3, 1, 1, 31), True, True), id="MQA-batch-key-mask-causal-scaled"),
    pytest.param((1, 3, 3, 41, 7, (41, 7), False, False), id="2d-mask-Nq>Nk"),
    pytest.param((2, 2, 1, 9, 31, (2, 1, 1, 31), 22, True), id="bottom-right-key-mask-scaled"),
    pytest.param((1, 4, 2, 23, 11, None, -5, True), id="offset-5-empty-rows-scaled"),
]


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few rows and one head, so every loop in the path runs many times (softmax
    runs by row blocks too when it has both a mask and the causal flag)."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 48)
    monkeypatch.setattr(chunked, "MIN_BLOCK_ROWS", 2)
    monkeypatch.setattr(chunked, "COMPACT_FRACTION", 1.0)  # entmax 1.3 steps on packed candidates


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha", SPARSE + [
    pytest.param("softmax", 1.5, id="softmax"),
    pytest.param("ssmax", 1.5, id="ssmax"),
])
@pytest.mark.parametrize("case", BLOCKED)
@pytest.mark.parametrize("mask_kind", ["bool", "neginf"])
def test_many_blocks_match_reference(tiny_blocks, normalizer, alpha, case, mask_kind):
    B, Hq, Hkv, Nq, Nk, mask_shape, causal, scaled = case
    q = (2 * torch.randn(B, Hq, Nq, 8, dtype=torch.float64)).requires_grad_()
    k = torch.randn(B, Hkv, Nk, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, 5, dtype=torch.float64, requires_grad=True)
    s = (0.3 + torch.rand(Hq, dtype=torch.float64)).requires_grad_() if scaled else None
    mask = make_mask(mask_kind, mask_shape) if mask_shape else None
    causal_offset = None if isinstance(causal, bool) else causal  # an int: a shifted causal mask
    kwargs = dict(attn_mask=mask, is_causal=causal is True, causal_offset=causal_offset, enable_gqa=True,
                  normalizer=normalizer, alpha=alpha, length_scale=s)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="torch")
    ref = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="reference")
    inputs = [q, k, v] + ([s] if scaled else [])
    do = torch.randn_like(ref)
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(torch.autograd.grad(out, inputs, do), torch.autograd.grad(ref, inputs, do)):
        assert rel_err(a, b) < 1e-11


@pytest.mark.parametrize("normalizer,alpha", SPARSE + [pytest.param("ssmax", 1.5, id="ssmax")])
def test_rows_of_8192_keys(normalizer, alpha):
    """Rows that see 8192, 8191, 4000 and 1 keys, against the reference, with gradients."""
    Nk = 8192
    q = torch.randn(1, 2, 4, 16, requires_grad=True)
    k = torch.randn(1, 2, Nk, 16, requires_grad=True)
    v = torch.randn(1, 2, Nk, 16, requires_grad=True)
    s = torch.tensor([0.3, 0.6], requires_grad=True)
    bias = torch.zeros(4, Nk)
    bias[1, 0] = float("-inf")
    bias[2, 4000:] = float("-inf")
    bias[3, 1:] = float("-inf")
    kwargs = dict(attn_mask=bias, normalizer=normalizer, alpha=alpha, length_scale=s)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="torch")
    ref = longattn.scaled_dot_product_attention(
        *(t.double() for t in (q, k, v)), **kwargs, backend="reference"
    )
    do = torch.randn_like(ref)
    assert rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad(out, (q, k, v, s), do.float())
    ref_grads = torch.autograd.grad(ref, (q, k, v, s), do)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("compact", [0.0, 1.0], ids=["full-rows", "candidates"])
@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("gain", [0.1, 1.0, 10.0])
def test_threshold_search_is_exact_and_quick(alpha, gain, compact, monkeypatch):
    """Newton from the left needs a handful of passes and lands on the reference threshold.

    Passes measured here (float32, 256 rows of 4096, gains 0.1 / 0.3 / 1 / 3 / 10): alpha 1.1:
    3-4; 1.3: 4-5; 1.5: 4-7; 1.75: 4-9; 2: 4-11 (flat rows, where many keys leave the support
    one Michelot step at a time, are the slow case)."""
    monkeypatch.setattr(chunked, "COMPACT_FRACTION", compact)  # other alpha: both ways of stepping
    z = gain * torch.randn(64, 4096, dtype=torch.float64)
    x = (alpha - 1) * (z - z.amax(-1, keepdim=True))
    empty = torch.zeros(64, 1, dtype=torch.bool)
    tau, steps = chunked.entmax_threshold(x, alpha, empty, torch.empty_like(x))
    assert steps <= 12
    p = (x - tau).clamp(min=0).pow(1 / (alpha - 1))
    assert (p.sum(-1) - 1).abs().max() < 1e-12
    torch.testing.assert_close(tau, reference.entmax_threshold(x, alpha), rtol=0, atol=1e-13)


_MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch, longattn
    torch.manual_seed(0)
    normalizer, alpha, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    q, k, v = (torch.randn(1, 1, n, 32, requires_grad=True) for _ in range(3))
    s = torch.ones(1, requires_grad=True)
    def status_mib(field):  # VmHWM, unlike ru_maxrss, does not inherit the parent's peak
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024
    before = status_mib("VmRSS")
    out = longattn.scaled_dot_product_attention(
        q, k, v, is_causal=True, normalizer=normalizer, alpha=alpha, length_scale=s, backend="torch")
    out.backward(torch.ones_like(out))
    print(status_mib("VmHWM") - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("normalizer,alpha", [("softmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5)])
def test_long_sequence_does_not_hold_the_score_matrix(normalizer, alpha):
    """N = 16384, forward and backward: the (N, N) float32 scores alone would be 1024 MiB."""
    n = 16384
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, normalizer, str(alpha), str(n)],
        capture_output=True, text=True, check=True,
    )
    growth_mib = float(run.stdout.strip())
    assert growth_mib < 160, f"peak memory grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize("alpha", [pytest.param(1.3, id="a1.3"), pytest.param("heads", id="per-head")])
@pytest.mark.parametrize("sink", [False, True], ids=["plain", "sink"])
def test_packed_candidates_serve_whole_blocks(alpha, sink, monkeypatch):
    """Every block steps on its packed candidates and (without a sink, which takes the dense
    product) multiplies their weights into the values as sparse rows, several heads a block:
    output and gradients equal the reference's; a NaN row stays NaN and spoils no other."""
    monkeypatch.setattr(chunked, "COMPACT_FRACTION", 1.0)
    q = torch.randn(2, 4, 29, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, d, dtype=torch.float64, requires_grad=True) for d in (8, 6))
    if alpha == "heads":
        alpha = torch.tensor([1.2, 1.35, 1.6, 1.9], dtype=torch.float64, requires_grad=True)
    a = alpha
    kw = dict(normalizer="entmax", alpha=a, enable_gqa=True, is_causal=True,
              sink=torch.randn(4, dtype=torch.float64) if sink else None)
    out = longattn.scaled_dot_product_attention(q, k, v, backend="torch", **kw)
    ref = longattn.scaled_dot_product_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    inputs = [t for t in (q, k, v, a) if torch.is_tensor(t)]
    do = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, do), torch.autograd.grad(ref, inputs, do)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    spoiled = q.detach().clone()
    spoiled[1, 2, 5, 0] = float("nan")
    out = longattn.scaled_dot_product_attention(spoiled, k, v, backend="torch", **kw)
    assert out[1, 2, 5].isnan().all() and out.isnan().sum() == out.shape[-1]
