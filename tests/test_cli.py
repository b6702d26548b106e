"""The command line: results on disk, one-line errors with exit code 2, help with examples."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import app, main

FAST = ["--hidden", "4", "--batch", "2", "--seq-len", "20"]


def _main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_run_writes_a_versioned_result_and_a_figure(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, _ = _main(["run", "--cell", "lstm", "--task", "recall", *FAST, "--out",
                             str(out)], capsys)
    assert code == 0
    for probe in ("grad_h0", "jacobian", "adjoint", "grad_c0", "jacobian_c"):
        assert probe in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["schema"] == "gradscope.run/1"
    assert result["config"]["cell"] == "lstm" and result["config"]["seq_len"] == 20
    assert set(result["profiles"]) == {"grad_h0", "jacobian", "adjoint", "grad_c0", "jacobian_c"}
    assert len(result["profiles"]["adjoint"]["log10"]) == 20
    assert result["profiles"]["adjoint"]["axis"] == "k"
    assert set(result["summary"]["jacobian_c"]) >= {"slope", "half_life", "horizon", "verdict"}
    meta = result["meta"]
    assert {"gradscope", "torch", "device", "dtype", "time_utc", "command"} <= set(meta)
    assert meta["command"].startswith("gradscope run --cell lstm")
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_costly_run_is_told_first_in_one_line_and_no_spinner_outside_a_terminal(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("gradscope.runner.forward_work", lambda config, probes: 4e12)
    code, stdout, stderr = _main(["run", *FAST, "--out", str(tmp_path)], capsys)
    assert code == 0 and "wrote" in stdout
    assert stderr.splitlines() == [
        "gradscope: note: the exact forward probes on 2 sequences take about 4e+12 "
        "multiply-adds, about 100 s on 2 CPU cores"]  # H = 4: no cheaper option to offer


def test_probes_option_selects(tmp_path, capsys):
    code, _, _ = _main(["run", *FAST, "--probes", "adjoint", "--out", str(tmp_path)], capsys)
    assert code == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result["profiles"]) == ["adjoint"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--cell", "transformer"], "unknown cell 'transformer' for --cell; choose from: rnn"),
    (["run", "--activation", "swish"], "unknown activation 'swish' for --activation; choose"),
    (["run", "--task", "parity"], "unknown task 'parity' for --task; choose from: adding"),
    (["run", "--hidden", "0"], "--hidden must be a positive integer, got 0"),
    (["run", "--seq-len", "-5"], "--seq-len must be a positive integer, got -5"),
    (["run", "--batch", "many"], "Invalid value for '--batch'"),
    (["run", "--cell", "lstm", "--activation", "relu"], "--activation relu does not apply"),
    (["run", "--gate-init", "chrono"], "--gate-init chrono applies to lstm and gru"),
    (["run", "--dtype", "float16"], "unknown dtype 'float16' for --dtype; choose from"),
    (["run", "--gain", "nan"], "--gain must be a finite number"),
    (["run", "--probes", "grad_c0"], "probe 'grad_c0' does not apply to the rnn cell"),
    (["run", "--probes", "hessian"], "unknown probe 'hessian' for --probes"),
    (["run", "--task", "temporal-order", "--seq-len", "5"], "--seq-len 5 is too short"),
    (["run", "--nope"], "No such option: --nope"),
    (["run", "--batch", "4", "--jacobian-samples", "5"],
     "--jacobian-samples 5 is more than the --batch of 4 sequences; give 1 to 4"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, stderr = _main([*argv, "--out", str(out)], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: error: "), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr + stdout
    assert not out.exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, _, stderr = _main(["run", *FAST, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "is not a directory" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = _main(["run", *FAST, "--out", str(blocker)], capsys)
    assert code == 2 and "is not a directory" in stderr
    assert blocker.read_text() == "keep me"


def test_a_failed_rerun_keeps_the_previous_result(tmp_path, capsys):
    assert _main(["run", *FAST, "--out", str(tmp_path)], capsys)[0] == 0
    before = (tmp_path / "result.json").read_bytes()
    assert _main(["run", *FAST, "--cell", "bad", "--out", str(tmp_path)], capsys)[0] == 2
    assert (tmp_path / "result.json").read_bytes() == before


def test_a_default_folder_never_replaces_another_runs_result(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folders are runs/... below the current one
    base = ["run", "--seq-len", "12", "--batch", "2", "--theory-k", "0"]
    hidden = {}
    for h in (3, 4, 3, 4):  # the default name leaves --hidden out
        code, out, err = _main([*base, "--hidden", str(h)], capsys)
        assert code == 0
        folder = out.split("wrote ")[-1].split("/result.json")[0]
        hidden.setdefault(h, folder)
        assert folder == hidden[h]  # a rerun of the same configuration: the same folder
        assert ("holds the result of another run" in err) == (h == 4)
    assert hidden == {3: "runs/rnn-pytorch-adding-T12-s0", 4: "runs/rnn-pytorch-adding-T12-s0-2"}
    for h, folder in hidden.items():
        assert gradscope.RunResult.load(tmp_path / folder).config.hidden == h
    # a user's module: the same command, the same folder; other arguments, another
    profile = ["profile", "torch.nn:GRU", "--seq-len", "12", "--theory-k", "0"]
    folders = []
    for args in ('{"input_size": 2, "hidden_size": 3}', '{"input_size": 2, "hidden_size": 5}',
                 '{"input_size": 2, "hidden_size": 3}'):
        code, out, _ = _main([*profile, "--model-args", args], capsys)
        folders.append(out.split("wrote ")[-1].split("/result.json")[0])
    assert folders == ["runs/GRU-T12-s0", "runs/GRU-T12-s0-2", "runs/GRU-T12-s0"]


def test_list_prints_every_registry(capsys):
    code, stdout, _ = _main(["list"], capsys)
    assert code == 0
    for word in ("cells", "activations", "inits", "gate-inits", "tasks", "probes", "chrono",
                 "temporal-order-3bit", "jacobian_c", "identity"):
        assert word in stdout


def _commands():
    return [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_ending_in_an_example_and_is_in_the_readme(command, capsys):
    code, stdout, _ = _main([command, "--help"], capsys)
    assert code == 0
    last = stdout.strip().splitlines()[-1].strip()
    assert last.startswith(f"Example:  gradscope {command}"), stdout
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"gradscope {command}" in readme


def test_version_and_the_bare_command():
    """`gradscope --version` did not exist; `gradscope` alone printed its help as an error
    ("gradscope: error: Usage: ...")."""
    import platform

    import torch

    import gradscope
    code = ("import sys; sys.argv = ['gradscope', '--version'];"
            "from gradscope.cli import main\ntry: main()\nexcept SystemExit as e: "
            "print('exit', e.code, [m for m in ('torch', 'pandas') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines() == [
        f"gradscope {gradscope.__version__} (torch {torch.__version__}, python "
        f"{platform.python_version()})", "exit 0 []"], done.stderr  # torch not imported
    done = subprocess.run([sys.executable, "-m", "gradscope"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("Usage: gradscope [OPTIONS] COMMAND") and "run" in done.stderr


def test_python_dash_m_and_the_console_script_run():
    done = subprocess.run([sys.executable, "-m", "gradscope", "list"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "probes" in done.stdout
    done = subprocess.run([sys.executable, "-m", "gradscope", "run", "--cell", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--preset", "huge"], "unknown preset 'huge' for --preset; choose from: smoke"),
    (["sweep", "--seq-len", "10,abc"], "--seq-len: 'abc' is not an integer"),
    (["sweep", "--workers", "0"], "--workers must be a positive integer"),
    (["sweep", "--cell", "rnn,cnn"], "unknown cell 'cnn' for --cell"),
    (["sweep", "--task", "temporal-order", "--seq-len", "5,50"], "--seq-len 5 is too short"),
    (["sweep", "--preset", "smoke", "--config", "x.toml"], "give --preset or --config, not both"),
    (["sweep", "--config", "missing.toml"], "cannot read sweep file missing.toml"),
    (["sweep", "--seeds", "0"], "seeds must be a positive integer"),
    (["sweep", "--seed-stack", "0"], "--seed-stack must be a positive integer"),
])
def test_sweep_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, argv,
                                                                 message):
    out = tmp_path / "out"
    code, _, stderr = _main([*argv, "--out", str(out)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr
    assert not out.exists()


def test_report_and_export_need_a_store(tmp_path, capsys):
    for argv in (["report", str(tmp_path)], ["export", str(tmp_path)]):
        code, _, stderr = _main(argv, capsys)
        assert code == 2 and "holds no results" in stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_then_report_then_export_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = _main(["sweep", "--cell", "rnn,gru", "--hidden", "3", "--batch", "2",
                             "--seq-len", "6", "--steps", "2", "--workers", "1", "--out",
                             str(out)], capsys)
    assert code == 0 and "2 runs finished, 0 already done, 0 failed" in stdout
    assert (out / "report" / "index.html").exists()
    # the report's ranking, printed best first: each row's label and median slope
    rows = gradscope.ranking(out)
    assert len(rows) == 2 and rows[0].slope >= rows[1].slope
    for command in (stdout, _main(["report", str(out)], capsys)[1]):
        assert "ranking by the median slope of grad_h0" in command
        assert "medians over 1 seed;" in command and "learned: seeds whose" in command
        at = [command.index(f"{r.slope:+.4f}") for r in rows]
        assert at == sorted(at)
        assert all(0 <= command.find(r.label) < a for r, a in zip(rows, at, strict=True))
    code, stdout, _ = _main(["export", str(out), "--format", "csv"], capsys)
    assert code == 0 and (out / "export" / "runs.csv").exists()


def test_outputs_get_the_umasks_permissions_and_a_replaced_file_keeps_its_own(tmp_path,
                                                                                capsys):
    """Files are written to a private temporary name and renamed: without a chmod, every
    result, figure, report and export would be 0o600, unreadable to anyone else."""
    import os
    import stat

    mask = os.umask(0o027)  # a umask other than the usual 0o022, so that it is read, not assumed
    try:
        out = tmp_path / "s"
        code, _, _ = _main(["sweep", "--cell", "rnn", "--hidden", "3", "--batch", "2",
                            "--seq-len", "6", "--workers", "1", "--out", str(out)], capsys)
        assert code == 0
        assert _main(["export", str(out)], capsys)[0] == 0
        run = tmp_path / "r"
        assert _main(["run", *FAST, "--out", str(run)], capsys)[0] == 0
        written = [*(out / "report").iterdir(), *(out / "export").iterdir(), *run.iterdir()]
        assert {p.suffix for p in written} >= {".html", ".png", ".csv", ".json"}
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
        assert modes == dict.fromkeys(modes, 0o640)
        (run / "result.json").chmod(0o604)
        assert _main(["run", *FAST, "--out", str(run)], capsys)[0] == 0
        assert stat.S_IMODE((run / "result.json").stat().st_mode) == 0o604
    finally:
        os.umask(mask)


@pytest.mark.parametrize("width", [100, 56, 40, 24])
def test_a_narrow_terminal_cuts_no_number(width, tmp_path, capsys, monkeypatch):
    """rich shortened the summary's numbers to '-0.2…' below about 60 columns, and folded
    the theory table's across lines: a value read off a narrow terminal was wrong."""
    from gradscope import cli
    from gradscope.summary import summary_row
    out = tmp_path / "r"
    assert _main(["run", "--cell", "lstm", *FAST, "--out", str(out)], capsys)[0] == 0
    result = gradscope.RunResult.load(out)
    monkeypatch.setattr(cli.out_console, "width", width)
    cli.print_result(result)
    text = capsys.readouterr().out
    assert "…" not in text
    words = set(text.split())
    for name, s in result.summary.items():
        assert set(summary_row(name, s, result.profiles[name])[:5]) - {"> 20"} <= words, text
    for p in result.theory["predictions"]:
        assert cli.number_text(p["predicted"], "+.4f") in words, text
    assert max(map(len, text.splitlines())) <= width


@pytest.mark.parametrize("width", [100, 30])
def test_users_text_is_printed_as_it_is_not_as_markup(width, tmp_path, capsys, monkeypatch):
    """rich read a folder named 'w[/x]' as a closing tag: `gradscope compare` ended in a
    MarkupError traceback, and '[bold]' in a name would have vanished into a style."""
    from gradscope import cli
    monkeypatch.setattr(cli.out_console, "width", width)
    a, b = tmp_path / "w[/x]", tmp_path / "[bold]b"
    for out in (a, b):
        code, stdout, _ = _main(["run", *FAST, "--out", str(out)], capsys)
        assert code == 0 and "wrote " in stdout
        assert str(out / "result.json") in "".join(stdout.split())
    code, stdout, err = _main(["compare", str(a), str(b)], capsys)
    assert code == 0, err
    flat = "".join(stdout.split())
    assert "w[/x]" in flat and "[bold]b" in flat
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gradscope.toml").write_text(
        '[checks."enc[/x]"]\ncell = "rnn"\nhidden = 4\nseq-len = 20\nmin-slope = -0.01\n')
    code, stdout, err = _main(["check"], capsys)
    assert code == 1, err
    assert "failed: enc[/x]" in stdout and stdout.count("enc[/x]") >= 2  # its rule's row too
