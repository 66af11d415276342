"""The Triton softmax kernels (`kernels/softmax.py`) against float64 oracles: the output, the lse
and every gradient, over causal offsets, GQA, odd shapes, strides and SSMax.

On CPU the kernels run in the Triton interpreter. `@triton.jit` reads TRITON_INTERPRET when a
kernel module is imported, so tests/conftest.py sets it before anything imports longattn; on a
GPU run with TRITON_INTERPRET=0 to test the compiled kernels.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from longattn.kernels import softmax as ksm

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import allowed_keys, check_rule, leaves, tensors
from oracles import attention_oracle, grads

DEVICE = KERNEL_DEVICE
if INTERPRET and not isinstance(ksm.softmax_attention_fwd_kernel.fn, InterpretedFunction):
    raise RuntimeError(
        "longattn.kernels.softmax was imported before TRITON_INTERPRET=1 was set, so its kernels "
        "were compiled for a GPU; set the variable in tests/conftest.py, before any import of longattn"
    )
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

S_FLOAT = 0.43
# the kernels refuse bfloat16 under the interpreter, whose tl.dot multiplies the raw bits
gpu_only = pytest.mark.skipif(INTERPRET, reason="bfloat16 is refused under the Triton interpreter")


def plain_attention(q, k, v, s, allowed, scale):
    """The definition materialised in plain torch in the inputs' dtype (no upcast): the baseline
    of the error rule, and in float64 the source of the reference lse. Returns (out, lse)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    z = q @ k.transpose(-1, -2)
    if s is not None:
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        z = z * torch.as_tensor(s, dtype=q.dtype).expand(q.shape[1]).reshape(-1, 1, 1) * torch.log(n)
    empty = ~allowed.any(-1, keepdim=True)
    z = (scale * z).masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0)
    p = torch.softmax(z, -1).masked_fill(empty, 0.0)
    return p @ v, torch.logsumexp(z, -1).masked_fill(empty[..., 0], -math.inf)


def make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, s_kind, strided=False):
    """`strided`: q, k in (B, N, H, D) storage, as a projection leaves them; v in (B, H, Dv, N)."""
    def leaf(b, h, n, d, order=(0, 1, 2, 3)):
        shape = [(b, h, n, d)[i] for i in order]
        t = torch.randn(shape, device=DEVICE).to(dtype).permute(*[order.index(i) for i in range(4)])
        return t.requires_grad_()

    q_order, v_order = ((0, 2, 1, 3), (0, 1, 3, 2)) if strided else ((0, 1, 2, 3),) * 2
    q, k, v = leaf(B, Hq, Nq, D, q_order), leaf(B, Hkv, Nk, D, q_order), leaf(B, Hkv, Nk, Dv, v_order)
    if s_kind == "tensor":
        s = (0.4 + torch.rand(Hq, device=DEVICE)).requires_grad_()
    elif s_kind == "scalar":
        s = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    else:
        s = S_FLOAT if s_kind == "float" else None
    return q, k, v, s


def bottom_right(Nq, Nk):
    return Nk - Nq


# (B, Hq, Hkv, Nq, Nk, D, Dv, causal_offset, length scale, strided)
CASES = [
    (1, 1, 1, 1, 1, 16, 16, None, None, False),
    (2, 4, 2, 17, 17, 40, 40, 0, None, False),
    (1, 2, 2, 130, 130, 64, 64, None, None, False),
    (1, 2, 2, 128, 128, 64, 64, 0, None, False),  # divisible sizes: the mask-free code path
    (1, 2, 2, 64, 96, 40, 24, 0, "tensor", False),  # divisible lengths, padded head dims
    (2, 2, 1, 130, 63, 64, 32, bottom_right(130, 63), None, False),  # rows 0..66 see no key
    (1, 2, 2, 17, 130, 32, 32, bottom_right(17, 130), None, False),  # decoding after a KV cache
    (1, 2, 1, 9, 12, 16, 16, -4, None, False),
    (1, 2, 1, 40, 41, 16, 16, bottom_right(40, 41), None, False),  # offset 1: key block edges
    (1, 3, 1, 40, 70, 72, 24, None, "tensor", False),
    (1, 2, 2, 33, 33, 128, 128, 0, None, False),
    (1, 1, 1, 17, 20, 256, 200, 0, None, False),
    (2, 2, 2, 65, 65, 16, 16, 0, "float", False),
    (1, 4, 2, 70, 50, 32, 32, bottom_right(70, 50), "tensor", False),  # empty rows and n_i = 1
    (1, 2, 2, 17, 1, 16, 16, None, "scalar", False),  # one key: ln(1) = 0 in every row
    (1, 2, 2, 20, 9, 16, 16, 3, "tensor", False),
    (1, 1, 1, 17, 17, 16, 16, 1000, "tensor", False),  # an offset past every key: not causal
    (1, 1, 1, 5, 3, 16, 16, -7, "tensor", False),  # an offset before every key: all rows empty
    (2, 4, 2, 33, 47, 40, 40, 0, "tensor", True),
]


def case_id(B, Hq, Hkv, Nq, Nk, D, Dv, offset, s_kind, strided):
    parts = [f"B{B}", f"H{Hq}" + (f"-{Hkv}" if Hkv != Hq else ""), f"N{Nq}" + (f"-{Nk}" if Nk != Nq else ""),
             f"D{D}" + (f"-{Dv}" if Dv != D else "")]
    if offset == 0:
        parts.append("causal")
    elif offset == bottom_right(Nq, Nk):
        parts.append("causal-br")
    elif offset is not None:
        parts.append(f"offset{offset:+d}")
    if s_kind:
        parts.append(f"ssmax-{s_kind}")
    if strided:
        parts.append("strided")
    return "-".join(parts)


def pick(*ids):
    cases = [c for c in CASES if case_id(*c) in ids]
    assert len(cases) == len(ids)
    return cases


HALF_CASES = pick("B2-H4-2-N17-D40-causal", "B2-H2-1-N130-63-D64-32-causal-br",
                  "B1-H3-1-N40-70-D72-24-ssmax-tensor", "B1-H4-2-N70-50-D32-causal-br-ssmax-tensor")
LSE_GRAD_CASES = pick("B2-H4-2-N17-D40-causal", "B1-H4-2-N70-50-D32-causal-br-ssmax-tensor",
                      "B2-H4-2-N33-47-D40-causal-ssmax-tensor-strided")


def params(cases, dtype, marks=()):
    return [pytest.param(c, dtype, id=case_id(*c) + f"-{str(dtype)[6:]}", marks=marks) for c in cases]


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize(
    "case,dtype",
    params(CASES, torch.float32) + params(HALF_CASES, torch.float16)
    + params(HALF_CASES, torch.bfloat16, gpu_only),
)
def test_matches_oracle(case, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv, offset, s_kind, strided = case
    args = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, s_kind, strided)  # q, k, v, s
    base_args, ref_args = leaves(args), leaves(args, torch.float64)
    allowed = allowed_keys(Nq, Nk, offset)

    out, lse = ksm.softmax_attention(*args[:3], causal_offset=offset, length_scale=args[3], return_lse=True)
    ref = attention_oracle(*ref_args[:3], attn_mask=allowed, length_scale=ref_args[3])
    _, ref_lse = plain_attention(*ref_args, allowed, D**-0.5)
    base, base_lse = plain_attention(*base_args, allowed, D**-0.5)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and out.shape == ref.shape and lse.shape == (B, Hq, Nq)
    assert lse.dtype == torch.float32 and lse.isfinite().eq(ref_lse.isfinite()).all()
    finite = ref_lse.isfinite()
    check_rule(out, base, ref, dtype, "out")
    check_rule(lse[finite], base_lse[finite], ref_lse[finite], dtype, "lse")

    do = torch.randn(ref.shape, dtype=torch.float64)
    got = [g.cpu() for g in grads(out, tensors(args), do.to(dtype))]  # out is the CPU copy
    g_base = grads(base, tensors(base_args), do.to(dtype))
    g_ref = grads(ref, tensors(ref_args), do)
    for name, g, g_b, g_r in zip("qkvs", got, g_base, g_ref, strict=False):  # no s without a tensor s
        assert g.shape == g_r.shape and g.dtype == g_b.dtype and g.isfinite().all(), name
        check_rule(g, g_b, g_r, dtype, f"d{name}")

    empty = ~allowed.any(-1)  # rows that see no key: output 0, lse -inf, gradient 0
    assert (out[:, :, empty] == 0).all() and (lse[:, :, empty] == -math.inf).all()
    assert (got[0][:, :, empty] == 0).all()
    assert out.isfinite().all()


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(*c)) for c in LSE_GRAD_CASES])
def test_lse_gradient(case):
    """lse is differentiable: its upstream gradient folds into the backward's row term."""
    B, Hq, Hkv, Nq, Nk, D, Dv, offset, s_kind, strided = case
    args = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float32, s_kind, strided)
    base_args, ref_args = leaves(args), leaves(args, torch.float64)
    allowed = allowed_keys(Nq, Nk, offset)
    d_out = torch.randn(B, Hq, Nq, Dv, dtype=torch.float64)
    d_lse = torch.randn(B, Hq, Nq, dtype=torch.float64)
    got = ksm.softmax_attention(*args[:3], causal_offset=offset, length_scale=args[3], return_lse=True)
    g_got = torch.autograd.grad(got, tensors(args), (d_out.to(DEVICE).float(), d_lse.to(DEVICE).float()))
    base = plain_attention(*base_args, allowed, D**-0.5)
    g_base = torch.autograd.grad(base, tensors(base_args), (d_out.float(), d_lse.float()))
    ref = plain_attention(*ref_args, allowed, D**-0.5)
    g_ref = torch.autograd.grad(ref, tensors(ref_args), (d_out, d_lse))
    for name, g, g_b, g_r in zip("qkvs", g_got, g_base, g_ref, strict=False):  # no s without a tensor s
        assert g.isfinite().all(), name
        check_rule(g.cpu(), g_b, g_r, torch.float32, f"d{name}")


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("Nq,Nk", [(5, 0), (0, 7)], ids=["N5-0", "N0-7"])
def test_no_keys_or_no_queries(Nq, Nk):
    q, k, v, s = make_inputs(1, 2, 1, Nq, Nk, 16, 16, torch.float32, "tensor")
    out, lse = ksm.softmax_attention(q, k, v, is_causal=True, length_scale=s, return_lse=True)
    assert out.shape == (1, 2, Nq, 16) and (out == 0).all() and (lse == -math.inf).all()
    (out.sum() + lse.clamp(min=0).sum()).backward()
    for t in (q, k, v, s):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.usefixtures("nan_empty")
def test_backward_from_merged_key_shards():
    """The launchers over two key shards, merged by their lse, give the full attention; the
    backward launcher, fed the merged (out, lse), gives each shard's share of the gradients.
    Causal bottom-right: the second shard, starting at key 17, has causal offset 7 - 17."""
    q, k, v, _ = make_inputs(1, 2, 2, 33, 40, 16, 16, torch.float32, None)
    q, k, v = (t.detach() for t in (q, k, v))
    shards = [(slice(0, 17), 7), (slice(17, 40), 7 - 17)]
    out, lse = ksm.softmax_attention_fwd(q, k, v, 0.25, 7)
    parts = [ksm.softmax_attention_fwd(q, k[:, :, sl], v[:, :, sl], 0.25, off) for sl, off in shards]
    merged_lse = torch.logaddexp(parts[0][1], parts[1][1])
    merged = sum(o * torch.exp(part_lse - merged_lse)[..., None] for o, part_lse in parts)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)

    do = torch.randn_like(out)
    dq, dk, dv, ds, _, _ = ksm.softmax_attention_bwd(do, q, k, v, out, lse, 0.25, 7)
    (dq0, dk0, dv0, *_), (dq1, dk1, dv1, *_) = (
        ksm.softmax_attention_bwd(do, q, k[:, :, sl], v[:, :, sl], merged, merged_lse, 0.25, off)
        for sl, off in shards
    )
    assert ds is None
    torch.testing.assert_close(dq0 + dq1, dq)
    torch.testing.assert_close(torch.cat([dk0, dk1], 2), dk)
    torch.testing.assert_close(torch.cat([dv0, dv1], 2), dv)


def test_rejects_what_the_kernels_cannot_do():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        ksm.softmax_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="at most 256"):
        ksm.softmax_attention(q, q, torch.randn(1, 2, 4, 300, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        ksm.softmax_attention(torch.randn(1, 3, 4, 8, device=DEVICE), q, q)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and AOT dispatch of both registered ops."""
    q, k, v, _ = make_inputs(1, 4, 2, 17, 9, 16, 8, torch.float32, None, strided=True)
    q, k, v = (t.detach() for t in (q, k, v))
    s = torch.rand(4, device=DEVICE)
    torch.library.opcheck(torch.ops.longattn.softmax_attention_fwd, (q, k, v, 0.25, 3, s))
    out, lse = ksm.softmax_attention_fwd(q, k, v, 0.25, 3, s)
    for s_, dlse in ((s, torch.randn_like(lse)), (None, None)):
        args = (torch.randn_like(out), q, k, v, out, lse, 0.25, 3, s_, dlse)
        torch.library.opcheck(torch.ops.longattn.softmax_attention_bwd, args)


def test_torch_compile_fullgraph():
    """torch.compile traces the entry, forward and backward, without graph breaks."""
    q, k, v, s = make_inputs(1, 4, 2, 17, 17, 16, 16, torch.float32, "tensor")

    def attend(q, k, v, s):
        return ksm.softmax_attention(q, k, v, is_causal=True, length_scale=s, return_lse=True)

    compiled = torch.compile(attend, fullgraph=True)
    d_out, d_lse = torch.randn(1, 4, 17, 16, device=DEVICE), torch.randn(1, 4, 17, device=DEVICE)
    results = [fn(q, k, v, s) for fn in (compiled, attend)]
    torch.testing.assert_close(results[0], results[1])
    got, expected = (torch.autograd.grad(r, (q, k, v, s), (d_out, d_lse)) for r in results)
    torch.testing.assert_close(got, expected)


def test_imports_without_interpreter_or_cuda():
    """Importing the kernels neither needs TRITON_INTERPRET nor touches CUDA."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = "import torch, longattn.kernels.softmax; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], env={**env, "CUDA_VISIBLE_DEVICES": ""}, check=True)


def test_torch_compile_through_the_public_function():
    """The public function, argument checks and dispatch included, traces without a graph break."""
    import longattn

    q, k, v = (torch.randn(1, 4, 33, 16, requires_grad=True) for _ in range(3))
    s = torch.full((4,), 0.5, requires_grad=True)

    def f(q, k, v, s):
        return longattn.scaled_dot_product_attention(q, k, v, is_causal=True, length_scale=s,
                                                     backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v, s)
    ref = f(q, k, v, s)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v, s))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, s))
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref)
