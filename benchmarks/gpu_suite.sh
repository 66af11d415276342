#!/usr/bin/env bash
# The GPU check of everything built, in one call: the compiled kernels' tests (bf16 included),
# then each GPU benchmark, their tables on stdout. Run from the repository root on a machine
# with an NVIDIA GPU; record the figures in benchmarks/RESULTS.md. Exits non-zero if a test or
# a benchmark's correctness check failed (the later steps run anyway).
set -u
export TRITON_INTERPRET=0
status=0
python -m pytest tests/test_triton_softmax.py tests/test_triton_entmax.py tests/test_varlen.py \
    tests/test_kernel_key_lengths.py tests/test_kernel_windows.py tests/test_kernel_logit_modifiers.py \
    tests/test_kernel_masks.py -x -q \
    || status=1
for script in gpu_softmax.py gpu_entmax.py gpu_windows.py gpu_masks.py; do
    python "benchmarks/$script" || status=1
done
exit $status
