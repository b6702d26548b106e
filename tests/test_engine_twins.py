"""Every probe, for every cell and activation, against its brute-force autograd twin."""

import math

import numpy as np
import pytest
import torch
from helpers import gpu_switches, graph_stand_in
from twins import assert_log10_close, brute_force

from gradscope.activations import ACTIVATIONS
from gradscope.engine import measure
from gradscope.probes import PROBES, probes_for

SMALL = dict(hidden=4, batch=3, seq_len=12)


def _engine(model, batch):
    names = probes_for(model.cell.parts)
    return measure(model.unroll(batch), [PROBES.get(n) for n in names]).log10


def _compare(model, batch):
    got, want = _engine(model, batch), brute_force(model, batch)
    assert set(got) == set(want)
    for name in want:
        assert_log10_close(got[name], want[name], name=name)


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_rnn_every_activation_matches_autograd(make, activation):
    # gain 1.5 keeps relu-like activations from dying on these tiny sizes
    _compare(*make(cell="rnn", activation=activation, init="normal", gain=1.5, **SMALL))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("init", ["pytorch", "orthogonal"])
def test_gated_cells_match_autograd(make, cell, init):
    _compare(*make(cell=cell, init=init, **SMALL))


@pytest.mark.parametrize("task", ["copy", "temporal-order", "temporal-order-3bit", "recall"])
def test_every_task_loss_matches_autograd(make, task):
    _compare(*make(cell="gru", task=task, **{**SMALL, "seq_len": 10}))


def test_variable_lengths_match_autograd(make):
    model, batch = make(cell="lstm", task="language", hidden=4, batch=4, seq_len=24)
    assert len(set(batch.lengths.tolist())) > 1, "the batch should mix lengths"
    _compare(model, batch)


def test_chrono_and_forget_bias_match_autograd(make):
    _compare(*make(cell="lstm", gate_init="chrono", **SMALL))
    _compare(*make(cell="gru", forget_bias=2.0, **SMALL))


def test_grad_h0_at_T_equals_gradient_of_task_loss_for_final_target(make):
    """For a final-target task L_T is the task loss, so grad_h0[T] = ||dL/dh_0||: two passes,
    two algorithms, one number."""
    model, batch = make(cell="rnn", init="orthogonal", **SMALL)
    got = _engine(model, batch)
    twin = brute_force(model, batch)
    assert np.isclose(got["grad_h0"][-1], twin["grad_h0"][-1], rtol=0, atol=1e-9)


def test_float32_agrees_with_float64(make):
    m64, b64 = make(cell="lstm", hidden=8, batch=4, seq_len=40)
    m32, b32 = make(cell="lstm", hidden=8, batch=4, seq_len=40, dtype="float32")
    p64, p32 = _engine(m64, b64), _engine(m32, b32)
    for name in p64:
        np.testing.assert_allclose(p32[name], p64[name], atol=1e-4, err_msg=name)


@pytest.mark.parametrize("options", [
    *({"cell": "rnn", "activation": a, "init": "normal", "gain": 1.3}
      for a in ACTIVATIONS.names()),
    {"cell": "lstm"}, {"cell": "gru"}, {"cell": "lstm", "task": "language", "seq_len": 150},
    {"cell": "gru", "task": "copy"},
])
def test_the_fast_back_end_matches_the_generic_one(make, options):
    """The cells' closed-form Jacobians (gradscope.linear) against forward-mode AD and
    autograd, over several chunks, with and without variable lengths."""
    from dataclasses import replace

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 150, **options})
    fast = model.unroll(batch)
    assert fast.linearize is not None
    slow = replace(fast, linearize=None)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
    got, want = measure(fast, probes).log10, measure(slow, probes).log10
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_random_projections_estimate_the_exact_forward_probes(make, cell):
    """P random Gaussian directions estimate squared norms without bias, error ~ sqrt(2/P):
    with P = 400 the log10 values agree to within a few hundredths of a decade."""
    model, batch = make(cell=cell, hidden=12, batch=4, seq_len=60)
    u = model.unroll(batch)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    exact = measure(u, probes).log10
    estimate = measure(u, probes, projections=400, seed=3).log10
    for name in exact:
        err = np.abs(estimate[name] - exact[name])
        assert np.median(err) < 0.03 and err.max() < 0.12, (name, err.max())
    again = measure(u, probes, projections=400, seed=3).log10
    assert all(np.array_equal(again[n], estimate[n]) for n in exact)  # seeded


@pytest.mark.parametrize("options", [
    *({"cell": "rnn", "activation": a} for a in ACTIVATIONS.names()),
    {"cell": "lstm"}, {"cell": "gru"},
    # sequences that end early, each holding its last state: the kernel (or a seed stack's
    # loop) runs all of them to T, and what comes after each one's end is overwritten
    *({"cell": c, "task": "language", "batch": 6} for c in ("rnn", "lstm", "gru")),
    {"cell": "rnn", "activation": "sigmoid", "task": "language", "batch": 6},
    {"cell": "lstm", "task": "language", "batch": 6, "seeds": 3}])
def test_the_fast_trajectory_is_the_step_by_step_one(make, options):
    from dataclasses import replace

    from gradscope.batched import stack_models
    from gradscope.engine import trajectory
    from gradscope.tasks import Batch

    options = {"hidden": 5, "batch": 3, "seq_len": 40, **options}
    seeds = options.pop("seeds", 1)
    builts = [make(seed=s, **options) for s in range(seeds)]
    model = builts[0][0] if seeds == 1 else stack_models([m for m, _ in builts])
    batch = builts[0][1] if seeds == 1 else Batch.stack([b for _, b in builts])
    u = model.unroll(batch)
    if options.get("task") == "language":
        assert len(set(batch.lengths.tolist())) > 1 and int(batch.lengths.min()) < 40
    assert u.fast_trajectory is not None
    fast, _ = trajectory(u)
    slow, _ = trajectory(replace(u, fast_trajectory=None))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_the_lstm_cell_state_scan_in_rounds_is_the_sequential_one(make, monkeypatch):
    """On a GPU the LSTM's c_t come from affine_scan's log2(n) rounds, not one op a step:
    the same trajectory, over chunks (1024 steps) and a shorter rest, and the same scan on
    its own against the recurrence written out."""
    import gradscope.linear as linear
    from gradscope.engine import trajectory

    gen = torch.Generator().manual_seed(0)
    f, b = torch.rand(37, 3, 4, generator=gen, dtype=torch.float64), \
        torch.randn(37, 3, 4, generator=gen, dtype=torch.float64)
    c0 = c = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    want = []
    for t in range(37):
        c = f[t] * c + b[t]
        want.append(c)
    torch.testing.assert_close(linear.affine_scan(f, b, c0), torch.stack(want), rtol=1e-12,
                               atol=1e-12)
    model, batch = make(cell="lstm", hidden=5, batch=3, seq_len=1500)
    u = model.unroll(batch)
    sequential, _ = trajectory(u)
    monkeypatch.setattr(linear, "_scan_in_rounds", lambda device: True)
    rounds, _ = trajectory(u)
    torch.testing.assert_close(rounds, sequential, rtol=1e-12, atol=1e-12)


_DECAYING = [{"cell": "rnn", "init": "normal", "gain": 0.03},  # about -1.5 decades a step
             {"cell": "lstm", "init": "normal", "gain": 0.05},
             {"cell": "gru", "init": "normal", "gain": 0.05}]
# grows about 0.4 decades a step; in float32 the state itself would overflow first
_GROWING = {"cell": "rnn", "activation": "linear", "init": "orthogonal", "gain": 2.5}


@pytest.mark.parametrize(("dtype", "options"), [
    *(("float32", o) for o in _DECAYING), *(("float64", o) for o in _DECAYING),
    ("float64", _GROWING)])
def test_the_blocked_adjoint_stays_exact_far_outside_float_range(make, dtype, options):
    """The fast reverse pass renormalises a block of steps at once; where a block would leave
    the safe range it is redone a step at a time. Over 300 steps the values here span hundreds
    of decades, beyond float32's and float64's range, and must match the per-step generic pass."""
    from dataclasses import replace

    model, batch = make(hidden=6, batch=3, seq_len=300, dtype=dtype, **options)
    fast = model.unroll(batch)
    adjoint = [PROBES.get("adjoint")]
    got = measure(fast, adjoint, fused=False).log10["adjoint"]
    want = measure(replace(fast, linearize=None), adjoint).log10["adjoint"]
    assert np.isfinite(got).all()
    assert abs(got[-1] - got[0]) > 45, "the case should leave float32's range"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if dtype == "float32" else 1e-9)


def test_the_blocked_adjoint_keeps_exact_zeros(make):
    """With W_hh = 0 nothing flows back: every adjoint before step T is exactly zero (-inf)."""
    model, batch = make(cell="lstm", hidden=5, batch=3, seq_len=100)
    model.cell.weight_hh.zero_()
    for fused in (False, True):
        u = model.unroll(batch)
        got = measure(u, [PROBES.get("adjoint")], fused=fused).log10["adjoint"]
        assert np.isfinite(got[0]) and np.isneginf(got[1:]).all()


@pytest.mark.parametrize("options", [
    {"cell": "lstm", "seq_len": 700},  # closed-form reverse pass, several segments
    {"cell": "gru", "task": "copy", "seq_len": 300},  # a loss at many steps
    {"cell": "lstm", "task": "language", "seq_len": 150},  # lengths vary
    {"cell": "rnn", "seq_len": 129},  # one step past a segment
])
def test_a_checkpointed_adjoint_is_the_stored_one(make, options):
    """With checkpoints the reverse pass recomputes each segment of about sqrt(T) steps from
    its first state: the same numbers, from the fast and the generic back ends."""
    from dataclasses import replace

    from gradscope.engine import Segmented

    model, batch = make(**{"hidden": 5, "batch": 3, **options})
    u = model.unroll(batch)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
    for unrolled in (u, replace(u, linearize=None, fast_trajectory=None)):
        want = measure(unrolled, probes).log10
        got = measure(unrolled, probes, checkpoint=True).log10
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-10,
                                       err_msg=name)
    kept = Segmented(u)
    T = u.seq_len
    assert kept.checkpoints.shape[0] == -(-T // kept.L) + 1  # every L-th state, not T
    assert kept.L % 64 == 0 and kept.L <= max(64, 2 * T ** 0.5)


_FUSED = [{"cell": "rnn"}, {"cell": "rnn", "activation": "relu", "init": "identity"},
          {"cell": "lstm"}]
# the fused adjoint's plan on the CPU (blocks of 64 in the cell's dtype), and each kernel plan
# a GPU may take (engine.GPU_PLANS: blocks of 256 in float64, and of 512 lifted 77 decades),
# all run here
_PLANS = pytest.mark.parametrize("plan", ["cpu", "kernel", "kernel-lifted"])


def _use_plan(monkeypatch, plan: str) -> None:
    import gradscope.engine as engine

    if plan != "cpu":
        chosen = engine.GPU_PLANS[plan]
        monkeypatch.setattr(engine, "_fused_plan", lambda u: chosen)


@pytest.mark.parametrize("options", [
    *_FUSED, {"cell": "lstm", "seq_len": 64}, {"cell": "rnn", "seq_len": 65},
    {"cell": "lstm", "seq_len": 2}])
@_PLANS
def test_the_fused_kernel_adjoint_matches_autograd(make, options, monkeypatch, plan):
    """The adjoint from torch's fused kernel (an extra zero input tied to W_hh, whose gradient
    is dL/dh_{t-1}) against the brute-force twin, over several blocks of 64 steps; no block
    may fall back to the step-by-step pass here."""
    _use_plan(monkeypatch, plan)
    import gradscope.engine as engine

    model, batch = make(**{"hidden": 4, "batch": 3, "seq_len": 150, **options})
    monkeypatch.setattr(engine, "_step_back", _no_fallback)
    got = measure(model.unroll(batch), [PROBES.get("adjoint")], fused=True).log10["adjoint"]
    assert_log10_close(got, brute_force(model, batch)["adjoint"], name="adjoint")


def _fused_adjoint_against_its_twin(model, batch, u, options, monkeypatch) -> None:
    """The fused kernel's adjoint of ``u``, with no block redone step by step (but for the
    ReLU RNN, whose adjoint may reach exact zeros, which that pass confirms), against the
    brute-force twin; the LSTM's (whose twin takes 16 s at these sizes) against the loop,
    which test_the_fast_back_end_matches_the_generic_one holds to the generic back end on
    these tasks, and that to the twin."""
    import gradscope.engine as engine

    backs, back = [], engine.FusedAdjoint.back
    monkeypatch.setattr(engine.FusedAdjoint, "back",
                        lambda self, *args: backs.append(1) or back(self, *args))
    if options.get("activation") != "relu":
        monkeypatch.setattr(engine, "_step_back", _no_fallback)
    got = measure(u, [PROBES.get("adjoint")], fused=True).log10["adjoint"]
    assert backs, "the fused kernel did not run"
    if options["cell"] == "lstm":
        monkeypatch.undo()
        want = measure(u, [PROBES.get("adjoint")], fused=False).log10["adjoint"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    else:
        assert_log10_close(got, brute_force(model, batch)["adjoint"], name="adjoint")


def _no_fallback(*args):
    raise AssertionError("a block fell back to the step-by-step reverse pass")


@pytest.mark.parametrize("options", [*_FUSED, {"cell": "lstm", "task": "language"}])
@_PLANS
def test_the_fused_kernel_adjoint_matches_the_loop_with_every_probe(make, options, monkeypatch,
                                                                   plan):
    """With the forward probes in the same call (stored trajectory), in float32 and float64;
    on the language task too, whose sequences end early (the loss gradient at each one's end
    from the stored, held trajectory)."""
    _use_plan(monkeypatch, plan)
    for dtype, atol in (("float64", 1e-10), ("float32", 2e-4)):
        model, batch = make(**{"hidden": 8, "batch": 4, "seq_len": 200, "dtype": dtype,
                               **options})
        u = model.unroll(batch)
        probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
        got, want = measure(u, probes, fused=True).log10, measure(u, probes, fused=False).log10
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol,
                                       err_msg=f"{name} {dtype}")


@pytest.mark.parametrize(("dtype", "options"), [
    *((d, o) for d in ("float32", "float64") for o in _DECAYING if o["cell"] != "gru"),
    ("float64", {"cell": "rnn", "activation": "relu", "init": "identity", "gain": 2.0})])
@_PLANS
def test_the_fused_kernel_adjoint_falls_back_outside_float_range(make, dtype, options, monkeypatch,
                                                                 plan):
    """Where a block of the fused kernel would leave the safe range (hundreds of decades over
    300 steps), it is redone step by step: the values match the generic pass."""
    _use_plan(monkeypatch, plan)
    from dataclasses import replace

    model, batch = make(hidden=6, batch=3, seq_len=300, dtype=dtype, **options)
    u = model.unroll(batch)
    adjoint = [PROBES.get("adjoint")]
    got = measure(u, adjoint, fused=True).log10["adjoint"]
    want = measure(replace(u, linearize=None), adjoint).log10["adjoint"]
    assert np.isfinite(got).all() and abs(got[-1] - got[0]) > 45
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if dtype == "float32" else 1e-9)


# every place a sequence can end against the fused adjoint's blocks of 64 (the CPU's plan):
# at step 1, inside a block, at a block's last step and the next one's first, at T
_ENDS = [1, 40, 64, 65, 128, 150]


@pytest.mark.parametrize("options", _FUSED)
@_PLANS
def test_the_fused_kernel_adjoint_of_sequences_that_end_early_matches_autograd(
        make, options, monkeypatch, plan):
    """The language task's sequences end at their own steps, where their loss is read; the
    kernel runs them on to T, and each one's loss gradient enters its backward as the
    gradient of the output at its end. Against the brute-force twin, which holds each state
    after its end (``_fused_adjoint_against_its_twin``)."""
    _use_plan(monkeypatch, plan)
    from dataclasses import replace

    import gradscope.engine as engine

    model, batch = make(**{"hidden": 4, "batch": len(_ENDS), "seq_len": 150,
                           "task": "language", **options})
    batch = replace(batch, lengths=torch.tensor(_ENDS))
    u = model.unroll(batch)
    assert u.losses_read_h and engine._fused_applies(u, True, False)
    _fused_adjoint_against_its_twin(model, batch, u, options, monkeypatch)


@pytest.mark.parametrize(("options", "dtype", "plan"), [
    *(({"cell": "rnn", "init": "normal", "gain": 0.03}, d, p)  # about -1.5 decades a step
      for d in ("float32", "float64") for p in ("cpu", "kernel", "kernel-lifted")
      if (d, p) != ("float64", "cpu")),  # 96 decades a block: in float64's range
    ({"cell": "lstm", "init": "normal", "gain": 0.05}, "float32", "cpu")])  # about -0.2
@pytest.mark.parametrize("ahead", [True, False])
def test_the_fused_adjoint_of_sequences_that_end_early_falls_back_as_the_loop_would(
        make, monkeypatch, options, dtype, plan, ahead):
    """An adjoint that falls fast leaves the safe range inside a block of the fused kernel:
    the loop redoes the pass from that block's start, taking over the sequences still waiting
    for their loss gradient as it would carry them itself. On a GPU (``ahead``) the checks
    are read at the end. The values are the loop's."""
    _use_plan(monkeypatch, plan)
    from dataclasses import replace

    import gradscope.engine as engine

    model, batch = make(**options, hidden=6, batch=4, seq_len=600, task="language",
                        dtype=dtype)
    batch = replace(batch, lengths=torch.tensor([600, 590, 300, 20]))
    u = model.unroll(batch)
    adjoint = [PROBES.get("adjoint")]
    want = measure(u, adjoint, fused=False).log10["adjoint"]
    monkeypatch.setattr(engine, "_runs_ahead", lambda x: ahead)
    backs, steps = [], []
    back, step_back = engine.FusedAdjoint.back, engine._step_back
    monkeypatch.setattr(engine.FusedAdjoint, "back",
                        lambda self, *args: backs.append(1) or back(self, *args))
    monkeypatch.setattr(engine, "_step_back",
                        lambda *args: steps.append(1) or step_back(*args))
    got = measure(u, adjoint, fused=True).log10["adjoint"]
    assert backs and steps, "the kernel ran, and a block fell back"
    assert abs(np.nanmin(want) - want[0]) > 100  # hundreds of decades
    # float32: the kernel's rounding against the loop's, over hundreds of steps
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 if dtype == "float32" else 1e-9)


def test_the_fused_kernel_adjoint_reports_where_the_trajectory_overflows(make):
    from gradscope.engine import measure as engine_measure

    # a trajectory that overflows float32: the same stop, found the usual way
    model, batch = make(cell="rnn", activation="relu", init="orthogonal", gain=3.0, hidden=6,
                        batch=3, seq_len=200, dtype="float32")
    u = model.unroll(batch)
    fused = engine_measure(u, [PROBES.get("adjoint")], fused=True)
    loop = engine_measure(u, [PROBES.get("adjoint")], fused=False)
    assert fused.nonfinite is not None and fused.nonfinite == loop.nonfinite
    np.testing.assert_array_equal(np.isnan(fused.log10["adjoint"]),
                                  np.isnan(loop.log10["adjoint"]))


@pytest.mark.parametrize("options", [{"cell": "gru"}, {"cell": "rnn", "activation": "sigmoid"}])
def test_cells_without_a_fused_adjoint_use_the_loop(make, options):
    model, batch = make(hidden=4, batch=2, seq_len=20, **options)
    u = model.unroll(batch)
    assert u.fused_adjoint(64, torch.float64) is None
    got = measure(u, [PROBES.get("adjoint")], fused=True).log10["adjoint"]
    assert_log10_close(got, brute_force(model, batch)["adjoint"], name="adjoint")


def test_the_fused_adjoint_is_chosen_where_it_is_faster(make):
    """Automatic choice on the CPU: the LSTM below H = 256, for the adjoint alone
    (measured in docs/benchmarks.md), sequences that end early and losses at many steps
    included; never with forward probes, never for the RNN, the GRU, or those two under
    losses that read the c-part."""
    from dataclasses import replace

    from gradscope.engine import _fused_applies

    def chosen(with_forward=False, **options):
        model, batch = make(**{"hidden": 8, "batch": 2, "seq_len": 20, "dtype": "float32",
                               **options})
        return _fused_applies(model.unroll(batch), None, with_forward)

    assert chosen(cell="lstm") and chosen(cell="lstm", dtype="float64")
    assert not chosen(cell="lstm", with_forward=True)
    assert not chosen(cell="lstm", hidden=256)
    assert not chosen(cell="rnn") and not chosen(cell="gru")
    assert chosen(cell="lstm", task="language", seq_len=60)  # lengths vary
    for task in ("language", "copy"):
        model, batch = make(cell="lstm", task=task, hidden=8, batch=2, seq_len=60,
                            dtype="float32")
        assert not _fused_applies(replace(model.unroll(batch), losses_read_h=False), None, False)
    assert chosen(cell="lstm", task="copy")  # losses at many steps
    model, batch = make(cell="lstm", hidden=8, batch=2, seq_len=20)
    generic = replace(model.unroll(batch), linearize=None)  # the reference back end stays
    assert not _fused_applies(generic, None, False) and not _fused_applies(generic, True, False)


def test_fused_kernels_run_without_tensorfloat32_and_restore_the_setting():
    from gradscope.linear import full_float32

    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(RuntimeError), full_float32():
            assert torch.backends.cudnn.allow_tf32 is False
            raise RuntimeError
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize(("dtype", "options"), [
    *(("float32", o) for o in _DECAYING), *(("float64", o) for o in _DECAYING),
    ("float64", _GROWING), ("float32", {"cell": "lstm"})])
def test_forward_probes_renormalised_by_slices_stay_exact(make, dtype, options):
    """The closed-form forward pass renormalises a slice of steps at once while its values
    stay in range, and every step once they would not: against the per-step generic pass,
    over hundreds of decades in float32 and float64."""
    from dataclasses import replace

    model, batch = make(hidden=6, batch=3, seq_len=300, dtype=dtype, **options)
    u = model.unroll(batch)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    got = measure(u, probes).log10
    want = measure(replace(u, linearize=None), probes).log10
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0,
                                   atol=1e-4 if dtype == "float32" else 1e-9, err_msg=name)


def test_forward_probes_in_range_take_whole_slices(make, monkeypatch):
    import gradscope.engine as engine

    model, batch = make(cell="lstm", hidden=6, batch=3, seq_len=200)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    monkeypatch.setattr(engine, "_push_steps", _no_fallback)
    measure(model.unroll(batch), probes)  # no slice fell back to step-by-step renormalising


def test_norms_neither_underflow_nor_overflow_in_their_squares():
    """float32 squares of 1e-25 are 0 and of 1e25 are inf; the norm itself is not."""
    from gradscope.probes import norm

    for dtype, value in [(torch.float32, 1e-25), (torch.float32, 1e-40), (torch.float32, 1e25),
                         (torch.float64, 1e-170), (torch.float64, 1e170)]:
        x = torch.full((3, 4), value, dtype=dtype)
        x[1] = 0
        got = norm(x)
        assert got.dtype == dtype
        assert got[1] == 0
        want = 2 * torch.tensor(value, dtype=dtype)  # ||(v, v, v, v)|| = 2v exactly
        assert torch.allclose(got[[0, 2]], want.expand(2), rtol=1e-6, atol=0), (dtype, value)


# Steps that shrink every direction by ~1e-27 (sigmoid'(-60)) or by a subnormal ~1e-39 in
# float32 (sigmoid'(-88)): one step takes a unit vector below where its squares vanish
_STEEP = [{"cell": "rnn", "activation": "sigmoid", "bias": -60.0},
          {"cell": "rnn", "activation": "sigmoid", "bias": -88.0},
          {"cell": "lstm", "bias": -60.0},
          {"cell": "lstm", "bias": -60.0, "readout": 1e-15}]  # and the loss gradient tiny


@pytest.mark.parametrize("options", _STEEP)
def test_steps_that_shrink_below_the_squares_range_stay_exact(make, options):
    """Each step's renormalisation and each probe's norm must see values far below
    sqrt(tiny): float32 against float64 (itself checked against its twin at T where the
    twin's own squares stay in range)."""
    options = dict(options)
    bias, readout = options.pop("bias"), options.pop("readout", 1.0)

    def engine(dtype, seq_len):
        model, batch = make(hidden=4, batch=3, seq_len=seq_len, dtype=dtype, **options)
        model.cell.bias_hh.fill_(bias)  # every pre-activation near `bias`
        if options["cell"] == "lstm":  # only the output gate closed: h tiny next to c
            model.cell.bias_hh[:3 * 4].fill_(0.0)
        model.readout.weight.mul_(readout)
        return model, batch, _engine(model, batch)

    model, batch, short = engine("float64", 4)
    twin = brute_force(model, batch)
    for name in twin:
        assert_log10_close(short[name], twin[name], rel=1e-9, name=name)
    got, want = engine("float32", 12)[2], engine("float64", 12)[2]
    for name in want:
        assert np.isfinite(want[name]).all(), name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("options", _DECAYING)
def test_forward_slices_shorten_to_the_decay_instead_of_going_step_by_step(make, monkeypatch,
                                                                          options):
    """Decaying ~1.5 decades a step leaves float32's safe range within a 64-step slice; the
    slices then shorten to what the decay allows (a few steps), rather than renormalising
    every step for the rest of the run."""
    import gradscope.engine as engine

    model, batch = make(hidden=6, batch=3, seq_len=300, dtype="float32", **options)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    stepped, blocked = [], []
    push_steps, push_block = engine._push_steps, engine._push_block

    def count(into, fn, pushed=lambda out: out):
        def counted(*args):
            out = fn(*args)
            if pushed(out) is not None:
                into.append(pushed(out)[0].shape[0])
            return out
        return counted

    monkeypatch.setattr(engine, "_push_steps", count(stepped, push_steps))
    monkeypatch.setattr(engine, "_push_block", count(blocked, push_block, lambda out: out[0]))
    measure(model.unroll(batch), probes)
    assert sum(stepped) + sum(blocked) == 300
    assert sum(stepped) <= 64 + 10 and max(blocked) > 1, (stepped, blocked)


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru", "task": "copy"},
                                     {"cell": "rnn", "activation": "sigmoid"}])
def test_forward_probes_alone_stream_long_trajectories_with_the_same_numbers(make, monkeypatch,
                                                                            options):
    """Forward probes alone take a small trajectory whole from the fast back end, and stream a
    large one chunk by chunk (memory bounded whatever T; so do varying lengths, which have no
    fast trajectory): the same numbers either way."""
    import gradscope.engine as engine

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 200, **options})
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    streamed, original = [], engine._streamed_chunks
    monkeypatch.setattr(engine, "_streamed_chunks",
                        lambda *a, **k: streamed.append(1) or original(*a, **k))
    whole = measure(model.unroll(batch), probes).log10
    assert not streamed
    monkeypatch.setattr(engine, "STREAMED_ABOVE", 0)
    chunked = measure(model.unroll(batch), probes).log10
    assert streamed
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=0, atol=1e-10,
                                   err_msg=name)


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru", "task": "copy"},
                                     {"cell": "rnn", "activation": "relu"}])
def test_replayed_slices_read_each_chunks_coefficients(make, monkeypatch, options):
    """The forward pass through ``cudagraphs.GraphedSteps`` on the CPU, its CUDA graph stood in
    for by a closure over the same static tensors: every chunk's coefficients (the shorter last
    chunk's too) reach the replayed slices, which give the eager numbers (to rounding: the
    graphed pass rounds its slices' lengths to powers of two, which moves where it
    renormalises)."""
    import gradscope.cudagraphs as cudagraphs
    import gradscope.engine as engine

    replayed = []
    capture = graph_stand_in(replayed)
    loaded, load = [], cudagraphs.GraphedSteps._load

    def spy(self, ops, a, b):
        fits = load(self, ops, a, b)
        if fits:  # the chunk's steps and where the slice lies in them: RNNOps hold phi' as
            # d, gated cells coef
            loaded.append((len(getattr(ops, "d", None) if hasattr(ops, "d") else ops.coef), a))
        return fits

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 290, **options})
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    # slices of 20 steps, which graphs round down to 16: the shorter last chunk replays the
    # graph captured on full ones
    monkeypatch.setattr(engine, "_length_for", lambda *args: 20)
    eager = measure(model.unroll(batch), probes).log10
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture", capture)
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_load", spy)
    monkeypatch.setattr(engine, "graphed_steps",
                        lambda device, method="push": cudagraphs.GraphedSteps(method))
    graphed = measure(model.unroll(batch), probes).log10
    # one graph for slices of 16 wherever they lie, in full chunks and in the shorter last
    assert replayed == [16] and min(c for c, _ in loaded) < 64 \
        and {a for _, a in loaded} == {0, 16, 32, 48}, (replayed, loaded)
    for name in eager:
        np.testing.assert_allclose(graphed[name], eager[name], rtol=0, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru"},
                                     {"cell": "rnn", "activation": "relu"},
                                     {"cell": "rnn", "init": "normal", "gain": 0.1}])
def test_reverse_blocks_replayed_from_graphs_give_the_eager_adjoint(make, monkeypatch,
                                                                     options):
    """The closed-form reverse loop's blocks through ``cudagraphs.GraphedSteps("pull")`` on
    the CPU, its CUDA graph stood in for: the adjoint of the eager loop, whose blocks are the
    same vjps. T = 290: the pass meets its shorter last chunk first; gain 0.1 falls about a
    decade a step, so its blocks shrink to what the decay allows."""
    import gradscope.cudagraphs as cudagraphs
    import gradscope.engine as engine

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 290, **options})
    u, probes = model.unroll(batch), [PROBES.get("adjoint")]
    eager = measure(u, probes, fused=False).log10["adjoint"]
    replayed, served, call = [], [], cudagraphs.GraphedSteps.__call__
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture", graph_stand_in(replayed))
    monkeypatch.setattr(cudagraphs.GraphedSteps, "__call__", lambda self, *args: (
        lambda out: served.append(out is not None) or out)(call(self, *args)))
    monkeypatch.setattr(engine, "graphed_steps",
                        lambda device, method="push": cudagraphs.GraphedSteps(method))
    graphed = measure(u, probes, fused=False).log10["adjoint"]
    assert all(m[0] == "pull" for m in replayed) and sum(served) >= 2, (replayed, served)
    np.testing.assert_allclose(graphed, eager, rtol=0, atol=1e-12)
    assert np.isfinite(eager).all() and eager[-1] < eager[0] - 3


def test_graphed_steps_take_their_static_coefficients_again_for_longer_slices(make,
                                                                                 monkeypatch):
    """Static per-step tensors taken from a short chunk (as a reverse pass meets first) are
    taken again from a full one when a longer slice comes: its replay pulls what the eager
    ``pull`` does."""
    import gradscope.cudagraphs as cudagraphs
    from gradscope.engine import trajectory

    model, batch = make(cell="lstm", hidden=6, batch=3, seq_len=100)
    u = model.unroll(batch)
    states, _ = trajectory(u)
    short, full = u.ops(states[80:], 80), u.ops(states[:65], 0)
    adj = torch.randn(3, 12, dtype=states.dtype)
    replayed = []
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture", graph_stand_in(replayed))
    graphs = cudagraphs.GraphedSteps("pull")
    assert graphs(short, adj, 0, 20) is None  # a length's first sighting runs eager
    assert graphs(short, adj, 0, 20) is not None and graphs.static.coef.shape[0] == 20
    assert graphs(full, adj, 0, 64) is None
    got = graphs(full, adj, 0, 64)
    assert got is not None and graphs.static.coef.shape[0] == 64, replayed
    want = full.pull(adj, 0, 64, torch.empty(64, *adj.shape, dtype=adj.dtype))
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@_PLANS
@pytest.mark.parametrize("ahead", [True, False])
def test_the_fused_adjoint_resumes_the_loop_at_the_first_block_out_of_range(make, monkeypatch,
                                                                            plan, ahead):
    """Where the third block from T fails its range check, the loop redoes the pass from that
    block's start, and the values are the loop's own. On a GPU (``ahead``) the blocks' checks
    are read all at once at the end, so the blocks after the failure ran on garbage, and
    their values are rewritten; on the CPU the pass stops at the failure."""
    _use_plan(monkeypatch, plan)
    import gradscope.engine as engine

    steps = {"cpu": 300, "kernel": 1200, "kernel-lifted": 2300}[plan]  # 5 blocks each
    model, batch = make(cell="lstm", hidden=6, batch=3, seq_len=steps)
    u = model.unroll(batch)
    adjoint = [PROBES.get("adjoint")]
    want = measure(u, adjoint, fused=False).log10["adjoint"]
    checks, backs, safe, back = [], [], engine._safe_range, engine.FusedAdjoint.back

    def failing_third(norms, live):
        checks.append(1)
        return safe(norms, live) & (len(checks) != 3)

    def garbage_after_third(self, k, adj, inject=None):  # what a block fed an out-of-range
        backs.append(k)  # adjoint gives
        lam_h, start = back(self, k, adj, inject)
        return (lam_h * math.nan, start * math.nan) if len(backs) >= 3 else (lam_h, start)

    monkeypatch.setattr(engine, "_runs_ahead", lambda x: ahead)
    monkeypatch.setattr(engine, "_safe_range", failing_third)
    monkeypatch.setattr(engine.FusedAdjoint, "back", garbage_after_third)
    got = measure(u, adjoint, fused=True).log10["adjoint"]
    assert backs == ([4, 3, 2, 1, 0] if ahead else [4, 3, 2])  # 5 blocks
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru", "task": "copy"},
                                     {"cell": "rnn", "activation": "relu"},
                                     {"cell": "lstm", "init": "normal", "gain": 0.05}])
def test_the_gpu_forward_plan_gives_the_same_numbers(make, monkeypatch, options):
    """On a GPU the forward probes push float64 tangents through chunks of 256 steps
    (engine._forward_plan), run here on the CPU: against the usual pass, to rounding in
    float64, and to float32's rounding for a float32 recurrence (whose tangents the plan
    widens); over chunks of 256 and a shorter rest, through more than 100 decades."""
    import gradscope.engine as engine

    slices, push_block = [], engine._push_block
    for dtype, atol in (("float64", 1e-10), ("float32", 1e-4)):
        model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 600, "dtype": dtype,
                               **options})
        u = model.unroll(batch)
        probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
        usual = measure(u, probes).log10
        with monkeypatch.context() as patch:
            patch.setattr(engine, "_forward_plan", lambda u: (256, torch.float64))
            patch.setattr(engine, "_push_block", lambda ops, v, a, b, *rest: slices.append(
                b - a) or push_block(ops, v, a, b, *rest))
            planned = measure(u, probes).log10
        for name in usual:
            assert np.isfinite(usual[name]).all()
            np.testing.assert_allclose(planned[name], usual[name], rtol=0, atol=atol,
                                       err_msg=f"{name} {dtype}")
    assert max(slices) > 64  # slices longer than the CPU's chunk


def test_a_lifted_block_holds_a_fall_that_a_block_from_norm_one_cannot(make, monkeypatch):
    """A tanh RNN whose adjoint falls about 200 decades over 512 steps: from norm 1 a float64
    block of 512 leaves the safe range (1e-154) and is redone by the loop; lifted to 1e+77
    it holds, and the numbers are the loop's either way."""
    import gradscope.engine as engine

    model, batch = make(cell="rnn", hidden=6, batch=3, seq_len=1100, init="normal", gain=0.4)
    u = model.unroll(batch)
    adjoint = [PROBES.get("adjoint")]
    want = measure(u, adjoint, fused=False).log10["adjoint"]
    assert want[0] - want[511] > 154  # more than a block from norm 1 can hold
    redone, step_back = [], engine._step_back
    monkeypatch.setattr(engine, "_step_back", lambda *a: redone.append(1) or step_back(*a))
    for lift in (0.0, 77.0):
        redone.clear()
        monkeypatch.setattr(engine, "_fused_plan",
                            lambda u, lift=lift: engine.FusedPlan(512, torch.float64, lift))
        got = measure(u, adjoint, fused=True).log10["adjoint"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"lift {lift}")
        assert bool(redone) == (lift == 0.0), (lift, len(redone))


@pytest.mark.parametrize("adjoint", ["kernel", "kernel-lifted", "loop"])
def test_the_gpu_takes_the_adjoint_plan_named_by_gpu_adjoint(make, monkeypatch, adjoint):
    """engine.GPU_ADJOINT picks the GPU's adjoint among engine.GPU_PLANS: a kernel plan's
    blocks, or (loop) the closed-form loop unless the kernel is asked for; the CPU's plan
    stays blocks of 64 in the cell's dtype whatever is named."""
    import gradscope.engine as engine

    model, batch = make(cell="lstm", hidden=4, batch=3, seq_len=20)
    u = model.unroll(batch)
    monkeypatch.setattr(engine, "GPU_ADJOINT", adjoint)
    assert engine._fused_plan(u) == (engine.CHUNK, torch.float64, 0.0)
    assert engine._fused_applies(u, None, False)  # the CPU's LSTM below H = 256
    monkeypatch.setattr(engine, "_on_gpu", lambda x: True)
    plan = engine.GPU_PLANS[adjoint]
    assert engine._fused_applies(u, None, False) == (plan is not None)
    assert engine._fused_applies(u, None, True) == (plan is not None)
    assert engine._fused_plan(u) == (plan or engine.GPU_PLANS["kernel"])


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru"}, {"cell": "rnn"},
                                     {"cell": "lstm", "init": "orthogonal", "gain": 0.3},
                                     {"cell": "rnn", "init": "orthogonal", "gain": 0.3}])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("adjoint", ["kernel", "kernel-lifted", "loop"])
def test_every_gpu_plan_at_once_run_on_the_cpu_gives_the_cpu_numbers(make, monkeypatch, options,
                                                                       dtype, adjoint):
    """Every switch a GPU throws, thrown together on the CPU: the GPU's adjoint
    (``engine.GPU_ADJOINT``: the fused kernel in float64 blocks of 256, or lifted ones of 512,
    range checks read late; or the closed-form loop, its blocks replayed), float64 tangents
    through chunks of 256, slices replayed from (stood-in) graphs, the cell-state scan in
    log2 rounds, the larger stacks and streaming limits. Every probe gives the CPU's numbers,
    through hundreds of decades: a check, before a lent GPU runs tests/test_gpu.py, that the
    paths work together."""
    import gradscope.engine as engine

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 700, "dtype": dtype,
                           **options})
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
    cpu = measure(model.unroll(batch), probes).log10
    replayed = []
    monkeypatch.setattr(engine, "GPU_ADJOINT", adjoint)
    gpu_switches(monkeypatch, replayed)
    backs, back = [], engine.FusedAdjoint.back
    monkeypatch.setattr(engine.FusedAdjoint, "back",
                        lambda self, *args: backs.append(1) or back(self, *args))
    gpu = measure(model.unroll(batch), probes).log10
    assert any(isinstance(m, int) for m in replayed), "no forward slice was replayed"
    by_kernel = adjoint != "loop" and options["cell"] != "gru"  # the GRU has no fused adjoint
    assert bool(backs) == by_kernel
    if not by_kernel:  # the loop's blocks replayed (a length is captured when it comes twice)
        assert any(isinstance(m, tuple) for m in replayed), replayed
    atol = 1e-9 if dtype == "float64" else 1e-3
    for name in cpu:
        assert np.isfinite(cpu[name]).all(), name
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("options", [{"cell": "rnn", "init": "orthogonal"}, {"cell": "lstm"}])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("task", ["language", "copy"])
def test_every_gpu_switch_on_the_language_and_copy_tasks_gives_the_cpu_numbers(
        make, monkeypatch, options, dtype, task):
    """The language task (sequences that end early) and the copy task (a loss at every step)
    with every GPU switch thrown on the CPU: the fused adjoint (each loss gradient entering
    cuDNN's backward at its own step) beside the forward probes (float64 tangents, stood-in
    graphs), against the CPU's pass, with no block of the adjoint redone step by step."""
    from dataclasses import replace

    import gradscope.engine as engine

    model, batch = make(**options, hidden=6, batch=4, seq_len=700, dtype=dtype,
                        task=task)  # slow decays: no block leaves the range
    if task == "language":
        batch = replace(batch, lengths=torch.tensor([700, 650, 300, 5]))
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
    cpu = measure(model.unroll(batch), probes).log10
    replayed = []
    gpu_switches(monkeypatch, replayed)
    backs, back = [], engine.FusedAdjoint.back
    monkeypatch.setattr(engine.FusedAdjoint, "back",
                        lambda self, *args: backs.append(1) or back(self, *args))
    monkeypatch.setattr(engine, "_step_back", _no_fallback)
    gpu = measure(model.unroll(batch), probes).log10
    assert replayed and backs, "no slice was replayed, or the kernel's backward did not run"
    atol = 1e-9 if dtype == "float64" else 1e-3
    for name in cpu:
        assert np.isfinite(cpu[name]).all(), name
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("task", ["adding", "language"])
def test_closed_form_jvps_push_any_number_of_directions_as_forward_mode_ad(cell, seeds, task):
    """gradscope.linear's jvps on sample-major directions (B, K, S), by both of their paths:
    fewer directions than H (v W^T, then the gate blocks summed) and at least H (a matrix per
    sample, a slice's all built at once by ``push``), step by step against forward-mode AD
    (``engine.push``), for one model and a seed stack of 3 (each seed's own W_hh), with equal
    lengths and with sequences that end early (their directions held)."""
    from gradscope.batched import stack_models
    from gradscope.config import RunConfig
    from gradscope.engine import push, trajectory
    from gradscope.model import build
    from gradscope.tasks import Batch

    builts = [build(RunConfig(cell=cell, hidden=5, batch=4, seq_len=24, seed=s, task=task,
                              dtype="float64"), torch.device("cpu")) for s in range(seeds)]
    model = builts[0].model if seeds == 1 else stack_models([b.model for b in builts])
    batch = builts[0].batch if seeds == 1 else Batch.stack([b.batch for b in builts])
    model.requires_grad_(False)
    u = model.unroll(batch)
    if task == "language":
        assert not bool(u.mask.all()), "some sequences should end early"
    states, _ = trajectory(u)
    ops = u.ops(states, 0)
    B, S = u.s0.shape
    gen = torch.Generator().manual_seed(0)
    for K in (2, 5, 2 * 5):  # below H, H, every direction of the LSTM's state
        v = torch.randn(B, K, S, generator=gen, dtype=torch.float64)
        pushed = ops.push(v, 0, 24, v.new_empty(24, B, K, S))
        for t in range(1, 25):
            want = push(u, t, states[t - 1], v if t == 1 else pushed[t - 2])
            torch.testing.assert_close(pushed[t - 1], want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ops.jvp(t - 1, pushed[t - 2] if t > 1 else v), want,
                                       rtol=1e-12, atol=1e-12)


def _many_losses(make, dtype, options, steps):
    """(u, whether W_hh is zeroed): 300 steps of the copy task (``steps`` None: a loss at
    every step), or of the adding task with its loss read at ``steps``; the option
    ``zero_recurrence`` zeroes W_hh (an adjoint exactly zero before each term)."""
    options = dict(options)
    zero = options.pop("zero_recurrence", False)
    model, batch = make(hidden=6, batch=3, seq_len=300 - (20 if steps is None else 0),
                        dtype=dtype, task="copy" if steps is None else "adding", **options)
    if zero:
        model.cell.weight_hh.zero_()
    u = model.unroll(batch)
    return (u if steps is None else _sparse_losses(u, steps)), zero


def _sparse_losses(u, steps):
    """``u`` with its loss read at ``steps`` only (1-based), each weighted 1."""
    from dataclasses import replace

    weights = torch.zeros_like(u.weights)
    weights[[s - 1 for s in steps]] = 1.0
    return replace(u, weights=weights)


@pytest.mark.parametrize(("dtype", "options", "steps", "redone"), [
    *(("float32", o, None, False) for o in _DECAYING),  # the copy task: a loss at every step
    ("float64", _DECAYING[1], None, False),
    ("float64", _GROWING, None, False),
    # losses far apart: in float32 the adjoint falls so far below the next loss's term that
    # the term overflows at its scale (redone); in float64 it may fit (154 decades of room);
    # with W_hh = 0 the adjoint is exactly zero before each term: no scale to bring it to
    ("float32", _DECAYING[0], (300, 240, 120, 7), True),
    ("float64", _DECAYING[1], (300, 150, 149, 20), False),
    ("float64", _GROWING, (300, 100), False),
    ("float64", {"cell": "rnn", "zero_recurrence": True}, (300, 299, 200, 50), True),
])
def test_the_blocked_adjoint_with_losses_at_many_steps_is_the_step_by_step_one(
        make, monkeypatch, dtype, options, steps, redone):
    """Losses at many steps: the reverse pass takes blocks of steps, each step's own loss term
    brought to the block's scale (``engine._general_block``), and redoes a block step by step,
    combining in log space, where that cannot be done. Against every step done that way."""
    from gradscope import engine

    u, zero = _many_losses(make, dtype, options, steps)
    assert not engine._loss_at_last_step_only(u)
    adjoint = [PROBES.get("adjoint")]
    blocks = []
    block = engine._general_block
    monkeypatch.setattr(engine, "_general_block", lambda *a: blocks.append(block(*a)) or
                        blocks[-1])
    got = measure(u, adjoint, fused=False).log10["adjoint"]
    monkeypatch.setattr(engine, "_general_block", lambda *a: None)
    want = measure(u, adjoint, fused=False).log10["adjoint"]
    assert sum(b is not None for b in blocks) >= 5, "blocks should carry most of the pass"
    if redone:
        assert any(b is None for b in blocks), "some block should have been redone"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert finite.sum() == len(steps) if zero else finite.sum() > 200  # W_hh = 0: zero between
    np.testing.assert_allclose(got[finite], want[finite], rtol=0,
                               atol=1e-4 if dtype == "float32" else 1e-9)


@pytest.mark.parametrize("options", _FUSED)
@_PLANS
def test_the_fused_kernel_adjoint_with_a_loss_at_every_step_matches_autograd(
        make, options, monkeypatch, plan):
    """The copy task reads its loss at every step: each step's own term enters the kernel's
    backward as the gradient of that step's output, brought to the block's scale, and step
    t0's joins the block's exit. Against the brute-force twin
    (``_fused_adjoint_against_its_twin``)."""
    _use_plan(monkeypatch, plan)
    import gradscope.engine as engine

    model, batch = make(**{"hidden": 4, "batch": 3, "seq_len": 110, "task": "copy",
                           **options})  # 130 steps: three blocks of 64
    u = model.unroll(batch)
    assert not engine._loss_at_last_step_only(u) and engine._fused_applies(u, True, False)
    _fused_adjoint_against_its_twin(model, batch, u, options, monkeypatch)


@pytest.mark.parametrize(("dtype", "options", "steps"), [
    *(("float32", o, None) for o in _DECAYING[:2]),  # the copy task: a loss at every step
    ("float64", _DECAYING[1], None),
    # losses far apart: the adjoint falls so far below the next loss's term that the term
    # overflows at its scale; with W_hh = 0 it is exactly zero before each term
    ("float32", _DECAYING[0], (300, 240, 120, 7)),
    ("float64", _DECAYING[1], (300, 150, 149, 20)),
    ("float64", {"cell": "rnn", "zero_recurrence": True}, (300, 299, 200, 50)),
])
@_PLANS
def test_the_fused_adjoint_with_losses_at_many_steps_is_the_step_by_step_one(
        make, monkeypatch, dtype, options, steps, plan):
    """Where a block of the fused kernel cannot take a step's term (or leaves the safe range),
    the loop redoes the pass from its start: the values are those of every step done by the
    step-by-step pass (``engine._general_block`` off)."""
    from gradscope import engine

    u, zero = _many_losses(make, dtype, options, steps)
    adjoint = [PROBES.get("adjoint")]
    with monkeypatch.context() as m:
        m.setattr(engine, "_general_block", lambda *a: None)
        want = measure(u, adjoint, fused=False).log10["adjoint"]
    _use_plan(monkeypatch, plan)
    backs, back = [], engine.FusedAdjoint.back
    monkeypatch.setattr(engine.FusedAdjoint, "back",
                        lambda self, *args: backs.append(1) or back(self, *args))
    got = measure(u, adjoint, fused=True).log10["adjoint"]
    assert backs, "the fused kernel did not run"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert finite.sum() == len(steps) if zero else finite.sum() > 200  # W_hh = 0: zero between
    np.testing.assert_allclose(got[finite], want[finite], rtol=0,
                               atol=1e-3 if dtype == "float32" else 1e-9)


@pytest.mark.parametrize("options", _DECAYING)
def test_a_forward_slice_keeps_its_steps_before_the_first_out_of_range(make, monkeypatch,
                                                                      options):
    """A slice whose values leave float32's safe range part way keeps the steps before that
    (each still in range), and the pass goes on from there; only a slice whose first step
    leaves it is done step by step. The same numbers as every step renormalised."""
    import gradscope.engine as engine

    model, batch = make(hidden=6, batch=3, seq_len=300, dtype="float32", **options)
    u = model.unroll(batch)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts) if n != "adjoint"]
    asked, kept = [], []
    push_block = engine._push_block
    info = torch.finfo(torch.float32)
    tiny, big = math.sqrt(info.tiny), math.sqrt(info.max)

    def spied(ops, tangent, a, b, *rest):
        pushed, late = push_block(ops, tangent, a, b, *rest)
        asked.append(b - a)
        kept.append(0 if pushed is None else pushed[0].shape[0])
        if pushed is not None:  # every kept step inside the safe range, for every live direction
            norms = torch.linalg.vector_norm(pushed[0], dim=-1)
            live = (tangent != 0).any(dim=-1)
            assert bool((((norms >= tiny) & (norms <= big)) | ~live).all())
        return pushed, late

    monkeypatch.setattr(engine, "_push_block", spied)
    got = measure(u, probes).log10
    assert any(0 < k < a for a, k in zip(asked, kept, strict=True)), (asked, kept)
    # on a GPU the check is read late, with the probes: the same steps kept, or redone
    cuts, block_to = [], engine._block_to
    monkeypatch.setattr(engine, "_push_block", push_block)
    monkeypatch.setattr(engine, "_runs_ahead", lambda x: True)
    monkeypatch.setattr(engine, "_block_to", lambda values, norms, good: cuts.append(
        values.shape[0] - good) or block_to(values, norms, good))
    late = measure(u, probes).log10
    assert any(cuts), cuts  # some block was cut after its probes were read
    monkeypatch.setattr(engine, "_push_block", lambda *args: (None, None))  # every step alone
    want = measure(u, probes).log10
    for name in want:
        for measured in (got, late):
            np.testing.assert_array_equal(np.isneginf(measured[name]), np.isneginf(want[name]))
            finite = np.isfinite(want[name])
            assert finite.sum() > 250, name
            np.testing.assert_allclose(measured[name][finite], want[name][finite], rtol=0,
                                       atol=1e-4, err_msg=name)
