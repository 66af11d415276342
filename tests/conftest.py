import os

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported, so it is set before any test
# imports longattn: on CPU the kernels run in the interpreter. On a GPU machine run
# `TRITON_INTERPRET=0 python -m pytest` to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from longattn.attention import normalizers

# The paths that run on this machine; each is held to the same oracles.
CPU_BACKENDS = ["reference", "torch"]

# Every registered normalizer, those that take an alpha at two values: `(normalizer, alpha)`.
NORMALIZER_CASES = [
    pytest.param(name, alpha, id=name + (str(alpha) if normalizers.get(name).takes_alpha else ""))
    for name in normalizers.names()
    for alpha in ((1.25, 1.5) if normalizers.get(name).takes_alpha else (1.5,))
]

# Where the Triton kernels run: the interpreter on CPU, or a GPU with TRITON_INTERPRET=0.
INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes")
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
# The kernels' atol beside the 2x-torch tolerance rule, per dtype.
KERNEL_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh buffers start as NaN, so an element a kernel forgets to write fails loudly."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def make_nan(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make_nan

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
