"""The examples run as a user runs them (a fresh interpreter, from the repository root), shortened
where they take flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str, **env_vars: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", **env_vars}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart():
    out = run_example("examples/quickstart.py")
    assert "entmax: out (2, 8, 1024, 64)" in out and "learnable s: (8,)" in out


@pytest.mark.parametrize("normalizer", ["ssmax", "entmax"])
def test_hf_swap(normalizer):
    pytest.importorskip("transformers")
    out = run_example("examples/hf_swap.py", "--normalizer", normalizer, "--steps", "20", "--batch", "8",
                      "--length", "24")
    assert f"converted to {normalizer}" in out
    assert "before: loss" in out and "after:  loss" in out
    assert "same results: True" in out
    assert ("learned s per layer and head" in out) == (normalizer == "ssmax")


def test_context_parallel_under_torchrun():
    """The README's command, `torchrun --standalone --nproc-per-node 2`, on a short sequence:
    every mode equals the single-process call to float32 rounding (softmax by three, entmax by
    the two that serve it). On CPUs (gloo, float32), also on a machine with GPUs."""
    out = run_example("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "examples/context_parallel.py", "--length", "96", CUDA_VISIBLE_DEVICES="")
    lines = [line for line in out.splitlines() if "max abs err" in line]
    assert len(lines) == 5, out
    for line in lines:
        assert float(line.split("one process ")[1].split(",")[0]) < 1e-5, line
