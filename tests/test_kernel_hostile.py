"""The Triton kernels (`kernels/`) under inputs and callers that other tests do not send: bfloat16
under the interpreter (refused: its tl.dot multiplies raw bits), +-inf in a query or a key (NaN
exactly where the float64 reference has it), double backward (refused, loudly), and the torch.func
transforms `grad` and `vmap` (equal to plain autograd and to a Python loop).

Small odd shapes: on CPU the kernels run in the Triton interpreter (tests/conftest.py).
"""

from functools import partial

import pytest
import torch
from torch.func import grad, vmap

import longattn
from longattn.kernels import common
from longattn.kernels import entmax as kem
from longattn.kernels import softmax as ksm

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import allowed_keys, leaves
from oracles import grads, rel_err

DEVICE = KERNEL_DEVICE
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

# (the normalizer's settings of longattn.scaled_dot_product_attention, the kernels' entry)
KERNELS = [
    pytest.param({"normalizer": "softmax"}, ksm.softmax_attention, id="softmax"),
    pytest.param({"normalizer": "entmax", "alpha": 1.5}, partial(kem.entmax_attention, alpha=1.5),
                 id="entmax1.5"),
    pytest.param({"normalizer": "entmax", "alpha": 2.0}, partial(kem.entmax_attention, alpha=2.0),
                 id="sparsemax"),
]


def randn(*shape, requires_grad=False):
    return torch.randn(shape).to(DEVICE).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------
# bfloat16 under the interpreter
# ----------------------------------------------------------------------------------------------

CU = torch.tensor([0, 3, 8], dtype=torch.int32)
ENTRIES = [
    pytest.param(lambda q: ksm.softmax_attention(q, q, q), 4, id="softmax"),
    pytest.param(lambda q: kem.entmax_attention(q, q, q), 4, id="entmax"),
    pytest.param(lambda q: ksm.softmax_varlen_attention(q, q, q, CU, CU, 5, 5), 3, id="softmax-varlen"),
    pytest.param(lambda q: kem.entmax_varlen_attention(q, q, q, CU, CU, 5, 5), 3, id="entmax-varlen"),
]


@pytest.mark.parametrize("flag", ["1", "true", "ON", "yes"])
@pytest.mark.parametrize("attend,ndim", ENTRIES)
def test_bfloat16_under_the_interpreter_is_refused(attend, ndim, flag, monkeypatch):
    """The interpreter's tl.dot multiplies the raw bits of bfloat16 operands (the output errs by
    ~1e9 relative): every entry refuses it, reading TRITON_INTERPRET at the call."""
    monkeypatch.setenv("TRITON_INTERPRET", flag)
    q = torch.randn((1, 2, 8, 16) if ndim == 4 else (8, 2, 16), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 is not supported under the Triton interpreter"):
        attend(q)


def test_bfloat16_with_the_interpreter_off_passes_the_checks(monkeypatch):
    """On a GPU (interpreter off) bfloat16 stays allowed; float16 is allowed either way."""
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common.check_inputs(q, q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    common.check_inputs(q.half(), q.half(), q.half())


# ----------------------------------------------------------------------------------------------
# +-inf in a query or a key
# ----------------------------------------------------------------------------------------------

N, D, POS = 37, 16, 20  # two key tiles in fp32; the inf sits in row / key POS of head 1


def inf_inputs(where, value):
    """q, k, v (1, 2, N, D) with `value` in one element of head 1: in query row POS ("query"), in
    key POS ("key"; a causal row before it cannot see it), or in key 0 with query 0 positive
    there ("key0": causal row 0 sees key 0 only, so -inf leaves it only -inf logits)."""
    q, k, v = torch.randn(1, 2, N, D), torch.randn(1, 2, N, D), torch.randn(1, 2, N, D)
    if where == "query":
        q[0, 1, POS, 3] = value
    elif where == "key":
        k[0, 1, POS, 3] = value
    else:
        k[0, 1, 0, 3], q[0, 1, 0, 3] = value, 1.0
    return [t.to(DEVICE).requires_grad_() for t in (q, k, v)]


def check_nan_pattern(got, ref, needed, what):
    """Rows (of dQ, dK or dV) NaN at least where `needed`, at most where the reference's are: its
    products spread 0 * inf and 0 * NaN further (a matmul through an inf key gives every row's dQ
    NaN), the kernels spread 0 * NaN only within a tile, to keys a NaN row cannot see but whose
    tile holds some it can. Finite values close to the reference's where both are finite."""
    got_nan, ref_nan = got.isnan().any(-1), ref.isnan().any(-1)
    assert (got_nan >= needed).all(), f"{what} is finite where it depends on the inf"
    assert (got_nan <= ref_nan).all(), f"{what} is NaN where the reference's is not"
    both = ~got.isnan() & ~ref.isnan()
    assert got[both].isfinite().all(), what
    assert rel_err(got[both], ref[both]) < 1e-5, what


INF_CASES = [
    pytest.param(where, value, causal, id=f"{name}-{'causal' if causal else 'full'}")
    for where, value, name in [("query", float("inf"), "q+inf"), ("query", float("-inf"), "q-inf"),
                               ("key", float("inf"), "k+inf"), ("key", float("-inf"), "k-inf"),
                               ("key0", float("-inf"), "k0-only-neg-inf")]
    for causal in (False, True)
    if causal or where != "key0"  # without the mask row 0 sees finite logits beside the -inf
]


@pytest.mark.parametrize("where,value,causal", INF_CASES)
@pytest.mark.parametrize("settings,attend", KERNELS)
def test_inf_spoils_the_rows_the_reference_spoils(settings, attend, where, value, causal):
    """A row whose logits hold +inf (inf - inf in the normalizer), or only -inf on the keys it
    sees (0 / 0), gives NaN exactly where the float64 reference does; one with a -inf beside
    finite logits gives that key weight 0. A causal row before the inf key stays finite (SDPA's
    math backend differs here: it adds its -inf mask to the +inf logit). Gradients are NaN at
    least where they depend on a NaN row, and at most where the reference's are."""
    args = inf_inputs(where, value)
    out = attend(*args, is_causal=causal)
    ref_args = leaves(args, torch.float64)
    ref = longattn.scaled_dot_product_attention(*ref_args, **settings, is_causal=causal, backend="reference")
    nan_rows = ref.isnan().any(-1)  # (1, 2, N)
    assert nan_rows.any() and not nan_rows[:, 0].any()
    assert torch.equal(out.detach().cpu().isnan(), ref.isnan())
    if where == "key" and causal:  # the rows before the inf key do not see it
        assert out[:, :, :POS].isfinite().all()
    finite = ~nan_rows
    assert rel_err(out.detach().cpu()[finite], ref.detach()[finite]) < 1e-5

    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu() for g in grads(out, args, do.float().to(DEVICE))]
    expected = grads(ref, ref_args, do)
    allowed = allowed_keys(N, N, 0 if causal else None)
    seen_keys = (allowed & nan_rows[..., None]).any(-2)  # (1, 2, N): keys a NaN row sees
    for name, g, g_ref, needed in zip("qkv", got, expected, (nan_rows, seen_keys, seen_keys), strict=True):
        check_nan_pattern(g, g_ref, needed, f"d{name}")


def test_softmax_lse_of_inf_rows():
    """The lse is NaN for a row with a +inf logit, -inf (log 0) for one with only -inf ones
    (row 0 here), finite elsewhere."""
    q, k, v = (t.detach() for t in inf_inputs("key0", float("-inf")))
    k[0, 1, POS, 5] = float("inf")
    _, lse = ksm.softmax_attention(q, k, v, is_causal=True, return_lse=True)
    ref = longattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                backend="reference")
    nan_rows = ref.isnan().any(-1).to(DEVICE)
    only_neg_inf = torch.zeros_like(nan_rows)
    only_neg_inf[0, 1, 0] = True
    assert nan_rows[only_neg_inf].all() and (lse[only_neg_inf] == float("-inf")).all()
    assert lse[nan_rows & ~only_neg_inf].isnan().all() and lse[~nan_rows].isfinite().all()


# ----------------------------------------------------------------------------------------------
# Double backward
# ----------------------------------------------------------------------------------------------

DOUBLE = pytest.mark.parametrize("attend", [
    pytest.param(lambda q, k, v: ksm.softmax_attention(q, k, v, is_causal=True), id="softmax"),
    pytest.param(lambda q, k, v: ksm.softmax_attention(q, k, v, return_lse=True)[1], id="softmax-lse"),
    pytest.param(lambda q, k, v: kem.entmax_attention(q, k, v, alpha=1.5, is_causal=True), id="entmax1.5"),
    pytest.param(lambda q, k, v: kem.entmax_attention(q, k, v, alpha=2.0), id="sparsemax"),
])


@DOUBLE
def test_double_backward_is_refused(attend):
    """The kernels' gradients are not differentiable: differentiating them raises, also where
    the upstream gradient needs no graph (`out.sum()`, which `once_differentiable` would let
    pass with the second derivative silently missing the kernels' part)."""
    q, k, v = randn(1, 2, 13, 16, requires_grad=True), randn(1, 2, 13, 16), randn(1, 2, 13, 16)
    (dq,) = torch.autograd.grad(attend(q, k, v).sum(), q, create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="double backward through longattn::"):
        torch.autograd.grad(dq.square().sum() + q.sum(), q)


@DOUBLE
def test_grad_of_grad_is_refused(attend):
    q, k, v = randn(1, 2, 13, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 16)
    first = grad(lambda q: attend(q, k, v).square().sum())
    with pytest.raises(RuntimeError, match="double backward through longattn::"):
        grad(lambda q: first(q).sum())(q)


# ----------------------------------------------------------------------------------------------
# torch.func: grad, vmap and per-sample gradients
# ----------------------------------------------------------------------------------------------

def out_and_lse(out, lse):
    """One tensor of both outputs, so that a loss reaches the lse too."""
    return torch.cat([out, lse[..., None]], -1)


FUNC_CASES = [
    pytest.param(lambda q, k, v, s: ksm.softmax_attention(q, k, v, causal_offset=2, length_scale=s),
                 id="softmax"),
    pytest.param(lambda q, k, v, s: out_and_lse(*ksm.softmax_attention(q, k, v, length_scale=s,
                                                                       return_lse=True)),
                 id="softmax-out-and-lse"),
    pytest.param(lambda q, k, v, s: kem.entmax_attention(q, k, v, alpha=1.5, causal_offset=2, length_scale=s),
                 id="entmax1.5"),
    pytest.param(lambda q, k, v, s: kem.entmax_attention(q, k, v, alpha=2.0, length_scale=s), id="sparsemax"),
]


def func_inputs(batch=()):
    """q (…, 1, 4, 19, 16), k, v (…, 1, 2, 23, 16) (GQA) and a (4,) length scale."""
    q, k, v = randn(*batch, 1, 4, 19, 16), randn(*batch, 1, 2, 23, 16), randn(*batch, 1, 2, 23, 16)
    return q, k, v, (0.5 + torch.rand(4)).to(DEVICE)


def weighted_loss(attend, weight):
    return lambda q, k, v, s: (attend(q, k, v, s) * weight).sum()


@pytest.mark.parametrize("attend", FUNC_CASES)
def test_func_grad_equals_autograd(attend):
    """torch.func.grad w.r.t. q, k, v and the length scale gives plain autograd's gradients."""
    q, k, v, s = func_inputs()
    loss = weighted_loss(attend, torch.randn_like(attend(q, k, v, s)))
    got = grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, s)]
    expected = torch.autograd.grad(loss(*inputs), inputs)
    for name, g, g_ref in zip("qkvs", got, expected, strict=True):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0, msg=f"d{name}")


@pytest.mark.parametrize("attend", FUNC_CASES)
def test_vmap_and_per_sample_grads_equal_a_loop(attend):
    """vmap over a leading dim of q, k, v (the length scale shared) gives the loop's outputs, and
    vmap(grad) the loop's per-sample gradients, the length scale's included."""
    q, k, v, s = func_inputs(batch=(2,))
    out = vmap(attend, in_dims=(0, 0, 0, None))(q, k, v, s)
    looped = torch.stack([attend(q[i], k[i], v[i], s) for i in range(2)])
    torch.testing.assert_close(out, looped, rtol=0, atol=0)

    loss = weighted_loss(attend, torch.randn_like(looped[0]))
    per_sample = vmap(grad(loss, argnums=(0, 1, 2, 3)), in_dims=(0, 0, 0, None))(q, k, v, s)
    for name, g, *g_loop in zip("qkvs", per_sample, *(grad(loss, argnums=(0, 1, 2, 3))(q[i], k[i], v[i], s)
                                                     for i in range(2)), strict=True):
        torch.testing.assert_close(g, torch.stack(g_loop), rtol=0, atol=0, msg=f"d{name}")


def test_vmap_over_other_dims_and_a_batched_length_scale():
    """in_dims other than 0, an unbatched key, a length scale batched too."""
    q, v = randn(1, 2, 3, 11, 16), randn(1, 2, 3, 11, 16)
    k, s = randn(1, 2, 11, 16), (0.5 + torch.rand(3, 2)).to(DEVICE)

    def attend(q, k, v, s):
        return kem.entmax_attention(q, k, v, alpha=1.25, length_scale=s)

    out = vmap(attend, in_dims=(2, None, 2, 0), out_dims=1)(q, k, v, s)
    looped = torch.stack([attend(q[:, :, i], k, v[:, :, i], s[i]) for i in range(3)], dim=1)
    torch.testing.assert_close(out, looped, rtol=0, atol=0)


@pytest.mark.parametrize("attend", [
    pytest.param(lambda q, k, v: ksm.softmax_varlen_attention(q, k, v, CU, CU, 5, 5, is_causal=True),
                 id="softmax"),
    pytest.param(lambda q, k, v: kem.entmax_varlen_attention(q, k, v, CU, CU, 5, 5, alpha=1.5,
                                                             is_causal=True),
                 id="entmax1.5"),
])
def test_varlen_vmap_and_per_sample_grads_equal_a_loop(attend):
    """The packed layout under vmap: the documents (cu_seqlens) shared by every sample."""
    q, k, v = randn(2, 8, 2, 16), randn(2, 8, 2, 16), randn(2, 8, 2, 16)
    out = vmap(attend)(q, k, v)
    torch.testing.assert_close(out, torch.stack([attend(q[i], k[i], v[i]) for i in range(2)]), rtol=0, atol=0)
    loss = weighted_loss(lambda q, k, v, s: attend(q, k, v), torch.randn_like(out[0]))
    per_sample = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, 0, None))(q, k, v, None)
    for g, *g_loop in zip(per_sample, *(grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i], None)
                                        for i in range(2)), strict=True):
        torch.testing.assert_close(g, torch.stack(g_loop), rtol=0, atol=0)
