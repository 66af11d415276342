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
