"""Helpers the test files share: the causal rule as a mask, fresh leaves for the oracles, and the
tolerance rule for kernels (flash-attn's: at most twice the error of a plain baseline in the
same dtype, plus a small atol)."""

from __future__ import annotations

import torch

from conftest import KERNEL_ATOL
from oracles import rel_err


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


def check_rule(x, x_base, x_ref, dtype, what, atol=None):
    """`x` errs against `x_ref` at most twice what the baseline `x_base` (plain torch or the
    reference backend, in the same dtype) errs, plus the kernels' atol for `dtype`."""
    atol = KERNEL_ATOL[dtype] if atol is None else atol
    err, base = rel_err(x, x_ref), rel_err(x_base, x_ref)
    assert err <= 2 * base + atol, f"{what}: rel err {err:.2e}, baseline {base:.2e}"
