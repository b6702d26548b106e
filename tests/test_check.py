"""`gradscope check`: rules (a table of edge cases), configuration errors, baselines, outputs,
and the issue's end-to-end story in a fresh folder."""

import json
import subprocess
import sys
import textwrap
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

import gradscope
from gradscope.check import (
    Exit,
    rule_baseline,
    rule_finite,
    rule_max_growth,
    rule_min_horizon,
    rule_min_slope,
)
from gradscope.cli import main
from gradscope.errors import ConfigError

# --- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope, zero, limit, passed, shortfall", [
    (-0.01, False, -0.02, True, ""),
    (-0.02, False, -0.02, True, ""),  # the limit itself passes
    (-0.03, False, -0.02, False, "0.0100 log10/step"),
    (None, True, -0.02, False, "exactly zero"),
    (None, False, -0.02, False, "no slope (under two finite values)"),
])
def test_min_slope(slope, zero, limit, passed, shortfall):
    r = rule_min_slope(slope, zero, limit)
    assert r.passed is passed and r.shortfall == shortfall


@pytest.mark.parametrize("horizon, limit, passed", [(None, 150, True), (150, 150, True),
                                                    (149, 150, False)])
def test_min_horizon(horizon, limit, passed):
    r = rule_min_horizon(horizon, 200, limit)
    assert r.passed is passed
    assert r.measured == ("never within 200 steps" if horizon is None else f"{horizon} steps")


def test_max_growth_and_finite():
    assert rule_max_growth(np.array([0.0, 1.0, 2.0]), 2.0).passed
    r = rule_max_growth(np.array([-1.0, 1.5, np.nan]), 2.0)
    assert not r.passed and r.shortfall == "0.50 decades"
    assert rule_finite(None).passed
    assert not rule_finite({"step": 7, "where": "state"}).passed
    underflow = rule_finite({"step": 9, "where": "underflow"})
    assert not underflow.passed and underflow.measured == "underflow at step 9"
    assert "fell further below the rest than the dtype holds" in underflow.detail


def test_baseline_windows_name_the_worst_window():
    base = -0.1 * np.arange(100)
    same = rule_baseline(base.copy(), base, 1.0, 4)
    assert same.passed and same.measured.startswith("+0.00")
    worse = base.copy()
    worse[75:] -= 3.0  # the last quarter lost 3 decades
    r = rule_baseline(worse, base, 1.0, 4)
    assert not r.passed and "window 4/4 (steps 76-100) is 3.00 decades below" in r.detail
    assert rule_baseline(worse, base, 3.0, 4).passed
    with pytest.raises(ConfigError, match="the baseline has 100 steps and the profile 50: "
                                          "measure as many steps as the baseline, or record "
                                          "it again at this length"):
        rule_baseline(base[:50], base, 1.0, 4)  # not just --update-baseline: at which length?


# --- the story of the issue, in a fresh folder --------------------------------------------------

MODELS = '''
import torch

def make_encoder(forget_bias=3.0):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 32, num_layers=2)
    with torch.no_grad():   # the usual remedy: a raised forget-gate bias in every layer
        for k in range(2):
            getattr(lstm, f"bias_ih_l{k}")[32:64] = forget_bias
            getattr(lstm, f"bias_hh_l{k}")[32:64] = 0.0
    return lstm

def small_tanh():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(8, 32)
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(0.3)
    return rnn
'''

CONFIG = '''
[project]
name = "myproject"
version = "0.1"

[tool.gradscope.checks.encoder]
model = "{module}:{factory}"
seq-len = 200
probe = "grad_h0"
min-slope = -0.02
min-horizon = 150
'''


def _project(tmp_path, factory="make_encoder", module="models"):
    (tmp_path / f"{module}.py").write_text(MODELS)
    (tmp_path / "pyproject.toml").write_text(CONFIG.format(module=module, factory=factory))
    return tmp_path


def _check(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "gradscope", "check", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "160", **(env or {})})


def test_lstm_passes_small_tanh_fails_broken_config_exits_2(tmp_path):
    _project(tmp_path)
    summary = tmp_path / "summary.md"
    ok = _check(tmp_path, "--junit-xml", "junit.xml", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 check passed" in ok.stdout
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert "gradscope check: passed" in summary.read_text()

    _project(tmp_path, factory="small_tanh")
    bad = _check(tmp_path, "--junit-xml", "junit.xml")
    assert bad.returncode == 1
    assert "min-slope" in bad.stdout and "FAIL by" in bad.stdout and "failed: encoder" in bad.stdout
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    failures = [c for c in suite if c.find("failure") is not None]
    assert suite.get("failures") == str(len(failures)) and len(failures) == 2
    assert "below the minimum -0.0200" in failures[0].find("failure").get("message")

    text = (tmp_path / "pyproject.toml").read_text().replace("min-slope", "min-slop")
    (tmp_path / "pyproject.toml").write_text(text)
    broken = _check(tmp_path)
    assert broken.returncode == 2
    assert broken.stderr.count("\n") == 1 and "check 'encoder': unknown key 'min-slop'" in \
        broken.stderr


@pytest.fixture
def project(tmp_path, monkeypatch, request):
    """A fresh folder with a uniquely named models module, as the current directory."""
    module = f"models_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    monkeypatch.chdir(tmp_path)
    return _project(tmp_path, module=module), module


def _main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("edit, message", [
    (("min-slope = -0.02", "min-slope = 'steep'"),
     "check 'encoder': min-slope must be int or float, got 'steep'"),
    (("seq-len = 200", "seq-len = 100"), "min-horizon 150 exceeds seq-len 100"),
    (("probe = \"grad_h0\"", "probe = \"grad_x\""), "probe 'grad_x' does not apply"),
    ((":make_encoder", ":missing"), "has no callable 'missing'"),
    (("model = \"", "model = \"nowhere."), "cannot import nowhere."),
    (("model = ", "cell = \"lstm\"\nmodel = "), "a factory and built-in options"),
    (("seq-len = 200", "seq-len = 200_000_000"), "measuring the model needs about "),
])
def test_configuration_errors_name_the_file_the_check_and_the_key(project, capsys, edit,
                                                                  message):
    folder, _ = project
    path = folder / "pyproject.toml"
    path.write_text(path.read_text().replace(*edit))
    code, _, err = _main(["check"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and "pyproject.toml" in err


def test_no_configuration_at_all(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["check"], capsys)
    assert code == 2 and "no gradscope.toml and no [tool.gradscope]" in err


def test_factory_that_raises_or_returns_the_wrong_type(project, capsys):
    folder, module = project
    (folder / f"{module}.py").write_text(MODELS + "\ndef broken():\n    raise ValueError('no')\n"
                                         "\ndef wrong():\n    return 42\n")
    path = folder / "pyproject.toml"
    for factory, message in (("broken", "raised ValueError: no"), ("wrong", "the model is an int")):
        path.write_text(CONFIG.format(module=module, factory=factory))
        code, _, err = _main(["check"], capsys)
        assert code == 2 and message in err


def test_baseline_then_a_regression_fails_by_window(project, capsys):
    folder, module = project
    code, out, _ = _main(["check", "--update-baseline"], capsys)
    assert code == 0 and (folder / "gradscope-baseline.json").exists()
    code, out, _ = _main(["check", "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 0 and [r["rule"] for r in report["checks"][0]["rules"]] == [
        "finite", "min-slope", "min-horizon", "baseline"]
    # a change lowers the forget bias: still within the rules' limits, but below the baseline
    path = folder / "pyproject.toml"
    path.write_text(path.read_text().replace(
        "min-horizon = 150", "min-horizon = 50\nmin-slope = -1\nmodel-args = {forget_bias = 1.0}"
    ).replace("min-slope = -0.02\n", ""))
    code, out, _ = _main(["check", "--format", "json"], capsys)
    rules = {r["rule"]: r for r in json.loads(out)["checks"][0]["rules"]}
    assert code == 1 and not rules["baseline"]["passed"] and rules["min-slope"]["passed"]
    assert "decades below the baseline" in rules["baseline"]["detail"]
    # flags override the file: a huge tolerance forgives it
    code, _, _ = _main(["check", "--tolerance", "1000"], capsys)
    assert code == 0


def test_a_baseline_of_another_probe_is_refused_and_kept_for_the_checks_not_updated(
        tmp_path, monkeypatch, capsys):
    """Changing a check's probe and not its baseline compared, say, jacobian with grad_h0's
    recorded profile (the same length) without a word; and `--update-baseline --check a`
    wrote the other checks' entries back without their probe."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "gradscope.toml"
    config.write_text(textwrap.dedent('''
        [checks.a]
        cell = "rnn"
        seq-len = 30
        [checks.b]
        cell = "gru"
        seq-len = 30
    '''))
    assert _main(["check", "--update-baseline"], capsys)[0] == 0
    assert _main(["check", "--update-baseline", "--check", "a"], capsys)[0] == 0
    recorded = json.loads((tmp_path / "gradscope-baseline.json").read_text())["checks"]
    assert {name: c["probe"] for name, c in recorded.items()} == {"a": "grad_h0",
                                                                  "b": "grad_h0"}
    config.write_text(config.read_text().replace('cell = "gru"', 'cell = "gru"\nprobe = '
                                                                 '"jacobian"'))
    code, _, err = _main(["check"], capsys)
    assert code == 2 and "check 'b': probe is 'jacobian', but the baseline was recorded for " \
                         "'grad_h0': run `gradscope check --update-baseline`" in err
    assert _main(["check", "--check", "a"], capsys)[0] == 0  # a's own baseline is still good
    assert _main(["check", "--update-baseline"], capsys)[0] == 0
    assert _main(["check"], capsys)[0] == 0


def test_builtin_configurations_can_be_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gradscope.toml").write_text(textwrap.dedent('''
        [checks.irnn]
        cell = "rnn"
        activation = "relu"
        init = "identity"
        seq-len = 100
        min-slope = -0.01
        [checks.default-tanh]
        cell = "rnn"
        seq-len = 100
        probe = "jacobian"
        min-slope = -0.05
    '''))
    code, out, _ = _main(["check", "--format", "json"], capsys)
    checks = {c["name"]: c["passed"] for c in json.loads(out)["checks"]}
    assert code == 1 and checks == {"irnn": True, "default-tanh": False}
    code, _, _ = _main(["check", "--check", "irnn"], capsys)
    assert code == 0
    code, _, err = _main(["check", "--check", "nope"], capsys)
    assert code == 2 and "no check 'nope'" in err
    # a factory's options on a built-in were ignored without a word
    config = tmp_path / "gradscope.toml"
    text = config.read_text()
    for extra in ("input-size = 5", "model-args = {hidden = 3}"):
        config.write_text(text.replace('init = "identity"', f'init = "identity"\n{extra}'))
        code, _, err = _main(["check"], capsys)
        key = extra.split(" ")[0]
        assert code == 2 and f"check 'irnn': {key} applies to a model factory" in err
    config.write_text(text)
    phases = []
    results, _, _ = gradscope.check(only=["default-tanh", "irnn"], on_phase=phases.append)
    assert phases == ["check irnn, 1 of 2", "check default-tanh, 2 of 2"]  # the file's order
    assert [r.name for r in results] == ["irnn", "default-tanh"]
    results, _, _ = gradscope.check(only="irnn")  # one name, not the letters i, r, n, n
    assert [r.name for r in results] == ["irnn"]


def test_assert_gradient_health_raises_with_the_table():
    torch.manual_seed(0)
    healthy = torch.nn.RNN(4, 16)
    torch.nn.init.orthogonal_(healthy.weight_hh_l0)
    passed = gradscope.assert_gradient_health(healthy, seq_len=50, probe="jacobian",
                                              min_slope=-0.1)
    slope = passed.summary.slope
    assert repr(passed) == ("<CheckResult model (jacobian): passed: finite pass (finite at "
                            f"every step), min-slope pass ({slope:+.4f} log10/step)>")
    small = torch.nn.RNN(4, 16)
    with torch.no_grad():
        small.weight_hh_l0.mul_(0.1)
    with pytest.raises(AssertionError) as info:
        gradscope.assert_gradient_health(small, seq_len=50, probe="jacobian", min_slope=-0.1)
    message = str(info.value)
    assert "min-slope" in message and "FAIL" in message and "below the minimum" in message


def test_assert_gradient_health_draws_its_plot_pass_or_fail(tmp_path):
    small = torch.nn.RNN(4, 16)
    with torch.no_grad():
        small.weight_hh_l0.mul_(0.1)
    plot = tmp_path / "figures" / "small.png"
    with pytest.raises(AssertionError, match=f"plot: {plot}"):
        gradscope.assert_gradient_health(small, seq_len=50, min_slope=-0.1, plot=plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "taken").write_text("")
    with pytest.raises(gradscope.ConfigError, match="plot .*taken"):
        gradscope.assert_gradient_health(small, seq_len=50, plot=tmp_path / "taken" / "x.png")
    with pytest.raises(gradscope.ConfigError, match="plot .*small.json is not a .png file"):
        gradscope.assert_gradient_health(small, seq_len=50, plot=tmp_path / "small.json")


def test_exit_codes_have_names():
    assert (Exit.PASSED, Exit.FAILED, Exit.USAGE) == (0, 1, 2)


# --- plots ------------------------------------------------------------------------------------

def _judged(profile, spec, baseline=None):
    """A CheckResult judged by the real rules, as gate.judge builds one."""
    from gradscope.check import CheckResult
    from gradscope.summary import summarize
    steps = np.arange(len(profile)) + 1
    summary = summarize(profile, steps)
    rules = [rule_finite(None)]
    if spec.min_slope is not None:
        rules.append(rule_min_slope(summary.slope, False, spec.min_slope))
    if spec.min_horizon is not None:
        rules.append(rule_min_horizon(summary.horizon, len(profile), spec.min_horizon))
    if spec.max_growth is not None:
        rules.append(rule_max_growth(profile, spec.max_growth))
    if baseline is not None:
        rules.append(rule_baseline(profile, baseline, spec.tolerance, spec.windows))
    return CheckResult(spec.name, "grad_h0", rules, profile, summary, (), spec, baseline, 1)


def test_check_figure_draws_the_profile_against_each_rule():
    from gradscope.checkconfig import CheckSpec
    from gradscope.plots import check_figure
    profile = -0.5 - 0.2 * np.arange(100.0)  # 6 decades down at step 31: 19 before 50
    baseline = -0.5 - 0.1 * np.arange(100.0)
    spec = CheckSpec(name="enc", source="t", seq_len=100, min_slope=-0.05, min_horizon=50,
                     max_growth=2.0, tolerance=1.5)
    result = _judged(profile, spec, baseline)
    fig = check_figure(result)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert np.array_equal(lines["grad_h0, measured"].get_ydata(), profile)
    assert np.allclose(lines["baseline - 1.5 decades (window means compared)"].get_ydata(),
                       baseline - 1.5)
    for label, slope in (("fit, -0.2000 log10/step", -0.2),
                         ("min-slope, -0.0500 log10/step", -0.05)):
        x, y = lines[label].get_xdata(), lines[label].get_ydata()
        assert np.polyfit(x, y, 1)[0] == pytest.approx(slope)
    assert lines["max-growth: 2 decades above the start"].get_ydata()[0] == pytest.approx(1.5)
    band = next(c for c in ax.collections if c.get_label().startswith("min-horizon"))
    corners = band.get_paths()[0].vertices
    assert corners[:, 0].min() == 1 and corners[:, 0].max() == 50
    assert corners[:, 1].max() == pytest.approx(-6.5)  # 6 decades below the start
    title = ax.get_title()
    assert title.startswith("check enc: FAILED\n") and "min-slope by 0.1500 log10/step" in title
    assert "; min-horizon by 19 steps; baseline by 7.20 decades in window 4/4" in title
    assert "max-growth" not in title
    passing = _judged(profile, CheckSpec(name="ok", source="t", seq_len=100))
    assert check_figure(passing).axes[0].get_title() == "check ok: passed"


def test_check_plots_one_png_per_check_even_when_a_rule_fails(project, capsys):
    from gradscope.checkconfig import CheckSpec
    from gradscope.plots import write_check_figures
    folder, _ = project
    path = folder / "pyproject.toml"
    second = path.read_text().split("\n\n")[-1].replace("checks.encoder", 'checks."enc/second"')
    path.write_text(path.read_text() + second.replace("min-slope = -0.02", "min-slope = 0.5"))
    code, out, _ = _main(["check", "--plots", "plots"], capsys)
    assert code == 1 and "failed: enc/second" in out
    assert "plots written: plots/encoder.png, plots/enc_second.png" in out
    pngs = sorted((folder / "plots").iterdir())
    assert [p.name for p in pngs] == ["enc_second.png", "encoder.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # names that would give one file get numbered
    profile = -0.1 * np.arange(20.0)
    results = [_judged(profile, CheckSpec(name=n, source="t", seq_len=20)) for n in ("a/b", "a b")]
    assert [p.name for p in write_check_figures(results, folder)] == ["a_b.png", "a_b-2.png"]
    # a name longer than a file name may be ("File name too long", after every measurement)
    long = [_judged(profile, CheckSpec(name="x" * 300 + s, source="t", seq_len=20))
            for s in ("1", "2")]
    assert [p.name for p in write_check_figures(long, folder)] == [
        "x" * 120 + ".png", "x" * 120 + "-2.png"]


def test_an_unusable_plots_folder_is_refused_before_measuring(project, capsys):
    folder, _ = project
    (folder / "taken").write_text("keep me")
    code, out, err = _main(["check", "--plots", "taken"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--plots" in err and "is not a directory" in err and "check" not in out
    assert (folder / "taken").read_text() == "keep me"


@pytest.mark.parametrize("fill, label", [(-np.inf, "exactly zero from step 11"),
                                         (np.nan, "not computed from step 11")])
def test_check_figure_marks_where_the_profile_stops(fill, label):
    from gradscope.checkconfig import CheckSpec
    from gradscope.plots import check_figure
    profile = np.full(30, fill)
    profile[:10] = -0.3 * np.arange(10.0)
    spec = CheckSpec(name="c", source="t", seq_len=30, min_slope=-0.1, min_horizon=5)
    labels = [line.get_label() for line in check_figure(_judged(profile, spec)).axes[0].lines]
    assert label in labels
    nothing = _judged(np.full(30, -np.inf), spec)
    labels = [line.get_label() for line in check_figure(nothing).axes[0].lines]
    assert "exactly zero from step 1" in labels


@pytest.mark.parametrize("options, message", [
    ({"seq_len": 0}, "seq-len must be positive, got 0"),
    ({"batch": -1}, "batch must be positive, got -1"),
    ({"seq_len": "100"}, "seq-len must be int, got '100'"),
    ({"batch": True}, "batch must be int, got True"),
    ({"input_size": 0}, "input-size must be positive"),
    ({"seed": -1}, "seed must be from 0 to 4294967295"),
    ({"seed": 2**32}, "seed must be from 0 to 4294967295"),
    ({"min_slope": float("nan")}, "min-slope must be a finite number"),
    ({"max_growth": -1.0}, "max-growth must be >= 0"),
    ({"min_horizon": 0}, "min-horizon must be positive"),
    ({"min_horizon": 101}, "min-horizon 101 exceeds seq-len 100"),
    ({"dtype": "float16"}, "unknown dtype 'float16'; choose from: float64, float32"),
    ({"device": "tpu"}, "unknown device 'tpu'; choose from: auto, cpu, cuda"),
])
def test_assert_gradient_health_refuses_bad_options_by_name(options, message):
    """From Python as from a file: one ConfigError naming the option, before any work (these
    used to raise IndexError or RuntimeError from deep inside, or to measure float16)."""
    with pytest.raises(ConfigError) as info:
        gradscope.assert_gradient_health(torch.nn.RNN(2, 3), **{"seq_len": 100, **options})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("assert_gradient_health: check 'model': ")


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--dtype", "float16"], "--dtype: unknown dtype 'float16'"),
    (["--tolerance", "-1"], "--tolerance must be >= 0, got -1.0"),
    (["--tolerance", "nan"], "--tolerance must be a finite number"),
    (["--seq-len", "0"], "--seq-len must be positive, got 0"),
    (["--batch", "0"], "--batch must be positive, got 0"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295 (torch's generator keeps 32 bits "
                       "of it), got -1"),
    (["--junit-xml", "pyproject.toml"], "--junit-xml pyproject.toml is not a .xml file"),
    pytest.param(["--device", "cuda"], "--device cuda was asked for, but torch sees no CUDA "
                                       "device", marks=pytest.mark.skipif(
                                           torch.cuda.is_available(), reason="a CUDA device")),
])
def test_bad_flags_are_one_line_not_a_traceback(project, capsys, flags, message):
    """A bad flag is named as the flag, not as a key of the file's first check (which it
    was, as "gradscope.toml: check 'enc': seq-len must be positive")."""
    folder = project[0]
    before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, _, err = _main(["check", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert "check '" not in err
    assert {p: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_an_unknown_override_from_python_is_the_callers_not_the_files(project):
    """gradscope.check(overrides={"bogus": 1}) blamed the file's first check ("gradscope.toml:
    check 'encoder': unknown key 'bogus'")."""
    with pytest.raises(ConfigError) as info:
        gradscope.check(overrides={"bogus": 1})
    assert str(info.value).startswith("unknown check option 'bogus' among the overrides; "
                                      "allowed: activation, batch, cell")
    results, _, _ = gradscope.check(overrides={"min_slope": -5.0})
    assert {r.spec.min_slope for r in results} == {-5.0}  # an override of a rule still works


def test_a_factory_beside_a_config_in_another_folder_is_imported(tmp_path, monkeypatch, capsys):
    """`gradscope check --config services/enc/pyproject.toml` from the repository's root: the
    factory's module lies beside the file, as the baseline does, and could not be imported."""
    module = "models_beside_the_config"
    (tmp_path / "svc").mkdir()
    _project(tmp_path / "svc", module=module)
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(["check", "--config", "svc/pyproject.toml"], capsys)
    assert code == 0, err
    assert "1 check passed" in out
    assert str((tmp_path / "svc").resolve()) not in sys.path  # only while the checks ran
