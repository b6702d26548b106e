"""GPU smoke test: --device cuda gives the CPU's numbers. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

import gradscope

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: this runs on the lent H100/H200 (see docs/benchmarks.md)")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cuda_matches_cpu(cell):
    options = dict(cell=cell, hidden=16, batch=4, seq_len=300, dtype="float64", theory_k=0)
    cpu = gradscope.run(device="cpu", **options)
    gpu = gradscope.run(device="cuda", **options)
    assert gpu.meta["device"].startswith("cuda")
    for name in cpu.profiles:
        np.testing.assert_allclose(gpu.profiles[name], cpu.profiles[name], atol=1e-8,
                                   err_msg=name)


def test_cuda_seed_stacks_and_checkpoints_match_cpu():
    from gradscope.batched import execute_seeds
    from gradscope.config import RunConfig

    options = dict(cell="lstm", hidden=16, batch=4, seq_len=300, dtype="float64", steps=3)
    cpu = gradscope.run(device="cpu", **options)
    stacked = execute_seeds([RunConfig(device="cuda", seed=s, **options) for s in (0, 1)])
    kept = gradscope.run(device="cuda", checkpoint=True, **options)
    for gpu in (stacked[0], kept):
        for name in cpu.profiles:
            np.testing.assert_allclose(gpu.profiles[name], cpu.profiles[name], atol=1e-8,
                                       err_msg=name)
