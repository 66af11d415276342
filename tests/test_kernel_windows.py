"""The Triton kernels' sliding windows (flash-attn's `window_size=(left, right)` around the causal
diagonal) against the float64 reference given the same window as a mask: the output and every
gradient (q, k, v, a tensor length scale) for each normalizer, windows narrower and wider than
a key tile, one- and two-sided, with causal offsets, GQA, odd lengths, rows the window leaves
empty and every buffer poisoned with NaN; packed documents with the window counted from each
document's end; and that only the key tiles inside the window are loaded (the ops' schemas with a
window: `tests/test_kernel_logit_modifiers.py`).
"""

import numpy as np
import pytest
import torch
from test_kernel_key_lengths import count_key_tile_loads
from test_triton_softmax import plain_attention

import longattn
from longattn.kernels.common import tile_config
from longattn.kernels.entmax import entmax_attention, entmax_attention_bwd, entmax_attention_fwd
from longattn.kernels.softmax import softmax_attention, softmax_attention_bwd, softmax_attention_fwd

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import check_kernel_call, kernel_leaves, leaves, window_keys

DEVICE = KERNEL_DEVICE
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

HQ, HKV = 4, 2
# (normalizer, alpha, window, causal offset, Nq, Nk): windows inside one 32-key tile and across
# several, causal and not, a window right of some rows' keys (rows left empty), bottom-right
CASES = [
    ("softmax", 1.5, (5, -1), 0, 70, 70), ("softmax", 1.5, (40, 3), None, 37, 70),
    ("ssmax", 1.5, (10, 0), 33, 37, 70), ("ssmax", 1.5, (0, 0), None, 45, 45),
    ("sparsemax", 2.0, (20, -1), -5, 70, 45), ("entmax", 1.5, (3, 3), None, 45, 45),
    ("entmax", 1.25, (45, 0), 7, 70, 70), ("sparsemax", 2.0, (-1, 6), None, 37, 70),
]


def case_name(normalizer, alpha, window, causal_offset, n_q, n_k):
    name = normalizer + (str(alpha) if normalizer == "entmax" else "")
    return f"{name}-w{window[0]}_{window[1]}-{causal_offset}-{n_q}x{n_k}"


def kernel_attention(q, k, v, normalizer, alpha, causal_offset, length_scale, window):
    if normalizer in ("softmax", "ssmax"):
        return softmax_attention(q, k, v, causal_offset=causal_offset, length_scale=length_scale,
                                 window_size=window)
    alpha = 2.0 if normalizer == "sparsemax" else alpha
    return entmax_attention(q, k, v, alpha=alpha, causal_offset=causal_offset, length_scale=length_scale,
                            window_size=window)


def check_against_reference(B, Nq, Nk, D, Dv, window, normalizer, alpha, causal_offset, dtype):
    """Output and gradients of q, k, v and the length scale (a `(Hq,)` tensor for SSMax and
    entmax) under the kernels' tolerance rule, against the reference backend given the window
    as a mask; dK, dV of keys no row sees exactly 0."""
    scaled = normalizer in ("ssmax", "entmax")
    q, k, v, s = kernel_leaves(B, HQ, HKV, Nq, Nk, D, Dv, DEVICE, dtype, scaled)
    inputs = [q, k, v] + ([s] if scaled else [])
    out = kernel_attention(q, k, v, normalizer, alpha, causal_offset, s, window)
    allowed = window_keys(Nq, Nk, window, causal_offset)

    def reference(args):
        q_, k_, v_, *s_ = args
        return longattn.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=allowed, normalizer=normalizer, alpha=alpha,
            length_scale=s_[0] if s_ else None, enable_gqa=True, backend="reference")

    def plain(args):  # fp16 softmax: the definition materialised in 16 bits
        return plain_attention(*args[:3], args[3] if scaled else None, allowed, D ** -0.5)[0]

    sixteen_bit_softmax = dtype != torch.float32 and normalizer in ("softmax", "ssmax")
    got = check_kernel_call(out, inputs, reference, dtype, ["dq", "dk", "dv", "ds"][:len(inputs)],
                            plain if sixteen_bit_softmax else None)
    unseen = ~allowed.any(0)  # keys outside every row's window
    for name, g in (("dk", got[1]), ("dv", got[2])):
        assert (g.cpu()[:, :, unseen] == 0).all(), f"{name} of unseen keys"


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,window,causal_offset,n_q,n_k", CASES,
                         ids=[case_name(*c) for c in CASES])
def test_matches_the_reference_masked_to_the_window(normalizer, alpha, window, causal_offset, n_q, n_k):
    check_against_reference(1, n_q, n_k, 16, 24, window, normalizer, alpha, causal_offset, torch.float32)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha", [("ssmax", 1.5), ("entmax", 1.5)], ids=["ssmax", "entmax1.5"])
def test_window_in_float16_across_key_blocks(normalizer, alpha):
    """fp16's 64-row, 32-key tiles: a window of 50 keys spans two or three of them."""
    check_against_reference(1, 130, 130, 24, 24, (49, 0), normalizer, alpha, 0, torch.float16)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_packed_documents_count_the_window_from_each_documents_end(family):
    """varlen: the window and the causal offset both counted from each document's bottom-right
    corner (`causal_from_end`), documents of unequal lengths and one empty, against the
    reference on each document."""
    lq, lk = [21, 0, 40, 9], [30, 6, 40, 45]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32, device=DEVICE) for n in (lq, lk))
    q = torch.randn(sum(lq), HQ, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(sum(lk), HKV, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    s = (0.5 + torch.rand(HQ)).to(DEVICE).requires_grad_()
    window = (12, -1)
    args = dict(max_seqlen_q=max(lq), max_seqlen_k=max(lk), is_causal=True, causal_from_end=True,
                length_scale=s, window_size=window)
    if family == "softmax":
        from longattn.kernels.softmax import softmax_varlen_attention
        out = softmax_varlen_attention(q, k, v, cu_q, cu_k, **args)
        normalizer = "ssmax"
    else:
        from longattn.kernels.entmax import entmax_varlen_attention
        out = entmax_varlen_attention(q, k, v, cu_q, cu_k, alpha=1.25, **args)
        normalizer = "entmax"
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s), do)
    q2, k2, v2, s2 = leaves([q, k, v, s], torch.float64)
    outs = []
    for d in range(len(lq)):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t, (a, b) in
                      ((q2, cu_q[d:d + 2]), (k2, cu_k[d:d + 2]), (v2, cu_k[d:d + 2])))
        allowed = window_keys(lq[d], lk[d], window, lk[d] - lq[d])
        o = longattn.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, normalizer=normalizer,
                                                  alpha=1.25, length_scale=s2, enable_gqa=True,
                                                  backend="reference")
        outs.append(o[0].transpose(0, 1))
    ref = torch.cat(outs)
    want = torch.autograd.grad(ref, (q2, k2, v2, s2), do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, w in zip(("dq", "dk", "dv", "ds"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


def tiles_touched(allowed: torch.Tensor, rows: int, keys: int) -> int:
    """How many (query block, key tile) pairs of `rows x keys` hold an allowed key."""
    n_q, n_k = allowed.shape
    padded = torch.zeros(-(-n_q // rows) * rows, -(-n_k // keys) * keys, dtype=torch.bool)
    padded[:n_q, :n_k] = allowed
    return int(padded.unflatten(0, (-1, rows)).unflatten(2, (-1, keys)).any(dim=(1, 3)).sum())


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton interpreter's loads")
def test_softmax_kernels_load_only_the_tiles_inside_the_window(monkeypatch):
    """Forward and dQ load K once per (query block, key tile) pair that holds a key inside the
    window, and the dK/dV programs once each: the count of the pairs the window touches, from
    the mask itself."""
    n, window = 256, (15, 0)
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))

    def forward_backward():
        out, lse = softmax_attention_fwd(q, k, v, 0.25, 0, None, window_offset=-15)
        softmax_attention_bwd(out, q, k, v, out, lse, 0.25, 0, None, window_offset=-15)

    allowed = window_keys(n, n, window, 0)
    rows, keys = tile_config(16, torch.float32)[:2]
    held, streamed = tile_config(16, torch.float32, backward=True)[:2]
    expected = tiles_touched(allowed, rows, keys) + tiles_touched(allowed, held, streamed) + n // held
    assert count_key_tile_loads(forward_backward, k, monkeypatch) == expected


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton interpreter's loads")
@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_windowed_cost_grows_as_n_times_w(family, monkeypatch):
    """Doubling N doubles the K tiles a window of 16 loads (forward and backward), where the
    causal mask alone more than triples them."""

    def loads(n, window_offset):
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))

        def run():
            if family == "softmax":
                out, lse = softmax_attention_fwd(q, k, v, 0.25, 0, None, window_offset=window_offset)
                softmax_attention_bwd(out, q, k, v, out, lse, 0.25, 0, None, window_offset=window_offset)
            else:
                out, m, t, f = entmax_attention_fwd(q, k, v, 0.25, 1.5, 0, None, window_offset=window_offset)
                entmax_attention_bwd(out, q, k, v, m, t, f, 0.25, 1.5, 0, None, window_offset=window_offset)
        return count_key_tile_loads(run, k, monkeypatch)

    windowed = loads(256, -15) / loads(128, -15)
    causal = loads(256, None) / loads(128, None)
    assert windowed <= 2.2 and causal >= 3.0, (windowed, causal)


def test_backend_triton_serves_windows():
    """The dispatch hands the window to the kernels (they take no dense mask)."""
    q = torch.randn(1, 2, 40, 16, device=DEVICE)
    for normalizer in ("ssmax", "sparsemax"):
        got = longattn.scaled_dot_product_attention(q, q, q, is_causal=True, window_size=(7, 0),
                                                    normalizer=normalizer, backend="triton")
        want = longattn.scaled_dot_product_attention(q.cpu().double(), q.cpu().double(), q.cpu().double(),
                                                     attn_mask=window_keys(40, 40, (7, 0), 0),
                                                     normalizer=normalizer, backend="reference")
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_window_counted_from_the_end_of_a_document_with_few_queries(family):
    """4 queries continuing 76 cached keys, a window of 31: its left edge, 30 keys before each
    query's own, lies far below `-total_q`, where a clamp to the query count would have moved
    it (the launchers clamp offsets counted from the end to `[-Nk, Nq]`)."""
    cu_q = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 80], dtype=torch.int32, device=DEVICE)
    q = torch.randn(4, 2, 16, device=DEVICE)
    k, v = torch.randn(2, 80, 2, 16, device=DEVICE)
    args = dict(max_seqlen_q=4, max_seqlen_k=80, is_causal=True, causal_from_end=True, window_size=(30, -1))
    if family == "softmax":
        from longattn.kernels.softmax import softmax_varlen_attention
        out, normalizer = softmax_varlen_attention(q, k, v, cu_q, cu_k, **args), "softmax"
    else:
        from longattn.kernels.entmax import entmax_varlen_attention
        out, normalizer = entmax_varlen_attention(q, k, v, cu_q, cu_k, alpha=1.5, **args), "entmax"
    qd, kd, vd = (t.cpu().double().transpose(0, 1)[None] for t in (q, k, v))
    ref = longattn.scaled_dot_product_attention(qd, kd, vd, attn_mask=window_keys(4, 80, (30, -1), 76),
                                                normalizer=normalizer, backend="reference")
    torch.testing.assert_close(out.cpu().double(), ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
