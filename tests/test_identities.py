"""The exact identities of ../shared/TASKS.md, including far below float64's range."""

import math

import numpy as np
import pytest
import torch

from gradscope.engine import measure
from gradscope.probes import PROBES
from gradscope.summary import summarize


def _profiles(model, batch, *names):
    return measure(model.unroll(batch), [PROBES.get(n) for n in names]).log10


def test_linear_orthogonal_preserves_the_norm_exactly(make):
    # identity 1 with g = 1: every singular value of dh_t/dh_0 is 1, so ||J||_F = sqrt(H)
    model, batch = make(cell="rnn", activation="linear", init="orthogonal", hidden=16,
                        seq_len=2000)
    jac = _profiles(model, batch, "jacobian")["jacobian"]
    np.testing.assert_allclose(jac, 0.5 * math.log10(16), rtol=0, atol=1e-10)


@pytest.mark.parametrize("init", ["identity", "orthogonal"])
@pytest.mark.parametrize("g", [0.5, 0.9, 1.1])
def test_linear_scaled_has_slope_log10_g_past_float64_range(make, init, g):
    # identity 1: W = g Q gives ||J_t||_F = sqrt(H) g^t exactly; with g = 0.5 and T = 3000
    # that is 1e-903, far below float64's 1e-308, and the engine still reports it exactly.
    T, H = 3000, 8
    model, batch = make(cell="rnn", activation="linear", init=init, gain=g, hidden=H, seq_len=T)
    jac = _profiles(model, batch, "jacobian")["jacobian"]
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(jac, t * math.log10(g) + 0.5 * math.log10(H), rtol=0, atol=1e-8)
    assert summarize(jac, t).slope == pytest.approx(math.log10(g), abs=1e-12)


def test_linear_any_matrix_is_the_matrix_power(make):
    # identity 2: dh_T/dh_0 = W^T for a linear RNN, whatever W is
    model, batch = make(cell="rnn", activation="linear", init="normal", gain=1.3, hidden=6,
                        seq_len=30)
    jac = _profiles(model, batch, "jacobian")["jacobian"]
    W = model.cell.weight_hh.detach()
    power = torch.eye(6, dtype=torch.float64)
    for t in range(1, 31):
        power = W @ power
        assert jac[t - 1] == pytest.approx(math.log10(torch.linalg.matrix_norm(power)), abs=1e-10)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_pascanu_bound_holds(make, activation):
    # identity 3: ||J_t||_2 <= (gamma ||W||_2)^t, so ||J_t||_F <= sqrt(H) (gamma ||W||_2)^t
    from gradscope.activations import ACTIVATIONS

    model, batch = make(cell="rnn", activation=activation, init="normal", gain=2.0, hidden=12,
                        seq_len=300)
    jac = _profiles(model, batch, "jacobian")["jacobian"]
    sigma = float(torch.linalg.matrix_norm(model.cell.weight_hh, ord=2))
    gamma = ACTIVATIONS.get(activation).gamma
    t = np.arange(1, 301)
    assert (jac <= 0.5 * math.log10(12) + t * math.log10(gamma * sigma) + 1e-9).all()


def test_relu_identity_with_positive_preactivations_is_exactly_constant(make):
    # identity 4: every pre-activation positive makes J_t = I at every step
    model, batch = make(cell="rnn", activation="relu", init="identity", hidden=8, seq_len=500)
    with torch.no_grad():  # adding inputs are >= 0; make U >= 0 and b > 0
        model.cell.weight_ih.abs_()
        model.cell.bias_ih.fill_(0.1)
        model.cell.bias_hh.zero_()
    p = _profiles(model, batch, "jacobian", "adjoint")
    np.testing.assert_allclose(p["jacobian"], 0.5 * math.log10(8), rtol=0, atol=1e-12)
    # the loss reads h_T only, and every J is I: the adjoint is the same vector at every k
    np.testing.assert_allclose(p["adjoint"], p["adjoint"][0], rtol=0, atol=1e-12)


def _gate_product(model, batch, gate: str) -> np.ndarray:
    """log10 of the RMS over the batch of ||diag(prod_t gate_t)||_F, gates from the inputs alone
    (W_hh = 0), computed directly in float64 logs."""
    cell = model.cell
    a = cell.project(batch.inputs) + cell.bias_hh  # (T, B, G*H): W_hh = 0
    log_gate = torch.nn.functional.logsigmoid(a[..., cell.gate_slice(gate)])
    cum = torch.cumsum(log_gate, dim=0)  # ln prod_{s<=t} gate_s, (T, B, H)
    per_sample = 0.5 * torch.logsumexp(2 * cum, dim=-1)  # ln ||diag||_F, (T, B)
    rms = 0.5 * (torch.logsumexp(2 * per_sample, dim=1) - math.log(per_sample.shape[1]))
    return (rms / math.log(10)).numpy()


def test_lstm_without_recurrence_follows_the_forget_gate_product(make):
    # identity 5: W_hh = 0 gives dc_T/dc_0 = diag(prod f_t) and dh_T/dh_0 = 0 exactly
    model, batch = make(cell="lstm", hidden=8, seq_len=400)
    with torch.no_grad():
        model.cell.weight_hh.zero_()
    p = _profiles(model, batch, "jacobian_c", "jacobian", "grad_h0", "grad_c0")
    np.testing.assert_allclose(p["jacobian_c"], _gate_product(model, batch, "f"), rtol=0,
                               atol=1e-9)
    assert np.isneginf(p["jacobian"]).all() and np.isneginf(p["grad_h0"]).all()
    assert np.isfinite(p["grad_c0"]).all()


def test_gru_without_recurrence_follows_the_update_gate_product(make):
    # identity 6: W_hh = 0 gives dh_T/dh_0 = diag(prod z_t)
    model, batch = make(cell="gru", hidden=8, seq_len=400)
    with torch.no_grad():
        model.cell.weight_hh.zero_()
    jac = _profiles(model, batch, "jacobian")["jacobian"]
    np.testing.assert_allclose(jac, _gate_product(model, batch, "z"), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bias, steps, value", [(0.0, 50, 8.9e-16), (1.0, 100, 2.5e-14),
                                                 (3.0, 100, 7.8e-3)])
def test_effective_forget_bias_gives_the_published_gate_products(make, bias, steps, value):
    # With W_hh = 0 and W_ih = 0 every forget gate is sigma(b), b the *effective* bias
    # (b_ih + b_hh), so ||dc_t/dc_0||_F = sqrt(H) sigma(b)^t (the numbers in TASKS.md).
    model, batch = make(cell="lstm", forget_bias=bias, init="normal", hidden=4, seq_len=steps)
    with torch.no_grad():
        model.cell.weight_hh.zero_()
        model.cell.weight_ih.zero_()
    jac_c = _profiles(model, batch, "jacobian_c")["jacobian_c"]
    assert jac_c[-1] - 0.5 * math.log10(4) == pytest.approx(math.log10(value), abs=0.01)


def test_tanh_pytorch_default_reaches_far_below_float32_and_float64(make):
    # sigma_w^2 = 1/3: about a quarter decade per step; float32 autograd would stop near 1e-45
    for dtype in ("float64", "float32"):
        model, batch = make(cell="rnn", activation="tanh", init="pytorch", hidden=32, batch=8,
                            seq_len=1000, dtype=dtype)
        p = _profiles(model, batch, "grad_h0", "jacobian", "adjoint")
        for name, values in p.items():
            assert np.isfinite(values).all(), (dtype, name)
            assert values[-1] < -150, (dtype, name, values[-1])


def test_raised_forget_bias_holds_the_cell_state_path(make):
    # the acceptance check, small: forget bias 3 decays far more slowly than 0
    slopes = {}
    for bias in (0.0, 3.0):
        model, batch = make(cell="lstm", forget_bias=bias, hidden=16, batch=4, seq_len=200)
        jac_c = _profiles(model, batch, "jacobian_c")["jacobian_c"]
        slopes[bias] = summarize(jac_c, np.arange(1, 201)).slope
    assert slopes[0.0] < -0.1
    assert slopes[3.0] > slopes[0.0] + 0.1
