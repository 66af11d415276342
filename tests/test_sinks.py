"""Attention sinks (`sink`, one learned logit per head, gpt-oss's and FlashAttention 4's): the
sink joins every row's normalization (softmax's sum, sparsemax's and entmax's threshold search)
and carries no value, exactly as an oracle written here in plain torch computes it, on every
path and for every normalizer, forward and every gradient (the sink's too), dense and packed;
a row with no key gives its whole weight to the sink; bad sinks are refused by name. The
kernels' side is in `tests/test_kernel_logit_modifiers.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import longattn
from longattn.attention import backends, reference

from conftest import NORMALIZER_CASES
from helpers import leaves, window_keys
from oracles import rel_err


def oracle(q, k, v, normalizer, alpha, sink, allowed, s=None):
    """The definition in plain torch: the logits, SSMax's factor from the allowed keys, one more
    column holding each head's sink, the normalizer's row function, and only the keys' weights
    multiplying V."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    z = q @ k.transpose(-1, -2)
    if normalizer == "ssmax" or s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        z = z * torch.as_tensor(1.0 if s is None else s, dtype=q.dtype).view(-1, 1, 1) * n.log()
    z = (z * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    z = torch.cat((z, sink.view(-1, 1, 1).expand(*z.shape[:-1], 1)), dim=-1)
    if normalizer in ("softmax", "ssmax"):
        p = torch.softmax(z, -1)
    else:
        p = reference.entmax(z, 2.0 if normalizer == "sparsemax" else alpha)
    return p[..., :-1] @ v


@pytest.mark.parametrize("causal_offset,window,masked", [(None, None, False), (0, None, False), (-3, None,
                                                                                                 True),
                                                         (2, (3, -1), False)],
                         ids=["full", "causal", "masked-rows-without-keys", "window"])
@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_sink_is_the_definition(backend, normalizer, alpha, causal_offset, window, masked):
    """GQA, Dv != D, a boolean mask that empties a row, and a learned length scale; every
    gradient, the sink's included."""
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 13, 8, dtype=torch.float64), torch.randn(2, 2, 13, 6, dtype=torch.float64)
    sink, s = torch.randn(4, dtype=torch.float64), 0.4 + torch.rand(4, dtype=torch.float64)
    mask = torch.rand(2, 1, 9, 13) > 0.3 if masked else None
    if mask is not None:
        mask[:, :, 4] = False  # a row with no key: all its weight goes to the sink
    allowed = window_keys(9, 13, window or (-1, -1), causal_offset) & (True if mask is None else mask)
    q1, k1, v1, sink1, s1 = leaves((q, k, v, sink, s))
    out = longattn.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, normalizer=normalizer,
                                                alpha=alpha,
                                                length_scale=s1, sink=sink1, causal_offset=causal_offset,
                                                window_size=window, enable_gqa=True, backend=backend)
    q2, k2, v2, sink2, s2 = leaves((q, k, v, sink, s))
    ref = oracle(q2, k2, v2, normalizer, alpha, sink2, allowed, s2)
    assert out.isfinite().all() and rel_err(out, ref) < 1e-12
    assert (out[..., ~allowed.any(-1), :] == 0).all() if mask is None else (out[:, :, 4] == 0).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q1, k1, v1, sink1, s1), grad)
    want = torch.autograd.grad(ref, (q2, k2, v2, sink2, s2), grad)
    for name, g, w in zip(("q", "k", "v", "sink", "length_scale"), got, want, strict=True):
        assert rel_err(g, w) < 1e-10, name


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_the_sink_takes_weight(normalizer, alpha):
    """A large sink takes most of every row's weight (the output shrinks toward 0); a very
    negative one takes none (the output is the sink-free one); the keys' weights of
    `attention_weights` sum to 1 less the sink's share."""
    q = 2 * torch.randn(1, 2, 7, 8, dtype=torch.float64)
    plain = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha)
    far = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha,
                                                sink=torch.full((2,), -1e4, dtype=torch.float64))
    big = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha,
                                                sink=torch.full((2,), 1e3, dtype=torch.float64))
    assert rel_err(far, plain) < 1e-12
    assert big.abs().max() < 1e-6 * plain.abs().max()
    p = longattn.attention.attention_weights(q / 4, q / 4, normalizer=normalizer, alpha=alpha,
                                             sink=torch.tensor([0.0, 1.0], dtype=torch.float64))
    sums = p.sum(-1)
    assert (sums <= 1 + 1e-12).all() and (sums < 1 - 1e-3).any()
    if normalizer in ("softmax", "ssmax"):  # a dense normalizer gives the sink some weight everywhere
        assert (sums < 1).all() and (sums > 0).all()


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_packed_documents_share_the_heads_sink(backend, normalizer, alpha):
    lq, lk = [5, 0, 9, 3], [8, 4, 9, 0]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32) for n in (lq, lk))
    q = torch.randn(sum(lq), 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, sum(lk), 2, 8, dtype=torch.float64)
    sink = torch.randn(4, dtype=torch.float64)
    out = longattn.varlen_attention(q, k, v, cu_q, cu_k, causal_offset="bottom_right", sink=sink,
                                    normalizer=normalizer, alpha=alpha, backend=backend)
    for d in range(len(lq)):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t, (a, b) in
                      ((q, cu_q[d:d + 2]), (k, cu_k[d:d + 2]), (v, cu_k[d:d + 2])))
        ref = oracle(qd, kd, vd, normalizer, alpha, sink, window_keys(lq[d], lk[d], (-1, -1), lk[d] - lq[d]))
        assert rel_err(out[cu_q[d]:cu_q[d + 1]], ref[0].transpose(0, 1)) < 1e-12, d


@pytest.mark.parametrize("sink,error,match", [
    ([0.0, 0.0], TypeError, "sink must be None or a torch.Tensor"),
    (torch.zeros(2, dtype=torch.int64), TypeError, "sink must be floating"),
    (torch.zeros(3), ValueError, r"sink must have shape \(2,\), one logit per query head"),
    (torch.zeros(1, 2), ValueError, r"sink must have shape \(2,\)"),
    (torch.zeros(2, device="meta"), ValueError, "sink must be on cpu"),
])
def test_bad_sinks_are_refused_by_name(sink, error, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(error, match=match):
        longattn.scaled_dot_product_attention(q, q, q, sink=sink)


def test_flash_refuses_sinks_by_name():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    call = longattn.attention.checks.make_call(q, q, q, normalizer="softmax", alpha=1.5, length_scale=None,
                                               scale=None, causal_offset=None, sink=torch.zeros(2))
    reason = backends._flash_limits(call)
    assert "sink" in reason or "flash-attn is not installed" in reason


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_alibi_beside_a_sink_counts_from_the_exact_diagonal(backend, normalizer, alpha):
    """ALiBi's diagonal is not clamped to the lengths: with a sink beside the keys, a diagonal 5
    keys right of 3 keys moves the keys' share against the sink's, as the definition says."""
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    slopes, sink = torch.tensor([0.7, 0.2], dtype=torch.float64), torch.tensor([0.3, -0.5],
                                                                               dtype=torch.float64)
    out = longattn.scaled_dot_product_attention(q, q, q, causal_offset=5, alibi_slopes=slopes, sink=sink,
                                                normalizer=normalizer, alpha=alpha, backend=backend)
    i, j = torch.arange(3).view(-1, 1), torch.arange(3)
    scale = 8 ** -0.5 * (math.log(3) if normalizer == "ssmax" else 1.0)  # SSMax: s = 1, n_i = 3
    z = q @ q.transpose(-1, -2) * scale - slopes.view(-1, 1, 1) * (j - i - 5).abs()
    z = torch.cat((z, sink.view(-1, 1, 1).expand(*z.shape[:-1], 1)), dim=-1)
    p = torch.softmax(z, -1) if normalizer in ("softmax", "ssmax") else reference.entmax(
        z, 2.0 if normalizer == "sparsemax" else alpha)
    assert rel_err(out, p[..., :3] @ q) < 1e-12


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_a_sink_of_minus_infinity_leaves_empty_rows_empty(backend, normalizer, alpha):
    """A head whose sink is -inf (switched off) has rows that see no key give 0, and its sink's
    gradient is 0, not NaN; the other head's sink takes those rows' weight."""
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    sink = torch.tensor([float("-inf"), 0.5], dtype=torch.float64, requires_grad=True)
    out = longattn.scaled_dot_product_attention(q, q, q, causal_offset=-1, sink=sink, normalizer=normalizer,
                                                alpha=alpha, backend=backend)
    assert out.isfinite().all() and (out[:, :, 0] == 0).all()
    dq, dsink = torch.autograd.grad(out.square().sum(), (q, sink))
    assert dq.isfinite().all() and dsink[0] == 0 and dsink[1].isfinite()
