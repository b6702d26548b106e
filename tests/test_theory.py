"""Theory beside measurement: exact cases, Lyapunov against the measured slope, the Pascanu
bound as a property over random small RNNs, the gate product, disagreement."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradscope
from gradscope.theory import lyapunov, mean_field


def _theory(**options):
    r = gradscope.run(**{"hidden": 8, "batch": 4, "seq_len": 200, **options})
    return r, r.theory


@pytest.mark.parametrize("init", ["orthogonal", "identity"])
@pytest.mark.parametrize("g", [0.8, 1.0, 1.2])
def test_linear_scaled_matrices_are_predicted_exactly(init, g):
    r, th = _theory(cell="rnn", activation="linear", init=init, gain=g)
    # every Lyapunov exponent is ln g; mean field's chi = sigma_w^2 = g^2 exactly
    np.testing.assert_allclose(th["lyapunov"], math.log(g), atol=1e-9)
    predicted = {p["name"]: p for p in th["predictions"]}
    assert predicted["lyapunov"]["predicted"] == pytest.approx(math.log10(g), abs=1e-9)
    assert predicted["mean-field"]["predicted"] == pytest.approx(math.log10(g), abs=1e-9)
    assert predicted["lyapunov"]["agrees"] and predicted["mean-field"]["agrees"]
    assert th["mean_field"]["sigma_w2"] == pytest.approx(g * g, rel=1e-12)
    assert th["sigma_max"] == pytest.approx(g, rel=1e-9) and th["bound_holds"]
    assert any("not i.i.d. Gaussian" in c for c in predicted["mean-field"]["caveats"])


def test_relu_identity_with_positive_preactivations_has_zero_exponents(make):
    model, batch = make(cell="rnn", activation="relu", init="identity", hidden=6, seq_len=300)
    with torch.no_grad():
        model.cell.weight_ih.abs_()
        model.cell.bias_ih.fill_(0.1)
    np.testing.assert_allclose(lyapunov(model.unroll(batch), k=6), 0.0, atol=1e-12)


@pytest.mark.parametrize("options", [
    {"cell": "rnn", "activation": "softsign", "init": "normal", "gain": 1.3},
    {"cell": "lstm"}, {"cell": "gru", "task": "language", "seq_len": 150}])
def test_lyapunov_by_the_closed_form_equals_forward_mode_ad(make, options):
    """The exponents come from the cells' closed-form Jacobians (gradscope.linear), over
    several chunks and with varying lengths: the same as by forward-mode AD through the step."""
    from dataclasses import replace

    model, batch = make(**{"hidden": 6, "batch": 3, "seq_len": 150, **options})
    u = model.unroll(batch)
    assert u.linearize is not None
    np.testing.assert_allclose(lyapunov(u, k=4), lyapunov(replace(u, linearize=None), k=4),
                               rtol=0, atol=1e-12)


def test_largest_lyapunov_exponent_matches_the_jacobian_slope_on_long_runs():
    # a chaotic tanh network (g = 1.5) and a vanishing one (PyTorch's default)
    for options in (dict(init="normal", gain=1.5), dict(init="pytorch")):
        r, th = _theory(cell="rnn", hidden=32, seq_len=1500, **options)
        measured = r.summary["jacobian"].slope
        assert th["lyapunov"][0] / math.log(10) == pytest.approx(measured, abs=0.005)


def test_mean_field_matches_a_wide_random_tanh_network():
    r, th = _theory(cell="rnn", init="normal", gain=0.8, hidden=256, batch=8, seq_len=150)
    mf = next(p for p in th["predictions"] if p["name"] == "mean-field")
    assert mf["agrees"] and mf["caveats"] == []


def test_mean_field_fixed_point_and_chi_for_tanh_at_zero_input():
    # with s^2 = 0 and sigma_w < 1 the fixed point is q* = 0, where phi'(0) = 1: chi = sigma_w^2
    mf = mean_field(torch.tanh, 0.64, 0.0)
    assert mf["q_star"] == pytest.approx(0.0, abs=1e-9)
    assert mf["chi"] == pytest.approx(0.64, rel=1e-6)


def test_gate_product_predicts_an_lstm_without_recurrence_exactly(make):
    from gradscope.engine import measure
    from gradscope.probes import PROBES
    from gradscope.summary import summarize
    from gradscope.theory import predict

    model, batch = make(cell="lstm", forget_bias=2.0, init="normal", hidden=8, seq_len=200)
    with torch.no_grad():
        model.cell.weight_hh.zero_()
        model.cell.weight_ih.zero_()
    u = model.unroll(batch)
    jac_c = measure(u, [PROBES.get("jacobian_c")]).log10["jacobian_c"]
    slope = summarize(jac_c, np.arange(1, 201)).slope
    th = predict(model, u, {"jacobian_c": slope}, k=4)
    gate = next(p for p in th.predictions if p.name == "gate-product")
    assert gate.predicted == pytest.approx(math.log10(1 / (1 + math.exp(-2.0))), abs=1e-12)
    assert gate.predicted == pytest.approx(slope, abs=1e-9) and gate.agrees
    assert gate.caveats == []


def test_a_strong_recurrence_disagrees_and_says_why():
    r, th = _theory(cell="lstm", hidden=32, seq_len=300)
    gate = next(p for p in th["predictions"] if p["name"] == "gate-product")
    assert gate["agrees"] is False and "recurrence not weak" in gate["caveats"][0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(activation=st.sampled_from(["tanh", "sigmoid", "relu", "linear", "softsign"]),
       init=st.sampled_from(["normal", "orthogonal", "pytorch", "xavier-uniform"]),
       gain=st.floats(0.2, 3.0), hidden=st.integers(2, 8), seq_len=st.integers(2, 60),
       seed=st.integers(0, 10_000))
def test_the_pascanu_bound_is_never_violated(activation, init, gain, hidden, seq_len, seed):
    r = gradscope.run(cell="rnn", activation=activation, init=init, gain=gain, hidden=hidden,
                      seq_len=seq_len, batch=3, seed=seed, probes=("jacobian",))
    if r.nonfinite is None:
        assert r.theory["bound_holds"] is True


def test_theory_is_in_result_json_and_can_be_turned_off(tmp_path):
    import json

    gradscope.run(seq_len=20, hidden=4, batch=2, out=tmp_path)
    theory = json.loads((tmp_path / "result.json").read_text())["theory"]
    assert {"lyapunov", "sigma_max", "pascanu_slope", "mean_field", "predictions"} <= set(theory)
    assert gradscope.run(seq_len=20, hidden=4, batch=2, theory_k=0).theory is None
