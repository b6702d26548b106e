"""The Python API: results, determinism, exploding networks, round trips."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import gradscope
from gradscope import RunConfig, RunResult

FAST = dict(hidden=6, batch=3, seq_len=40)


def test_run_returns_profiles_and_summaries():
    r = gradscope.run(cell="gru", task="copy", **FAST)
    assert isinstance(r, RunResult)
    assert list(r.profiles) == ["grad_h0", "jacobian", "adjoint"]
    assert all(len(v) == 60 for v in r.profiles.values())  # copy runs T + 20 steps
    assert r.task["seq_len"] == 60 and r.task["chance_loss"] == pytest.approx(10 * np.log(8) / 60)
    assert r.summary["jacobian"].verdict in ("vanishing", "stable", "exploding")
    frame = r.to_frame()
    assert set(frame.columns) == {"probe", "axis", "step", "log10"} and len(frame) == 180
    assert frame[frame.probe == "adjoint"].step.min() == 0


def test_same_seed_same_numbers_other_seed_other_numbers():
    a, b = gradscope.run(seed=5, **FAST), gradscope.run(seed=5, **FAST)
    c = gradscope.run(seed=6, **FAST)
    for name in a.profiles:
        assert np.array_equal(a.profiles[name], b.profiles[name])
    assert not np.array_equal(a.profiles["grad_h0"], c.profiles["grad_h0"])


def test_config_and_options_combine():
    r = gradscope.run(RunConfig(cell="lstm", **FAST), forget_bias=2.0)
    assert r.config.cell == "lstm" and r.config.forget_bias == 2.0
    with pytest.raises(gradscope.ConfigError, match=r"^unknown run option\(s\) hiden; "
                                                    r"allowed: activation, batch, "):
        gradscope.run(hiden=8)  # a typo: named, with every option allowed, before any work
    # a dict of fields is a config (a result's config.to_dict(), say); a name is not
    again = gradscope.run(r.config.to_dict(), forget_bias=1.0)
    assert again.config == r.config.replace(forget_bias=1.0)
    for wrong in ("lstm", 5):  # were AttributeError or TypeError from deep inside
        with pytest.raises(gradscope.ConfigError, match="the config must be a gradscope."
                                                        "RunConfig .or a dict of its fields."):
            gradscope.run(wrong)


def test_a_run_tells_its_phases_in_order():
    phases = []
    gradscope.run(cell="lstm", steps=5, profile_every=2, on_phase=phases.append, **FAST)
    measuring = [p for p in phases if p.startswith("measuring")]
    assert measuring == [f"measuring the profiles at step {k}" for k in (0, 2, 4, 5)]
    assert phases[:2] == ["measuring the profiles at step 0", "the theory: Lyapunov exponents"]
    done = [p for p in phases if p.startswith("training")]
    assert done == [f"training: {k} of 5 steps done" for k in range(1, 6)]
    assert phases.index("training: 2 of 5 steps done") \
        == phases.index("measuring the profiles at step 2") + 1


def test_the_cost_note_names_the_forward_probes_work_and_cheaper_options():
    note = gradscope.cost_note(cell="lstm", hidden=256, seq_len=1000)
    # 32 sequences x 512 directions (h and c) x 1000 steps x (4 x 256) x 256
    assert note.startswith("the exact forward probes on 32 sequences take about 4e+12 "
                           "multiply-adds, about 107 s on 2 CPU cores")
    assert note.endswith("--jacobian-samples 4 or --projections 32 (estimates; 8x fewer "
                         "directions) costs less")
    trained = gradscope.cost_note(cell="lstm", hidden=128, seq_len=1000, steps=300,
                                  profile_every=100)
    assert "in 4 measurements" in trained  # at steps 0, 100, 200 and 300
    assert gradscope.cost_note(cell="lstm", hidden=256, seq_len=1000, probes=("adjoint",)) \
        is None
    assert gradscope.cost_note(cell="lstm", hidden=256, seq_len=1000, jacobian_samples=2) \
        is None
    assert gradscope.cost_note(**FAST) is None
    with pytest.raises(gradscope.ConfigError, match="--hidden"):
        gradscope.cost_note(hidden=0)


def test_an_exploding_network_is_reported_with_its_step_not_raised(tmp_path):
    # ReLU with W = 2I doubles the state every step: float32 overflows near step 128
    r = gradscope.run(cell="rnn", activation="relu", init="identity", gain=2.0, dtype="float32",
                      hidden=4, batch=2, seq_len=300, out=tmp_path)
    assert r.nonfinite is not None and r.nonfinite["where"] == "state"
    step = r.nonfinite["step"]
    assert 100 < step < 160
    jac = r.profiles["jacobian"]
    assert np.isfinite(jac[: step - 1]).all() and np.isnan(jac[step - 1:]).all()
    # before the overflow the Jacobian is exactly 2I (positive pre-activations): slope log10 2
    assert r.summary["jacobian"].slope == pytest.approx(np.log10(2), abs=1e-6)
    assert np.isnan(r.profiles["adjoint"]).all()  # the task loss itself is not finite
    assert {s.verdict for s in r.summary.values()} == {"exploding"}
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["nonfinite"] == {"step": step, "where": "state"}
    assert saved["profiles"]["jacobian"]["log10"][step - 1] is None


def test_result_round_trips_through_json(tmp_path):
    r = gradscope.run(cell="lstm", out=tmp_path, **FAST)
    back = RunResult.load(tmp_path)
    assert back.config == r.config and back.summary == r.summary and back.meta == r.meta
    for name in r.profiles:
        np.testing.assert_array_equal(back.profiles[name], r.profiles[name])


def test_a_result_shows_itself_in_one_line_and_in_a_notebook_as_its_summary_table():
    r = gradscope.run(cell="gru", steps=3, **FAST)
    line = repr(r)
    assert "\n" not in line and "array" not in line and len(line) < 300
    assert line.startswith("<RunResult gru pytorch, task adding, H=6, T=40: grad_h0 ")
    for name, s in r.summary.items():
        assert f"{name} {s.verdict} ({s.slope:+.4f}/step)" in line
    html = r._repr_html_()
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>.*?>(\w+)</td></tr>", html)
    assert [(name, verdict) for name, _, verdict in rows] \
        == [(name, s.verdict) for name, s in r.summary.items()]
    assert [float(slope) for _, slope, _ in rows] \
        == pytest.approx([s.slope for s in r.summary.values()], abs=1e-4)
    assert r.training.outcome() in html and r.training.outcome().startswith("trained 3 steps")
    assert repr(r.training) == f"<Training {r.training.outcome()}; 1 snapshot>"
    assert repr(r.snapshots[-1]).startswith("<Snapshot at step 3: grad_h0 ")
    exploded = gradscope.run(cell="rnn", activation="relu", init="identity", gain=2.0,
                             dtype="float32", hidden=4, batch=2, seq_len=300)
    assert "adjoint exploding>" in repr(exploded)  # no slope: nothing computed
    assert exploded.notes() == [f"the forward pass left float range (state not finite) at "
                                f"step {exploded.nonfinite['step']}; later steps are not computed"
                                "; float64 reaches further"]
    exploded64 = gradscope.run(exploded.config.replace(dtype="float64"))
    assert exploded64.nonfinite is None and exploded64.notes() == []  # 2**300 fits float64
    foreign = replace(gradscope.profile(torch.nn.RNN(2, 4), seq_len=20), model="<b>x</b> & y")
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in foreign._repr_html_()
    assert repr(foreign).startswith("<ModelProfile <b>x</b> & y, T=20, B=8: grad_h0 ")


def test_a_profile_with_one_finite_value_is_drawn_as_a_dot_over_the_whole_axis():
    from gradscope.plots import comparison_figure, profile_figure
    r = gradscope.run(gain=1e10, theory_k=0, **FAST)  # tanh saturates: exactly 0 from step 2
    assert np.isfinite(r.profiles["grad_h0"]).sum() == 1
    for fig in (profile_figure(r), comparison_figure([r], "grad_h0")):
        ax = fig.axes[0]
        drawn = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert drawn and all(line.get_marker() == "o" for line in drawn)
        assert "exactly zero from step 2" in ax.get_legend().get_texts()[0].get_text()
        lo, hi = ax.get_xlim()
        assert lo < 1 and hi > FAST["seq_len"]  # the steps of exact zeros are in view too


def test_the_tables_last_value_tells_exact_zero_from_not_computed_fresh_or_saved(tmp_path):
    from gradscope.summary import summary_row
    exploded = gradscope.run(cell="rnn", activation="relu", init="identity", gain=2.0,
                             dtype="float32", hidden=4, batch=2, seq_len=300, theory_k=0,
                             out=tmp_path / "exploded")  # the adjoint is not computed at all
    saturated = gradscope.run(gain=1e10, theory_k=0, out=tmp_path / "saturated", **FAST)
    for r in (exploded, RunResult.load(tmp_path / "exploded")):
        assert summary_row("adjoint", r.summary["adjoint"], r.profiles["adjoint"])[4] == "-"
    for r in (saturated, RunResult.load(tmp_path / "saturated")):  # exactly 0 from step 2
        assert summary_row("grad_h0", r.summary["grad_h0"], r.profiles["grad_h0"])[4] \
            == "-inf (exact 0)"


def test_exact_zero_is_null_in_json_and_inf_in_memory():
    r = RunResult(RunConfig(), {}, {"jacobian": np.array([0.0, -np.inf])}, {"jacobian": "t"},
                  {}, None, {})
    assert r.to_dict()["profiles"]["jacobian"]["log10"] == [0.0, None]


def test_compare_loads_runs_and_checks_the_probe(tmp_path):
    gradscope.run(cell="lstm", out=tmp_path / "a", **FAST)
    gradscope.run(cell="rnn", out=tmp_path / "b", **FAST)
    results = gradscope.compare([tmp_path / "a", tmp_path / "b"], "jacobian",
                                tmp_path / "c.png")
    assert len(results) == 2 and (tmp_path / "c.png").stat().st_size > 1000
    for one in (tmp_path / "a", str(tmp_path / "a")):  # was read as the name's characters
        assert [r.config.cell for r in gradscope.compare(one, "jacobian")] == ["lstm"]
    with pytest.raises(gradscope.ConfigError, match="has no 'jacobian_c' profile"):
        gradscope.compare([tmp_path / "a", tmp_path / "b"], "jacobian_c")
    with pytest.raises(gradscope.ConfigError, match="holds no readable gradscope result"):
        gradscope.compare([tmp_path / "missing"], "jacobian")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(gradscope.ConfigError, match="is a directory; give the .png file"):
        gradscope.compare([tmp_path / "a"], "jacobian", tmp_path / "d.png")  # was an OSError
    # a slip of --out wrote the figure over a run's result.json
    saved = (tmp_path / "a" / "result.json").read_bytes()
    for out in (tmp_path / "a" / "result.json", tmp_path):
        with pytest.raises(gradscope.ConfigError, match="is not a .png file"):
            gradscope.compare([tmp_path / "a"], "jacobian", out)
    assert (tmp_path / "a" / "result.json").read_bytes() == saved


def test_jacobian_samples_measure_forward_probes_on_the_first_sequences(make):
    from gradscope.engine import measure
    from gradscope.measure import snapshot
    from gradscope.probes import PROBES, probes_for

    model, batch = make(cell="lstm", hidden=5, batch=6, seq_len=30)
    probes = [PROBES.get(n) for n in probes_for(model.cell.parts)]
    snap = snapshot(model, batch, probes, drop=6.0, band=1.0, jacobian_samples=2)
    sub = measure(model.unroll(batch.take(2)), [p for p in probes if p.pass_ == "forward"])
    full = measure(model.unroll(batch), [PROBES.get("adjoint")])
    for name, values in sub.log10.items():
        np.testing.assert_array_equal(snap.profiles[name], values)
    np.testing.assert_array_equal(snap.profiles["adjoint"], full.log10["adjoint"])
    assert list(snap.profiles) == [p.name for p in probes]
    assert batch.take(2).inputs.shape[1] == 2


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_the_command_line_loads_without_torch_and_the_api_on_first_use():
    """--help and usage errors answer at once: the CLI module does not import torch, pandas
    or matplotlib; the package's API functions load when first asked for."""
    heavy = "('torch', 'pandas', 'matplotlib')"
    out = _fresh_python(
        "import sys, gradscope.cli, gradscope;"
        f"print([m for m in {heavy} if m in sys.modules]);"
        "gradscope.run;"
        f"print([m for m in {heavy} if m in sys.modules])")
    assert out.splitlines() == ["[]", "['torch', 'pandas', 'matplotlib']"]


def test_drawing_leaves_the_users_matplotlib_backend_alone(tmp_path):
    """A notebook's backend stays as it was: the figures are drawn outside pyplot (they used
    to switch matplotlib to Agg on import)."""
    out = _fresh_python(
        "import sys, matplotlib; matplotlib.use('svg');"
        "import gradscope, gradscope.report.figures;"
        f"gradscope.run(hidden=3, batch=2, seq_len=5, theory_k=0, out={str(tmp_path)!r});"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    assert out == "svg False"
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_api_functions_keep_the_names_of_the_submodules_check_and_sweep():
    # importing gradscope.check or gradscope.sweep sets the module as the package's attribute,
    # unless the package keeps its function there
    out = _fresh_python(
        "import gradscope.check, gradscope.sweep, gradscope;"
        "from gradscope.check import to_json;"
        "print(gradscope.check.__module__, gradscope.sweep.__module__, gradscope.run.__name__)")
    assert out == "gradscope.api gradscope.api run"
    assert sorted(gradscope.__all__) == dir(gradscope)  # not its imports: sys, importlib, ...
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gradscope.nope  # noqa: B018


def test_probes_as_a_comma_list_in_python_as_on_the_command_line():
    """gradscope.profile took "grad_h0,adjoint" and gradscope.run refused it as one unknown
    probe name."""
    assert gradscope.RunConfig(probes="grad_h0, adjoint").probes == ("grad_h0", "adjoint")
    assert gradscope.RunConfig(probes="adjoint").probes == ("adjoint",)
    with pytest.raises(gradscope.ConfigError, match="at least one probe"):
        gradscope.RunConfig(probes=" , ")
    result = gradscope.run(probes="grad_h0,adjoint", **FAST)
    assert list(result.profiles) == ["grad_h0", "adjoint"]


def test_the_public_api_has_docstrings_with_an_example():
    """STYLE.md: docstrings on the public API with an example."""
    import inspect
    lacking = [name for name in gradscope.__all__
               if name not in ("ConfigError", "GradscopeError", "__version__")
               and ">>>" not in (inspect.getdoc(getattr(gradscope, name)) or "")]
    assert lacking == []


def test_seeds_beyond_32_bits_are_refused_not_aliased():
    """torch's CPU generator keeps 32 bits of a seed: seed 2**32 replayed seed 0's weights and
    data exactly, as a different run; 2**64 was a ValueError from torch."""
    import torch
    same = [torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (0, 2**32)]
    assert torch.equal(*same)  # why the bound is there
    gradscope.RunConfig(seed=2**32 - 1)
    for seed in (2**32, 2**64, -1, True):
        with pytest.raises(gradscope.ConfigError, match="--seed must be an integer from 0 to "
                                                        "4294967295"):
            gradscope.RunConfig(seed=seed)
