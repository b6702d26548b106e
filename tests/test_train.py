"""BPTT training: the loss it minimises, learning, divergence, snapshots, determinism."""

import numpy as np
import pytest
import torch

import gradscope
from gradscope.cli import main
from gradscope.config import RunConfig
from gradscope.errors import ConfigError


def test_model_loss_is_the_task_loss_the_adjoint_traces(make):
    # L = sum_t w_t mean_b loss_t, for a final-target, a per-step and a variable-length task
    for task, T in (("adding", 12), ("copy", 6), ("language", 30)):
        model, batch = make(cell="gru", task=task, hidden=4, batch=3, seq_len=T)
        unrolled = model.unroll(batch)
        s = unrolled.s0
        states = []
        for t in range(1, batch.seq_len + 1):
            s = unrolled.step_at(t)(s)
            states.append(s)
        per_step = unrolled.losses(torch.stack(states), 1).mean(dim=1)
        expected = (unrolled.weights.to(per_step) * per_step).sum()
        assert float(model.loss(batch)) == pytest.approx(float(expected), rel=1e-12)


def test_lstm_learns_a_short_recall():
    r = gradscope.run(cell="lstm", task="recall", seq_len=5, hidden=16, batch=32, steps=150,
                      lr=0.01)
    t = r.training
    assert t.steps_done == 150 and t.diverged_at is None and len(t.curve) == 150
    assert np.mean(t.curve[-10:]) < 0.5 * np.mean(t.curve[:10])
    assert t.learned and t.final_loss < 0.5 * t.chance_loss and t.accuracy > 0.9


def test_untrainable_long_recall_is_not_learned():
    r = gradscope.run(cell="rnn", task="recall", seq_len=60, hidden=8, batch=16, steps=20)
    assert not r.training.learned and r.training.final_loss > 0.5 * r.training.chance_loss


def test_divergence_is_recorded_and_training_stops():
    r = gradscope.run(cell="rnn", activation="relu", init="identity", gain=1.5, task="adding",
                      seq_len=60, hidden=8, batch=8, steps=50, optimizer="sgd", lr=1e4,
                      clip=None)
    t = r.training
    assert t.diverged_at is not None and t.steps_done == t.diverged_at - 1
    assert t.final_loss is None and not t.learned


def test_a_last_update_that_leaves_float_range_is_reported_not_raised(tmp_path, capsys):
    # no training step checks the update after it: here it leaves the held-out loss not finite
    options = ["--cell", "rnn", "--activation", "relu", "--init", "identity", "--task",
               "recall", "--seq-len", "20", "--hidden", "4", "--batch", "2", "--steps", "1",
               "--lr", "1e6", "--clip", "0", "--dtype", "float32", "--theory-k", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *options, "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    assert "trained 1 step: the held-out loss is not finite" in capsys.readouterr().out
    t = gradscope.RunResult.load(tmp_path).training
    assert t.diverged_at is None and np.isfinite(t.curve).all()  # every step was finite
    assert t.final_loss is None and t.accuracy is None and not t.learned
    assert t.snapshots[-1].nonfinite["where"] == "state"


def test_snapshots_every_k_steps_and_at_the_end():
    r = gradscope.run(cell="gru", task="adding", seq_len=10, hidden=4, batch=4, steps=7,
                      profile_every=3)
    assert [s.step for s in r.snapshots] == [0, 3, 6, 7]
    assert set(r.snapshots[-1].profiles) == set(r.profiles)
    # training changed the weights, so the profiles changed
    assert not np.array_equal(r.snapshots[-1].profiles["grad_h0"], r.profiles["grad_h0"])


def test_training_is_deterministic_and_round_trips(tmp_path):
    options = dict(cell="lstm", task="copy", seq_len=5, hidden=4, batch=4, steps=5,
                   out=tmp_path)
    a, b = gradscope.run(**options), gradscope.run(**options)
    assert a.training.curve == b.training.curve
    back = gradscope.RunResult.load(tmp_path)
    assert back.training.curve == b.training.curve
    assert back.training.snapshots[-1].summary == b.training.snapshots[-1].summary


@pytest.mark.parametrize("options, message", [
    (dict(steps=-1), "--steps must be a non-negative integer"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(clip=-1.0), "--clip must be positive, or 0 to turn clipping off"),
])
def test_bad_training_options(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**options)


def test_clip_0_turns_clipping_off_wherever_it_is_given(tmp_path):
    assert RunConfig(clip=0).clip is None and RunConfig(clip=0) == RunConfig(clip=None)
    (tmp_path / "sweep.toml").write_text("[base]\nclip = 0\nsteps = 5\n[grid]\nlr = [0.1]\n")
    spec = gradscope.sweep_spec(config_file=tmp_path / "sweep.toml")
    assert [c.clip for c in spec.runs] == [None]


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="unknown optimizer 'adamw' for --optimizer"):
        gradscope.run(optimizer="adamw", seq_len=5, hidden=2, batch=2)


def _loss_gradients(model, batch, kernel):
    model.kernel = kernel
    model.requires_grad_(True)
    model.zero_grad()
    losses = model.group_losses(batch)
    losses.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.requires_grad_(False)
    return losses.detach(), grads


@pytest.mark.parametrize("options", [
    {"cell": "rnn"}, {"cell": "rnn", "activation": "relu", "init": "identity"},
    {"cell": "lstm"}, {"cell": "gru"}, {"cell": "lstm", "task": "copy", "seq_len": 8},
    {"cell": "gru", "task": "language", "seq_len": 30},
    {"cell": "lstm", "task": "language", "seq_len": 30, "batch": 6}])
@pytest.mark.parametrize("seeds", [1, 3])
def test_training_through_the_fused_kernel_gets_the_loops_gradients(make, options, seeds):
    """torch.nn's kernel on the cell's own parameters (one call per seed in a stack) gives the
    loss and every parameter's gradient that the step loop gives, in float64, also where
    sequences end early (the kernel runs them on, and each holds the state at its end)."""
    from gradscope.batched import stack_models
    from gradscope.tasks import Batch

    built = [make(**{"hidden": 5, "batch": 4, "seq_len": 40, **options, "seed": s})
             for s in range(seeds)]
    model = built[0][0] if seeds == 1 else stack_models([m for m, _ in built])
    batch = built[0][1] if seeds == 1 else Batch.stack([b for _, b in built])
    loop_loss, loop = _loss_gradients(model, batch, kernel=False)
    kernel_loss, kernel = _loss_gradients(model, batch, kernel=True)
    torch.testing.assert_close(kernel_loss, loop_loss, rtol=1e-12, atol=0)
    assert set(kernel) == set(loop) and len(loop) >= 5
    for name in loop:
        torch.testing.assert_close(kernel[name], loop[name], rtol=1e-10, atol=1e-14, msg=name)


def test_training_runs_the_kernel_where_it_is_measured_faster():
    from gradscope.linear import kernel_trains_faster

    cpu, f32, f64 = torch.device("cpu"), torch.float32, torch.float64
    for cell in ("rnn", "lstm", "gru"):
        assert kernel_trains_faster(cell, None, f32, torch.device("cuda"), stacked=True)
    for cell in ("lstm", "gru"):
        assert kernel_trains_faster(cell, None, f64, cpu, stacked=False)
    assert not kernel_trains_faster("rnn", None, f32, cpu, stacked=False)  # its loop is faster
    assert kernel_trains_faster("rnn", None, f32, cpu, stacked=False, masked=True)  # not held
    assert not kernel_trains_faster("rnn", None, f32, cpu, stacked=True, masked=True)
    assert kernel_trains_faster("lstm", None, f32, cpu, stacked=True)
    assert not kernel_trains_faster("lstm", None, f64, cpu, stacked=True)
    assert not kernel_trains_faster("gru", None, f32, cpu, stacked=True)
    assert not kernel_trains_faster("rnn", "sigmoid", f32, cpu, stacked=False)  # none in torch
