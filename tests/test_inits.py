"""The initialisation conventions of ../shared/TASKS.md."""

import math

import pytest
import torch

from gradscope.errors import ConfigError

H = 256


def _w(make, **options):
    model, _ = make(hidden=H, seq_len=10, **options)
    return model.cell


def test_normal_draws_sigma_w_over_sqrt_h(make):
    w = _w(make, init="normal", gain=1.7).weight_hh
    assert float(w.std() * math.sqrt(H)) == pytest.approx(1.7, rel=0.02)


@pytest.mark.parametrize("init, sigma2", [("pytorch", 1 / 3), ("xavier-uniform", 1.0),
                                          ("xavier-normal", 1.0), ("kaiming", 2.0)])
def test_sigma_w_of_each_scheme(make, init, sigma2):
    w = _w(make, init=init).weight_hh
    assert float(w.var() * H) == pytest.approx(sigma2, rel=0.03)


def test_pytorch_scheme_bounds_weights_and_biases(make):
    cell = _w(make, init="pytorch", gain=2.0)
    assert float(cell.weight_hh.abs().max()) <= 2.0 / math.sqrt(H)
    assert float(cell.weight_hh.abs().max()) > 1.9 / math.sqrt(H)
    for b in (cell.bias_ih, cell.bias_hh):
        assert 0 < float(b.abs().max()) <= 1 / math.sqrt(H)


def test_orthogonal_and_identity_are_exact(make):
    q = _w(make, init="orthogonal", gain=0.8).weight_hh
    torch.testing.assert_close(q.T @ q, 0.64 * torch.eye(H, dtype=q.dtype))
    w = _w(make, init="identity", gain=1.25).weight_hh
    assert torch.equal(w, 1.25 * torch.eye(H, dtype=w.dtype))


def test_schemes_apply_per_gate_block_and_zero_the_biases(make):
    cell = _w(make, cell="lstm", init="identity")
    for k in range(4):
        block = cell.weight_hh[k * H:(k + 1) * H]
        assert torch.equal(block, torch.eye(H, dtype=block.dtype))
    assert not cell.bias_ih.any() and not cell.bias_hh.any()


def test_input_init_is_separate(make):
    cell = _w(make, init="identity", input_init="normal")
    assert torch.equal(cell.weight_hh, torch.eye(H, dtype=cell.weight_hh.dtype))
    assert float(cell.weight_ih.std()) == pytest.approx(1 / math.sqrt(2), rel=0.1)  # D = 2


def test_forget_bias_sets_the_effective_bias(make):
    # PyTorch adds b_ih and b_hh: their sum is what the gate sees
    cell = _w(make, cell="lstm", init="pytorch", forget_bias=3.0)
    f = cell.gate_slice("f")
    torch.testing.assert_close(cell.bias_ih[f] + cell.bias_hh[f],
                               torch.full((H,), 3.0, dtype=torch.float64))
    assert cell.bias_ih[cell.gate_slice("i")].any()  # other gates keep the scheme's biases


def test_chrono_sets_log_u_on_the_effective_bias(make):
    T = 500
    cell = _w(make, cell="lstm", gate_init="chrono", chrono_tmax=T)
    f, i = cell.gate_slice("f"), cell.gate_slice("i")
    bf = cell.bias_ih[f] + cell.bias_hh[f]
    assert float(bf.min()) >= 0 and float(bf.max()) <= math.log(T - 1)
    assert float(bf.max()) > math.log(T - 1) - 0.5  # spread over [0, log(T_max - 1)]
    torch.testing.assert_close(cell.bias_ih[i] + cell.bias_hh[i], -bf)
    assert not cell.bias_hh[f].any()  # not log(u1 * u2) from two vectors


def test_chrono_on_gru_raises_the_update_gate(make):
    cell = _w(make, cell="gru", gate_init="chrono")
    z = cell.bias_ih[cell.gate_slice("z")] + cell.bias_hh[cell.gate_slice("z")]
    assert float(z.min()) >= 0 and float(z.max()) <= math.log(10 - 1)  # T_max = seq_len = 10


@pytest.mark.parametrize("options, message", [
    (dict(cell="rnn", gate_init="chrono"), "--gate-init chrono applies to lstm and gru"),
    (dict(cell="rnn", forget_bias=1.0), "--forget-bias applies to lstm and gru"),
    (dict(cell="lstm", forget_bias=1.0, gate_init="chrono"), "give one of them"),
    (dict(init="glorot"), "unknown init 'glorot' for --init; choose from: pytorch, "),
    (dict(input_init="eye"), "unknown init 'eye' for --input-init"),
])
def test_bad_combinations_are_config_errors(make, options, message):
    with pytest.raises(ConfigError, match=message):
        make(hidden=4, seq_len=10, **options)


def test_same_seed_same_weights_different_seed_different(make):
    a = _w(make, init="normal", seed=3).weight_hh
    b = _w(make, init="normal", seed=3).weight_hh
    c = _w(make, init="normal", seed=4).weight_hh
    assert torch.equal(a, b) and not torch.equal(a, c)
