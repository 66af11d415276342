"""The Triton kernels' logit soft-capping, ALiBi and attention sinks against the float64
reference: the output and every gradient (q, k, v, a tensor length scale, the sink) for each
normalizer, each modifier alone and together with causal offsets (rows with no key but the
sink), windows, GQA and odd lengths, every buffer poisoned with NaN; packed documents with ALiBi
counted from each document's end; and the ops' schemas."""

import numpy as np
import pytest
import torch
from test_kernel_key_lengths import opcheck_kernel_ops

import longattn
from longattn.kernels.entmax import entmax_attention
from longattn.kernels.softmax import softmax_attention

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import check_kernel_call, check_rule, kernel_leaves, leaves, window_keys

DEVICE = KERNEL_DEVICE
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

HQ, HKV = 4, 2
# (normalizer, alpha, softcap, ALiBi, causal offset, window): every normalizer, each modifier
# alone and both with the bounds
CASES = [
    ("softmax", 1.5, 1.5, False, None, None), ("ssmax", 1.5, None, True, 0, None),
    ("softmax", 1.5, 2.0, True, 5, (30, -1)), ("sparsemax", 2.0, 1.0, False, 0, None),
    ("sparsemax", 2.0, None, True, None, (9, 9)), ("entmax", 1.5, 2.5, True, 0, None),
    ("entmax", 1.25, 3.0, True, -3, (40, 0)),
]


def case_name(normalizer, alpha, softcap, alibi, causal_offset, window):
    name = normalizer + (str(alpha) if normalizer == "entmax" else "")
    return f"{name}-cap{softcap}-alibi{alibi}-{causal_offset}-w{window}"


def kernel_attention(q, k, v, normalizer, alpha, **kwargs):
    if normalizer in ("softmax", "ssmax"):
        return softmax_attention(q, k, v, **kwargs)
    return entmax_attention(q, k, v, alpha=2.0 if normalizer == "sparsemax" else alpha, **kwargs)


def plain_softmax(q, k, v, s, sink, softcap, slopes, causal_offset, window):
    """Softmax with the modifiers materialised in plain torch in the inputs' dtype (no upcast):
    the 16-bit baseline of the error rule, as the plain kernel tests' `plain_attention` is."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = window_keys(q.shape[2], k.shape[2], window or (-1, -1), causal_offset)
    z = q @ k.transpose(-1, -2)
    if s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        z = z * s.to(q.dtype).reshape(-1, 1, 1) * torch.log(n)
    z = z * q.shape[-1] ** -0.5
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if slopes is not None:
        i, j = torch.arange(q.shape[2]).view(-1, 1), torch.arange(k.shape[2])
        z = z - slopes.to(q.dtype).view(-1, q.shape[1], 1,
                                        1) * (j - i - (causal_offset or 0)).abs().to(q.dtype)
    z = z.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        z = torch.cat((z, sink.to(q.dtype).view(-1, 1, 1).expand(*z.shape[:-1], 1)), dim=-1)
    return torch.softmax(z, -1)[..., :k.shape[2]] @ v


def check_against_reference(B, Nq, Nk, D, Dv, normalizer, alpha, softcap, alibi, causal_offset, window,
                            dtype, sink=False):
    scaled = normalizer in ("ssmax", "entmax")
    q, k, v, s = kernel_leaves(B, HQ, HKV, Nq, Nk, D, Dv, DEVICE, dtype, scaled)
    slopes = 0.2 + torch.rand(B, HQ) if alibi else None
    sinks = (2 * torch.randn(HQ)).to(DEVICE).requires_grad_() if sink else None
    inputs = [q, k, v] + ([s] if scaled else []) + ([sinks] if sink else [])
    names = ["dq", "dk", "dv"] + (["ds"] if scaled else []) + (["dsink"] if sink else [])
    kwargs = dict(causal_offset=causal_offset, window_size=window, softcap=softcap)
    out = kernel_attention(q, k, v, normalizer, alpha, length_scale=s, sink=sinks,
                           alibi_slopes=None if slopes is None else slopes.to(DEVICE), **kwargs)

    def reference(args):
        q_, k_, v_, *rest = args
        s_ = rest.pop(0) if scaled else None
        return longattn.scaled_dot_product_attention(
            q_, k_, v_, normalizer=normalizer, alpha=alpha, length_scale=s_, sink=rest[0] if sink else None,
            enable_gqa=True,
            alibi_slopes=None if slopes is None else slopes.to(q_.dtype), backend="reference", **kwargs)

    def plain(args):  # fp16 softmax: the definition materialised in 16 bits
        q_, k_, v_, *rest = args
        s_ = rest.pop(0) if scaled else None
        return plain_softmax(q_, k_, v_, s_, rest[0] if sink else None, softcap, slopes, causal_offset,
                             window)

    sixteen_bit_softmax = dtype != torch.float32 and normalizer in ("softmax", "ssmax")
    check_kernel_call(out, inputs, reference, dtype, names, plain if sixteen_bit_softmax else None)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,softcap,alibi,causal_offset,window", CASES,
                         ids=[case_name(*c) for c in CASES])
def test_matches_the_reference(normalizer, alpha, softcap, alibi, causal_offset, window):
    check_against_reference(2, 37, 70, 16, 24, normalizer, alpha, softcap, alibi, causal_offset, window,
                            torch.float32)


SINK_CASES = [("softmax", 1.5, None), ("ssmax", 1.5, -5), ("sparsemax", 2.0, 0), ("entmax", 1.5, -5),
              ("entmax", 1.25, None)]


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,causal_offset", SINK_CASES,
                         ids=[f"{n}{a if n == 'entmax' else ''}-{o}" for n, a, o in SINK_CASES])
def test_sinks_match_the_reference(normalizer, alpha, causal_offset):
    """A sink per head, alone and (every other case) with the cap and ALiBi; the -5 offset leaves
    the first rows nothing but the sink: output 0, and their share of dsink 0."""
    with_modifiers = causal_offset != 0
    check_against_reference(2, 37, 45, 16, 24, normalizer, alpha, 2.0 if with_modifiers else None,
                            with_modifiers, causal_offset, None, torch.float32, sink=True)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha", [("ssmax", 1.5), ("entmax", 1.5)], ids=["ssmax", "entmax1.5"])
def test_modifiers_in_float16(normalizer, alpha):
    check_against_reference(1, 70, 130, 24, 24, normalizer, alpha, 2.0, True, 60, None, torch.float16,
                            sink=True)


def test_float16_softmax_with_the_modifiers():
    """fp16 softmax held to the reference in fp16 as its baseline (the kernel tests' plain
    materialised baseline takes no modifiers)."""
    q, k, v = (torch.randn(1, 2, 45, 16).to(DEVICE, torch.float16) for _ in range(3))
    slopes = torch.tensor([0.3, 0.6])
    out = softmax_attention(q, k, v, is_causal=True, softcap=1.5, alibi_slopes=slopes.to(DEVICE))
    ref = longattn.scaled_dot_product_attention(*(t.cpu().double() for t in (q, k, v)), is_causal=True,
                                                softcap=1.5, alibi_slopes=slopes.double(),
                                                backend="reference")
    base = longattn.scaled_dot_product_attention(*(t.cpu() for t in (q, k, v)), is_causal=True, softcap=1.5,
                                                 alibi_slopes=slopes.half(), backend="reference")
    check_rule(out.cpu(), base, ref, torch.float16, "out")


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_packed_documents_count_alibi_from_each_documents_end(family):
    """varlen, `causal_from_end`: each document's distances count from its own bottom-right
    diagonal, its slopes its own row of `(num_docs, Hq)`; the cap beside them."""
    lq, lk = [21, 0, 40, 9], [30, 6, 40, 45]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(n)], dtype=torch.int32, device=DEVICE) for n in (lq, lk))
    q = torch.randn(sum(lq), HQ, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(sum(lk), HKV, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    slopes = torch.rand(4, HQ)
    args = dict(max_seqlen_q=max(lq), max_seqlen_k=max(lk), is_causal=True, causal_from_end=True, softcap=2.0,
                alibi_slopes=slopes.to(DEVICE))
    if family == "softmax":
        from longattn.kernels.softmax import softmax_varlen_attention
        out, normalizer = softmax_varlen_attention(q, k, v, cu_q, cu_k, **args), "softmax"
    else:
        from longattn.kernels.entmax import entmax_varlen_attention
        out, normalizer = entmax_varlen_attention(q, k, v, cu_q, cu_k, alpha=1.25, **args), "entmax"
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    q2, k2, v2 = leaves([q, k, v], torch.float64)
    outs = []
    for d in range(len(lq)):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t, (a, b) in
                      ((q2, cu_q[d:d + 2]), (k2, cu_k[d:d + 2]), (v2, cu_k[d:d + 2])))
        o = longattn.scaled_dot_product_attention(qd, kd, vd, causal_offset="bottom_right", softcap=2.0,
                                                  alibi_slopes=slopes[d].double(), normalizer=normalizer,
                                                  alpha=1.25, enable_gqa=True, backend="reference")
        outs.append(o[0].transpose(0, 1))
    ref = torch.cat(outs)
    want = torch.autograd.grad(ref, (q2, k2, v2), do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


def test_custom_ops_opcheck_with_the_modifiers_and_a_window():
    """The ops' schemas take `window_offset`, `softcap`, `alibi_slopes`, `alibi_offset` and `sink`
    (opcheck: schema, fake implementations)."""
    q, k, v = (torch.randn(2, n, 13, 16, device=DEVICE) for n in (4, 2, 2))
    kwargs = {"window_offset": -4, "softcap": 2.0, "alibi_slopes": torch.rand(2, 4, device=DEVICE),
              "alibi_offset": 3, "sink": torch.randn(4, device=DEVICE)}
    opcheck_kernel_ops(q, k, v, None, kwargs)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_sink_edge_cases_on_the_kernels(normalizer):
    """Beside a sink, ALiBi's diagonal 5 keys right of 3 keys counts exactly (not clamped to the
    lengths); and a sink of -inf leaves a row with no key at 0, its gradient 0, not NaN."""
    q = torch.randn(1, 2, 3, 16).to(DEVICE)
    slopes, sink = torch.tensor([0.7, 0.2]), torch.tensor([0.3, -0.5])
    kwargs = dict(causal_offset=5, normalizer=normalizer)
    got = longattn.scaled_dot_product_attention(q, q, q, alibi_slopes=slopes.to(DEVICE), sink=sink.to(DEVICE),
                                                backend="triton", **kwargs)
    want = longattn.scaled_dot_product_attention(*(q.cpu().double(),) * 3, alibi_slopes=slopes.double(),
                                                 sink=sink.double(), backend="reference", **kwargs)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)

    q = torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True)
    off = torch.tensor([float("-inf"), 0.5], device=DEVICE, requires_grad=True)
    out = longattn.scaled_dot_product_attention(q, q, q, causal_offset=-1, sink=off, normalizer=normalizer,
                                                backend="triton")
    assert out.isfinite().all() and (out[:, :, 0] == 0).all()
    dq, dsink = torch.autograd.grad(out.square().sum(), (q, off))
    assert dq.isfinite().all() and dsink[0] == 0 and dsink[1].isfinite()
