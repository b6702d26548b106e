"""Users' own modules: the unrolled step reproduces the module's forward, the engine measures
it exactly (against autograd on the module itself), and bad models are refused clearly."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from twins import assert_log10_close

import gradscope
from gradscope.engine import measure
from gradscope.errors import ConfigError
from gradscope.probes import PROBES, layer_probes, probes_for
from gradscope.usermodel import adapt, inputs, outputs, projection, unroll


def _seeded(module):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, 0, 0.4)
    return module.double()


@pytest.mark.parametrize("module", [
    nn.RNN(3, 5), nn.RNN(3, 5, nonlinearity="relu", num_layers=2),
    nn.RNN(3, 5, batch_first=True, bias=False), nn.LSTM(3, 5, num_layers=3, batch_first=True),
    nn.LSTM(3, 5, bias=False), nn.GRU(3, 5, num_layers=2), nn.GRU(3, 5, batch_first=True),
    nn.LSTM(3, 5, proj_size=2), nn.LSTM(3, 5, proj_size=3, num_layers=2, batch_first=True),
], ids=lambda m: repr(m))
def test_unrolled_stacked_modules_reproduce_their_forward(module):
    module = _seeded(module)
    x = torch.randn(11, 4, 3, dtype=torch.float64)
    own = module(x.transpose(0, 1) if module.batch_first else x)[0]
    own = own.transpose(0, 1) if module.batch_first else own
    got = outputs(adapt(module, "test"), x)  # a projected h padded with zeros to H
    P = own.shape[-1]
    assert got.shape[-1] == module.hidden_size and (got[..., P:] == 0).all()
    torch.testing.assert_close(got[..., :P], own, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", [nn.RNNCell(3, 5), nn.RNNCell(3, 5, nonlinearity="relu"),
                                  nn.LSTMCell(3, 5), nn.GRUCell(3, 5, bias=False)],
                         ids=lambda m: repr(m))
def test_unrolled_cells_reproduce_their_forward(cell):
    cell = _seeded(cell)
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    state = None
    hs = []
    for t in range(9):
        state = cell(x[t], state)
        hs.append(state[0] if isinstance(state, tuple) else state)
    torch.testing.assert_close(outputs(adapt(cell, "test"), x), torch.stack(hs))


class Leaky(nn.Module):
    """The step protocol: a leaky tanh unit."""

    input_size = 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5) * 0.5)
        self.u = nn.Parameter(torch.randn(5, 3))

    def initial_state(self, batch):
        return (torch.zeros(batch, 5, dtype=self.w.dtype),)

    def step(self, x, state):
        (h,) = state
        return (0.9 * h + 0.1 * torch.tanh(h @ self.w.T + x @ self.u.T),)


def _twin(module, seq_len, batch, seed):
    """Autograd on the module itself: ||dL_t/dh^(l)_0|| per layer, L_t = mean_b r . h_t."""
    a = adapt(module, "twin")
    u = unroll(a, seq_len=seq_len, batch=batch, seed=seed, input_size=None,
               device=torch.device("cpu"))
    m = a.module
    L, H, P = m.num_layers, m.hidden_size, m.proj_size or m.hidden_size
    h0 = torch.zeros(L, batch, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.zeros(L, batch, H, dtype=torch.float64, requires_grad=True)
    x = inputs(a, seq_len, batch, seed)
    out, _ = m(x, (h0, c0))  # (T, B, P): the top layer's h_t
    r = projection(P, seed)
    step_loss = (out @ r).mean(dim=1)  # (T,)
    grads = {f"grad_h0{'' if k == 0 else f'@{k + 1}'}": [] for k in range(L)}
    for t in range(seq_len):
        (g,) = torch.autograd.grad(step_loss[t], h0, retain_graph=True)
        for k in range(L):
            n = float(g[k].norm())
            grads[f"grad_h0{'' if k == 0 else f'@{k + 1}'}"].append(
                math.log10(n) if n > 0 else -math.inf)
    return u, a, {k: np.array(v) for k, v in grads.items()}


@pytest.mark.parametrize("layers", [1, 2])
def test_an_lstm_is_measured_exactly_for_every_layer(layers):
    """One layer runs on the built-in cell's fast back end, two by forward-mode AD: both
    against autograd on the module itself."""
    module = nn.LSTM(3, 4, num_layers=layers).double()
    u, a, want = _twin(module, seq_len=12, batch=3, seed=1)
    assert len(a.cells) == layers and u.linearize is not None
    probes = [PROBES.get(n) for n in probes_for(a.parts)] + layer_probes(a.parts)
    got = measure(u, probes).log10
    assert {"grad_h0", "grad_c0", "jacobian", "jacobian_c", "adjoint",
            *(("grad_h0@2", "grad_c0@2") if layers == 2 else ())} == set(got)
    for name in want:
        ratio = np.abs(10.0 ** (got[name] - want[name]) - 1)
        assert ratio.max() < 1e-6, name


@pytest.mark.parametrize("layers", [1, 2])
def test_an_lstm_with_a_projection_is_measured_exactly_for_every_layer(layers):
    """proj_size: h (P values) carried padded to H; by the generic back end, against autograd
    on the module itself, every layer's h_0."""
    module = _seeded(nn.LSTM(3, 5, proj_size=2, num_layers=layers))
    u, a, want = _twin(module, seq_len=30, batch=3, seed=1)
    assert a.readout == 2 and u.linearize is None
    got = measure(u, [PROBES.get(n) for n in probes_for(a.parts)] + layer_probes(a.parts)).log10
    assert len(want) == layers
    for name in want:
        assert_log10_close(got[name], want[name], name=name)


def _every_probe_by_autograd(step, state0, xs, r):
    """A state (h, c)'s every probe by autograd through ``step(x_t, (h, c)) -> (h, c)`` a
    step at a time: ||dL_t/dh_0||, ||dL_t/dc_0||, ||dh_t/dh_0||_F and ||dc_t/dc_0||_F (root
    mean square over the batch), and the adjoint ||dL/dh_{T-k}||; L_t = mean_b r . h_t and
    L = L_T."""
    h0, c0 = (t.detach().clone().requires_grad_() for t in state0)
    hs, cs, state = [], [], (h0, c0)  # the tensors that the next step reads
    for x in xs:
        state = step(x, state)
        hs.append(state[0])
        cs.append(state[1])
    step_loss = torch.stack([(h @ r).mean() for h in hs])

    def log10(v):
        return math.log10(v) if v > 0 else -math.inf

    def frobenius(out, start):
        sq = torch.zeros(out.shape[0], dtype=torch.float64)
        for j in range(out.shape[-1]):
            (row,) = torch.autograd.grad(out[:, j].sum(), start, retain_graph=True)
            sq += (row ** 2).sum(dim=1)
        return log10(float(sq.mean().sqrt()))

    want = {"grad_h0": [], "grad_c0": [], "jacobian": [], "jacobian_c": []}
    for t in range(len(hs)):
        for name, start in (("grad_h0", h0), ("grad_c0", c0)):
            (g,) = torch.autograd.grad(step_loss[t], start, retain_graph=True)
            want[name].append(log10(float(g.norm())))
        want["jacobian"].append(frobenius(hs[t], h0))
        want["jacobian_c"].append(frobenius(cs[t], c0))
    adjoint = torch.autograd.grad(step_loss[-1], hs)
    want["adjoint"] = [log10(float(a.norm())) for a in reversed(adjoint)]
    return {name: np.array(values) for name, values in want.items()}


def test_an_lstm_with_a_projection_has_every_probe_of_its_twin():
    """One projected layer, every probe against autograd through the module's own forward."""
    module = _seeded(nn.LSTM(3, 5, proj_size=2))
    T, B, P, H = 25, 3, 2, 5
    a = adapt(module, "twin")
    u = unroll(a, seq_len=T, batch=B, seed=4, input_size=None, device=torch.device("cpu"))
    got = measure(u, [PROBES.get(n) for n in probes_for(a.parts)]).log10

    def step(x, state):
        _, (h, c) = a.module(x[None], (state[0][None], state[1][None]))
        return h[0], c[0]

    zeros = (torch.zeros(B, P, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64))
    want = _every_probe_by_autograd(step, zeros, inputs(a, T, B, 4), projection(P, 4))
    assert set(got) == set(want)
    for name, values in want.items():
        assert_log10_close(got[name], values, name=name)


class Narrow(nn.Module):
    """The step protocol with state tensors of two widths: h of 3 values, c of 5."""

    input_size = 2

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, 3) * 0.6)
        self.b = nn.Parameter(torch.randn(5, 5) * 0.3)
        self.u = nn.Parameter(torch.randn(5, 2))
        self.o = nn.Parameter(torch.randn(3, 5) * 0.8)

    def initial_state(self, batch):
        return (torch.full((batch, 3), 0.1, dtype=self.a.dtype),
                torch.full((batch, 5), -0.2, dtype=self.a.dtype))

    def step(self, x, state):
        h, c = state
        c = 0.8 * c + torch.tanh(h @ self.a.T + c @ self.b.T + x @ self.u.T)
        return torch.tanh(c @ self.o.T), c


class Concatenated(nn.Module):
    """The step protocol as cells are written for training: the input and the state joined
    with torch.cat along dim 1, the new state split with [:, :k] (neither broadcasts over a
    leading dimension, which the engine's directions once had to)."""

    input_size = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2 + 4 + 4, 8)

    def initial_state(self, batch):
        return (torch.full((batch, 4), 0.3, dtype=self.w.weight.dtype),
                torch.full((batch, 4), -0.1, dtype=self.w.weight.dtype))

    def step(self, x, state):
        h, c = state
        z = self.w(torch.cat([x, h, c], dim=1))
        c = 0.7 * c + 0.3 * torch.tanh(z[:, :4])
        return torch.sigmoid(z[:, 4:]) * torch.tanh(c), c


def _assert_every_probe_of_its_twin(a, h_width, T, B, seed):
    """The engine's every probe of a step module, against autograd through its own step from
    its own initial state."""
    u = unroll(a, seq_len=T, batch=B, seed=seed, input_size=None, device=torch.device("cpu"))
    got = measure(u, [PROBES.get(n) for n in probes_for(a.parts)]).log10
    want = _every_probe_by_autograd(a.module.step, a.module.initial_state(B),
                                    inputs(a, T, B, seed), projection(h_width, seed))
    assert set(got) == set(want)
    for name, values in want.items():
        assert_log10_close(got[name], values, name=name)


def test_a_step_written_for_training_is_measured_exactly():
    torch.manual_seed(1)
    _assert_every_probe_of_its_twin(adapt(Concatenated().double(), "twin"), 4, T=25, B=3,
                                    seed=4)


def test_the_step_protocol_takes_state_tensors_of_different_widths():
    """Carried padded to the widest with zeros: every probe as autograd through the module's
    own step gives it, from its own nonzero initial state."""
    a = adapt(Narrow().double(), "twin")
    assert (a.hidden, a.readout, a.parts) == (5, 3, ("h", "c"))
    _assert_every_probe_of_its_twin(a, 3, T=30, B=3, seed=5)


@pytest.mark.parametrize("module, seq_len", [
    (nn.RNN(3, 5), 40), (nn.RNN(3, 5, nonlinearity="relu", bias=False), 40),
    (nn.LSTM(3, 5, batch_first=True), 40), (nn.LSTM(3, 5, bias=False), 40), (nn.GRU(3, 5), 40),
    (nn.RNNCell(3, 5, nonlinearity="relu"), 40), (nn.LSTMCell(3, 5), 40),
    (nn.GRUCell(3, 5, bias=False), 40),
    (nn.RNN(3, 5, num_layers=2), 300), (nn.RNN(3, 5, nonlinearity="relu", num_layers=3), 40),
    (nn.LSTM(3, 5, num_layers=3, batch_first=True), 300), (nn.LSTM(3, 5, num_layers=2), 40),
    (nn.GRU(3, 5, num_layers=2), 300), (nn.GRU(3, 5, num_layers=3, bias=False), 40),
], ids=lambda m: repr(m) if isinstance(m, nn.Module) else f"T{m}")
def test_torch_nn_modules_take_the_built_in_cells_fast_back_end(module, seq_len):
    """The built-in cells with the module's weights, a layer each (stacked: ``Layered``):
    every probe, every layer's, as the step-by-step generic back end measures the module
    itself; at T = 300 through up to 120 decades."""
    from dataclasses import replace

    a = adapt(_seeded(module), "test")
    assert len(a.cells) == getattr(module, "num_layers", 1)
    probes = [PROBES.get(n) for n in probes_for(a.parts)] + layer_probes(a.parts)
    got = {}
    for fast in (True, False):
        u = unroll(a if fast else replace(a, cells=()), seq_len=seq_len, batch=3, seed=2,
                   input_size=None, device=torch.device("cpu"))
        assert (u.linearize is not None) == fast
        got[fast] = measure(u, probes).log10
    for name in got[False]:
        np.testing.assert_allclose(got[True][name], got[False][name], rtol=0, atol=1e-9,
                                   err_msg=name)


def test_the_step_protocol_is_measured():
    a = adapt(Leaky().double(), "test")
    u = unroll(a, seq_len=30, batch=2, seed=0, input_size=3, device=torch.device("cpu"))
    p = measure(u, [PROBES.get("jacobian")]).log10["jacobian"]
    assert np.isfinite(p).all() and p[-1] < p[0]


class Forgetful(Leaky):
    """A step that does not read its state (``ignore``) or cuts it from autograd."""

    def __init__(self, ignore: bool):
        super().__init__()
        self.ignore = ignore

    def step(self, x, state):
        h = torch.zeros_like(state[0]) if self.ignore else state[0].detach()
        return (0.9 * h + 0.1 * torch.tanh(x @ self.u.T),)


@pytest.mark.parametrize("ignore", [True, False], ids=["ignores its state", "detaches it"])
def test_a_step_that_does_not_carry_its_state_has_exactly_zero_gradients(ignore):
    """Such a step was an AttributeError traceback (forward-mode AD returns no tangent); its
    step Jacobian is exactly zero, as autograd says: every profile is zero from step 1."""
    module = Forgetful(ignore).double()
    p = gradscope.profile(module, seq_len=12, batch=2, theory_k=2)
    for name in ("grad_h0", "jacobian"):
        assert np.isneginf(p.profiles[name]).all(), name
    assert np.isfinite(p.profiles["adjoint"][0]) and np.isneginf(p.profiles["adjoint"][1:]).all()
    h0 = module.initial_state(2)[0].requires_grad_(True)  # autograd's word: zero, too
    h1 = module.step(torch.randn(2, 3, dtype=torch.float64), (h0,))[0]
    assert not h1.requires_grad or torch.autograd.grad(h1.sum(), h0, allow_unused=True)[0] is None


@pytest.mark.parametrize("module, message", [
    (nn.Linear(3, 3), "the model is a Linear; expected torch.nn.RNN, LSTM or GRU"),
    ("not a module", "the model is a str"),
    (nn.LSTM(3, 4, bidirectional=True), "bidirectional LSTM reads time both ways"),
    # a bare tensor as the state was read as its rows, two states of shape (4,)
    (type("Bare", (Leaky,), {"initial_state": lambda self, b: torch.zeros(b, 5)})(),
     r"must return a tuple of tensors, one per part of the state; it returned one tensor of "
     r"shape \(2, 5\): return \(h,\)"),
    (type("Mixed", (Leaky,), {"initial_state": lambda self, b: (torch.zeros(b, 5), 3)})(),
     r"must return a tuple of tensors, one per part of the state; it returned tuple "
     r"\(Tensor \(2, 5\), int\)"),
    (type("Named", (Leaky,), {"initial_state": lambda self, b: {"h": torch.zeros(b, 5)}})(),
     "must return a tuple of tensors, one per part of the state; it returned dict$"),
])
def test_unsupported_models_are_config_errors(module, message):
    with pytest.raises(ConfigError, match=message):
        adapt(module, "here")


class NormedLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return torch.layer_norm(out, out.shape[-1:]), state


class HalvedRNN(nn.RNN):
    """A torch.nn.RNN subclass with the step protocol: h' = tanh(...) / 2, not nn.RNN's."""

    def initial_state(self, batch):
        return (torch.zeros(batch, self.hidden_size, dtype=self.weight_hh_l0.dtype),)

    def step(self, x, state):
        pre = x @ self.weight_ih_l0.T + state[0] @ self.weight_hh_l0.T
        return (torch.tanh(pre) / 2,)


def test_a_subclass_with_its_own_forward_is_refused_and_one_with_a_step_is_stepped():
    """A subclass of torch.nn.LSTM that overrides forward (here: a layer norm on every
    output) was measured as a plain LSTM of its weights, its own forward silently left out;
    one that defines the step protocol was unrolled as torch.nn.RNN all the same."""
    with pytest.raises(ConfigError, match="NormedLSTM overrides torch.nn.LSTM's forward, which "
                                          "gradscope does not run"):
        adapt(NormedLSTM(3, 4), "here")
    assert adapt(type("Plain", (nn.GRU,), {})(3, 4), "here").parts == ("h",)  # no override

    torch.manual_seed(0)
    module = HalvedRNN(3, 4, bias=False).double()
    a = adapt(module, "here")
    assert a.cells == ()  # the step protocol, not the built-in cell's back end
    u = unroll(a, seq_len=12, batch=2, seed=0, input_size=None, device=torch.device("cpu"))
    got = measure(u, [PROBES.get("grad_h0")]).log10["grad_h0"]
    x = inputs(a, 12, 2, 0).double()
    h0 = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    h, want = h0, []
    r = projection(4, 0).double()
    for t in range(12):  # autograd through the module's own step, one backward per step
        h = module.step(x[t], (h,))[0]
        (g,) = torch.autograd.grad((h @ r).mean(), h0, retain_graph=True)
        want.append(math.log10(g.norm()))
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_a_model_that_holds_a_recurrent_module_is_told_to_return_it():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn, self.out = nn.Embedding(9, 3), nn.LSTM(3, 4), nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"the model is an Encoder; expected .*; it holds "
                                          r"rnn \(LSTM\): let the factory return that$"):
        adapt(Encoder(), "here")


def test_a_step_protocol_state_of_the_wrong_shape_is_refused():
    bad = Narrow()
    bad.initial_state = lambda batch: (torch.zeros(batch, 3), torch.zeros(batch, 2, 2))
    with pytest.raises(ConfigError, match=r"must return tensors of shape \(batch, n\); "
                                          r"initial_state\(2\) gave shapes \[\(2, 3\), "
                                          r"\(2, 2, 2\)\]"):
        adapt(bad, "here")


def test_nan_weights_are_refused():
    rnn = nn.RNN(3, 4)
    with torch.no_grad():
        rnn.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="weight_hh_l0 holds NaN or Inf"):
        adapt(rnn, "here")


def test_input_size_must_match():
    a = adapt(nn.GRU(3, 4), "here")
    with pytest.raises(ConfigError, match="input-size 5 does not match the model's input_size 3"):
        unroll(a, seq_len=5, batch=2, seed=0, input_size=5, device=torch.device("cpu"))


@pytest.mark.parametrize("module", [nn.LSTM(3, 5, num_layers=2), nn.GRU(3, 5, num_layers=2),
                                    nn.RNN(3, 5, num_layers=3), nn.LSTM(3, 5)],
                         ids=lambda m: repr(m))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_nn_modules_under_every_gpu_switch_give_the_cpu_numbers(monkeypatch, module,
                                                                       dtype):
    """On a GPU the forward probes push float64 tangents (the layers' maps cast with them,
    ``StackedOps.mapped``) and replay one layer's slices from CUDA graphs (stacked layers stay
    eager): thrown on the CPU, every probe gives the CPU's numbers, as far as the CPU's float32
    tangents go (where layers drift apart beyond float32, the CPU stops with an underflow and
    the GPU's float64 goes on)."""
    from helpers import gpu_switches

    a = adapt(_seeded(module), "test", dtype)
    probes = [PROBES.get(n) for n in probes_for(a.parts)] + layer_probes(a.parts)

    def measured():
        u = unroll(a, seq_len=700, batch=3, seed=2, input_size=None, device=torch.device("cpu"))
        return measure(u, probes)

    cpu = measured()
    replayed = []
    gpu_switches(monkeypatch, replayed)
    gpu = measured()
    assert bool(replayed) == (len(a.cells) == 1)
    assert gpu.nonfinite is None
    end = 700 if cpu.nonfinite is None else cpu.nonfinite.step - 1
    assert cpu.nonfinite is None or (dtype == torch.float32 and cpu.nonfinite.where == "underflow")
    atol = 1e-9 if dtype == torch.float64 else 1e-3
    for name in cpu.log10:
        np.testing.assert_allclose(gpu.log10[name][:end], cpu.log10[name][:end], rtol=0,
                                   atol=atol, err_msg=name)


def test_layers_that_drift_apart_beyond_float32_widen_or_stop_with_an_underflow():
    """A 3-layer tanh RNN in float32: the first layer's part of each direction falls more
    than 1e-31 below the deeper layers' within a few hundred steps. Renormalising each
    direction keeps the whole in range, not that part, which would then read as an exact
    zero. The closed-form back end pushes float64 tangents once more and measures to the end,
    as float64 does; forward-mode AD, in the module's own float32, stops there and says so."""
    from dataclasses import replace

    module = _seeded(nn.RNN(3, 5, num_layers=3))
    probes = [PROBES.get(n) for n in probes_for(("h", "h@2", "h@3"))]
    got = {}
    for dtype in (torch.float32, torch.float64):
        a = adapt(module, "test", dtype)
        for fast in (True, False):
            u = unroll(a if fast else replace(a, cells=()), seq_len=300, batch=3, seed=2,
                       input_size=None, device=torch.device("cpu"))
            got[dtype, fast] = measure(u, probes)
    full = got[torch.float64, True].log10["jacobian"]
    assert got[torch.float64, True].nonfinite is None
    assert got[torch.float64, False].nonfinite is None
    assert np.isfinite(full).all() and full[-1] < -70  # its first layer far below the rest
    widened = got[torch.float32, True]
    assert widened.nonfinite is None
    np.testing.assert_allclose(widened.log10["jacobian"], full, rtol=0, atol=1e-3)
    # a GPU reads a block's range check late, with its probes: where the first step of a
    # block has a part below range, that slice is redone step by step, as read at once
    import gradscope.engine as engine
    u = unroll(adapt(module, "test", torch.float32), seq_len=300, batch=3, seed=2,
               input_size=None, device=torch.device("cpu"))
    stepped, push_steps = [], engine._push_steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_runs_ahead", lambda x: True)
        patch.setattr(engine, "_push_steps", lambda *args: stepped.append(1) or push_steps(*args))
        late = measure(u, probes)
    assert late.nonfinite is None and stepped
    for name in late.log10:
        np.testing.assert_allclose(late.log10[name], widened.log10[name], rtol=0, atol=1e-9,
                                   err_msg=name)
    stop = got[torch.float32, False].nonfinite
    assert stop is not None and stop.where == "underflow" and 50 < stop.step < 300, stop
    # checkpointed: the first pass records the checkpoints, the second streams its own chunks
    u = unroll(adapt(module, "test", torch.float32), seq_len=300, batch=3, seed=2,
               input_size=None, device=torch.device("cpu"))
    kept = measure(u, probes, checkpoint=True)
    assert kept.nonfinite is None
    for name in kept.log10:  # its trajectory streamed step by step: float32 rounding apart
        np.testing.assert_allclose(kept.log10[name], widened.log10[name], rtol=0, atol=1e-4,
                                   err_msg=name)
    jac = got[torch.float32, False].log10["jacobian"]
    assert np.isfinite(jac[:stop.step - 1]).all() and np.isnan(jac[stop.step - 1:]).all()
    np.testing.assert_allclose(jac[:stop.step - 1], full[:stop.step - 1], rtol=0, atol=1e-3)


def test_the_memory_estimate_counts_what_each_path_keeps():
    """Forward probes alone stream the trajectory; the adjoint keeps it (twice as much by the
    generic back end) and, for one LSTM or vanilla RNN layer, the fused kernel's graph."""
    from gradscope.usermodel import memory_estimate

    cpu, T, B = torch.device("cpu"), 1000, 4

    def estimate(module, reverse):
        return memory_estimate(adapt(module.double(), "here"), T, B, cpu, reverse=reverse)

    H, S, D = 16, 32, 3  # an LSTM's state: h and c of H values each
    lstm, gru = nn.LSTM(D, H), nn.GRU(D, H)
    inputs_and_tangents = T * B * D * 16 + 4 * S * B * S * 8
    assert estimate(lstm, False) == inputs_and_tangents + 2 * T * B * 4 * H * 8
    stored = 2 * (T + 1) * B * S * 8
    graph = 8 * T * B * H * 8
    assert estimate(lstm, True) == inputs_and_tangents + T * B * 4 * H * 8 + stored + graph
    assert estimate(gru, True) - estimate(gru, False) == 2 * (T + 1) * B * H * 8 \
        - T * B * 3 * H * 8  # no graph: the GRU has no fused adjoint
    generic = nn.LSTM(D, H, proj_size=8)  # carried padded: the same S
    assert estimate(generic, True) - estimate(generic, False) == 2 * stored


class Faulty(Narrow):
    """A step module whose step goes wrong in the ways users' code does."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def initial_state(self, batch):  # torch's default float32, though measured in float64
        return torch.zeros(batch, 3), torch.zeros(batch, 5)

    def step(self, x, state):
        if self.fault == "raises":
            return {}["missing"]
        h, c = super().step(x, state)
        return {"width": (h[..., :2], c), "tensor": h, "mixed": (h.mean(0, keepdim=True), c),
                "batch-mean": (h - h.mean(0, keepdim=True), c),
                "noise": (h + 0.01 * torch.randn_like(h), c),
                "integer": (h.long(), c), "fine": (h, c)}[self.fault]


@pytest.mark.parametrize("fault, message", [
    ("raises", r"the model's step raised KeyError: 'missing' \(at test_usermodel.py:\d+\)$"),
    ("width", r"step\(x, state\) returned tensors of shapes \[\(2, 2\), \(2, 5\)\] for "
              r"states of shapes \[\(2, 3\), \(2, 5\)\]: return each as it came$"),
    ("mixed", r"step\(x, state\) returned tensors of shapes \[\(1, 3\), \(2, 5\)\] for "
              r"states of shapes \[\(2, 3\), \(2, 5\)\]: return each as it came$"),
    ("tensor", r"step\(x, state\) must return a tuple of tensors, as initial_state does; it "
               r"returned a Tensor$"),
    ("integer", r"step\(x, state\) returned tensors of dtypes \['torch.int64', "
                r"'torch.float64'\]; return floating-point ones"),
    # measured without a word before: every probe silently wrong
    ("batch-mean", r"step\(x, state\) mixes the sequences of its batch: the first one's next "
                   r"state changed when only the second one's input did"),
    ("noise", r"step\(x, state\) gave two different next states for the same x and state"),
])
def test_a_step_that_goes_wrong_is_one_line_naming_it(fault, message):
    with pytest.raises(ConfigError, match=r"^here: " + message):
        a = adapt(Faulty(fault).double(), "here")  # the step is tried here, on 2 sequences
        measure(unroll(a, seq_len=5, batch=2, seed=0, input_size=None,
                       device=torch.device("cpu")), [PROBES.get("jacobian")])


def test_batch_norm_in_eval_mode_steps_each_sequence_alone_and_is_measured():
    class Normed(Narrow):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def step(self, x, state):
            h, c = super().step(x, state)
            return self.norm(h), c

    module = Normed()
    a = adapt(module.double(), "here")  # adapt puts it in eval mode: running statistics
    u = unroll(a, seq_len=5, batch=2, seed=0, input_size=None, device=torch.device("cpu"))
    assert np.isfinite(measure(u, [PROBES.get("jacobian")]).log10["jacobian"]).all()
    module.norm.train = lambda mode=True: module.norm  # stays in training mode: refused
    with pytest.raises(ConfigError, match="mixes the sequences of its batch"):
        adapt(module, "here")


def test_a_step_modules_float32_initial_state_is_cast_to_its_weights_dtype():
    a = adapt(Faulty("fine").double(), "here")
    assert a.initial_state(2).dtype == torch.float64
    u = unroll(a, seq_len=5, batch=2, seed=0, input_size=None, device=torch.device("cpu"))
    assert np.isfinite(measure(u, [PROBES.get("jacobian")]).log10["jacobian"]).all()
