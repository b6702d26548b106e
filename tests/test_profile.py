"""`gradscope profile` and gradscope.profile: a user's own module measured whole, every probe
against autograd through the module itself; results that load, compare and refuse bad input."""

import json

import matplotlib.text
import numpy as np
import pytest
import torch
from test_usermodel import _every_probe_by_autograd, _seeded, _twin
from torch import nn
from twins import assert_log10_close

import gradscope
from gradscope.cli import main
from gradscope.results import ModelProfile, load_result
from gradscope.usermodel import adapt, inputs, projection


def test_every_probe_of_a_module_against_autograd_through_it():
    module = _seeded(nn.LSTM(3, 5))
    T, B, seed = 25, 3, 4
    got = gradscope.profile(module, seq_len=T, batch=B, seed=seed, device="cpu")
    a = adapt(module, "twin")

    def step(x, state):
        _, (h, c) = a.module(x[None], (state[0][None], state[1][None]))
        return h[0], c[0]

    zeros = (torch.zeros(B, 5, dtype=torch.float64),) * 2
    want = _every_probe_by_autograd(step, zeros, inputs(a, T, B, seed), projection(5, seed))
    assert set(got.profiles) == set(want)
    for name, values in want.items():
        assert_log10_close(got.profiles[name], values, name=name)
    assert got.model == "LSTM(3, 5)" and got.input_size == 3 and got.axes["adjoint"] == "k"
    assert got.summary["grad_h0"].slope == pytest.approx(
        np.polyfit(np.arange(1, T + 1), want["grad_h0"], 1)[0])


def test_a_stacked_module_reports_each_layer_and_summarises_its_adjoint_from_k_1():
    module = _seeded(nn.LSTM(3, 4, num_layers=2))
    _, _, want = _twin(module, seq_len=30, batch=3, seed=1)
    got = gradscope.profile(module, seq_len=30, batch=3, seed=1, device="cpu")
    for name in ("grad_h0", "grad_h0@2"):
        assert_log10_close(got.profiles[name], want[name], name=name)
    assert list(got.profiles) == ["grad_h0", "jacobian", "adjoint", "grad_c0", "jacobian_c",
                                  "grad_h0@2", "grad_c0@2"]
    # the first layer's state adjoint is exactly zero at k = 0: the loss reads the top layer
    adjoint = got.profiles["adjoint"]
    assert adjoint[0] == -np.inf and np.isfinite(adjoint[1:]).all()
    assert got.summary["adjoint"].start == adjoint[1] and got.summary["adjoint"].horizon != 0
    chosen = gradscope.profile(module, seq_len=30, batch=3, seed=1, device="cpu",
                               probes="grad_h0@2, jacobian")
    assert list(chosen.profiles) == ["grad_h0@2", "jacobian"]
    np.testing.assert_array_equal(chosen.profiles["jacobian"], got.profiles["jacobian"])


def test_saved_profiles_load_and_compare_beside_a_run(tmp_path):
    factory = tmp_path / "mymodels_saved.py"
    factory.write_text("import torch\n\ndef make(hidden=6):\n    torch.manual_seed(0)\n"
                       "    return torch.nn.GRU(2, hidden)\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        got = gradscope.profile("mymodels_saved:make", model_args={"hidden": 7}, seq_len=20,
                                device="cpu", projections=4, out=tmp_path / "p")
    finally:
        sys.path.remove(str(tmp_path))
    saved = json.loads((tmp_path / "p" / "result.json").read_text())
    assert saved["schema"] == "gradscope.model/1" and saved["model"] == "mymodels_saved:make"
    assert saved["projections"] == 4 and (tmp_path / "p" / "profile.png").stat().st_size > 1000
    back = load_result(tmp_path / "p")
    assert isinstance(back, ModelProfile) and back.summary == got.summary
    assert back.theory == got.theory and len(got.theory["lyapunov"]) == 7
    for name, values in got.profiles.items():
        np.testing.assert_array_equal(back.profiles[name], values)
    assert set(back.to_frame().probe) == set(got.profiles)
    gradscope.run(cell="gru", hidden=7, seq_len=20, batch=2, theory_k=0, out=tmp_path / "r")
    results = gradscope.compare([tmp_path / "r", tmp_path / "p"], "grad_h0", tmp_path / "c.png")
    assert [type(r).__name__ for r in results] == ["RunResult", "ModelProfile"]
    assert results[1].label() == "mymodels_saved:make, seq-len 20"
    # each kind loads as itself (ModelProfile had no load), and not as the other
    assert gradscope.ModelProfile.load(tmp_path / "p").summary == got.summary
    assert gradscope.RunResult.load(tmp_path / "r" / "result.json").config.hidden == 7
    with pytest.raises(ValueError, match="not a gradscope.run/1 result"):
        gradscope.RunResult.load(tmp_path / "p")


@pytest.mark.parametrize("options, message", [
    ({"seq_len": 0}, "gradscope.profile: seq-len must be positive, got 0"),
    ({"probes": ["grad_c9"]}, "probes: 'grad_c9' does not apply to this model; it offers: "
                              "grad_h0, jacobian, adjoint"),
    ({"probes": []}, "give at least one probe"),
    ({"projections": 0}, "projections must be a positive integer"),
    ({"dtype": "float16"}, "unknown dtype 'float16'"),
    ({"model_args": {"x": 1}}, "model_args go to a factory"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(gradscope.ConfigError) as info:
        gradscope.profile(nn.RNN(2, 3), **{"seq_len": 10, **options})
    assert message in str(info.value) and "\n" not in str(info.value)


def _main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_the_command_line_writes_the_result_and_refuses_bad_input(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels_cli.py").write_text(
        "import torch\n\ndef encoder(layers=1):\n    torch.manual_seed(0)\n"
        "    return torch.nn.LSTM(4, 6, num_layers=layers)\n")
    for argv, message in (
            (["mymodels_cli"], 'look like "package.module:factory"'),
            (["mymodels_cli:nothing"], "gradscope profile: mymodels_cli has no callable "
                                       "'nothing'"),
            (["mymodels_cli:encoder", "--seq-len", "0"], "error: --seq-len must be positive"),
            (["mymodels_cli:encoder", "--probes", "adjoint", "--projections", "4"],
             "error: --projections applies to the forward probes, not to probes adjoint"),
            (["mymodels_cli:encoder", "--probes", "grad_h0", "--checkpoint"],
             "error: --checkpoint applies to the adjoint probe, not to probes grad_h0"),
            (["mymodels_cli:encoder", "--model-args", "[2]"], "must be a JSON object"),
            (["mymodels_cli:encoder", "--input-size", "5"],
             "--input-size 5 does not match the model's"),
            (["mymodels_cli:encoder", "--probes", "grad_h0@2"], "'grad_h0@2' does not apply")):
        code, _, err = _main(["profile", *argv], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing written
    code, out, _ = _main(["profile", "mymodels_cli:encoder", "--model-args", '{"layers": 2}',
                          "--seq-len", "30"], capsys)
    assert code == 0 and "grad_h0@2" in out and "input size 4" in out
    folder = tmp_path / "runs" / "encoder-T30-s0"
    assert load_result(folder).model == "mymodels_cli:encoder"
    assert f"wrote {folder.relative_to(tmp_path) / 'result.json'}" in out


class ScaledRotation(nn.Module):
    """The step protocol, linear: h' = g Q h + U x, Q orthogonal. Every Lyapunov exponent is
    ln g exactly, and ||dh_t/dh_0|| = g^t sqrt(H) (TASKS.md's identity)."""

    input_size = 2

    def __init__(self, g, hidden=6):
        super().__init__()
        torch.manual_seed(0)
        q = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))[0]
        self.w = nn.Parameter(g * q)
        self.u = nn.Parameter(torch.randn(hidden, 2, dtype=torch.float64))

    def initial_state(self, batch):
        return (torch.zeros(batch, self.w.shape[0], dtype=torch.float64),)

    def step(self, x, state):
        return (state[0] @ self.w.T + x @ self.u.T,)


@pytest.mark.parametrize("g", [0.5, 1.0, 1.3])
def test_a_modules_lyapunov_exponents_and_slope_are_exact_for_a_scaled_rotation(g):
    got = gradscope.profile(ScaledRotation(g), seq_len=60, batch=2, theory_k=4, device="cpu")
    np.testing.assert_allclose(got.theory["lyapunov"], [np.log(g)] * 4, atol=1e-12)
    (prediction,) = got.theory["predictions"]
    assert prediction["predicted"] == pytest.approx(np.log10(g), abs=1e-12)
    assert got.summary["jacobian"].slope == pytest.approx(np.log10(g), abs=1e-10)
    assert prediction["agrees"] and not prediction["caveats"]
    np.testing.assert_allclose(got.profiles["jacobian"],
                               np.log10(g) * np.arange(1, 61) + 0.5 * np.log10(6), atol=1e-10)
    assert gradscope.profile(ScaledRotation(g), seq_len=5, theory_k=0).theory is None


def test_a_name_with_dollars_is_drawn_as_text_not_as_math(tmp_path):
    """A check named 'a$\\q$' (or a model's repr with '$...$') ended `gradscope check --plots`
    in matplotlib's ParseFatalException: matplotlib read the '$...$' as math."""
    from dataclasses import replace

    from gradscope.plots import comparison_figure, profile_figure, save_figure
    name = "enc $\\q$ <x>"
    profile = replace(gradscope.profile(torch.nn.RNN(2, 3), seq_len=10), model=name)
    for i, fig in enumerate([profile_figure(profile), comparison_figure([profile], "grad_h0")]):
        save_figure(fig, tmp_path / f"{i}.png")  # drawing parses the texts
        texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
        assert any(name in text for text in texts), texts
    assert matplotlib.rcParams["text.parse_math"]  # the user's own figures are as they were
