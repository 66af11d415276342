"""The dispatch: which backend serves a call, and the reason when one cannot; the normalizer
registry; the README's capability tables; and the flash-attn backend's causal mapping and
length factor, which run without flash-attn (its correctness test needs a GPU)."""

import math
from pathlib import Path

import pytest
import torch

import longattn
from longattn.attention import backends, checks, dispatch, normalizers
from longattn.attention.block_map import BlockMap
from longattn.attention.call import PackedDocs
from longattn.models import TransformerConfig, needle

from conftest import KERNEL_DEVICE
from oracles import grads, rel_err


def _call(q, k, v, **kwargs):
    defaults = dict(normalizer="softmax", alpha=1.5, length_scale=None, scale=None, causal_offset=None)
    return checks.make_call(q, k, v, **{**defaults, **kwargs})


def test_auto_picks_the_torch_path_on_cpu():
    q = torch.randn(1, 1, 4, 8)
    for name in normalizers.names():
        assert dispatch.select(_call(q, q, q, normalizer=name), "auto") is backends.TORCH
    assert dispatch.select(_call(q, q, q), "reference") is backends.REFERENCE


@pytest.mark.parametrize("normalizer,alpha", [("sparsemax", 1.5), ("entmax", 1.5), ("entmax", 1.7)])
def test_triton_through_the_public_function(normalizer, alpha):
    """backend="triton" reaches the kernels (sparsemax as alpha 2) with the same values as the
    kernel entry, with a mask too."""
    from longattn.kernels import entmax as kem

    q, k, v = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    q, k, v = q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE)
    out = longattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                normalizer=normalizer, alpha=alpha, backend="triton")
    _, kernel_alpha, _ = normalizers.canonical(normalizer, alpha, None)
    assert kernel_alpha == (2.0 if normalizer == "sparsemax" else alpha)
    assert torch.equal(out, kem.entmax_attention(q, k, v, alpha=kernel_alpha, is_causal=True))
    mask = torch.rand(2, 1, 11, 11, device=KERNEL_DEVICE) < 0.7
    out = longattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                normalizer=normalizer,
                                                alpha=alpha, backend="triton")
    assert torch.equal(out, kem.entmax_attention(q, k, v, alpha=kernel_alpha, attn_mask=mask))


def test_canonical_forms():
    """The rewrites happen in the registry: SSMax is softmax with s = 1 by default, sparsemax is
    entmax at alpha 2; the other names stay as they are."""
    assert normalizers.canonical("ssmax", 1.5, None) == (normalizers.SOFTMAX, 1.5, 1.0)
    assert normalizers.canonical("ssmax", 1.5, 0.4) == (normalizers.SOFTMAX, 1.5, 0.4)
    assert normalizers.canonical("sparsemax", 1.3, None) == (normalizers.ENTMAX, 2.0, None)
    assert normalizers.canonical("entmax", 1.3, 0.5) == (normalizers.ENTMAX, 1.3, 0.5)
    with pytest.raises(ValueError, match="normalizer must be one of 'softmax', 'ssmax'"):
        normalizers.canonical("relu", 1.5, None)


REFUSED = [
    # (id, call, words the message must hold)
    ("triton-dropout", dict(dropout_p=0.1), "backend='triton'.*dropout_p"),
]


@pytest.mark.parametrize("kwargs,words", [pytest.param(c, w, id=i) for i, c, w in REFUSED])
def test_triton_refuses_what_the_kernels_cannot_do(kwargs, words):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match=words + r".*; use backend='reference' or 'torch'"):
        longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="triton")


def test_triton_refuses_float64_dense_and_packed():
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'.*float64"):
        longattn.scaled_dot_product_attention(q, q, q, backend="triton")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = torch.randn(7, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'.*float64"):
        longattn.varlen_attention(packed, packed, packed, cu, cu, backend="triton")


def test_flash_is_refused_with_the_reason():
    """Without flash-attn (or without CUDA) naming it says which extra to install (or what it
    needs); normalizers it has no path for are refused by name, whatever is installed."""
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    reason = (r"(flash-attn is not installed \(pip install 'longattn\[flash\]'\)"
              r"|flash-attn needs CUDA tensors)")
    with pytest.raises(ValueError, match=r"backend='flash' cannot run this call: " + reason):
        longattn.scaled_dot_product_attention(q, q, q, is_causal=True, backend="flash")
    for name in ("entmax", "sparsemax"):
        with pytest.raises(ValueError, match=f"normalizer '{name}' has no flash implementation"):
            longattn.scaled_dot_product_attention(q, q, q, normalizer=name, backend="flash")


@pytest.mark.parametrize("n_q,n_k,offset", [(5, 5, 0), (3, 9, 6), (3, 9, 8), (9, 4, 0), (9, 4, -5), (4, 4, 2),
                                            (3, 9, 0), (4, 4, -1), (6, 2, None)])
def test_flash_window_is_the_causal_offset(n_q, n_k, offset):
    """flash-attn's rule, key j allowed for row i iff `j <= i + Nk - Nq + right` (right = 0 when
    causal, unbounded when -1 and not causal), equals `j <= i + causal_offset` wherever the
    mapping accepts the offset; the rest (offsets below Nk - Nq) is refused."""
    q, k = torch.randn(1, 1, n_q, 8), torch.randn(1, 1, n_k, 8)
    (causal, (_, right)), reason = backends._flash_window(_call(q, k, k, causal_offset=offset))
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    if offset is not None and offset < n_k - n_q:
        assert "bottom-right" in reason and str(n_k - n_q) in reason
        return
    assert reason == ""
    expected = torch.ones(n_q, n_k, dtype=torch.bool) if offset is None else j <= i + offset
    if causal:
        right = 0
    flash = torch.ones_like(expected) if right == -1 else j <= i + n_k - n_q + right
    assert torch.equal(flash, expected)


@pytest.mark.parametrize("causal_offset", [None, 0, 3])
def test_flash_length_factor_is_the_reference_one(causal_offset):
    """SSMax's factor folded into the query for flash-attn: `s_h ln(n_i)` as the reference counts
    `n_i`, dense `(B, Nq, Hq, 1)` and packed `(total, Hq, 1)`."""
    from longattn.attention import reference

    s = torch.tensor([0.4, 1.3])
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 9, 8)
    got = backends._flash_length_factor(_call(q, k, k, length_scale=s, causal_offset=causal_offset))
    allowed, _ = reference.split_mask(None, causal_offset, 7, 9, "cpu", torch.float32)
    want = reference.length_factor(s, allowed, 2, torch.float32)[..., 0]  # (Hq, Nq)
    torch.testing.assert_close(got[0, :, :, 0], want.T)

    lq, lk = [3, 0, 5], [4, 2, 6]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lq, lk))
    docs = PackedDocs(cu_q, cu_k, 5, 6, cu_q.tolist(), cu_k.tolist())
    packed = _call(torch.randn(8, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8), length_scale=s,
                   causal_offset=None if causal_offset is None else 0, docs=docs)
    got = backends._flash_length_factor(packed)[..., 0]  # (total_q, Hq)
    for d in range(3):
        allowed, _ = reference.split_mask(None, packed.causal_offset, lq[d], lk[d], "cpu", torch.float32)
        want = reference.length_factor(s, allowed, 2, torch.float32)[..., 0].T
        torch.testing.assert_close(got[cu_q[d]:cu_q[d + 1]], want)


@pytest.mark.skipif(not (torch.cuda.is_available() and (backends.FLASH_ATTN_2 or backends.FLASH_ATTN_3)),
                    reason="needs flash-attn on a GPU")
@pytest.mark.parametrize("length_scale", [None, "tensor"])
@pytest.mark.parametrize("causal_offset", [None, "bottom-right", "wider"])
def test_flash_matches_reference(length_scale, causal_offset):
    q = torch.randn(2, 4, 70, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 90, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 90, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offset = {None: None, "bottom-right": 20, "wider": 25}[causal_offset]
    s = (0.5 + torch.rand(4, device="cuda")).requires_grad_() if length_scale else None
    inputs = [t for t in (q, k, v, s) if t is not None]
    kwargs = dict(enable_gqa=True, causal_offset=offset, length_scale=s)
    out = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="flash")
    ref = longattn.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), **kwargs,
                                                backend="reference")
    base = longattn.scaled_dot_product_attention(q, k, v, **kwargs, backend="reference")
    assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-3
    do = torch.randn_like(ref)
    for g, g_b, g_r in zip(grads(out, inputs, do.to(out.dtype)), grads(base, inputs, do.to(out.dtype)),
                           grads(ref.float(), inputs, do.float())):
        assert rel_err(g, g_r) <= 2 * rel_err(g_b, g_r) + 1e-2


# ---------------------------------------------------------------------------------------------
# A normalizer added as one record: served by the reference, refused by the others


def _quiet(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Softmax with an extra zero logit in the denominator ("softmax + 1"), so a row may put
    weight on nothing: `exp(z_j) / (1 + sum_k exp(z_k))`."""
    m = logits.amax(-1, keepdim=True).clamp(min=0)
    e = torch.exp(logits - m)
    return e / (torch.exp(-m) + e.sum(-1, keepdim=True))


@pytest.fixture
def quiet():
    record = normalizers.register(
        normalizers.Normalizer("quiet", "softmax + 1 (a test's normalizer)", _quiet)
    )
    yield record
    normalizers.unregister("quiet")


def test_reference_only_normalizer_is_served_by_the_reference(quiet):
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 5, dtype=torch.float64, requires_grad=True)
    out = longattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, normalizer="quiet",
                                                backend="reference")
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = torch.ones(6, 9, dtype=torch.bool).tril()
    z = (q @ kk.transpose(-1, -2) / math.sqrt(8)).masked_fill(~causal, -math.inf)
    want = (z.exp() / (1 + z.exp().sum(-1, keepdim=True))) @ vv  # by hand, logits far from overflow
    assert rel_err(out, want) < 1e-12
    do = torch.randn_like(out)
    for g, g_want in zip(grads(out, (q, k, v), do), grads(want, (q, k, v), do)):
        assert rel_err(g, g_want) < 1e-12

    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # one document
    cu_q, cu_k = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32)
    out_packed = longattn.varlen_attention(*packed, cu_q, cu_k, is_causal=True, normalizer="quiet",
                                           backend="reference")
    torch.testing.assert_close(out_packed, out[0].transpose(0, 1))

    layer = longattn.ScaledDotProductAttention("quiet", backend="reference")
    torch.testing.assert_close(layer(q, k, v, is_causal=True, enable_gqa=True), out)
    assert TransformerConfig(normalizer="quiet", backend="reference").normalizer == "quiet"
    assert needle.parse_setting("quiet+ls0.5") == {"normalizer": "quiet", "alpha": 1.5, "length_scale": 0.5}


def test_reference_only_normalizer_is_refused_elsewhere(quiet):
    q = torch.randn(1, 2, 5, 8)
    for backend in ("torch", "triton", "flash"):
        with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this call: normalizer 'quiet' "
                                             rf"has no {backend} implementation; use backend='reference'$"):
            longattn.scaled_dot_product_attention(q, q, q, normalizer="quiet", backend=backend)
    with pytest.raises(ValueError, match="backend='auto' has no backend for normalizer 'quiet' on cpu "
                                         r"\(torch: normalizer 'quiet' has no torch implementation\); "
                                         "backend='reference' serves every normalizer"):
        longattn.scaled_dot_product_attention(q, q, q, normalizer="quiet")
    assert "| `quiet` | yes | no | no | no |" in dispatch.capability_table()


def test_register_refuses_bad_records():
    with pytest.raises(ValueError, match="registered already"):
        normalizers.register(normalizers.Normalizer("softmax", "again", _quiet))
    with pytest.raises(ValueError, match="needs its reference row function"):
        normalizers.register(normalizers.Normalizer("nothing", "no implementation"))
    with pytest.raises(ValueError, match="base 'ssmax' must be a registered canonical one"):
        normalizers.register(normalizers.Normalizer("twice", "a rewrite of a rewrite", base="ssmax"))
    with pytest.raises(TypeError, match="Normalizer"):
        normalizers.register("quiet")
    assert "nothing" not in normalizers.names()


def test_readme_states_the_capability_tables():
    """The README's backends section shows exactly what the registry serves
    (`longattn.attention.dispatch.capability_table()`)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert dispatch.capability_table() in readme


def _feature_call(feature, device):
    """A small call using `feature` (one of `backends.FEATURES`) and nothing else beyond SDPA's."""
    dtype = torch.float64 if feature == "float64" else torch.float32
    q, k = torch.randn(2, 2, 5, 16, dtype=dtype, device=device), torch.randn(2, 2, 7, 16, dtype=dtype,
                                                                             device=device)
    kwargs = {
        "causal_offset": dict(causal_offset=3), "window_size": dict(window=(2, -1)),
        "seqused_k": dict(seqused_k=torch.tensor([3, 7], dtype=torch.int32, device=device)),
        "attn_mask": dict(attn_mask=torch.rand(5, 7, device=device) > 0.5), "dropout_p": dict(dropout_p=0.1),
        "block_map": dict(block_map=BlockMap(torch.ones(1, 1, dtype=torch.bool, device=device), 64)),
        "softcap": dict(softcap=2.0), "alibi_slopes": dict(alibi_slopes=torch.rand(1, 2, device=device)),
        "sink": dict(sink=torch.zeros(2, device=device)), "float64": {},
    }[feature]
    return _call(q, k, k, **kwargs)


@pytest.mark.parametrize("feature", backends.FEATURES)
def test_declared_features_are_what_verify_decides(feature):
    """The README's keyword table (`Backend.features`) says what each backend's `verify` does:
    "yes" where it takes a call with that keyword, "no" where it refuses it naming the keyword
    (the reference and torch paths, and the kernels where they run here; flash-attn's needs a
    GPU, and its mapping has tests of its own above)."""
    for backend in (backends.REFERENCE, backends.TORCH, backends.TRITON):
        device = KERNEL_DEVICE if backend is backends.TRITON else "cpu"
        reason = dispatch.why_not(backend, _feature_call(feature, device))
        if backend.features[feature] == "yes":
            assert reason == "", (backend.name, feature, reason)
        else:
            assert backend.features[feature] == "no" and feature.split("_")[0] in reason, (backend.name,
                                                                                           reason)
