"""Sparsemax and alpha-entmax against the `entmax` package on materialised logits, and every
normalizer (length-scaled too) against the float64 oracle: outputs and every gradient."""

import inspect
import textwrap

import pytest
import torch

import longattn

from conftest import NORMALIZER_CASES
from oracles import attention_oracle, case_id, grads, make_mask, rel_err

NORMALIZERS = [
    pytest.param("sparsemax", 2.0, id="sparsemax"),
    pytest.param("entmax", 1.25, id="entmax1.25"),
    pytest.param("entmax", 1.5, id="entmax1.5"),
    pytest.param("entmax", 1.75, id="entmax1.75"),
    pytest.param("entmax", 2.0, id="entmax2"),
]

# (B, Hq, Hkv, Nq, Nk, D, Dv, is_causal, mask kind)
SHAPES = [
    (2, 2, 2, 17, 17, 16, 16, False, None),
    (1, 2, 2, 17, 17, 8, 8, True, None),
    (2, 4, 2, 5, 13, 8, 12, True, None),  # GQA, Nq < Nk, Dv != D
    (1, 2, 2, 11, 19, 8, 8, False, "bool"),
    (1, 2, 2, 11, 19, 8, 8, False, "neginf"),
    (1, 1, 1, 1, 1, 1, 1, False, None),
    (1, 1, 1, 63, 130, 4, 4, False, None),
]


def _run(shape, normalizer, alpha, dtype, backend, length_scale=None, logit_gain=3.0):
    B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask_kind = shape
    # A gain > 1 spreads the logits so that the sparse supports are neither one key nor all.
    q = (logit_gain * torch.randn(B, Hq, Nq, D, dtype=torch.float64)).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, Dv, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk))
    kwargs = dict(attn_mask=mask, is_causal=causal)
    inputs = [q, k, v]
    if isinstance(length_scale, torch.Tensor):
        length_scale = length_scale.to(dtype).requires_grad_()
        inputs.append(length_scale)
    out = longattn.scaled_dot_product_attention(
        q, k, v, **kwargs, enable_gqa=Hq != Hkv, normalizer=normalizer, alpha=alpha,
        length_scale=length_scale, backend=backend,
    )
    ref = attention_oracle(q, k, v, normalizer=normalizer, alpha=alpha, length_scale=length_scale, **kwargs)
    do = torch.randn_like(ref)
    return out, ref, grads(out, inputs, do.to(dtype)), grads(ref, inputs, do)


@pytest.mark.parametrize("normalizer,alpha", NORMALIZERS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=case_id(*s[:8], mask=s[8])) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sparse_normalizers_match_entmax_package(normalizer, alpha, shape, dtype, backend):
    out, ref, g_out, g_ref = _run(shape, normalizer, alpha, dtype, backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) < tol
    for g, gr in zip(g_out, g_ref):
        assert rel_err(g, gr) < tol


def test_sparse_outputs_are_sparse(backend):
    """The sparse normalizers put exact zeros on keys: check through the value rows picked."""
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 64, 16, dtype=torch.float64)
    v = torch.eye(64, dtype=torch.float64).view(1, 1, 64, 64)  # output row = attention weights
    for normalizer, alpha in (("sparsemax", 2.0), ("entmax", 1.5), ("entmax", 1.25)):
        p = longattn.scaled_dot_product_attention(
            q, k, v, normalizer=normalizer, alpha=alpha, backend=backend
        )
        assert (p == 0).sum() > 0 and (p > 0).sum() > 1
        assert abs(p.sum().item() - 1) < 1e-12
    p = longattn.scaled_dot_product_attention(q, k, v)
    assert (p > 0).all()


LENGTH_SCALED = [
    pytest.param("ssmax", 1.5, None, id="ssmax-default-s"),
    pytest.param("ssmax", 1.5, 0.43, id="ssmax-s0.43"),
    pytest.param("softmax", 1.5, "tensor", id="softmax-s-tensor"),
    pytest.param("sparsemax", 2.0, "tensor", id="sparsemax-s-tensor"),
    pytest.param("entmax", 1.5, "tensor", id="entmax1.5-s-tensor"),
    pytest.param("entmax", 1.25, 0.7, id="entmax1.25-s0.7"),
]


@pytest.mark.parametrize("normalizer,alpha,s", LENGTH_SCALED)
@pytest.mark.parametrize("shape", [pytest.param(s, id=case_id(*s[:8], mask=s[8])) for s in SHAPES[1:5]])
def test_length_scaled_match_oracle(normalizer, alpha, s, shape, backend):
    """Gradients include the one of a per-head `s` tensor."""
    if s == "tensor":
        s = 0.2 + torch.rand(shape[1], dtype=torch.float64)
    out, ref, g_out, g_ref = _run(
        shape, normalizer, alpha, torch.float64, backend, length_scale=s, logit_gain=1.0
    )
    assert rel_err(out, ref) < 1e-10
    for g, gr in zip(g_out, g_ref):
        assert rel_err(g, gr) < 1e-10


@pytest.mark.parametrize("normalizer,alpha", NORMALIZERS[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_accumulate_in_float32(normalizer, alpha, dtype):
    """Half inputs on the blockwise path: no worse than twice the reference run on the same
    half inputs (which computes in float32), against the float64 oracle."""
    shape = (2, 4, 2, 33, 47, 32, 32, True, None)
    out, ref, g_out, g_ref = _run(shape, normalizer, alpha, dtype, "torch", logit_gain=1.0)
    torch.manual_seed(0)  # the same inputs again, through the reference
    base, _, g_base, _ = _run(shape, normalizer, alpha, dtype, "reference", logit_gain=1.0)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-3
    for g, gb, gr in zip(g_out, g_base, g_ref):
        assert rel_err(g, gr) <= 2 * rel_err(gb, gr) + 1e-3


def _docstring_attention():
    """The "equivalent to" code of `scaled_dot_product_attention`'s docstring, run as written."""
    doc = inspect.getdoc(longattn.scaled_dot_product_attention)
    block = doc.split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith(" "):
            break  # the prose after the block
        lines.append(line)
    namespace = {}
    exec(textwrap.dedent("\n".join(lines)), namespace)
    return namespace["attention"]


# (B, Hq, Hkv, Nq, Nk, D, Dv, mask kind, is_causal, causal_offset, length scale, key lengths)
DOC_CASES = [
    (2, 2, 2, 7, 9, 8, 5, None, False, None, None, None, None),
    (1, 4, 2, 9, 9, 8, 8, "neginf", True, None, "tensor", None, None),  # GQA, causal with a -inf float mask
    (2, 2, 1, 6, 11, 4, 4, "bool", False, 5, 0.6, None, None),  # bottom-right offset, fully masked rows
    (1, 2, 2, 8, 5, 8, 3, "float", False, -2, None, None, None),  # rows before the first key
    (3, 4, 2, 7, 9, 8, 5, "float", False, 3, "tensor", [0, 4, 9], None),  # per-batch key lengths
    (2, 2, 2, 9, 12, 8, 5, "float", True, None, 0.8, None, (3, 0)),  # a causal sliding window
    (1, 4, 2, 9, 7, 8, 5, None, False, 2, None, [5], (1, 2)),  # a window around a shifted diagonal
    (2, 2, 2, 9, 9, 8, 5, "bool", False, None, "tensor", None, (2, 4)),  # a two-sided window, not causal
    # bottom-right at each batch's key length: 4 < Nq leaves rows empty, 12 > Nk is clamped
    (3, 4, 2, 7, 10, 8, 5, "float", False, "bottom_right", "tensor", [0, 4, 12], (2, 0)),
]
# (softcap, ALiBi slopes' shape) beside some of the cases above, by index
MODIFIERS = {0: (1.5, None), 1: (None, "heads"), 2: (2.5, "batch"), 6: (0.7, "heads"), 7: (None, "batch"),
             8: (1.5, "batch")}


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: case_id(*c[:7], causal=c[8], mask=c[7]))
def test_docstring_code_is_the_reference(normalizer, alpha, case):
    """The docstring's equivalent code equals the reference backend in float64, to 1e-10."""
    B, Hq, Hkv, Nq, Nk, D, Dv, mask_kind, is_causal, offset, s, lengths, window = case
    softcap, slopes = MODIFIERS.get(DOC_CASES.index(case), (None, None))
    slopes = {"heads": torch.rand(Hq, dtype=torch.float64), "batch": torch.rand(B, Hq, dtype=torch.float64),
              None: None}[slopes]
    q = 2 * torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, Nk, D, dtype=torch.float64), torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk))
    if mask is not None:
        mask[:, :, 1] = False if mask.dtype == torch.bool else float("-inf")  # a row with no key
        if mask.dtype != torch.bool:  # Hugging Face's masked keys: the lowest finite value
            mask[:, :, 2, ::2] = torch.finfo(mask.dtype).min
    s = 0.3 + torch.rand(Hq, dtype=torch.float64) if s == "tensor" else s
    kwargs = dict(attn_mask=mask, is_causal=is_causal, normalizer=normalizer, alpha=alpha, length_scale=s,
                  causal_offset=offset, seqused_k=None if lengths is None else torch.tensor(lengths),
                  window_size=window, softcap=softcap, alibi_slopes=slopes)
    got = _docstring_attention()(q, k, v, **kwargs)
    ref = longattn.scaled_dot_product_attention(q, k, v, **kwargs, enable_gqa=Hq != Hkv, backend="reference")
    assert got.isfinite().all()
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("case", DOC_CASES[:3], ids=lambda c: case_id(*c[:7], causal=c[8], mask=c[7]))
def test_docstring_code_takes_per_head_alpha(case):
    """The same with one alpha per query head, as a tensor."""
    B, Hq, Hkv, Nq, Nk, D, Dv, mask_kind, is_causal, offset, _, _, _ = case
    q = 2 * torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, Nk, D, dtype=torch.float64), torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64)
    alpha = 1.1 + 0.9 * torch.rand(Hq, dtype=torch.float64)
    kwargs = dict(attn_mask=make_mask(mask_kind, (B, 1, Nq, Nk)), is_causal=is_causal, normalizer="entmax",
                  alpha=alpha, causal_offset=offset)
    got = _docstring_attention()(q, k, v, **kwargs)
    ref = longattn.scaled_dot_product_attention(q, k, v, **kwargs, enable_gqa=Hq != Hkv, backend="reference")
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_attention_weights_are_the_rows_behind_the_output(normalizer, alpha):
    """`attention_weights` times V is the output; its rows sum to 1, and to 0 where a row has no
    key; unbatched inputs give unbatched weights."""
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 5, dtype=torch.float64)
    kwargs = dict(enable_gqa=True, causal_offset=-1, normalizer=normalizer, alpha=alpha, length_scale=0.7)
    p = longattn.attention.attention_weights(q, k, **kwargs)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="reference")
    assert p.shape == (2, 4, 6, 9) and p.dtype == torch.float64
    assert rel_err(p @ v.repeat_interleave(2, 1), out) < 1e-12
    sums = p.sum(-1)
    assert (sums[:, :, 0] == 0).all() and torch.allclose(sums[:, :, 1:], torch.ones_like(sums[:, :, 1:]))
    torch.testing.assert_close(longattn.attention.attention_weights(q[0], k[0], **kwargs), p[0])
