"""Helpers the test files share: the causal rule as a mask, fresh leaves for the oracles, and the
tolerance rule for kernels (flash-attn's: at most twice the error of a plain baseline in the
same dtype, plus a small atol)."""

from __future__ import annotations

import torch

from conftest import KERNEL_ATOL
from oracles import grads, rel_err


def allowed_keys(n_q: int, n_k: int, causal_offset: int | None) -> torch.Tensor:
    """`(n_q, n_k)` bool: key j allowed for row i iff `j <= i + causal_offset`; all when None."""
    if causal_offset is None:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + causal_offset


def window_keys(n_q: int, n_k: int, window: tuple[int, int],
                causal_offset: int | None = None) -> torch.Tensor:
    """`(n_q, n_k)` bool: flash-attn's sliding window `(left, right)` around the diagonal
    `i + c`, `c` the causal offset (0 without one), `i + c - left <= j <= i + c + right` (-1:
    that side unbounded), and the causal rule `j <= i + c` where there is one."""
    left, right = window
    c = 0 if causal_offset is None else causal_offset
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    allowed = allowed_keys(n_q, n_k, causal_offset)
    if left >= 0:
        allowed = allowed & (j >= i + c - left)
    if right >= 0:
        allowed = allowed & (j <= i + c + right)
    return allowed


def leaves(args, dtype=None):
    """Fresh CPU leaves holding the same values (in `dtype` if given): the oracle gets float64
    ones, so its gradients are not rounded to the inputs' dtype. Non-tensors pass through."""
    return [t.detach().cpu().to(dtype or t.dtype).requires_grad_() if torch.is_tensor(t) else t for t in args]


def tensors(args):
    """The tensors among `args` (a length scale may be a float)."""
    return [t for t in args if torch.is_tensor(t)]


def kernel_leaves(B, Hq, Hkv, Nq, Nk, D, Dv, device, dtype, scaled):
    """Random q, k, v leaves in `dtype` on `device` and, when `scaled`, a `(Hq,)` fp32 length scale."""
    q = torch.randn(B, Hq, Nq, D).to(device, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D).to(device, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, Dv).to(device, dtype).requires_grad_()
    s = (0.5 + torch.rand(Hq)).to(device).requires_grad_() if scaled else None
    return q, k, v, s


def check_kernel_call(out, inputs, reference, dtype, names, baseline=None):
    """The kernels' output `out` of `inputs` (leaves) and the gradients of every input, named
    `names`, under the tolerance rule: against `reference(args)` on float64 copies, with the same
    in `dtype` as the baseline (or `baseline(args)`, the definition materialised in 16 bits,
    where the reference's upcast would make the baseline too good). Returns the kernels' grads."""
    base_args, ref_args = leaves(inputs, dtype), leaves(inputs, torch.float64)
    base, ref = (baseline or reference)(base_args), reference(ref_args)
    check_rule(out.detach().cpu(), base.detach(), ref.detach(), dtype, "out")
    do = torch.randn(ref.shape, dtype=torch.float64)
    got = grads(out, inputs, do.to(out.device, dtype))
    g_base, g_ref = grads(base, base_args, do.to(dtype)), grads(ref, ref_args, do)
    for name, g, g_b, g_r in zip(names, got, g_base, g_ref, strict=True):
        check_rule(g.cpu(), g_b, g_r, dtype, name)
    return got


def check_rule(x, x_base, x_ref, dtype, what, atol=None):
    """`x` errs against `x_ref` at most twice what the baseline `x_base` (plain torch or the
    reference backend, in the same dtype) errs, plus the kernels' atol for `dtype`."""
    atol = KERNEL_ATOL[dtype] if atol is None else atol
    err, base = rel_err(x, x_ref), rel_err(x_base, x_ref)
    assert err <= 2 * base + atol, f"{what}: rel err {err:.2e}, baseline {base:.2e}"
