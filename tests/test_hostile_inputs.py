"""Inputs a demanding user passes (issue #11): every mask shape that broadcasts, huge logits,
masks that are learned, second derivatives, half precision with length scaling, Hugging Face's
`finfo.min` masks, offsets past any length, numpy scalars, alpha near 1, and the transforms
(`torch.compile`, `torch.func`, the meta device, autocast). Each backend must give the reference's
answer or refuse clearly. The Triton kernels' own cases are in `tests/test_kernel_hostile.py`."""

import numpy as np
import pytest
import torch

import longattn
from longattn.attention.checks import MIN_ALPHA

from conftest import CPU_BACKENDS, NORMALIZER_CASES
from helpers import check_rule
from oracles import attention_oracle, rel_err

sdpa = longattn.scaled_dot_product_attention

# Every normalizer, and a length-scaled sparse one (its n_i reads the mask too).
SETTINGS = [
    pytest.param(dict(normalizer=n, alpha=a), id=c.id) for c in NORMALIZER_CASES for n, a in [c.values]
] + [pytest.param(dict(normalizer="entmax", alpha=1.5, length_scale=0.7), id="entmax1.5-scaled")]
SPARSE = [pytest.param(dict(normalizer="sparsemax"), id="sparsemax"),
          pytest.param(dict(normalizer="entmax", alpha=1.5), id="entmax1.5"),
          pytest.param(dict(normalizer="entmax", alpha=1.25), id="entmax1.25")]

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 7, 9, 8


def _qkv(dtype=torch.float64, n_q=NQ, n_k=NK, requires_grad=True):
    shapes = ((B, HQ, n_q, D), (B, HKV, n_k, D), (B, HKV, n_k, D))
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def _grads(out, inputs, seed=0):
    """The gradients of `(out * w).sum()`, `w` fixed by the seed and alike in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# 1. Masks of every broadcastable shape, boolean and float, on every backend

MASK_SHAPES = [(NK,), (1, NK), (NQ, 1), (NQ, NK), (HQ, 1, NK), (B, 1, 1, NK), (B, HQ, NQ, NK), (1, HQ, NQ, 1)]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal_offset", [None, 2])
def test_every_broadcast_mask_shape(settings, shape, kind, causal_offset):
    """The torch path against the reference, float64, forward and the gradients of q, k, v and a
    float mask (a 1-D mask crashed SDPA's CPU kernel; the sparse path gave a float mask no
    gradient)."""
    q, k, v = _qkv()
    if kind == "bool":
        mask = torch.rand(shape) < 0.75
        mask.view(-1)[0] = True
    else:
        mask = torch.randn(shape, dtype=torch.float64).masked_fill(torch.rand(shape) < 0.2, float("-inf"))
        mask.requires_grad_()
    inputs = [q, k, v] + ([mask] if kind == "float" else [])
    results = []
    for backend in CPU_BACKENDS:
        out = sdpa(q, k, v, mask, causal_offset=causal_offset, enable_gqa=True, **settings, backend=backend)
        results.append((out, _grads(out, inputs)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("settings", SPARSE)
def test_float_mask_gradient_against_the_oracle(settings):
    """A learned additive bias (relative positions, ALiBi variants) gets the entmax package's
    gradient through the torch path."""
    q, k, v = _qkv(n_q=NK)
    bias = torch.randn(HQ, NK, NK, dtype=torch.float64, requires_grad=True)
    out = sdpa(q, k, v, bias, enable_gqa=True, is_causal=True, **settings, backend="torch")
    want = attention_oracle(q, k, v, attn_mask=bias, is_causal=True, **settings)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    (got,), (ref,) = _grads(out, [bias]), _grads(want, [bias])
    assert ref.abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. Shift invariance: adding c to every logit changes nothing but the inputs' own rounding


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shift", [1e4, 2.0**20, 2.0**26])
def test_shift_invariance(settings, backend, shift):
    """q = 0 makes the logits the bias itself: multiples of 1/8 up to 1, so `bias + shift` is
    exact in float32 for shifts up to 2**20 and a multiple of 8 apart beyond. The torch path
    computed `x - (max + tau)`, rounding tau into a large max: off by 0.14 at c = 1e6."""
    q = torch.zeros(1, 2, 5, 4)
    k, v = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)
    step = 8.0 if shift >= 2.0**23 else 0.125
    bias = step * torch.randint(-8, 9, (5, 16)).float()
    base = sdpa(q, k, v, bias, **settings, backend=backend)
    shifted = sdpa(q, k, v, bias + shift, **settings, backend=backend)
    torch.testing.assert_close(shifted, base, rtol=0, atol=2e-6)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_huge_logit_takes_all_the_weight(settings, backend):
    """A logit of 1.2e8 among O(1) ones is one-hot for every normalizer (the torch path's sparse
    rows were all zero)."""
    q, k, v = torch.zeros(1, 1, 3, 4), torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    bias = torch.randn(3, 10)
    bias[:, 6] = 1.2e8
    out = sdpa(q, k, v, bias, **settings, backend=backend)
    torch.testing.assert_close(out, v[:, :, 6:7].expand(1, 1, 3, 4), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Second derivatives: exact, or an error


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_reference_is_twice_differentiable(settings):
    """gradgradcheck on the reference (its entmax backward gave NaN second derivatives at the
    support's edge). Few elements, GQA kept: gradgradcheck's cost grows with each input; the
    queries scaled so that every sparse normalizer has zeros among the allowed keys."""
    q = (3 * torch.randn(1, 2, 5, 4, dtype=torch.float64)).requires_grad_()
    k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.rand(5, 6) < 0.8
    mask[:, 0] = True

    def attention(q, k, v):
        return sdpa(q, k, v, mask, enable_gqa=True, **settings, backend="reference")

    assert torch.autograd.gradgradcheck(attention, (q, k, v), atol=1e-6)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("penalty", ["double-backward", "gradient-penalty"])
def test_the_torch_path_refuses_a_second_derivative(settings, penalty):
    """The torch path's first derivatives are not differentiable (SDPA's CPU kernel has none,
    the sparse backward treats its saved threshold as a constant): a second derivative raises,
    also when the first one was taken against a constant upstream gradient and mixed into a loss
    (a gradient penalty), where the sparse path used to return 64% off without a word."""
    q, k, v = _qkv()
    out = sdpa(q, k, v, enable_gqa=True, **settings, backend="torch")
    if penalty == "double-backward":
        (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        loss = dq.sum()
    else:
        (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        loss = out.sum() + dq.square().sum()
    with pytest.raises(RuntimeError, match="derivative"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# 5. Half precision with length scaling: float32 inside, as the reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("settings", [dict(normalizer="ssmax"), dict(normalizer="entmax", alpha=1.5)],
                         ids=["ssmax", "entmax1.5"])
def test_length_scaling_in_half_precision(dtype, settings):
    """Forward and every gradient, `ds` included, within the tolerance rule of the reference in
    the same dtype (folding `s ln(n)` into a half-precision query made SSMax's ds 7x (bf16) and
    23x (fp16) worse)."""
    q, k, v = (torch.randn(2, 4, 256, 64).to(dtype) for _ in range(3))
    s = torch.linspace(0.3, 1.0, 4)
    inputs64 = [t.double().requires_grad_() for t in (q, k, v, s)]
    want = sdpa(*inputs64[:3], length_scale=inputs64[3], **settings, backend="reference")
    want_grads = _grads(want, inputs64)
    results = {}
    for backend in CPU_BACKENDS:
        inputs = [t.clone().requires_grad_() for t in (q, k, v, s)]
        out = sdpa(*inputs[:3], length_scale=inputs[3], **settings, backend=backend)
        assert out.dtype == dtype
        results[backend] = (out, _grads(out.float(), inputs))
    (base, base_grads), (got, got_grads) = results["reference"], results["torch"]
    check_rule(got, base, want, dtype, "out")
    for name, g, b, w in zip(("dq", "dk", "dv", "ds"), got_grads, base_grads, want_grads):
        check_rule(g, b, w, dtype, name)


# ---------------------------------------------------------------------------------------------
# 8. Causal offsets of any size; numpy scalars


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset,sees", [(2**63, "all"), (2**100, "all"), (NK, "all"), (-(2**63) - 5, "none"),
                                         (-NQ, "none")])
def test_offsets_beyond_the_lengths(settings, backend, offset, sees):
    """Past `Nk`, every row sees every key; below `-Nq`, none sees any (2**63 wrapped to zeros on
    the torch path and failed inside the reference)."""
    q, k, v = _qkv(requires_grad=False)
    out = sdpa(q, k, v, causal_offset=offset, enable_gqa=True, **settings, backend=backend)
    if sees == "all":
        torch.testing.assert_close(out, sdpa(q, k, v, enable_gqa=True, **settings, backend=backend))
    else:
        assert (out == 0).all()


def test_numpy_scalars_are_taken():
    """numpy ints for the offset and numpy bools for the flags, as Python's."""
    q, k, v = _qkv(requires_grad=False)
    want = sdpa(q, k, v, causal_offset=2, enable_gqa=True, normalizer="entmax")
    for offset in (np.int64(2), np.int32(2), np.uint8(2)):
        got = sdpa(q, k, v, causal_offset=offset, enable_gqa=np.bool_(True), normalizer="entmax")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=np.bool_(True), enable_gqa=True),
                               sdpa(q, k, v, causal_offset=0, enable_gqa=True), rtol=0, atol=0)
    with pytest.raises(TypeError, match="causal_offset"):
        sdpa(q, k, v, causal_offset=np.bool_(True), enable_gqa=True)
    with pytest.raises(TypeError, match="causal_offset"):
        sdpa(q, k, v, causal_offset=np.float64(2.0), enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# 9. Float masks: -inf and the dtype's lowest finite value both mask


@pytest.mark.parametrize("settings", SETTINGS + [pytest.param(dict(normalizer="softmax", length_scale=0.6),
                                                              id="softmax-scaled")])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,mask_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
], ids=["fp32", "fp16", "fp16-fp32mask", "bf16", "fp64"])
def test_finfo_min_masks_as_a_boolean_mask_does(settings, backend, dtype, mask_dtype):
    """Hugging Face's masks put `torch.finfo(dtype).min` on masked keys. Such a mask gives what the
    boolean mask gives, n_i of length scaling included, and a row masked entirely gives 0 (it
    counted those keys in SSMax's n_i, off by 0.33, and such a row gave the mean of V)."""
    q, k, v = (t.to(dtype) for t in _qkv(requires_grad=False))
    allowed = torch.rand(NQ, NK) < 0.6
    allowed[:, 0] = True
    allowed[3] = False
    bias = torch.randn(NQ, NK).to(mask_dtype)
    mask = bias.masked_fill(~allowed, torch.finfo(mask_dtype).min)
    got = sdpa(q, k, v, mask, enable_gqa=True, **settings, backend=backend)
    want = sdpa(q, k, v, bias.masked_fill(~allowed, float("-inf")), enable_gqa=True, **settings,
                backend=backend)
    oracle = attention_oracle(q, k, v, attn_mask=mask, **settings)
    assert (got[:, :, 3] == 0).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert rel_err(got, oracle) < {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)


# ---------------------------------------------------------------------------------------------
# 10. alpha near 1: accurate down to the smallest accepted, refused below


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_smallest_alpha_is_accurate_in_float32(backend):
    """At MIN_ALPHA, float32 against the float64 entmax package within the kernels' fp32 atol
    (at 1 + 1e-5 it erred 1.3e-3, at 1 + 1e-9 0.52)."""
    q, k, v = (torch.randn(1, 2, 200, 32) for _ in range(3))
    out = sdpa(q, k, v, normalizer="entmax", alpha=MIN_ALPHA, backend=backend)
    want = attention_oracle(q, k, v, normalizer="entmax", alpha=MIN_ALPHA)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("alpha", [1.0 + 1e-9, 1.005, np.nextafter(MIN_ALPHA, 1.0)])
def test_alpha_below_the_smallest_is_refused(alpha):
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="softmax"):
        sdpa(q, k, v, enable_gqa=True, normalizer="entmax", alpha=alpha)


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("settings", SPARSE)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_compile_fullgraph_on_the_torch_path(settings, mask_kind):
    """`torch.compile(fullgraph=True)` over the sparse torch path, masks, offsets and a learned s
    included, equals eager (the Newton loop's early exit broke the graph)."""
    q, k, v = (t.float().detach().requires_grad_() for t in _qkv())
    mask = torch.rand(NQ, NK) < 0.8 if mask_kind == "bool" else torch.randn(NQ, NK, requires_grad=True)
    s = torch.full((HQ,), 0.6, requires_grad=True)

    def attention(q, k, v, mask, s):
        return sdpa(q, k, v, mask, causal_offset=3, enable_gqa=True, length_scale=s, **settings,
                    backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    inputs = [q, k, v, s] + ([mask] if mask.requires_grad else [])
    got = compiled(q, k, v, mask, s)
    want = attention(q, k, v, mask, s)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_and_vmap(settings, backend):
    """`torch.func.grad`, `vmap` and per-sample gradients, `vmap(grad(...))`, equal plain autograd
    and a loop (the sparse autograd functions had no `setup_context`)."""
    q, k, v = (t.detach() for t in _qkv())

    def attention(q, k, v):
        return sdpa(q, k, v, enable_gqa=True, **settings, backend=backend)

    def loss(q, k, v):
        return attention(q, k, v).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    want = torch.autograd.grad(loss(*(t.requires_grad_() for t in (q, k, v))), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    q, k, v = (t.detach() for t in (q, k, v))
    torch.testing.assert_close(torch.func.vmap(attention)(q, k, v), attention(q, k, v), rtol=0, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(loss))(q, k, v)  # each batch entry on its own
    for i in range(B):
        qi = q[i : i + 1].clone().requires_grad_()
        (want_i,) = torch.autograd.grad(loss(qi, k[i : i + 1], v[i : i + 1]), qi)
        torch.testing.assert_close(per_sample[i], want_i[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_tensors_give_shapes(settings, backend):
    """Shape inference without data: masks, offsets and a length-scale tensor on the meta device
    (the torch path called `.item()`)."""
    q, k, v = (torch.empty(s, device="meta") for s in ((B, HQ, NQ, D), (B, HKV, NK, D), (B, HKV, NK, 5)))
    mask = torch.empty(NQ, NK, device="meta")
    out = sdpa(q, k, v, mask, causal_offset=1, enable_gqa=True, **settings, backend=backend)
    assert out.device.type == "meta" and out.shape == (B, HQ, NQ, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_gives_sdpas_dtype(settings, backend):
    """Under CPU autocast to bfloat16, every normalizer and backend returns what SDPA returns
    there, bfloat16, and computes on the inputs cast to it (softmax returned bfloat16 and entmax
    float32)."""
    q, k, v = (t.float().detach() for t in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True, **settings, backend=backend)
        torchs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == torchs.dtype == torch.bfloat16
    want = sdpa(*(t.bfloat16() for t in (q, k, v)), is_causal=True, enable_gqa=True, **settings,
                backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 7. Non-finite inputs: NaN where the definition has NaN, the same values elsewhere


@pytest.mark.parametrize("settings", SPARSE)
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("causal_offset", [None, -1])
def test_non_finite_inputs_spoil_the_rows_they_reach(settings, where, value, causal_offset):
    """One non-finite element of q or k: the sparse torch path's output is NaN in the reference's
    rows and agrees elsewhere; a row whose allowed logits are all -inf is NaN (it gave 0, as if
    the masks had left it no key), and one the causal mask keeps from the poisoned key stays
    finite. Each gradient has NaN where the reference has (a NaN upstream gradient carries the
    row's NaN: `u` dropped it) and agrees where both are finite. Where exactly NaN lands on
    masked keys differs: both spread it there, the reference through `0 * nan` in its matmuls."""
    q, k, v = (t.detach() for t in _qkv(n_q=NK))
    (q if where == "query" else k)[0, 1, 4, 3] = value
    results = []
    for backend in CPU_BACKENDS:
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sdpa(*inputs, causal_offset=causal_offset, enable_gqa=True, **settings, backend=backend)
        results.append([out, *_grads(out, inputs)])
    (want, *want_grads), (got, *got_grads) = results
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), rtol=1e-8, atol=1e-9)
    for g, w in zip(got_grads, want_grads):
        assert g.isnan().any() == w.isnan().any()
        finite = g.isfinite() & w.isfinite()
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_over_packed_documents(settings, backend):
    """`vmap` and `vmap(grad)` over `varlen_attention`, the documents shared by every sample."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = torch.randn(3, 12, 4, 8), torch.randn(3, 12, 2, 8), torch.randn(3, 12, 2, 8)

    def attention(q, k, v):
        return longattn.varlen_attention(q, k, v, cu, cu, is_causal=True, **settings, backend=backend)

    def loss(q, k, v):
        return attention(q, k, v).square().sum()

    out = torch.func.vmap(attention)(q, k, v)
    per_sample = torch.func.vmap(torch.func.grad(loss))(q, k, v)
    for i in range(3):
        qi = q[i].clone().requires_grad_()
        want = attention(qi, k[i], v[i])
        (want_grad,) = torch.autograd.grad(want.square().sum(), qi)
        torch.testing.assert_close(out[i], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(per_sample[i], want_grad, rtol=0, atol=1e-5)
