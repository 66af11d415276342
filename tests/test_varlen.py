"""`longattn.varlen_attention` (packed documents, flash-attn's varlen layout) against the dense
function applied to each document: the output and every gradient, on the per-document loop
(all normalizers) and on the Triton kernels' varlen mode (softmax, SSMax, sparsemax, entmax),
plus bad inputs.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 is set in conftest.py).
"""

import math

import pytest
import torch

import longattn
from longattn.attention import normalizers
from longattn.kernels import entmax as kem
from longattn.kernels import softmax as ksm

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import check_rule, leaves, tensors
from oracles import attention_oracle, grads

DEVICE = KERNEL_DEVICE
HAS_TRITON_DEVICE = INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="TRITON_INTERPRET is off and there is no GPU")
NORMALIZERS = list(normalizers.names())


def cu(lengths, device=DEVICE):
    """cu_seqlens of documents of these lengths: int32, from 0."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_inputs(lq, lk, Hq, Hkv, D, Dv, dtype, s_kind, device=DEVICE):
    """Packed leaves q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) and s."""
    def leaf(*shape):
        return torch.randn(shape, device=device).to(dtype).requires_grad_()

    q, k, v = leaf(sum(lq), Hq, D), leaf(sum(lk), Hkv, D), leaf(sum(lk), Hkv, Dv)
    if s_kind == "tensor":
        s = (0.4 + torch.rand(Hq, device=device)).to(dtype if dtype == torch.float64 else torch.float32)
        s = s.requires_grad_()
    else:
        s = 0.43 if s_kind == "float" else None
    return q, k, v, s


def per_document(attend, q, k, v, lq, lk):
    """`attend(q_d, k_d, v_d)` on each document's (1, H, n, D) views, concatenated to (total, H, Dv)."""
    outs, bq, bk = [], 0, 0
    for nq, nk in zip(lq, lk):
        docs = (q[bq:bq + nq], k[bk:bk + nk], v[bk:bk + nk])
        q_d, k_d, v_d = (t.transpose(0, 1).unsqueeze(0) for t in docs)
        outs.append(attend(q_d, k_d, v_d)[0].transpose(0, 1))
        bq, bk = bq + nq, bk + nk
    return torch.cat(outs)


def plain_attention(q, k, v, s, is_causal):
    """Softmax / SSMax materialised in plain torch in the inputs' dtype (no upcast), one
    document in (1, H, n, D): the baseline of the error rule."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n_q, n_k = q.shape[2], k.shape[2]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    z = q @ k.transpose(-1, -2)
    if s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        z = z * torch.as_tensor(s).to(q.dtype).expand(q.shape[1]).reshape(-1, 1, 1) * torch.log(n)
    empty = ~allowed.any(-1, keepdim=True)
    z = (q.shape[-1] ** -0.5 * z).masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0)
    return torch.softmax(z, -1).masked_fill(empty, 0.0) @ v


ODD = [1, 17, 0, 33, 5]
CROSS_K = [3, 0, 9, 40, 5]  # doc 1 has queries and no keys (output 0); doc 2 keys and no queries
# (query doc lengths, key doc lengths, Hq, Hkv, D, Dv, causal, length scale)
TRITON_CASES = [
    pytest.param(ODD, ODD, 4, 2, 32, 32, True, "tensor", id="odd-H4-2-D32-causal-ssmax-tensor"),
    pytest.param(ODD, ODD, 2, 2, 24, 40, False, None, id="odd-H2-D24-40"),
    pytest.param(ODD, CROSS_K, 2, 1, 40, 24, True, "tensor", id="cross-H2-1-D40-24-causal-ssmax-tensor"),
    pytest.param(ODD, CROSS_K, 3, 1, 16, 16, False, "float", id="cross-H3-1-D16-ssmax-float"),
    pytest.param([70, 2, 65], [64, 1, 97], 2, 2, 64, 64, True, None, id="blocks-H2-D64-causal"),
    pytest.param([1], [1], 1, 1, 16, 16, False, "tensor", id="one-token-ssmax-tensor"),
]
HALF_IDS = ("odd-H4-2-D32-causal-ssmax-tensor", "cross-H2-1-D40-24-causal-ssmax-tensor")


def triton_params():
    out = [pytest.param(*p.values, torch.float32, id=p.id + "-float32") for p in TRITON_CASES]
    out += [pytest.param(*p.values, torch.float16, id=p.id + "-float16")
            for p in TRITON_CASES if p.id in HALF_IDS]
    return out


@needs_triton
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("lq,lk,Hq,Hkv,D,Dv,causal,s_kind,dtype", triton_params())
def test_triton_matches_per_document_reference(lq, lk, Hq, Hkv, D, Dv, causal, s_kind, dtype):
    args = make_inputs(lq, lk, Hq, Hkv, D, Dv, dtype, s_kind)  # q, k, v, s
    base_args, ref_args = leaves(args), leaves(args, torch.float64)
    s = args[3]
    normalizer = "softmax" if s is None else "ssmax"
    out = longattn.varlen_attention(*args[:3], cu(lq), cu(lk), is_causal=causal, normalizer=normalizer,
                                    length_scale=s, backend="triton")

    def dense(s_, backend):
        return lambda q, k, v: longattn.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=True, length_scale=s_, backend=backend)

    ref = per_document(dense(ref_args[3], "reference"), *ref_args[:3], lq, lk)
    base = per_document(lambda q, k, v: plain_attention(q, k, v, base_args[3], causal),
                        *base_args[:3], lq, lk)
    assert out.shape == ref.shape == (sum(lq), Hq, Dv) and out.dtype == dtype
    out = out.cpu()
    assert out.isfinite().all()
    check_rule(out, base, ref, dtype, "out")

    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu() for g in grads(out, tensors(args), do.to(dtype))]
    g_base = grads(base, tensors(base_args), do.to(dtype))
    g_ref = grads(ref, tensors(ref_args), do)
    for name, g, g_b, g_r in zip("qkvs", got, g_base, g_ref):
        assert g.shape == g_r.shape and g.isfinite().all(), name
        if name == "s" and dtype == torch.float16:
            continue  # held to the dense kernel below: see there
        check_rule(g, g_b, g_r, dtype, f"d{name}")

    # The varlen mode is the dense kernels run on each document: same values up to summation
    # order. In float16 the dense kernels' ds can exceed 2x plain torch's error (it sums a row
    # term built from the float16-rounded output over every row), so there the dense kernels'
    # own ds is the baseline of the rule.
    dense_args = [t.detach().requires_grad_() if torch.is_tensor(t) else t for t in args]
    dense = per_document(
        lambda q, k, v: ksm.softmax_attention(q, k, v, is_causal=causal, length_scale=dense_args[3]),
        *dense_args[:3], lq, lk,
    )
    torch.testing.assert_close(out, dense.cpu(), rtol=1e-6, atol=1e-6)
    g_dense = [g.cpu() for g in grads(dense, tensors(dense_args), do.to(dtype).to(DEVICE))]
    for name, g, g_d in zip("qkvs", got, g_dense):
        torch.testing.assert_close(g, g_d, rtol=1e-5, atol=1e-5, msg=f"d{name} vs the dense kernels")
    if s is not None and torch.is_tensor(s) and dtype == torch.float16:
        check_rule(got[3], g_dense[3], g_ref[3], dtype, "ds")

    # rows of a document without keys: output 0 and gradient 0
    bounds = cu(lq, "cpu").tolist()
    for d, nk in enumerate(lk):
        if nk == 0:
            rows = slice(bounds[d], bounds[d + 1])
            assert (out[rows] == 0).all() and (got[0][rows] == 0).all()


def oracle_per_document(q, k, v, lq, lk, **kw):
    def attend(q_, k_, v_):  # the entmax package takes no empty rows: a document without keys gives 0
        if k_.shape[2] == 0:
            return torch.zeros(*q_.shape[:3], v_.shape[3], dtype=torch.float64)
        return attention_oracle(q_, k_, v_, **kw)

    return per_document(attend, q, k, v, lq, lk)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_loop_matches_oracle(backend, normalizer, causal):
    """The per-document loop against the float64 oracles (torch softmax, the entmax package),
    each document separately; with a tensor length scale (the length-scaled variants)."""
    lq, lk = ODD, [2, 17, 3, 0, 6]
    q, k, v, s = make_inputs(lq, lk, 4, 2, 8, 8, torch.float64, "tensor", device="cpu")
    out = longattn.varlen_attention(q, k, v, cu(lq, "cpu"), cu(lk, "cpu"), is_causal=causal,
                                    normalizer=normalizer, length_scale=s, backend=backend)
    ref = oracle_per_document(q, k, v, lq, lk, normalizer=normalizer, is_causal=causal, length_scale=s)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    do = torch.randn_like(ref)
    for name, g, g_r in zip("qkvs", grads(out, [q, k, v, s], do), grads(ref, [q, k, v, s], do)):
        torch.testing.assert_close(g, g_r, rtol=1e-6, atol=1e-8, msg=f"d{name}")


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_loop_float32_torch_backend(normalizer):
    """float32 through the blockwise torch path: one document of queries without keys, one of
    keys without queries, GQA; no length scale (ssmax brings its own s = 1)."""
    lq, lk = [4, 17, 0, 9], [4, 0, 5, 30]
    q, k, v, _ = make_inputs(lq, lk, 2, 1, 16, 8, torch.float32, None, device="cpu")
    out = longattn.varlen_attention(q, k, v, cu(lq, "cpu"), cu(lk, "cpu"), normalizer=normalizer,
                                    alpha=1.3, backend="torch")
    ref = oracle_per_document(q, k, v, lq, lk, normalizer=normalizer, alpha=1.3)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    assert (out[4:21] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_batches(backend):
    """Zero documents, or only empty documents."""
    for lq, lk in (([], []), ([0, 0], [0, 0]), ([0, 3], [2, 0])):
        q, k, v, _ = make_inputs(lq, lk, 2, 2, 8, 4, torch.float32, None, device="cpu")
        out = longattn.varlen_attention(q, k, v, cu(lq, "cpu"), cu(lk, "cpu"), backend=backend)
        assert out.shape == (sum(lq), 2, 4) and (out == 0).all()


@needs_triton
def test_triton_ssmax_default_scale_and_hints():
    """normalizer="ssmax" without s uses s = 1; max_seqlen hints above the true maximum are fine."""
    lq = [5, 12]
    q, k, v, _ = make_inputs(lq, lq, 2, 2, 16, 16, torch.float32, None)
    q, k, v = (t.detach() for t in (q, k, v))
    out = longattn.varlen_attention(q, k, v, cu(lq), cu(lq), 40, 50, normalizer="ssmax", is_causal=True,
                                    backend="triton")
    ref = longattn.varlen_attention(q, k, v, cu(lq), cu(lq), normalizer="ssmax", is_causal=True,
                                    backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


ENTMAX_CASES = [  # (query doc lengths, key doc lengths, Hq, Hkv, D, Dv, causal, length scale, alpha)
    pytest.param(ODD, ODD, 4, 2, 32, 32, True, "tensor", 1.5, id="odd-H4-2-D32-causal-scaled-a1.5"),
    pytest.param(ODD, CROSS_K, 2, 1, 40, 24, True, None, 2.0, id="cross-H2-1-D40-24-causal-sparsemax"),
    pytest.param(ODD, CROSS_K, 3, 1, 16, 16, False, "tensor", 1.25, id="cross-H3-1-D16-scaled-a1.25"),
    pytest.param([70, 2, 65], [64, 1, 97], 2, 2, 64, 64, True, None, 1.25, id="blocks-H2-D64-causal-a1.25"),
]


@needs_triton
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("lq,lk,Hq,Hkv,D,Dv,causal,s_kind,alpha", ENTMAX_CASES)
def test_triton_entmax_matches_per_document_reference(lq, lk, Hq, Hkv, D, Dv, causal, s_kind, alpha, dtype):
    """The entmax kernels' varlen mode: against the float64 oracle (the `entmax` package) per
    document, with the reference backend in the same dtype as the baseline of the error rule,
    and equal up to summation order to the dense kernels run on each document."""
    args = make_inputs(lq, lk, Hq, Hkv, D, Dv, dtype, s_kind)  # q, k, v, s
    base_args, ref_args = leaves(args), leaves(args, torch.float64)
    out = longattn.varlen_attention(*args[:3], cu(lq), cu(lk), is_causal=causal, normalizer="entmax",
                                    alpha=alpha, length_scale=args[3], backend="triton")
    ref = oracle_per_document(*ref_args[:3], lq, lk, normalizer="entmax", alpha=alpha, is_causal=causal,
                              length_scale=ref_args[3])
    base = longattn.varlen_attention(*base_args[:3], cu(lq, "cpu"), cu(lk, "cpu"), is_causal=causal,
                                     normalizer="entmax", alpha=alpha, length_scale=base_args[3],
                                     backend="reference")
    assert out.shape == ref.shape == (sum(lq), Hq, Dv) and out.dtype == dtype
    check_rule(out.detach().cpu(), base.detach(), ref.detach(), dtype, "out")
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu() for g in grads(out, tensors(args), do.to(DEVICE, dtype))]
    g_base = grads(base, tensors(base_args), do.to(dtype))
    for name, g, g_b, g_r in zip("qkvs", got, g_base, grads(ref, tensors(ref_args), do)):
        assert g.shape == g_r.shape and g.isfinite().all(), name
        check_rule(g, g_b, g_r, dtype, f"d{name}")

    dense_args = [t.detach().requires_grad_() if torch.is_tensor(t) else t for t in args]
    dense = per_document(
        lambda q, k, v: kem.entmax_attention(
            q, k, v, alpha=alpha, is_causal=causal, length_scale=dense_args[3]
        ),
        *dense_args[:3], lq, lk,
    )
    torch.testing.assert_close(out.detach().cpu(), dense.detach().cpu(), rtol=1e-6, atol=1e-6)
    g_dense = [g.cpu() for g in grads(dense, tensors(dense_args), do.to(DEVICE, dtype))]
    for name, g, g_d in zip("qkvs", got, g_dense):
        torch.testing.assert_close(g, g_d, rtol=1e-5, atol=1e-5, msg=f"d{name} vs the dense kernels")


@needs_triton
def test_varlen_ops_opcheck_and_compile():
    """The custom ops' varlen mode passes opcheck, and torch.compile(fullgraph=True) traces the
    kernels' varlen entry, forward and backward."""
    lq, lk = [3, 0, 17], [5, 2, 9]
    q, k, v, s = make_inputs(lq, lk, 4, 2, 16, 8, torch.float32, "tensor")
    cq, ck = cu(lq), cu(lk)
    sd = s.detach()
    fwd_args = (q.detach(), k.detach(), v.detach(), 0.25, 0, sd, cq, ck, 17, 9)
    torch.library.opcheck(torch.ops.longattn.softmax_attention_fwd, fwd_args)
    out, lse = ksm.softmax_attention_fwd(*fwd_args)
    assert out.shape == (20, 4, 8) and lse.shape == (4, 20)
    bwd_args = (torch.randn_like(out), *fwd_args[:3], out, lse, 0.25, 0, sd, torch.randn_like(lse),
                cq, ck, 17, 9)
    torch.library.opcheck(torch.ops.longattn.softmax_attention_bwd, bwd_args)
    entmax_args = (*fwd_args[:4], 1.5, *fwd_args[4:])
    torch.library.opcheck(torch.ops.longattn.entmax_attention_fwd, entmax_args)
    out, row_max, tau, flags = kem.entmax_attention_fwd(*entmax_args)
    assert out.shape == (20, 4, 8) and row_max.shape == tau.shape == (4, 20)
    assert flags.shape == (12, 1, 1)  # 3 documents x 4 heads, one 32 x 32 tile each
    torch.library.opcheck(torch.ops.longattn.entmax_attention_bwd,
                          (torch.randn_like(out), *fwd_args[:3], row_max, tau, flags,
                           0.25, 1.5, 0, sd, cq, ck, 17, 9))

    def attend(q, k, v, s):
        return ksm.softmax_varlen_attention(q, k, v, cq, ck, 17, 9, is_causal=True, length_scale=s,
                                            return_lse=True)

    compiled = torch.compile(attend, fullgraph=True)
    results = [fn(q, k, v, s) for fn in (compiled, attend)]
    torch.testing.assert_close(results[0], results[1])
    upstream = (torch.randn_like(results[1][0]), torch.randn_like(results[1][1]))
    got, expected = (torch.autograd.grad(r, (q, k, v, s), upstream) for r in results)
    torch.testing.assert_close(got, expected)


def _bad_cases():
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 6)
    cq, ck = cu([3, 4], "cpu"), cu([4, 5], "cpu")
    ok = dict(query=q, key=k, value=v, cu_seqlens_q=cq, cu_seqlens_k=ck)
    return [
        ("rank", dict(ok, query=q[None]), ValueError, r"query must have shape \(total, H, D\)"),
        ("value-rank", dict(ok, value=v[..., None]), ValueError, r"value must have shape \(total, H, D\)"),
        ("not-tensor", dict(ok, key=k.tolist()), TypeError, "key must be a torch.Tensor"),
        ("int-query", dict(ok, query=q.long()), TypeError, "query must be float16"),
        ("dtype-mismatch", dict(ok, key=k.double()), TypeError, "share a dtype"),
        ("head-dim", dict(ok, key=k[..., :4]), ValueError, "same head dim"),
        ("kv-length", dict(ok, value=v[:8]), ValueError, "same total length"),
        ("kv-heads", dict(ok, value=v[:, :1]), ValueError, "same number of heads"),
        ("gqa", dict(ok, key=torch.randn(9, 3, 8), value=torch.randn(9, 3, 6)), ValueError, "multiple"),
        ("cu-float", dict(ok, cu_seqlens_q=cq.float()), TypeError, "cu_seqlens_q must be int32 .* or int64"),
        ("cu-int16", dict(ok, cu_seqlens_k=ck.short()), TypeError, "cu_seqlens_k must be int32 .* or int64"),
        ("cu-list", dict(ok, cu_seqlens_k=[0, 4, 9]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
        ("cu-2d", dict(ok, cu_seqlens_q=cq[None]), ValueError, "cu_seqlens_q must be 1-D"),
        ("cu-empty", dict(ok, cu_seqlens_q=cq[:0]), ValueError, "cu_seqlens_q must be 1-D"),
        ("cu-start", dict(ok, cu_seqlens_q=cq + 1), ValueError, "cu_seqlens_q must start at 0"),
        ("cu-decreasing", dict(ok, cu_seqlens_k=torch.tensor([0, 6, 2, 9], dtype=torch.int32)), ValueError,
         "cu_seqlens_k must be non-decreasing"),
        ("cu-end", dict(ok, cu_seqlens_q=cu([3, 3], "cpu")), ValueError,
         "cu_seqlens_q must end at the total"),
        ("doc-count", dict(ok, cu_seqlens_k=cu([4, 0, 5], "cpu")), ValueError, "same number of documents"),
        ("max-small", dict(ok, max_seqlen_q=3), ValueError, r"max_seqlen_q \(3\) is below"),
        ("max-k-small", dict(ok, max_seqlen_k=4), ValueError, r"max_seqlen_k \(4\) is below"),
        ("max-float", dict(ok, max_seqlen_k=5.0), TypeError, "max_seqlen_k must be None, an int or a 0-d"),
        ("max-tensor-1d", dict(ok, max_seqlen_q=torch.tensor([4])), TypeError, "max_seqlen_q must be None"),
        ("max-tensor-float", dict(ok, max_seqlen_q=torch.tensor(4.0)), TypeError, "max_seqlen_q must be"),
        ("max-tensor-small", dict(ok, max_seqlen_q=torch.tensor(3)), ValueError, r"max_seqlen_q \(3\) is"),
        ("causal", dict(ok, is_causal=1), TypeError, "is_causal"),
        ("normalizer", dict(ok, normalizer="relu"), ValueError, "normalizer"),
        ("backend", dict(ok, backend="cuda"), ValueError, "backend"),
        ("alpha", dict(ok, alpha=3.0), ValueError, "alpha"),
        ("length-scale", dict(ok, length_scale=torch.ones(2)), ValueError, "length_scale"),
        ("scale", dict(ok, scale="x"), TypeError, "scale"),
    ]


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("normalizer", ["softmax", "entmax"])
def test_hugging_face_offsets_and_lengths(backend, normalizer):
    """int64 cu_seqlens and 0-d tensor max lengths (what transformers' packing collators pass)
    give exactly the int32 / int result."""
    device = "cpu" if backend != "triton" else DEVICE
    cq, ck = cu([3, 0, 5], device), cu([4, 2, 6], device)
    q = torch.randn(8, 4, 16, device=device)
    k, v = torch.randn(12, 2, 16, device=device), torch.randn(12, 2, 8, device=device)
    kwargs = dict(is_causal=True, normalizer=normalizer, backend=backend)
    want = longattn.varlen_attention(q, k, v, cq, ck, 5, 6, **kwargs)
    lengths = torch.tensor(5), torch.tensor(6, dtype=torch.int32)
    got = longattn.varlen_attention(q, k, v, cq.long(), ck.long(), *lengths, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,exc,match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        longattn.varlen_attention(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_rejects_device_mismatch():
    q, k, v = torch.randn(7, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens_q must be on"):
        longattn.varlen_attention(q, k, v, cu([3, 4], "cuda"), cu([4, 5], "cpu"))
    with pytest.raises(ValueError, match="one device"):
        longattn.varlen_attention(q.cuda(), k, v, cu([3, 4], "cpu"), cu([4, 5], "cpu"))
