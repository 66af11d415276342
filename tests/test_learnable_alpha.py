"""Tensor and learnable alpha (entmax, one per head): the outputs and every gradient, alpha's
included, against `entmax.entmax_bisect` on materialised float64 logits (whose backward gives
alpha's gradient); `gradcheck` with alpha among the inputs; the kernels in the interpreter with
GQA, causal offsets, length scaling, logit modifiers and packed documents; the checks; and the
layers, whose learnable alpha moves where a loss wants it.
"""

import pytest
import torch

import longattn
from longattn.attention import MultiheadAttention, ScaledDotProductAttention, reference
from longattn.attention.modules import alpha_logit
from longattn.kernels.common import MIN_ALPHA
from longattn.models import needle
from longattn.models.transformer import Transformer, TransformerConfig

from conftest import KERNEL_DEVICE
from helpers import check_kernel_call, leaves
from oracles import attention_oracle, grads

HEAD_ALPHAS = [1.15, 1.5, 1.8, 2.0]  # the special values too: a tensor takes the general path


def inputs(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, device="cpu"):
    return [torch.randn(*shape, dtype=dtype).to(device).requires_grad_()
            for shape in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))]


def sdpa(q, k, v, alpha, backend, **kw):
    return longattn.scaled_dot_product_attention(q, k, v, normalizer="entmax", alpha=alpha, backend=backend,
                                                 enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("alpha,causal,length_scale", [
    pytest.param(HEAD_ALPHAS, False, None, id="per-head"),
    pytest.param(HEAD_ALPHAS, True, [0.6, 0.9, 1.2, 1.5], id="per-head-causal-ls"),
    pytest.param(1.3, True, None, id="one-tensor-causal"),
])
def test_matches_entmax_bisect(alpha, causal, length_scale, backend):
    q, k, v = inputs(2, 4, 2, 7, 9, 8)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    s = None if length_scale is None else torch.tensor(length_scale, dtype=torch.float64)
    out = sdpa(q, k, v, a, backend, is_causal=causal, length_scale=s)
    oracle_in = leaves([q, k, v, a])
    want = attention_oracle(*oracle_in[:3], normalizer="entmax", alpha=oracle_in[3], is_causal=causal,
                            length_scale=s)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    do = torch.randn_like(want)
    for name, got, expected in zip("q k v alpha".split(), grads(out, [q, k, v, a], do),
                                   grads(want, oracle_in, do), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9, msg=name)


def test_float32_against_float64(backend):
    q, k, v = inputs(1, 4, 2, 13, 11, 8, dtype=torch.float32)
    a = torch.tensor(HEAD_ALPHAS, requires_grad=True)
    out = sdpa(q, k, v, a, backend, causal_offset=1)
    ref_in = leaves([q, k, v, a], torch.float64)
    want = sdpa(*ref_in, "reference", causal_offset=1)
    do = torch.randn_like(want)
    for got, expected in zip(grads(out, [q, k, v, a], do.float()), grads(want, ref_in, do)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sink", [False, True], ids=["plain", "sink"])
def test_gradcheck_with_alpha(backend, sink):
    q, k, v = inputs(1, 2, 1, 3, 5, 4)
    a = torch.tensor([1.3, 1.9], dtype=torch.float64, requires_grad=True)
    kw = {"sink": torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)} if sink else {}

    def attend(q, k, v, a, *sink):
        return sdpa(q, k, v, a, backend, causal_offset=2, **dict(zip(kw, sink)))

    assert torch.autograd.gradcheck(attend, (q, k, v, a, *kw.values()))


def test_reference_row_function_matches_entmax_bisect():
    """The row function alone, one alpha per row, alpha's gradient included."""
    import entmax

    z = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    a = (1.05 + 0.95 * torch.rand(3, 5, 1, dtype=torch.float64)).requires_grad_()
    p, want = reference.entmax(z, a), entmax.entmax_bisect(z, alpha=a, dim=-1, n_iter=100)
    torch.testing.assert_close(p, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(p)
    for got, expected in zip(torch.autograd.grad(p, (z, a), g), torch.autograd.grad(want, (z, a), g)):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The kernels (the interpreter on CPU)


def kernel_case(q, k, v, a, **kw):
    out = sdpa(q, k, v, a, "triton", **kw)
    names = ["q", "k", "v", "alpha"] + [n for n in ("length_scale", "sink") if torch.is_tensor(kw.get(n))]
    extra = [kw[n] for n in names[4:]]

    def reference_call(args):
        q, k, v, a, *rest = args
        return sdpa(q, k, v, a, "reference", **{**kw, **dict(zip(names[4:], rest))})

    return check_kernel_call(out, [q, k, v, a, *extra], reference_call, q.dtype, names)


@pytest.mark.parametrize("kw", [
    pytest.param({"causal_offset": 3, "length_scale": "tensor"}, id="gqa-causal-ls"),
    pytest.param({"softcap": 2.5, "alibi": True, "sink": True, "mask": True}, id="cap-alibi-sink-mask"),
])
def test_kernels_per_head_alpha(kw, nan_empty):
    q, k, v = inputs(2, 4, 2, 37, 45, 16, dtype=torch.float32, device=KERNEL_DEVICE)
    a = torch.tensor(HEAD_ALPHAS, device=KERNEL_DEVICE, requires_grad=True)
    call = {key: value for key, value in kw.items() if key not in ("length_scale", "alibi", "sink", "mask")}
    if kw.get("length_scale"):
        call["length_scale"] = (0.5 + torch.rand(4)).to(KERNEL_DEVICE).requires_grad_()
    if kw.get("alibi"):
        call["alibi_slopes"] = torch.tensor([0.05, 0.1, 0.2, 0.4], device=KERNEL_DEVICE)
    if kw.get("sink"):
        call["sink"] = torch.randn(4, device=KERNEL_DEVICE).requires_grad_()
    if kw.get("mask"):
        call["attn_mask"] = 0.5 * torch.randn(2, 1, 37, 45, device=KERNEL_DEVICE)
    got = kernel_case(q, k, v, a, **call)
    assert torch.isfinite(got[3]).all() and got[3].abs().min() > 0  # every head's alpha moves


def test_kernels_one_alpha_half_precision():
    q, k, v = inputs(1, 2, 2, 33, 40, 16, dtype=torch.float16, device=KERNEL_DEVICE)
    a = torch.tensor(1.35, device=KERNEL_DEVICE, requires_grad=True)
    kernel_case(q, k, v, a, is_causal=True)


def test_kernels_packed_documents():
    lengths, H, Hkv, D = [5, 19, 1, 12], 4, 2, 16
    cu = torch.tensor([0, 5, 24, 25, 37], dtype=torch.int32, device=KERNEL_DEVICE)
    q = torch.randn(37, H, D, device=KERNEL_DEVICE).requires_grad_()
    k, v = (torch.randn(37, Hkv, D, device=KERNEL_DEVICE).requires_grad_() for _ in range(2))
    a = torch.tensor(HEAD_ALPHAS, device=KERNEL_DEVICE, requires_grad=True)

    def attend(q, k, v, a, backend):
        return longattn.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), is_causal=True,
                                         normalizer="entmax", alpha=a, backend=backend)

    out = attend(q, k, v, a, "triton")
    ref_in = leaves([q, k, v, a], torch.float64)
    want = attend(*[t.to(KERNEL_DEVICE) for t in ref_in], "reference").cpu()
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-6)
    do = torch.randn_like(want)
    for got, expected in zip(grads(out, [q, k, v, a], do.float().to(KERNEL_DEVICE)), grads(want, ref_in, do)):
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checks


@pytest.mark.parametrize("alpha,error,match", [
    (torch.tensor([1.5, 1.5, 1.5]), ValueError, r"alpha must have shape \(4,\)"),
    (torch.tensor([2, 2, 2, 2]), TypeError, "alpha tensor must be floating"),
    (torch.tensor([1.5, 2.5, 1.5, 1.5]), ValueError, r"alpha must be in \[1.01, 2\]"),
    (torch.tensor(1.0), ValueError, r"alpha must be in \[1.01, 2\]"),
    (torch.tensor(float("nan")), ValueError, r"alpha must be in \[1.01, 2\]"),
    (torch.tensor([1.5] * 4, device="meta"), ValueError, "alpha must be on cpu"),
])
def test_bad_tensor_alpha(alpha, error, match):
    q, k, v = inputs(1, 4, 2, 3, 3, 4)
    with pytest.raises(error, match=match):
        sdpa(q, k, v, alpha, "auto")


def test_kernel_entry_checks_a_tensor_alpha():
    from longattn.kernels.entmax import entmax_attention

    q, k, v = inputs(1, 4, 2, 3, 3, 4, dtype=torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(TypeError, match="alpha tensor must be floating"):
        entmax_attention(q, k, v, alpha=torch.tensor([2, 2, 2, 2], device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        entmax_attention(q, k, v, alpha=torch.tensor([1.5, 1.5], device=KERNEL_DEVICE))


@pytest.mark.parametrize("normalizer", ["softmax", "ssmax", "sparsemax"])
def test_tensor_alpha_only_for_entmax(normalizer):
    q, k, v = inputs(1, 2, 2, 3, 3, 4)
    with pytest.raises(ValueError, match="a tensor alpha is read by normalizer='entmax' only"):
        longattn.scaled_dot_product_attention(q, k, v, normalizer=normalizer, alpha=torch.tensor(1.5))


# ---------------------------------------------------------------------------------------------
# Layers, the model and the study


def test_learnable_alpha_moves_where_the_loss_wants(backend):
    """Retrieving the one key whose logit stands out wants sparser weights (alpha up); averaging
    every value wants denser ones (alpha down)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    top = (q @ k.transpose(-1, -2)).argmax(-1)  # (1, 2, 6)
    targets = {"sparser": v.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, 8)),
               "denser": v.mean(2, keepdim=True).expand(-1, -1, 6, -1)}
    for direction, target in targets.items():
        layer = ScaledDotProductAttention("entmax", num_heads=2, alpha="learnable", backend=backend).double()
        start = layer.alpha.detach().clone()
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        for _ in range(30):
            optimizer.zero_grad()
            loss = (layer(q, k, v) - target).square().mean()
            loss.backward()
            optimizer.step()
        moved = layer.alpha.detach() - start
        assert ((moved > 0.05) if direction == "sparser" else (moved < -0.05)).all(), (direction, moved)
        assert ((layer.alpha >= MIN_ALPHA) & (layer.alpha <= 2)).all()


def test_learnable_alpha_layer():
    layer = ScaledDotProductAttention("entmax", num_heads=3, alpha="learnable", initial_alpha=1.3)
    torch.testing.assert_close(layer.alpha, torch.full((3,), 1.3))
    assert list(dict(layer.named_parameters())) == ["alpha_logit"]
    assert "alpha='learnable'" in repr(layer)
    assert alpha_logit(1.3) == pytest.approx(layer.alpha_logit[0].item())
    mha = MultiheadAttention(16, 4, 2, normalizer="entmax", alpha="learnable", initial_alpha=1.7)
    torch.testing.assert_close(mha.attention.alpha, torch.full((4,), 1.7))
    x = torch.randn(2, 5, 16)
    mha(x, is_causal=True).sum().backward()
    assert mha.attention.alpha_logit.grad.abs().min() > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"normalizer": "softmax", "num_heads": 2, "alpha": "learnable"}, "alpha='learnable' is for normalizer"),
    ({"normalizer": "entmax", "alpha": "learnable"}, "num_heads is needed"),
    ({"normalizer": "entmax", "num_heads": 2, "alpha": "learnable", "initial_alpha": 2.0}, "initial_alpha"),
    ({"normalizer": "entmax", "num_heads": 2, "alpha": "learn"}, "'learnable'"),
])
def test_learnable_alpha_layer_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaledDotProductAttention(**kwargs)


def test_transformer_learns_alpha_and_saves_it(tmp_path):
    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layer=1, n_head=2, n_kv_head=1, normalizer="entmax",
                            alpha="learnable", initial_alpha=1.4, backend="torch")
    model = Transformer(cfg)
    idx = torch.randint(0, 32, (2, 9))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    logit = model.blocks[0].attn.attend.alpha_logit
    assert logit.grad.abs().min() > 0
    with torch.no_grad():
        logit.add_(torch.tensor([0.3, -0.2]))
    model.save(tmp_path / "m.pt")
    loaded = Transformer.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.blocks[0].attn.attend.alpha, model.blocks[0].attn.attend.alpha)
    with pytest.raises(ValueError, match="alpha='learnable' is for normalizer"):
        TransformerConfig(normalizer="sparsemax", alpha="learnable")


def test_study_settings_learn_alpha():
    assert needle.parse_setting("entmax-learn") == {"normalizer": "entmax", "alpha": "learnable"}
    assert needle.parse_setting("entmax-learn+ls")["length_scale"] is None
    cfg = needle.StudyConfig(settings=("entmax-learn+ls",))
    model_cfg = cfg.model_config("entmax-learn+ls")
    assert model_cfg.alpha == "learnable" and model_cfg.length_scale is not None
    for bad in ("softmax-learn", "sparsemax-learn", "entmax-learn1.3"):
        with pytest.raises(ValueError):
            needle.parse_setting(bad)


# ---------------------------------------------------------------------------------------------
# The custom ops and torch.compile


def test_custom_ops_opcheck_with_alphas():
    from longattn.kernels import entmax as kem

    q = torch.randn(1, 4, 13, 16, device=KERNEL_DEVICE)
    k, v = torch.randn(1, 2, 19, 16, device=KERNEL_DEVICE), torch.randn(1, 2, 19, 8, device=KERNEL_DEVICE)
    alphas = torch.tensor(HEAD_ALPHAS, device=KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.longattn.entmax_attention_fwd, (q, k, v, 0.25, 0.0, 3, None),
                          {"alphas": alphas})
    out, row_max, tau, flags = kem.entmax_attention_fwd(q, k, v, 0.25, 0.0, 3, alphas=alphas)
    torch.library.opcheck(torch.ops.longattn.entmax_attention_bwd,
                          (torch.randn_like(out), q, k, v, row_max, tau, flags, 0.25, 0.0, 3, None),
                          {"alphas": alphas, "alpha_grad": True})
    qd, kd, vd = (t.double() for t in (q.cpu(), k.cpu(), v.cpu()))
    args = (qd, kd, vd, None, alphas.double().cpu(), None, None, None, 3, None, 0.25, 0.0, 0.0, None, None)
    torch.library.opcheck(torch.ops.longattn.blockwise_entmax_fwd, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_learns_alpha(backend):
    """A layer's learnable alpha through torch.compile(fullgraph=True): the same output and
    gradients, alpha's included, as eager."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    layer = ScaledDotProductAttention("entmax", num_heads=4, alpha="learnable", backend=backend).to(device)
    q, k, v = inputs(1, 4, 2, 17, 23, 16, dtype=torch.float32, device=device)

    def attend(q, k, v):
        return layer(q, k, v, is_causal=True, enable_gqa=True)

    compiled = torch.compile(attend, fullgraph=True)
    results = [fn(q, k, v) for fn in (compiled, attend)]
    torch.testing.assert_close(results[0], results[1])
    do = torch.randn_like(results[1])
    got, expected = (torch.autograd.grad(r, (q, k, v, layer.alpha_logit), do) for r in results)
    torch.testing.assert_close(got, expected)
