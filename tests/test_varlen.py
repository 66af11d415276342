"""`longattn.varlen_attention` (packed documents, flash-attn's varlen layout) against the dense
function applied to each document: the output and every gradient, on the per-document loop
(all normalizers) and on the Triton kernels' varlen mode (softmax, SSMax, sparsemax, entmax),
causal offsets per document (an int from each document's start, "bottom_right" from its end)
and how flash-attn's adaptor maps them, plus bad inputs. `torch.compile` and host syncs are
`tests/test_varlen_compile.py`'s.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 is set in conftest.py).
"""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import longattn
from longattn.attention import backends, dispatch, normalizers, reference
from longattn.kernels import entmax as kem
from longattn.kernels import softmax as ksm

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import allowed_keys, check_rule, leaves, tensors
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


# ---------------------------------------------------------------------------------------------
# Causal offsets per document

# a prefix continued (3 queries after 4 cached keys), decoding rows (1 query, 6 keys; 1, 2),
# keys and no queries, as many queries as keys, queries and no keys, more queries than keys
OFFSET_LQ, OFFSET_LK = [3, 1, 0, 4, 1, 5, 1], [7, 6, 2, 4, 0, 3, 2]
OFFSET_SETTINGS = [pytest.param(n, a, id=n + ("1.5" if n == "entmax" else ""))
                   for n, a in (("softmax", 1.5), ("ssmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5))]


def document_offset(causal_offset, n_q: int, n_k: int) -> int:
    """The int offset `causal_offset` means in a document of `n_q` queries and `n_k` keys."""
    return n_k - n_q if causal_offset == "bottom_right" else causal_offset


def reference_per_document(q, k, v, lq, lk, causal_offset, **kw):
    """The dense reference backend on each document, its offset given as an int."""
    def attend(q_, k_, v_):
        offset = document_offset(causal_offset, q_.shape[2], k_.shape[2])
        return longattn.scaled_dot_product_attention(q_, k_, v_, enable_gqa=True, causal_offset=offset,
                                                     backend="reference", **kw)

    return per_document(attend, q, k, v, lq, lk)


def offset_params():
    """Every normalizer at each offset on the loop; on the kernels every normalizer bottom-right
    and both kernel families at the int offsets (the interpreter is slow)."""
    params = []
    for backend in ("reference", "torch", "triton"):
        for offset in ("bottom_right", -2, 3):
            for setting in OFFSET_SETTINGS:
                at_int = offset != "bottom_right"
                if backend == "triton" and at_int and setting.id not in ("softmax", "entmax1.5"):
                    continue
                marks = needs_triton if backend == "triton" else ()
                params.append(pytest.param(backend, *setting.values, offset, marks=marks,
                                           id=f"{backend}-{setting.id}-{offset}"))
    return params


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("backend,normalizer,alpha,causal_offset", offset_params())
def test_causal_offset_per_document(backend, normalizer, alpha, causal_offset):
    """`causal_offset` applies per document, rows and keys counted from its start, and
    "bottom_right" is each document's own `n_k - n_q`: the output and the gradients of q, k, v
    and a learned length scale (whose `n_i` counts the keys under the shifted mask) against the
    float64 reference on each document. Rows left with no key give 0 and gradient 0."""
    lq, lk = OFFSET_LQ, OFFSET_LK
    kernel = backend == "triton"
    dtype, device = (torch.float32, DEVICE) if kernel else (torch.float64, "cpu")
    args = make_inputs(lq, lk, 2, 1, 8, 8, dtype, "tensor", device=device)  # q, k, v, s
    ref_args = leaves(args, torch.float64)
    kw = dict(normalizer=normalizer, alpha=alpha)
    out = longattn.varlen_attention(*args[:3], cu(lq, device), cu(lk, device), causal_offset=causal_offset,
                                    length_scale=args[3], backend=backend, **kw)
    ref = reference_per_document(*ref_args[:3], lq, lk, causal_offset, length_scale=ref_args[3], **kw)
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [x.cpu() for x in (out, *grads(out, args, do.to(device, dtype)))]
    want = [ref, *grads(ref, ref_args, do)]
    names = ("out", "dq", "dk", "dv", "ds")
    if kernel:  # float32: the rule against the reference backend's loop in float32
        base_args = leaves(args)
        base = longattn.varlen_attention(*base_args[:3], cu(lq, "cpu"), cu(lk, "cpu"),
                                         causal_offset=causal_offset, length_scale=base_args[3],
                                         backend="reference", **kw)
        for name, x, x_base, x_ref in zip(names, got, [base, *grads(base, base_args, do.to(dtype))], want):
            check_rule(x, x_base, x_ref, dtype, name)
    else:
        for name, x, x_ref in zip(names, got, want):
            torch.testing.assert_close(x, x_ref, rtol=1e-7, atol=1e-9, msg=name)
    bounds = cu(lq, "cpu").tolist()
    for d, (n_q, n_k) in enumerate(zip(lq, lk)):
        sees_none = ~allowed_keys(n_q, n_k, document_offset(causal_offset, n_q, n_k)).any(-1)
        rows = torch.arange(bounds[d], bounds[d + 1])[sees_none]
        assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all(), f"document {d}"


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_dense_bottom_right_is_nk_minus_nq(backend):
    """The dense API's `causal_offset="bottom_right"` is `Nk - Nq`, so the loop's dense calls
    (and the docstring's equivalent code) give each document its own."""
    for n_q, n_k in ((3, 9), (9, 4)):
        q = torch.randn(1, 2, n_q, 8, device=DEVICE if backend == "triton" else "cpu")
        k = torch.randn(1, 2, n_k, 8, device=q.device)
        want = longattn.scaled_dot_product_attention(q, k, k, causal_offset=n_k - n_q, backend=backend)
        got = longattn.scaled_dot_product_attention(q, k, k, causal_offset="bottom_right", backend=backend)
        assert torch.equal(got, want)
    weights = longattn.attention.attention_weights(q, k, causal_offset="bottom_right")
    assert torch.equal(weights, longattn.attention.attention_weights(q, k, causal_offset=n_k - n_q))


def test_is_causal_with_an_offset_is_the_offset():
    """As in the dense API, an offset implies causal: `is_causal=True` beside it changes nothing."""
    lq, lk = OFFSET_LQ, OFFSET_LK
    q, k, v, _ = make_inputs(lq, lk, 2, 1, 8, 8, torch.float64, None, device="cpu")
    for offset in ("bottom_right", -2):
        got, want = (longattn.varlen_attention(q, k, v, cu(lq, "cpu"), cu(lk, "cpu"), causal_offset=offset,
                                               is_causal=flag, backend="reference") for flag in (True, False))
        assert torch.equal(got, want)


def packed_call(monkeypatch, *args, **kwargs):
    """The call `varlen_attention(*args, **kwargs)` hands the dispatch."""
    calls = []
    monkeypatch.setattr(dispatch, "run", lambda call, backend: calls.append(call))
    longattn.varlen_attention(*args, **kwargs)
    return calls[0]


@pytest.mark.parametrize("causal_offset,lk,hints,same_tensor,expected", [
    pytest.param("bottom_right", [5, 1, 4], (3, 5), False, (True, -1), id="bottom-right-any-lengths"),
    pytest.param(0, [3, 0, 4], None, False, (True, -1), id="start-equal-lengths"),
    pytest.param(2, [3, 0, 4], None, False, (False, 2), id="start-window"),
    pytest.param(0, [3, 0, 4], (3, 4), True, (True, -1), id="start-one-tensor-hinted"),
    pytest.param(0, [3, 0, 4], (3, 4), False, "not read", id="start-hinted-unknown"),
    pytest.param(0, [5, 1, 4], None, False, "as many queries as keys", id="start-unequal-lengths"),
    pytest.param(-1, [3, 0, 4], None, False, "at least 0", id="start-below-bottom-right"),
])
def test_flash_maps_packed_causal_offsets(monkeypatch, causal_offset, lk, hints, same_tensor, expected):
    """flash-attn's varlen causal mask is bottom-right in each document: "bottom_right" maps to
    it for any lengths, an offset from each document's start only where every document is known
    to have as many queries as keys (one cu_seqlens tensor for both, or offsets read on the host).
    Else the reason."""
    lq = [3, 0, 4]
    q, k, v, _ = make_inputs(lq, lk, 2, 1, 16, 16, torch.float16, None, device="cpu")
    cq = cu(lq, "cpu")
    ck = cq if same_tensor else cu(lk, "cpu")
    call = packed_call(monkeypatch, q, k, v, cq, ck, *(hints or ()), causal_offset=causal_offset)
    (causal, (_, right)), reason = backends._flash_window(call)
    if isinstance(expected, str):
        assert expected in reason
    else:
        assert reason == "" and (causal, right) == expected


def test_flash_length_factor_counts_bottom_right_keys(monkeypatch):
    """SSMax's factor for flash-attn, packed and bottom-right: `s_h ln(n_i)` with `n_i` counted
    under each document's own offset, as the reference counts it."""
    lq, lk = OFFSET_LQ, OFFSET_LK
    q, k, v, s = make_inputs(lq, lk, 2, 1, 8, 8, torch.float32, "tensor", device="cpu")
    call = packed_call(monkeypatch, q, k, v, cu(lq, "cpu"), cu(lk, "cpu"), max(lq), max(lk),
                       causal_offset="bottom_right", length_scale=s)
    got = backends._flash_length_factor(call)[..., 0]  # (total_q, Hq)
    bounds = cu(lq, "cpu").tolist()
    for d, (n_q, n_k) in enumerate(zip(lq, lk)):
        allowed, _ = reference.split_mask(None, n_k - n_q, n_q, n_k, "cpu", torch.float32)
        want = reference.length_factor(s, allowed, 2, torch.float32)[..., 0].T
        torch.testing.assert_close(got[bounds[d]:bounds[d + 1]], want)


# ---------------------------------------------------------------------------------------------
# Both max lengths given, as Hugging Face's packed batches call it: the offsets are trusted, never
# read on the host, so the one-launch backends run without a host sync, and
# torch.compile(fullgraph=True) traces every backend, the per-document loop through its custom
# ops (`dispatch._run_documents_op`), forward and gradients equal to eager.

HINTS = max(OFFSET_LQ), max(OFFSET_LK)  # max_seqlen_q, max_seqlen_k
# Reads of a tensor's values into Python: on a GPU, each is a host sync.
HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__")


class HostReads(TorchFunctionMode):
    """Records the host reads (`HOST_READS`) of the code run under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def packed(backend, dtype=torch.float32):
    """Leaves q, k, v, a learned `(Hq,)` length scale, and the int32 cu_seqlens, on the device the
    backend runs on."""
    device = DEVICE if backend == "triton" else "cpu"
    lq, lk = OFFSET_LQ, OFFSET_LK
    return (*make_inputs(lq, lk, 2, 1, 16, 8, dtype, "tensor", device=device), cu(lq, device), cu(lk, device))


def compiled_and_eager(attention, inputs, backend="aot_eager"):
    """`attention(*inputs)` compiled with fullgraph=True (a graph break fails) and eager: the
    outputs, then the gradients of each input."""
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    outs = [fn(*inputs) for fn in (compiled, attention)]
    do = torch.randn_like(outs[1])
    return [[out, *grads(out, inputs, do)] for out in outs]


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("normalizer,alpha", OFFSET_SETTINGS)
def test_compile_fullgraph_equals_eager(backend, normalizer, alpha):
    """With both max lengths given, fullgraph compilation traces the public function on every
    backend (the loop's, reading the offsets, inside custom ops whose backward recomputes each
    document), bottom-right, with a learned length scale: forward and gradients equal eager."""
    q, k, v, s, cq, ck = packed(backend)

    def attention(q, k, v, s):
        return longattn.varlen_attention(q, k, v, cq, ck, *HINTS, causal_offset="bottom_right",
                                         length_scale=s, backend=backend, normalizer=normalizer, alpha=alpha)

    got, want = compiled_and_eager(attention, (q, k, v, s))
    for name, g, w in zip(("out", "dq", "dk", "dv", "ds"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=name)


def test_compile_inductor_and_a_float_length_scale():
    """The default backend (inductor) compiles the loop's ops too; an int offset, and SSMax's
    default length scale (a float, carried among the ops' settings)."""
    q, k, v, _, cq, ck = packed("torch")

    def attention(q, k, v):
        out = longattn.varlen_attention(q, k, v, cq, ck, *HINTS, causal_offset=-1, normalizer="ssmax",
                                        backend="torch")
        return out * 2  # something for inductor to fuse

    got, want = compiled_and_eager(attention, (q, k, v), backend="inductor")
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=name)


def test_loop_ops_opcheck_and_first_order_only(monkeypatch):
    """The loop's forward op passes opcheck (its fake, its autograd registration, its backward op
    traced by AOT autograd); a second derivative through its backward raises."""
    q, k, v, s, cq, ck = packed("torch")
    call = packed_call(monkeypatch, q, k, v, cq, ck, *HINTS, causal_offset="bottom_right",
                       normalizer="entmax", length_scale=s)
    args = dispatch._op_args(call, backends.TORCH)
    torch.library.opcheck(torch.ops.longattn.packed_documents_fwd, args)
    out = torch.ops.longattn.packed_documents_fwd(*args)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="packed_documents_bwd is not supported"):
        torch.autograd.grad(dq.sum(), q)


@needs_triton
@pytest.mark.parametrize("normalizer", ["ssmax", "entmax"])
def test_one_launch_makes_no_host_read(normalizer):
    """Given both max lengths, the kernels' path reads no tensor value into Python, forward and
    backward (on a GPU, no host sync); without them the offsets are read, and checked."""
    q, k, v, s, cq, ck = packed("triton")
    for hints, expect_reads in ((HINTS, False), ((), True)):
        with HostReads() as mode:
            out = longattn.varlen_attention(q, k, v, cq, ck, *hints, causal_offset="bottom_right",
                                            normalizer=normalizer, length_scale=s, backend="triton")
            grads(out, (q, k, v, s), torch.ones_like(out))
        assert bool(mode.seen) == expect_reads, mode.seen


def test_flash_adaptor_makes_no_host_read(monkeypatch):
    """flash-attn's causal mapping and SSMax's folded factor, for a packed call given both max
    lengths, read no tensor value into Python (flash-attn itself takes the cu_seqlens as they are):
    bottom-right, and is_causal with one cu_seqlens tensor for queries and keys."""
    q, k, v, s, cq, ck = packed("torch", torch.float16)
    kv = q[:, :1].detach()
    for args, causal_offset in (((q, k, v, cq, ck), "bottom_right"), ((q, kv, kv, cq, cq), 0)):
        call = packed_call(monkeypatch, *args, *HINTS, causal_offset=causal_offset, length_scale=s)
        with HostReads() as mode:
            (causal, _), reason = backends._flash_window(call)
            backends._flash_length_factor(call)
        assert causal and reason == "" and not mode.seen, mode.seen


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
        ("offset-name", dict(ok, causal_offset="bottom-right"), ValueError,
         "causal_offset must be None, an int or 'bottom_right'; got 'bottom-right'"),
        ("offset-float", dict(ok, causal_offset=1.5), TypeError, "causal_offset must be None, an int or"),
        ("offset-bool", dict(ok, causal_offset=True), TypeError, "causal_offset must be None, an int or"),
        ("offset-tensor", dict(ok, causal_offset=torch.tensor(1)), TypeError, "causal_offset must be None"),
        # one hint given: the offsets are still read and checked
        ("cu-start-one-hint", dict(ok, cu_seqlens_q=cq + 1, max_seqlen_q=4), ValueError,
         "cu_seqlens_q must start at 0"),
        ("cu-end-one-hint", dict(ok, cu_seqlens_k=cu([4, 4], "cpu"), max_seqlen_k=5), ValueError,
         "cu_seqlens_k must end at the total"),
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
