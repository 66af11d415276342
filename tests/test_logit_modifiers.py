"""Logit soft-capping (Gemma 2's `softcap`) and ALiBi (`alibi_slopes`, flash-attn's form): the
logits `z` become `softcap * tanh(z / softcap)`, then `- slope_h * |j - i - c|` is added (`c` the
causal diagonal, 0 without one), exactly as an oracle written here in plain torch computes it,
on every path and for every normalizer, forward and every gradient, with windows, masks,
length scaling and packed documents; bad values are refused by name. The kernels' side is
`tests/test_kernel_logit_modifiers.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import longattn
from longattn.attention import backends, reference
from longattn.attention.call import AttentionCall

from conftest import NORMALIZER_CASES
from helpers import leaves, window_keys
from oracles import rel_err


def oracle(q, k, v, normalizer, alpha, softcap=None, slopes=None, causal_offset=None, window=None, s=None,
           bias=None):
    """The definition in plain torch, independent of the library's paths: the score matrix, SSMax's
    factor from the allowed keys, the cap, ALiBi, the mask's bias, the normalizer's row function."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    allowed = window_keys(n_q, n_k, window or (-1, -1), causal_offset)
    z = q @ k.transpose(-1, -2)
    if normalizer == "ssmax" or s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        z = z * torch.as_tensor(1.0 if s is None else s, dtype=q.dtype).view(-1, 1, 1) * n.log()
    z = z * q.shape[-1] ** -0.5
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if slopes is not None:
        i, j = torch.arange(n_q).view(-1, 1), torch.arange(n_k)
        c = 0 if causal_offset is None else causal_offset
        z = z - slopes.view(-1, q.shape[-3], 1, 1) * (j - i - c).abs()
    if bias is not None:
        z = z + bias
    z = z.masked_fill(~allowed, float("-inf"))
    if normalizer in ("softmax", "ssmax"):
        p = torch.softmax(z, -1)
    else:
        p = reference.entmax(z, 2.0 if normalizer == "sparsemax" else alpha)
    return p.masked_fill(~allowed.any(-1, keepdim=True), 0) @ v


# (softcap, ALiBi, causal offset, window): each alone, together, with a shifted causal diagonal,
# a window and a two-sided window without causality
CASES = [(2.0, False, None, None), (None, True, 0, None), (1.5, True, 3, (4, -1)), (3.0, True, None, (2, 2)),
         (0.5, False, -2, None)]


@pytest.mark.parametrize("softcap,alibi,causal_offset,window", CASES,
                         ids=[f"cap{c}-alibi{a}-{o}-w{w}" for c, a, o, w in CASES])
@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_modifiers_are_the_definition(backend, normalizer, alpha, softcap, alibi, causal_offset, window):
    """GQA, Dv != D, per-batch slopes, a float mask beside them and a learned length scale; every
    gradient (q, k, v, the length scale, the mask)."""
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 13, 8, dtype=torch.float64), torch.randn(2, 2, 13, 6, dtype=torch.float64)
    s, bias = 0.4 + torch.rand(4, dtype=torch.float64), torch.randn(1, 4, 9, 13, dtype=torch.float64)
    slopes = torch.rand(2, 4, dtype=torch.float64) if alibi else None
    kwargs = dict(softcap=softcap, causal_offset=causal_offset, window_size=window)
    q1, k1, v1, s1, b1 = leaves((q, k, v, s, bias))
    out = longattn.scaled_dot_product_attention(q1, k1, v1, attn_mask=b1, normalizer=normalizer, alpha=alpha,
                                                length_scale=s1, alibi_slopes=slopes, enable_gqa=True,
                                                backend=backend, **kwargs)
    q2, k2, v2, s2, b2 = leaves((q, k, v, s, bias))
    ref = oracle(q2, k2, v2, normalizer, alpha, slopes=slopes, s=s2, bias=b2, **{
        "softcap": softcap, "causal_offset": causal_offset, "window": window})
    assert rel_err(out, ref) < 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q1, k1, v1, s1, b1), grad)
    want = torch.autograd.grad(ref, (q2, k2, v2, s2, b2), grad)
    for name, g, w in zip(("q", "k", "v", "length_scale", "attn_mask"), got, want, strict=True):
        assert rel_err(g, w) < 1e-10, name


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_modifiers_change_the_result(normalizer, alpha):
    """Neither is a no-op: a cap of 0.5 and slopes of 0.5 each move the output."""
    q = 3 * torch.randn(1, 2, 9, 8, dtype=torch.float64)
    plain = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha)
    capped = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha, softcap=0.5)
    biased = longattn.scaled_dot_product_attention(q, q, q, normalizer=normalizer, alpha=alpha,
                                                   alibi_slopes=torch.full((2,), 0.5, dtype=torch.float64))
    assert rel_err(capped, plain) > 1e-2 and rel_err(biased, plain) > 1e-2


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_packed_documents_count_alibi_from_each_documents_diagonal(backend, normalizer, alpha):
    """varlen: per-document slopes `(num_docs, Hq)`, distances from each document's causal
    diagonal (bottom-right with `causal_offset="bottom_right"`), and the cap."""
    lq, lk = [5, 0, 9, 3], [8, 4, 9, 1]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32) for n in (lq, lk))
    q = torch.randn(sum(lq), 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, sum(lk), 2, 8, dtype=torch.float64)
    slopes = torch.rand(4, 4, dtype=torch.float64)
    for offset in ("bottom_right", None):
        out = longattn.varlen_attention(q, k, v, cu_q, cu_k, causal_offset=offset, softcap=1.5,
                                        alibi_slopes=slopes, normalizer=normalizer, alpha=alpha,
                                        backend=backend)
        for d in range(len(lq)):
            qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t, (a, b) in
                          ((q, cu_q[d:d + 2]), (k, cu_k[d:d + 2]), (v, cu_k[d:d + 2])))
            diagonal = lk[d] - lq[d] if offset else None
            ref = oracle(qd, kd, vd, normalizer, alpha, 1.5, slopes[d], diagonal)
            assert rel_err(out[cu_q[d]:cu_q[d + 1]], ref[0].transpose(0, 1)) < 1e-12, (offset, d)


def test_layers_pass_the_modifiers():
    layer = longattn.ScaledDotProductAttention("entmax", alpha=1.5)
    q = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    slopes = torch.tensor([0.25, 0.5], dtype=torch.float64)
    got = layer(q, q, q, is_causal=True, softcap=2.0, alibi_slopes=slopes)
    assert rel_err(got, oracle(q, q, q, "entmax", 1.5, 2.0, slopes, 0)) < 1e-12


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(softcap=0.0), ValueError, "softcap must be a finite number above 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number above 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number above 0"),
    (dict(softcap="2"), TypeError, "softcap must be None or a positive real number"),
    (dict(softcap=True), TypeError, "softcap must be None or a positive real number"),
    (dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes must be None or a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.int64)), TypeError, "alibi_slopes must be floating"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=torch.ones(2, 2)), ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=torch.ones(2, requires_grad=True)), ValueError, "alibi_slopes get no gradient"),
    (dict(alibi_slopes=torch.ones(2, device="meta")), ValueError, "alibi_slopes must be on cpu"),
])
def test_bad_modifiers_are_refused_by_name(kwargs, error, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(error, match=match):
        longattn.scaled_dot_product_attention(q, q, q, **kwargs)


def _call(q, k, causal_offset=None, alibi_offset=None, docs=None):
    record = longattn.attention.normalizers.get("softmax")
    slopes = None if alibi_offset is None else torch.ones(1, q.shape[-3])
    return AttentionCall(q, k, k, "softmax", record, 1.5, None, 0.125, causal_offset, docs=docs,
                         alibi_slopes=slopes, alibi_offset=alibi_offset)


@pytest.mark.parametrize("n_q,n_k,causal_offset,alibi_offset", [(6, 6, 0, 0), (4, 9, 5, 5), (4, 9, None, 5),
                                                                 (4, 9, None, 0), (6, 6, 2, 2)])
def test_flash_takes_alibi_counted_from_its_diagonal(n_q, n_k, causal_offset, alibi_offset):
    """flash-attn's ALiBi counts from the bottom-right diagonal `i + Nk - Nq`: a call whose
    distances count from there maps, any other is refused with the reason."""
    q, k = torch.randn(1, 2, n_q, 8), torch.randn(1, 2, n_k, 8)
    _, reason = backends._flash_window(_call(q, k, causal_offset, alibi_offset))
    if alibi_offset == n_k - n_q:
        assert reason == ""
    else:
        assert "ALiBi" in reason and f"i + {alibi_offset}" in reason


def test_the_compiled_per_document_path_carries_every_modifier():
    """Under torch.compile packed calls run document by document inside custom ops
    (`longattn::packed_documents_fwd/_bwd`), which rebuild the call: the window, the cap, ALiBi
    and the sink must reach it, and the sink and length scale their gradients."""
    from longattn.attention import checks, dispatch
    from longattn.attention.call import PackedDocs

    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
    q = torch.randn(12, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(13, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sink = torch.randn(2, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    docs = PackedDocs(cu_q, cu_k, 7, 7, cu_q.tolist(), cu_k.tolist())
    call = checks.make_call(q, k, v, normalizer="entmax", alpha=1.5, length_scale=s, scale=None,
                            causal_offset="bottom_right", docs=docs, window=(1, 0), softcap=2.0,
                            alibi_slopes=torch.rand(2, 2, dtype=torch.float64), sink=sink)
    loop = dispatch._run_documents(call, backends.TORCH)
    ops = dispatch._run_documents_op(call, backends.TORCH)
    assert rel_err(ops, loop) < 1e-14
    grad = torch.randn_like(loop)
    want = torch.autograd.grad(loop, (q, k, v, sink, s), grad)
    got = torch.autograd.grad(ops, (q, k, v, sink, s), grad)
    for name, g, w in zip(("q", "k", "v", "sink", "length_scale"), got, want, strict=True):
        assert rel_err(g, w) < 1e-12, name
