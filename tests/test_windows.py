"""Sliding windows, flash-attn's `window_size=(left, right)`: row `i` attends to keys
`i + c - left <= j <= i + c + right` around its causal diagonal (`c` the causal offset, 0 without
one), exactly as that rule given as a boolean mask, on every path and for every normalizer,
forward and every gradient, dense and packed; SSMax's `n_i` counts the keys in the window; the
torch path reads only the keys inside each block's window; bad windows are refused by name. The
kernels' side is `tests/test_kernel_windows.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.attention import backends, checks, chunked
from longattn.attention.call import AttentionCall

from conftest import NORMALIZER_CASES
from helpers import leaves, window_keys
from oracles import rel_err

# (Nq, Nk, window, causal_offset): windows narrower and wider than the sequence, one-sided and
# two-sided, empty rows (a window right of every key), top-left, shifted and bottom-right
CASES = [
    (9, 13, (2, -1), None), (9, 13, (3, 1), None), (9, 13, (-1, 0), None), (9, 13, (0, 0), 0),
    (13, 9, (4, 2), -3), (9, 13, (5, -1), "bottom_right"), (9, 13, (30, 30), 2), (9, 13, (1, 4), 20),
]


def case_id(case):
    n_q, n_k, (left, right), offset = case
    return f"{n_q}x{n_k}-w{left}_{right}-{offset}"


def resolved(offset, n_q, n_k):
    return n_k - n_q if offset == "bottom_right" else offset


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_window_is_the_flash_attn_rule(backend, normalizer, alpha, case):
    """GQA, Dv != D, a float mask with Hugging Face's masked entries and a learned length scale
    beside the window; every gradient, the mask's too."""
    n_q, n_k, window, offset = case
    q = torch.randn(2, 4, n_q, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, n_k, 8, dtype=torch.float64), torch.randn(2, 2, n_k, 6, dtype=torch.float64)
    s, bias = 0.4 + torch.rand(4, dtype=torch.float64), torch.randn(1, 4, n_q, n_k, dtype=torch.float64)
    bias[..., 3, ::2] = torch.finfo(torch.float64).min
    args = (q, k, v, s, bias)
    kwargs = dict(enable_gqa=True, normalizer=normalizer, alpha=alpha)
    q1, k1, v1, s1, b1 = leaves(args)
    out = longattn.scaled_dot_product_attention(q1, k1, v1, attn_mask=b1, length_scale=s1,
                                                window_size=window, causal_offset=offset, backend=backend,
                                                **kwargs)
    q2, k2, v2, s2, b2 = leaves(args)
    allowed = window_keys(n_q, n_k, window, resolved(offset, n_q, n_k))
    masked = b2.masked_fill(~allowed, float("-inf"))
    ref = longattn.scaled_dot_product_attention(q2, k2, v2, attn_mask=masked, length_scale=s2,
                                                backend="reference", **kwargs)
    assert out.isfinite().all()
    assert rel_err(out, ref) < 1e-12
    empty = ~allowed.any(-1)
    assert (out[:, :, empty] == 0).all()  # rows the window leaves no key give 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q1, k1, v1, s1, b1), grad)
    want = torch.autograd.grad(ref, (q2, k2, v2, s2, b2), grad)
    for name, g, w in zip(("q", "k", "v", "length_scale", "attn_mask"), got, want, strict=True):
        assert rel_err(g, w) < 1e-10, name
    assert (got[4][..., ~allowed] == 0).all()  # outside the window, no mask gradient


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_window_with_key_lengths_and_unbatched(backend, normalizer, alpha):
    """A window, per-batch key lengths and a boolean mask together; unbatched inputs likewise."""
    q = torch.randn(3, 2, 11, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 2, 15, 8, dtype=torch.float64)
    lengths = torch.tensor([0, 7, 15])
    mask = torch.rand(3, 1, 11, 15) > 0.2
    kwargs = dict(normalizer=normalizer, alpha=alpha, length_scale=0.8, causal_offset=3)
    out = longattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, seqused_k=lengths,
                                                window_size=(4, -1), backend=backend, **kwargs)
    keys = torch.arange(15) < lengths[:, None]
    full = mask & window_keys(11, 15, (4, -1), 3) & keys[:, None, None, :]
    ref = longattn.scaled_dot_product_attention(q, k, v, attn_mask=full, backend="reference", **kwargs)
    assert rel_err(out, ref) < 1e-12
    one = longattn.scaled_dot_product_attention(q[1], k[1], v[1], window_size=(4, -1), backend=backend,
                                                **kwargs)
    ref1 = longattn.scaled_dot_product_attention(q[1], k[1], v[1], attn_mask=window_keys(11, 15, (4, -1), 3),
                                                 backend="reference", **kwargs)
    assert one.shape == (2, 11, 8) and rel_err(one, ref1) < 1e-12


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_ssmax_counts_the_keys_in_the_window(normalizer, alpha):
    """`n_i` of length scaling is the number of keys row i sees inside the window: the weights
    equal those of the logits multiplied by `s ln(n_i)`, n_i counted from the rule itself."""
    n_q, n_k, window = 10, 16, (3, 2)
    q, k = torch.randn(1, 2, n_q, 8, dtype=torch.float64), torch.randn(1, 2, n_k, 8, dtype=torch.float64)
    allowed = window_keys(n_q, n_k, window)
    n = allowed.sum(-1, keepdim=True).clamp(min=1).double()
    p = longattn.attention.attention_weights(q, k, normalizer=normalizer, alpha=alpha, length_scale=0.7,
                                             window_size=window)
    plain = "softmax" if normalizer == "ssmax" else normalizer  # ssmax is softmax, length-scaled
    p_scaled_q = longattn.attention.attention_weights(q * 0.7 * n.log(), k, attn_mask=allowed,
                                                      normalizer=plain, alpha=alpha)
    assert rel_err(p, p_scaled_q) < 1e-12
    assert ((p > 0) <= allowed).all()


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_packed_documents_take_the_window_per_document(backend, normalizer, alpha):
    """varlen_attention's window is each document's own, centred on its causal diagonal
    (bottom-right with `causal_offset="bottom_right"`), as the dense call on that document."""
    lq, lk = [5, 0, 9, 3], [8, 4, 9, 1]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32) for n in (lq, lk))
    q = torch.randn(sum(lq), 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, sum(lk), 2, 8, dtype=torch.float64)
    kwargs = dict(normalizer=normalizer, alpha=alpha, length_scale=1.1)
    for offset, window in [("bottom_right", (2, -1)), (None, (1, 3)), (1, (2, 0))]:
        out = longattn.varlen_attention(q, k, v, cu_q, cu_k, causal_offset=offset, window_size=window,
                                        backend=backend, **kwargs)
        for d in range(len(lq)):
            qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t, (a, b) in
                          ((q, cu_q[d:d + 2]), (k, cu_k[d:d + 2]), (v, cu_k[d:d + 2])))
            allowed = window_keys(lq[d], lk[d], window, resolved(offset, lq[d], lk[d]))
            ref = longattn.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, enable_gqa=True,
                                                        backend="reference", **kwargs)
            assert rel_err(out[cu_q[d]:cu_q[d + 1]], ref[0].transpose(0, 1)) < 1e-12, (offset, window, d)


def test_torch_path_reads_only_the_keys_in_each_blocks_window(monkeypatch):
    """Softmax's row blocks hand SDPA only the keys inside their window (4096 queries, a
    window of 64: each block sees its rows plus 63 keys, not the 4096), and the sparse path's
    blocks likewise: the cost grows as N * W."""
    n, window = 4096, (63, 0)
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    widths = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, *args, **kwargs):
        widths.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    out = longattn.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=window, backend="torch")
    ref = longattn.scaled_dot_product_attention(q[:, :, -300:], k[:, :, -363:], v[:, :, -363:],
                                                causal_offset=63, window_size=window, backend="reference")
    torch.testing.assert_close(out[:, :, -300:], ref)
    assert sum(r for r, _ in widths) == n
    assert all(w <= r + window[0] for r, w in widths)

    blocks = chunked._Blocks(torch.randn(1, 1, n, 16), None, None, None, 0, -63, 1.0, 1.5, 1, n, 0.0, 0)
    spans = [blocks.keys(r0, r1) for _, _, _, r0, r1 in blocks.bounds]
    assert all(k1 - k0 <= (r1 - r0) + 63 for (k0, k1), (_, _, _, r0, r1) in zip(spans, blocks.bounds))
    assert sum(k1 - k0 for k0, k1 in spans) < 2 * n + 63 * len(spans)


def test_window_bounds_fold_the_right_edge_into_the_causal_offset():
    """The canonical form: a window's left edge is `window_offset`, its right edge bounds only
    what the causal rule would not, `(-1, -1)` is no window; both are clamped to the lengths."""
    q, k = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 10, 8)

    def bounds(**kw):
        causal_offset = checks.check_causal(kw.pop("is_causal", False), kw.pop("causal_offset", None))
        window = checks.check_window(kw.pop("window_size"))
        call = checks.make_call(q, k, k, normalizer="softmax", alpha=1.5, length_scale=None, scale=None,
                                causal_offset=causal_offset, window=window)
        return call.causal_offset, call.window_offset

    assert bounds(window_size=(-1, -1)) == (None, None)
    assert bounds(window_size=(3, -1)) == (None, -3)
    assert bounds(window_size=(3, 2)) == (2, -3)
    assert bounds(window_size=(3, 2), causal_offset=1) == (1, -2)  # causal: the right edge adds nothing
    assert bounds(window_size=(3, 0), causal_offset="bottom_right") == (4, 1)
    assert bounds(window_size=(10 ** 9, 10 ** 9)) == (10, -6)  # clamped: no row changes
    assert bounds(window_size=(np.int64(2), np.int32(-1)), is_causal=True) == (0, -2)


@pytest.mark.parametrize("window_size,error,match", [
    ((-2, 0), ValueError, r"window_size must be .*got \(-2, 0\)"),
    ((1, -5), ValueError, r"-1 \(unbounded\) or >= 0"),
    ((3,), TypeError, "pair"),
    (4, TypeError, "pair"),
    ("left", TypeError, "pair"),
    ((1.5, 0), TypeError, r"window_size\[0\] must be an int"),
    ((True, 0), TypeError, r"window_size\[0\] must be an int"),
])
def test_bad_windows_are_refused_by_name(window_size, error, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(error, match=match):
        longattn.scaled_dot_product_attention(q, q, q, window_size=window_size)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(error, match=match):
        longattn.varlen_attention(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu,
                                  window_size=window_size)


def test_layers_pass_the_window():
    layer = longattn.ScaledDotProductAttention("sparsemax")
    q = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    got = layer(q, q, q, is_causal=True, window_size=(3, 0))
    want = longattn.scaled_dot_product_attention(q, q, q, attn_mask=window_keys(12, 12, (3, 0), 0),
                                                 normalizer="sparsemax", backend="reference")
    assert rel_err(got, want) < 1e-12
    mha = longattn.MultiheadAttention(16, 2, normalizer="entmax").double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    masked = mha(x, attn_mask=window_keys(12, 12, (2, 2)))
    assert rel_err(mha(x, window_size=(2, 2)), masked) < 1e-12


def _call(q, k, causal_offset=None, window_offset=None, length_scale=None, docs=None):
    record = longattn.attention.normalizers.get("softmax")
    return AttentionCall(q, k, k, "softmax", record, 1.5, length_scale, 0.125, causal_offset, docs=docs,
                         window_offset=window_offset)


@pytest.mark.parametrize("n_q,n_k", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("causal_offset,window_offset", [(None, -2), (0, -3), (2, -1), (5, 5), (5, 6), (1, 3),
                                                         (None, None), (-1, -4)])
def test_flash_window_maps_both_bounds(n_q, n_k, causal_offset, window_offset):
    """flash-attn's `(causal, window_size)`, whose rule counts from the bottom-right diagonal
    `i + Nk - Nq`, allows exactly the keys `window_offset <= j - i <= causal_offset` wherever
    the mapping accepts the call; the rest is refused with the reason."""
    q, k = torch.randn(1, 1, n_q, 8), torch.randn(1, 1, n_k, 8)
    (causal, (left, right)), reason = backends._flash_window(_call(q, k, causal_offset, window_offset))
    bottom_right = n_k - n_q
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    if (causal_offset is not None and causal_offset < bottom_right) or (
            window_offset is not None and window_offset > bottom_right):
        assert "bottom-right" in reason
        return
    assert reason == ""
    expected = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal_offset is not None:
        expected &= j - i <= causal_offset
    if window_offset is not None:
        expected &= j - i >= window_offset
    right = 0 if causal else right
    flash = torch.ones_like(expected)
    if right >= 0:
        flash &= j <= i + bottom_right + right
    if left >= 0:
        flash &= j >= i + bottom_right - left
    assert torch.equal(flash, expected)


def test_flash_length_factor_counts_the_window():
    """SSMax's factor for flash-attn: `n_i` counts the keys inside the window, dense and packed
    (counted from each document's end)."""
    from longattn.attention.call import PackedDocs

    s = torch.tensor([0.4, 1.3])
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 9, 8)
    got = backends._flash_length_factor(_call(q, k, 3, -1, length_scale=s))[0, :, :, 0]  # (Nq, Hq)
    n = window_keys(7, 9, (4, 0), 3).sum(-1).clamp(min=1).float()
    torch.testing.assert_close(got, n.log()[:, None] * s)

    lq, lk = [3, 0, 5], [4, 2, 6]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32) for n in (lq, lk))
    docs = PackedDocs(cu_q, cu_k, 5, 6, cu_q.tolist(), cu_k.tolist(), causal_from_end=True)
    got = backends._flash_length_factor(_call(torch.randn(8, 2, 8), torch.randn(12, 2, 8), 0, -2, s, docs))
    for d in (0, 2):
        n = window_keys(lq[d], lk[d], (2, 0), lk[d] - lq[d]).sum(-1).clamp(min=1).float()
        torch.testing.assert_close(got[cu_q[d]:cu_q[d + 1], :, 0], n.log()[:, None] * s)
