import os

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported, so it is set before any test
# imports longattn: on CPU the kernels run in the interpreter. On a GPU machine run
# `TRITON_INTERPRET=0 python -m pytest` to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# The paths that run on this machine; each is held to the same oracles.
CPU_BACKENDS = ["reference", "torch"]


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
