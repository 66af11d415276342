"""The Triton sparsemax / alpha-entmax forward kernel (`kernels/entmax.py`) against the float64
oracle (the `entmax` package): the output over alpha in {1.25, 1.5, 2}, odd lengths, GQA, causal
offsets with empty rows, SSMax length scaling, peaked and flat rows; and the saved row max and
threshold against `attention.reference.entmax_threshold`. Forward only: the backward comes next.

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
from conftest import INTERPRET, KERNEL_ATOL, KERNEL_DEVICE
from oracles import attention_oracle, case_id, rel_err

DEVICE = KERNEL_DEVICE
if INTERPRET and not isinstance(kem.entmax_attention_fwd_kernel.fn, InterpretedFunction):
    raise RuntimeError(
        "longattn.kernels.entmax was imported before TRITON_INTERPRET=1 was set, so its kernel was "
        "compiled for a GPU; set the variable in tests/conftest.py, before any import of longattn"
    )
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

ATOL = KERNEL_ATOL
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
ALPHAS = [pytest.param(1.25, id="a1.25"), pytest.param(1.5, id="a1.5"), pytest.param(2.0, id="sparsemax")]


def allowed_keys(n_q, n_k, causal_offset):
    """Key j allowed for row i iff j <= i + causal_offset; everything when not causal."""
    if causal_offset is None:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + causal_offset


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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,off,s_kind,q_scale", [case_param(*c) for c in CASES])
def test_forward_matches_oracle(B, Hq, Hkv, Nq, Nk, D, Dv, off, s_kind, q_scale, alpha, dtype, nan_empty):
    """The output errs at most 2x what the reference backend errs in the same dtype, + atol;
    rows with no key give 0, row max 0 and tau +inf."""
    q, k, v, s = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, s_kind, q_scale)
    scale = D ** -0.5
    out, row_max, tau = kem.entmax_attention_fwd(q, k, v, scale, alpha, off, s)

    allowed = allowed_keys(Nq, Nk, off)
    s_cpu = s.cpu() if torch.is_tensor(s) else s
    ref = attention_oracle(q.cpu(), k.cpu(), v.cpu(), normalizer="entmax", alpha=alpha,
                           attn_mask=allowed, scale=scale, length_scale=s_cpu)
    base = longattn.scaled_dot_product_attention(
        q, k, v, normalizer="entmax", alpha=alpha, scale=scale, causal_offset=off,
        length_scale=s, enable_gqa=Hq != Hkv, backend="reference",
    )
    assert out.dtype == dtype and out.shape == (B, Hq, Nq, Dv)
    err, err_base = rel_err(out.cpu(), ref), rel_err(base.cpu(), ref)
    assert err <= 2 * err_base + ATOL[dtype], f"kernel {err:.2e} vs reference backend {err_base:.2e}"

    empty = ~allowed.any(-1)  # (Nq,)
    if empty.any():
        assert (out[:, :, empty.to(DEVICE)] == 0).all()
        assert (row_max[:, :, empty.to(DEVICE)] == 0).all()
        assert torch.isinf(tau[:, :, empty.to(DEVICE)]).all()
    assert not torch.isnan(row_max).any() and not torch.isnan(tau).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("alpha", [pytest.param(1.25, id="a1.25"), pytest.param(2.0, id="sparsemax")])
def test_wide_head_dims_and_strides(alpha, dtype, nan_empty):
    """D = 200, Dv = 136 pad to 256; q, k in (B, N, H, D) storage, v in (B, H, Dv, N)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = 1, 2, 1, 19, 37, 200, 136
    q = torch.randn(B, Nq, Hq, D).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Nk, Hkv, D).to(DEVICE, dtype).transpose(1, 2)
    v = torch.randn(B, Hkv, Dv, Nk).to(DEVICE, dtype).transpose(2, 3)
    out, _, _ = kem.entmax_attention_fwd(q, k, v, D ** -0.5, alpha, 18, None)
    ref = attention_oracle(q.cpu(), k.cpu(), v.cpu(), normalizer="entmax", alpha=alpha,
                           attn_mask=allowed_keys(Nq, Nk, 18))
    base = longattn.scaled_dot_product_attention(q, k, v, normalizer="entmax", alpha=alpha, causal_offset=18,
                                                 enable_gqa=True, backend="reference")
    err, err_base = rel_err(out.cpu(), ref), rel_err(base.cpu(), ref)
    assert err <= 2 * err_base + ATOL[dtype], f"kernel {err:.2e} vs reference backend {err_base:.2e}"


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,off,s_kind,q_scale", [
    case_param(*c) for c in CASES if c[-1] in ("gqa", "bottomright-empty", "ssmax", "peaked", "flat")
])
def test_saved_threshold(B, Hq, Hkv, Nq, Nk, D, Dv, off, s_kind, q_scale, alpha, nan_empty):
    """`row_max` and `tau` (fp32, entmax units) match the float64 max and the reference
    threshold of `x - max`, up to fp32 rounding of the logits."""
    q, k, v, s = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float32, s_kind, q_scale)
    scale = D ** -0.5
    _, row_max, tau = kem.entmax_attention_fwd(q, k, v, scale, alpha, off, s)
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
def test_newton_converges_in_few_passes(alpha):
    """From t = -1 Newton rises to the root: on N(0, 1) logits six passes (the last confirming)
    reach the converged fp32 threshold, and the uncapped run equals it."""
    q, k, v = torch.randn(1, 1, 32, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    _, _, tau = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, None)
    _, _, tau_6 = kem.entmax_attention_fwd(q, k, v, 0.25, alpha, None, max_newton_steps=6)
    assert torch.equal(tau, tau_6)


def test_entry_defaults_and_refuses_grad():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    out = kem.entmax_attention_forward(q, k, v, alpha=1.5, is_causal=True)
    expected, _, _ = kem.entmax_attention_fwd(q, k, v, 16 ** -0.5, 1.5, 0)
    assert torch.equal(out, expected)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward"):
        kem.entmax_attention_forward(q, k, v)
    with torch.no_grad():  # taken as constants
        assert torch.equal(kem.entmax_attention_forward(q, k, v, alpha=1.5, is_causal=True), expected)
    with pytest.raises(ValueError, match="alpha"):
        kem.entmax_attention_forward(q.detach(), k, v, alpha=1.0)
