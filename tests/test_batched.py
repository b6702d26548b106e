"""Seed stacks (gradscope.batched) against the same seeds run one by one: same numbers."""

from dataclasses import replace

import numpy as np
import pytest

from gradscope.batched import execute_seeds, group_seeds
from gradscope.config import RunConfig
from gradscope.runner import execute

SMALL = dict(hidden=6, batch=4, seq_len=30, dtype="float64")


def _assert_same(one, other, atol=1e-9):
    assert one.config == other.config
    assert one.nonfinite == other.nonfinite
    for name in one.profiles:
        np.testing.assert_allclose(other.profiles[name], one.profiles[name], rtol=0, atol=atol,
                                   err_msg=name)
        assert one.summary[name].verdict == other.summary[name].verdict
    assert (one.theory is None) == (other.theory is None)
    if one.theory is not None:
        np.testing.assert_allclose(np.array(other.theory["lyapunov"], dtype=float),
                                   np.array(one.theory["lyapunov"], dtype=float), atol=atol)
        for p, q in zip(one.theory["predictions"], other.theory["predictions"], strict=True):
            assert (p["name"], p["agrees"]) == (q["name"], q["agrees"])
            assert q["predicted"] == pytest.approx(p["predicted"], rel=1e-9, abs=1e-12)
    assert (one.training is None) == (other.training is None)
    if one.training is not None:
        a, b = one.training, other.training
        assert (a.steps_done, a.diverged_at, a.learned) == (b.steps_done, b.diverged_at,
                                                            b.learned)
        np.testing.assert_allclose(b.curve, a.curve, rtol=1e-9)
        assert (a.final_loss is None) == (b.final_loss is None)
        if a.final_loss is not None:
            assert b.final_loss == pytest.approx(a.final_loss, rel=1e-9)
        assert b.accuracy == pytest.approx(a.accuracy)
        assert [s.step for s in a.snapshots] == [s.step for s in b.snapshots]
        for sa, sb in zip(a.snapshots, b.snapshots, strict=True):
            for name in sa.profiles:
                np.testing.assert_allclose(sb.profiles[name], sa.profiles[name], rtol=0,
                                           atol=atol, err_msg=f"step {sa.step} {name}")


@pytest.mark.parametrize("options", [
    dict(cell="rnn", steps=6, profile_every=3, clip=0.5),  # clipped per seed
    dict(cell="lstm", steps=4, optimizer="sgd", lr=0.1),
    dict(cell="gru", task="copy", steps=3),  # a loss at every step
    dict(cell="lstm", task="language", steps=3, seq_len=40),  # tokens, lengths vary
    dict(cell="rnn", activation="relu", init="identity", jacobian_samples=2, projections=3),
])
def test_a_seed_stack_gives_each_seed_its_own_numbers(options):
    configs = [RunConfig(**{**SMALL, **options, "seed": s}) for s in (0, 1, 5)]
    for alone, stacked in zip(map(execute, configs), execute_seeds(configs), strict=True):
        _assert_same(alone, stacked)


def test_a_stack_that_leaves_float_range_is_measured_seed_by_seed():
    configs = [RunConfig(cell="rnn", activation="linear", init="orthogonal", gain=3.0,
                         hidden=4, batch=3, seq_len=400, dtype="float32", seed=s) for s in (0, 1)]
    results = execute_seeds(configs)
    assert all(r.nonfinite is not None for r in results)
    for alone, stacked in zip(map(execute, configs), results, strict=True):
        _assert_same(alone, stacked)


def test_a_seed_that_diverges_is_rerun_alone():
    options = dict(cell="rnn", activation="linear", init="orthogonal", gain=1.0, lr=1e6,
                   optimizer="sgd", steps=5, clip=None, **SMALL)
    configs = [RunConfig(**options, seed=s) for s in (0, 1)]
    results = execute_seeds(configs)
    assert all(r.training.diverged_at is not None for r in results)
    for alone, stacked in zip(map(execute, configs), results, strict=True):
        _assert_same(alone, stacked)


def test_configurations_that_differ_only_in_seed_are_grouped():
    a, b = RunConfig(cell="rnn", batch=8), RunConfig(cell="gru", batch=8)
    configs = [replace(a, seed=s) for s in range(10)] + [replace(b, seed=3), replace(a, seed=10)]
    groups = group_seeds(configs, size=8)
    assert [[c.seed for c in g] for g in groups] == [list(range(8)), [8, 9, 10], [3]]
    assert [g[0].cell for g in groups] == ["rnn", "rnn", "gru"]
    with pytest.raises(ValueError, match="differ only in their seed"):
        execute_seeds([a, b])


def test_seeds_stack_only_where_that_was_measured_faster():
    """On the CPU, above 16 sequences per seed, profiles alone and the float32 LSTM's training
    run one seed at a time; everything else stacks."""
    from gradscope.batched import stack_pays

    lstm = RunConfig(cell="lstm", dtype="float32", steps=10, batch=32, device="cpu")
    assert not stack_pays(lstm)
    assert not stack_pays(replace(lstm, cell="gru", steps=0))
    assert [len(g) for g in group_seeds([replace(lstm, seed=s) for s in range(3)])] == [1, 1, 1]
    for other in (replace(lstm, batch=8), replace(lstm, dtype="float64"), replace(lstm, batch=16),
                  replace(lstm, cell="gru"), replace(lstm, cell="rnn")):
        assert stack_pays(other), other
    assert [len(g) for g in group_seeds([replace(lstm, batch=8, seed=s)
                                         for s in range(3)])] == [3]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_stacks_training_loop_split_by_seed_is_the_flat_one(cell):
    """A seed stack's training loop keeps its tensors split by seed ((S, n, ...): one bmm a
    step, no reshapes; ``Cell.recur``): the same states, and the same gradients, as the loop
    over the flat batch of S*n rows."""
    import torch

    from gradscope.batched import stack_models
    from gradscope.config import RunConfig
    from gradscope.model import build
    from gradscope.tasks import Batch

    builts = [build(RunConfig(cell=cell, hidden=5, batch=3, seq_len=30, seed=s),
                    torch.device("cpu")) for s in range(3)]
    model = stack_models([b.model for b in builts])
    data = Batch.stack([b.batch for b in builts])
    model.kernel = False  # the loop, both ways
    grads, split, step = {}, [], model.cell._step
    model.cell._step = lambda *args: split.append(args[4]) or step(*args)
    for grouped in (True, False):
        model.groups = 3 if grouped else 1  # 1: the flat loop over the same stacked weights
        model.zero_grad()
        hs = model.hidden_states(data)
        hs.square().sum().backward()
        grads[grouped] = hs.detach(), [p.grad.clone() for p in model.cell.parameters()]
    assert split == [True] * 30 + [False] * 30  # the stack's loop was the one split by seed
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[True][1], grads[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
