"""The Triton sparsemax / alpha-entmax kernels (`kernels/entmax*.py`) against the float64 oracle
(the `entmax` package on materialised logits): the output and every gradient (q, k, v and the
length scale) over alpha in {1.25, 1.5, 2}, odd lengths, GQA, causal offsets with empty rows,
SSMax length scaling, peaked rows (one key in the support) and flat ones (every key in it); the
saved row max and threshold against `attention.reference.entmax_threshold`; the custom ops under
opcheck and torch.compile; and the dispatch through `longattn.scaled_dot_product_attention`.
Packed documents are tested in `tests/test_varlen.py`.

On CPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set before longattn is
imported); on a GPU run with TRITON_INTERPRET=0 to test the compiled kernel.
"""

import math

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import longattn
from longattn.attention.reference import entmax_threshold
from longattn.kernels import entmax as kem

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import allowed_keys, check_rule, leaves, tensors
from oracles import attention_oracle, case_id, grads, rel_err

DEVICE = KERNEL_DEVICE
if INTERPRET and not isinstance(kem.entmax_attention_fwd_kernel.fn, InterpretedFunction):
    raise RuntimeError(
        "longattn.kernels.entmax was imported before TRITON_INTERPRET=1 was set, so its kernel was "
        "compiled for a GPU; set the variable in tests/conftest.py, before any import of longattn"
    )
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
ALPHAS = [pytest.param(1.25, id="a1.25"), pytest.param(1.5, id="a1.5"), pytest.param(2.0, id="sparsemax")]


def entmax_logits(q, k, scale, alpha, s, allowed):
    """Float64 logits in entmax units, `x = (alpha - 1) scale f_i q.k`, masked keys at -inf."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    x = (alpha - 1) * scale * (q @ k.transpose(-1, -2))
    if s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).double()
        x = x * torch.as_tensor(s, dtype=torch.float64).expand(q.shape[1]).reshape(-1, 1, 1) * torch.log(n)
    return x.masked_fill(~allowed.to(x.device), -math.inf)


# (B, Hq, Hkv, Nq, Nk, D, Dv, causal_offset, length_scale, query scale, extra id)
CASES = [
    (1, 2, 2, 1, 1, 16, 16, None, None, 1.0, "single"),
    (2, 2, 2, 17, 17, 40, 40, None, None, 1.0, ""),
    (1, 4, 2, 130, 65, 32, 24, None, None, 1.0, "gqa"),
    (1, 2, 1, 17, 33, 16, 16, 0, None, 1.0, "topleft"),
    (1, 2, 2, 33, 17, 16, 16, -16, None, 1.0, "bottomright-empty"),  # Nk - Nq: rows 0..15 see nothing
    (1, 2, 2, 20, 130, 16, 16, 110, None, 1.0, "bottomright"),
    (1, 3, 1, 17, 40, 16, 16, 5, "tensor", 1.0, "ssmax"),
    (1, 2, 2, 17, 40, 16, 16, None, 0.6, 1.0, "ssmax-float"),
    (1, 2, 2, 17, 70, 16, 16, None, None, 40.0, "peaked"),
    (1, 2, 2, 17, 70, 16, 16, None, None, 1e-3, "flat"),
]


def case_param(B, Hq, Hkv, Nq, Nk, D, Dv, off, s, qs, extra):
    return pytest.param(B, Hq, Hkv, Nq, Nk, D, Dv, off, s, qs,
                        id=case_id(B, Hq, Hkv, Nq, Nk, D, Dv, off is not None, extra=extra))


def make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, s_kind, q_scale):
    q = (q_scale * torch.randn(B, Hq, Nq, D)).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, D).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, Dv).to(DEVICE, dtype)
    s = (0.4 + torch.rand(Hq)).to(DEVICE) if s_kind == "tensor" else s_kind
    return q, k, v, s


HALF_CASE_IDS = ("gqa", "bottomright-empty", "ssmax", "peaked")


def params():
    out = []
    for dtype in DTYPES:
        for c in CASES:
            if dtype != torch.float32 and c[-1] not in HALF_CASE_IDS:
                continue
            for a in ALPHAS:
                p = case_param(*c)
                out.append(pytest.param(*p.values, a.values[0], dtype, id=f"{p.id}-{a.id}-{str(dtype)[6:]}"))
    return out


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,off,s_kind,q_scale,alpha,dtype", params())
def test_matches_oracle(B, Hq, Hkv, Nq, Nk, D, Dv, off, s_kind, q_scale, alpha, dtype):
    """Output and gradients err at most 2x what the reference backend errs in the same dtype,
    + atol; rows with no key give 0 with gradient 0, and save row max 0 and tau +inf."""
    args = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, s_kind, q_scale)  # q, k, v, s
    args = [t.requires_grad_() if torch.is_tensor(t) else t for t in args]
    base_args, ref_args = leaves(args), leaves(args, torch.float64)
    scale = D ** -0.5
    allowed = allowed_keys(Nq, Nk, off)

    out = kem.entmax_attention(*args[:3], scale=scale, alpha=alpha, causal_offset=off, length_scale=args[3])
    ref = attention_oracle(*ref_args[:3], normalizer="entmax", alpha=alpha, attn_mask=allowed, scale=scale,
                           length_scale=ref_args[3])
    base = longattn.scaled_dot_product_attention(
        *base_args[:3], normalizer="entmax", alpha=alpha, scale=scale, causal_offset=off,
        length_scale=base_args[3], enable_gqa=Hq != Hkv, backend="reference",
    )
    assert out.dtype == dtype and out.shape == (B, Hq, Nq, Dv)
    check_rule(out.detach().cpu(), base.detach(), ref.detach(), dtype, "out")

    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu() for g in grads(out, tensors(args), do.to(DEVICE, dtype))]
    g_base = grads(base, tensors(base_args), do.to(dtype))
    g_ref = grads(ref, tensors(ref_args), do)
    for name, g, g_b, g_r in zip("qkvs", got, g_base, g_ref, strict=False):  # no s without a tensor s
        assert g.shape == g_r.shape and g.isfinite().all(), name
        check_rule(g, g_b, g_r, dtype, f"d{name}")

    empty = ~allowed.any(-1)  # (Nq,)
    if empty.any():
        assert (out[:, :, empty.to(DEVICE)] == 0).all() and (got[0][:, :, empty] == 0).all()
        _, row_max, tau, _ = kem.entmax_attention_fwd(*args[:3], scale, alpha, off, args[3])
        assert (row_max[:, :, empty.to(DEVICE)] == 0).all()
        assert torch.isinf(tau[:, :, empty.to(DEVICE)]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("alpha", [pytest.param(1.25, id="a1.25"), pytest.param(2.0, id="sparsemax")])
def test_wide_head_dims_and_strides(alpha, dtype, nan_empty):
    """D = 200, Dv = 136 pad to 256; q, k in (B, N, H, D) storage, v in (B, H, Dv, N)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = 1, 2, 1, 19, 37, 200, 136
    q = torch.randn(B, Nq, Hq, D).to(DEVICE, dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Nk, Hkv, D).to(DEVICE, dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Hkv, Dv, Nk).to(DEVICE, dtype).transpose(2, 3).requires_grad_()
    out = kem.entmax_attention(q, k, v, alpha=alpha, causal_offset=18)
    base_args, ref_args = leaves([q, k, v]), leaves([q, k, v], torch.float64)
    ref = attention_oracle(*ref_args, normalizer="entmax", alpha=alpha, attn_mask=allowed_keys(Nq, Nk, 18))
    base = longattn.scaled_dot_product_attention(*base_args, normalizer="entmax", alpha=alpha,
                                                 causal_offset=18, enable_gqa=True, backend="reference")
    check_rule(out.detach().cpu(), base.detach(), ref.detach(), dtype, "out")
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = grads(out, (q, k, v), do.to(DEVICE, dtype))
    g_base, g_ref = grads(base, base_args, do.to(dtype)), grads(ref, ref_args, do)
    for name, g, g_b, g_r in zip("qkv", got, g_base, g_ref, strict=True):
        check_rule(g.cpu(), g_b, g_r, dtype, f"d{name}")


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,off,s_kind,q_scale", [
    case_param(*c) for c in CASES if c[-1] in ("gqa", "bottomright-empty", "ssmax", "peaked", "flat")
])
def test_saved_threshold(B, Hq, Hkv, Nq, Nk, D, Dv, off, s_kind, q_scale, alpha, nan_empty):
    """`row_max` and `tau` (fp32, entmax units) match the float64 max and the reference
    threshold of `x - max`, up to fp32 rounding of the logits."""
    q, k, v, s = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float32, s_kind, q_scale)
    scale = D ** -0.5
    _, row_max, tau, _ = kem.entmax_attention_fwd(q, k, v, scale, alpha, off, s)
    allowed = allowed_keys(Nq, Nk, off)
    x = entmax_logits(q.cpu(), k.cpu(), scale, alpha, s.cpu() if torch.is_tensor(s) else s, allowed)
    rows = allowed.any(-1)
    x = x[:, :, rows]
    m = x.amax(-1, keepdim=True)
    tau_ref = entmax_threshold(x - m, alpha)[..., 0]
    # fp32 logits err by ~1e-7 of their size: 1e-6 of the row max bounds it
    tol = 1e-5 + 1e-6 * m[..., 0].abs()
    assert ((row_max.cpu()[:, :, rows].double() - m[..., 0]).abs() <= tol).all()
    assert ((tau.cpu()[:, :, rows].double() - tau_ref).abs() <= tol).all()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_newton_converges_in_few_passes(alpha, monkeypatch):
    """From t = -1 Newton rises to the root: on N(0, 1) logits six passes (the last confirming)
    reach the converged fp32 threshold, and the uncapped run equals it. The cap is the module's
    MAX_NEWTON_STEPS, which the launcher reads at each call.

    Passes until the fp32 threshold stops changing, the last one confirming, as measured on 32
    rows of N(0, 1) logits at N = 512 and 2048: 5 (alpha 1.25), 6 (1.5), 6 (2); with peaked rows
    (q scaled 30x) 1 to 3; nearly flat rows (q scaled 1e-3) 2 to 5; on the GPU benchmark's
    structured inputs (N = 2048) 5 for all three."""
    q, k, v = torch.randn(1, 1, 32, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    _, _, tau, _ = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, None)
    monkeypatch.setattr(kem, "MAX_NEWTON_STEPS", 6)
    _, _, tau_6, _ = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, None)
    assert torch.equal(tau, tau_6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bisection_safeguard_alone_finds_the_same_threshold(alpha, nan_empty, monkeypatch):
    """The safeguard's bracket [-1, -n^(1-alpha)] and its bisection, run without Newton steps
    (real inputs never leave the bracket; the module's testing hook BISECT_ONLY makes every step
    one): tau within its stopping width of Newton's, the same output under the usual rule, and
    tile flags that still cover every weight."""
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    out, _, tau, flags = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, 10)
    monkeypatch.setattr(kem, "BISECT_ONLY", True)
    out_b, _, tau_b, flags_b = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, 10)
    finite = tau.isfinite()
    assert torch.equal(finite, tau_b.isfinite())
    assert (tau_b[finite] - tau[finite]).abs().max() < 4 * kem.NEWTON_TOL
    ref = attention_oracle(q.cpu(), k.cpu(), v.cpu(), normalizer="entmax", alpha=alpha, scale=0.25,
                           attn_mask=allowed_keys(40, 70, 10))
    assert rel_err(out_b.cpu(), ref) < 1e-5
    assert torch.equal(flags_b, flags)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("off", [None, 0], ids=["full", "causal"])
def test_tile_flags_mark_exactly_the_tiles_with_weight(alpha, off):
    """The forward's flags are set exactly on the (query block, key tile) pairs holding a
    non-zero weight of the float64 oracle's (checked on inputs whose weights are far from the
    threshold's rounding), and such inputs leave most tiles clear: the skipping happens."""
    Nq = Nk = 200
    # keys in 8 groups of 25 with a shared direction; each query sees its own group's strongly
    g = torch.Generator().manual_seed(1)
    dirs = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    group = torch.arange(Nk) // 25
    k = (0.05 * torch.randn(1, 1, Nk, 16, generator=g) + 4 * dirs[group]).to(DEVICE)
    q = (0.05 * torch.randn(1, 1, Nq, 16, generator=g) + 4 * dirs[group]).to(DEVICE)
    v = torch.randn(1, 1, Nk, 16).to(DEVICE)
    _, _, _, flags = kem.entmax_attention_fwd(q, k, v, 16 ** -0.5, alpha, off)
    block_m, block_n = kem._tile_blocks(16, 16, torch.float32)
    x = entmax_logits(q.cpu(), k.cpu(), 16 ** -0.5, alpha, None, allowed_keys(Nq, Nk, off))[0, 0]
    x = x - x.amax(-1, keepdim=True)
    nonzero = x > entmax_threshold(x, alpha)
    n_qb, n_kb = flags.shape[1:]
    padded = torch.nn.functional.pad(nonzero, (0, n_kb * block_n - Nk, 0, n_qb * block_m - Nq))
    expected = padded.view(n_qb, block_m, n_kb, block_n).any(3).any(1)
    assert torch.equal(flags[0].cpu().bool(), expected)
    assert expected.float().mean() < 0.5


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("alpha", [1.02, 1.1, 1.99])
def test_alpha_near_the_ends_of_its_range(alpha):
    """alpha near 1 (weights d ** 50, near softmax) and near 2 (near sparsemax): output and
    gradients under the same rule, causal with GQA and odd lengths."""
    q = (2 * torch.randn(1, 4, 37, 16)).to(DEVICE).requires_grad_()
    k = torch.randn(1, 2, 45, 16).to(DEVICE).requires_grad_()
    v = torch.randn(1, 2, 45, 16).to(DEVICE).requires_grad_()
    out = kem.entmax_attention(q, k, v, alpha=alpha, causal_offset=8)
    base_args, ref_args = leaves([q, k, v]), leaves([q, k, v], torch.float64)
    allowed = allowed_keys(37, 45, 8)
    ref = attention_oracle(*ref_args, normalizer="entmax", alpha=alpha, attn_mask=allowed)
    base = longattn.scaled_dot_product_attention(*base_args, normalizer="entmax", alpha=alpha,
                                                 causal_offset=8, enable_gqa=True, backend="reference")
    check_rule(out.detach().cpu(), base.detach(), ref.detach(), torch.float32, "out")
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = grads(out, (q, k, v), do.float().to(DEVICE))
    g_base, g_ref = grads(base, base_args, do.float()), grads(ref, ref_args, do)
    for name, g, g_b, g_r in zip("qkv", got, g_base, g_ref, strict=True):
        check_rule(g.cpu(), g_b, g_r, torch.float32, f"d{name}")


def test_entry_defaults():
    """scale defaults to D ** -0.5; is_causal is causal_offset 0; bad alpha is refused."""
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    out = kem.entmax_attention(q, k, v, alpha=1.5, is_causal=True)
    expected, _, _, _ = kem.entmax_attention_fwd(q, k, v, 16 ** -0.5, 1.5, 0)
    assert torch.equal(out, expected)
    for alpha in (1.0, 2.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            kem.entmax_attention(q, k, v, alpha=alpha)


def test_no_keys_or_no_queries():
    """Nk = 0 gives 0 and zero gradients; Nq = 0 gives an empty output and dk = dv = 0."""
    for n_q, n_k in ((5, 0), (0, 7)):
        q = torch.randn(1, 2, n_q, 16, device=DEVICE, requires_grad=True)
        k = torch.randn(1, 2, n_k, 16, device=DEVICE, requires_grad=True)
        v = torch.randn(1, 2, n_k, 8, device=DEVICE, requires_grad=True)
        out = kem.entmax_attention(q, k, v, alpha=1.25)
        assert out.shape == (1, 2, n_q, 8) and (out == 0).all()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_huge_logits_stay_finite(nan_empty):
    """Logits around 1e4 (q scaled 3e3): the row max is subtracted before the threshold, so the
    output and every gradient are finite, and the output is as close to the oracle as the other
    backends' (`test_edge_cases.py`, 1e-4). dV = P^T dO is held to the fp32 spacing of the
    logits: the backward recomputes `x` (about 2500 in entmax units, spacing 2.4e-4) in another
    summation order, and `p = d ** (1 / (alpha - 1))` of the one key in each support moves with
    it, as exp(x - lse) does in any recomputing softmax backward. dQ and dK are exactly 0 here
    (one key per support), so only their finiteness is asserted."""
    q = (3e3 * torch.randn(1, 2, 9, 16)).to(DEVICE).requires_grad_()
    k = torch.randn(1, 2, 21, 16).to(DEVICE).requires_grad_()
    v = torch.randn(1, 2, 21, 16).to(DEVICE).requires_grad_()
    for alpha in (1.25, 1.5, 2.0):
        out = kem.entmax_attention(q, k, v, alpha=alpha)
        ref_args = leaves([q, k, v], torch.float64)
        ref = attention_oracle(*ref_args, normalizer="entmax", alpha=alpha)
        assert rel_err(out.detach().cpu(), ref.detach()) < 1e-4
        do = torch.randn(ref.shape, dtype=torch.float64)
        dq, dk, dv = grads(out, (q, k, v), do.float().to(DEVICE))
        assert dq.isfinite().all() and dk.isfinite().all()
        x_max = (alpha - 1) * (q.detach() @ k.detach().transpose(-1, -2)).abs().max().item() / 4
        spacing = torch.finfo(torch.float32).eps * 2.0 ** math.ceil(math.log2(x_max))
        assert rel_err(dv.cpu(), grads(ref, ref_args[2:], do)[0]) < 4 * spacing / (alpha - 1)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_spoils_the_rows_the_definition_spoils(alpha, where):
    """A NaN in a query row, or in a key, gives NaN in exactly the output rows where the float64
    reference has NaN (a causal row before the NaN key stays finite). Gradients are NaN at
    least where they depend on the NaN (dQ of those rows; dK, dV of every key those rows see)
    and at most where the reference's are (its products spread 0 * NaN further; the kernels
    spread it only within a tile)."""
    q, k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    if where == "query":
        q[0, 1, 40, 3] = float("nan")
    else:
        k[0, 0, 45, 2] = float("nan")
    args = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = kem.entmax_attention(*args, alpha=alpha, is_causal=True)
    ref_args = leaves(args, torch.float64)
    ref = longattn.scaled_dot_product_attention(*ref_args, normalizer="entmax", alpha=alpha, is_causal=True,
                                                backend="reference")
    nan_rows = ref.isnan().any(-1)  # (1, H, N)
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(out.detach().cpu().isnan().any(-1), nan_rows)
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu().isnan().any(-1) for g in grads(out, args, do.float().to(DEVICE))]
    expected = [g.isnan().any(-1) for g in grads(ref, ref_args, do)]
    last_row = nan_rows.float().mul(torch.arange(70)).amax(-1, keepdim=True)  # (1, H, 1)
    seen_keys = (torch.arange(70) <= last_row) & nan_rows.any(-1, keepdim=True)
    for name, g, g_ref, needed in zip("qkv", got, expected, (nan_rows, seen_keys, seen_keys), strict=True):
        assert (g >= needed).all(), f"d{name} is finite where it depends on the NaN"
        assert (g <= g_ref).all(), f"d{name} is NaN where the reference's is not"


def test_custom_ops_opcheck():
    q, k, v = torch.randn(1, 4, 13, 16), torch.randn(1, 2, 19, 16), torch.randn(1, 2, 19, 8)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    s = (0.5 + torch.rand(4)).to(DEVICE)
    for alpha in (1.5, 1.3):
        torch.library.opcheck(torch.ops.longattn.entmax_attention_fwd, (q, k, v, 0.25, alpha, 3, s))
        out, row_max, tau, flags = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, 3, s)
        args = (torch.randn_like(out), q, k, v, row_max, tau, flags, 0.25, alpha, 3, s)
        torch.library.opcheck(torch.ops.longattn.entmax_attention_bwd, args)


def test_torch_compile_fullgraph():
    """torch.compile traces the public function into the kernels, forward and backward, with no
    graph break; alpha travels as an argument of the ops."""
    q = torch.randn(1, 4, 17, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 23, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 23, 16, device=DEVICE, requires_grad=True)
    s = (0.5 + torch.rand(4, device=DEVICE)).requires_grad_()

    def attend(q, k, v, s):
        return longattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                     normalizer="entmax", alpha=1.25, length_scale=s,
                                                     backend="triton")

    compiled = torch.compile(attend, fullgraph=True)
    results = [fn(q, k, v, s) for fn in (compiled, attend)]
    torch.testing.assert_close(results[0], results[1])
    do = torch.randn_like(results[1])
    got, expected = (torch.autograd.grad(r, (q, k, v, s), do) for r in results)
    torch.testing.assert_close(got, expected)
