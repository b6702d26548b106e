"""Sweeps: expansion, files, presets, determinism across workers, and resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from helpers import count_finished

import gradscope
from gradscope.errors import ConfigError
from gradscope.store import Store
from gradscope.sweep import PRESETS, from_mapping, preset

TINY = {"hidden": 3, "batch": 2, "seq_len": 8}


def test_grid_product_with_collapsed_nonsense_and_notes():
    spec = from_mapping({}, "options", seeds=2, overrides={
        "cell": ["rnn", "lstm", "gru"], "activation": ["tanh", "relu"],
        "forget_bias": [1.0]})
    cells = [(c.cell, c.activation, c.forget_bias) for c in spec.runs]
    # rnn x {tanh, relu} without the forget bias; lstm and gru once each without activation
    assert sorted(set(cells), key=str) == sorted(
        {("rnn", "tanh", None), ("rnn", "relu", None), ("lstm", None, 1.0),
         ("gru", None, 1.0)}, key=str)
    assert len(spec.runs) == 8 and len({(c, s.seed) for c, s in zip(cells, spec.runs,
                                                                    strict=True)}) == 8
    assert any("--activation does not apply to lstm" in n for n in spec.notes)
    assert any("do not apply to rnn" in n for n in spec.notes)


def test_options_take_one_value_as_a_list_of_one():
    """sweep_spec(options={"cell": "rnn", "seq_len": 10}) was a TypeError ('int' object is not
    iterable), and a name would have been read letter by letter."""
    spec = gradscope.sweep_spec(options={"cell": "gru", "seq_len": 10,
                                         "init": ("orthogonal", "identity")})
    assert [(c.cell, c.seq_len, c.init) for c in spec.runs] == [
        ("gru", 10, "orthogonal"), ("gru", 10, "identity")]


def test_sweep_takes_a_spec_and_says_how_to_make_one(tmp_path):
    """gradscope.sweep("smoke", out), a preset's name for the spec, was an AttributeError."""
    with pytest.raises(ConfigError, match=r"gradscope.sweep takes a SweepSpec, got str 'smoke': "
                                          r"make one with gradscope.sweep_spec\(preset=...\)"):
        gradscope.sweep("smoke", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chrono_tmax_goes_with_chrono_alone():
    """--chrono-tmax without --gate-init chrono was silently ignored by `gradscope run`; a
    sweep over gate-init none and chrono drops it from the others, with a note."""
    with pytest.raises(ConfigError, match="--chrono-tmax applies to --gate-init chrono, not "
                                          "to --gate-init none"):
        gradscope.run(cell="lstm", chrono_tmax=5, hidden=3, batch=2, seq_len=10)
    spec = from_mapping({"base": {"chrono_tmax": 5}}, "options", overrides={
        "cell": ["rnn", "lstm"], "gate_init": ["none", "chrono"]})
    runs = {(c.cell, c.gate_init, c.chrono_tmax) for c in spec.runs}
    assert runs == {("rnn", "none", None), ("lstm", "none", None), ("lstm", "chrono", 5)}
    assert ("--chrono-tmax applies to --gate-init chrono only: dropped from the other runs"
            in spec.notes)
    assert any("do not apply to rnn" in n for n in spec.notes)


@pytest.mark.parametrize("options, message", [
    ({"profile_every": 5}, "--profile-every applies to training, not to a run with --steps 0; "
                           "add --steps N or leave it out"),
    ({"lr": 0.01}, "--lr applies to training, not to a run with --steps 0; add --steps N or "
                   "leave it out"),
    ({"optimizer": "sgd"}, "--optimizer applies to training, not to a run with --steps 0; add "
                           "--steps N or leave it out"),
    ({"clip": 0}, "--clip applies to training, not to a run with --steps 0; add --steps N or "
                  "leave it out"),
    ({"probes": "adjoint", "projections": 4},
     "--projections applies to the forward probes, not to --probes adjoint; add grad_h0 or "
     "jacobian to --probes or leave it out"),
    ({"probes": "adjoint", "jacobian_samples": 1},
     "--jacobian-samples applies to the forward probes, not to --probes adjoint; add grad_h0 "
     "or jacobian to --probes or leave it out"),
    ({"probes": "grad_h0,jacobian", "checkpoint": True},
     "--checkpoint applies to the adjoint probe, not to --probes grad_h0,jacobian; add adjoint "
     "to --probes or leave it out"),
])
def test_an_option_that_nothing_reads_is_refused(options, message, tmp_path):
    """These were silently ignored: a user who forgot --steps got no profiles in training."""
    with pytest.raises(ConfigError) as info:
        gradscope.run(**TINY, **options, out=tmp_path / "run")
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()


def test_a_sweep_drops_what_its_runs_do_not_read_with_a_note():
    spec = from_mapping({"base": {"profile_every": 5, "lr": 0.01, "probes": ["grad_h0",
                                                                          "adjoint"],
                                  "projections": 4, "checkpoint": True}}, "options",
                        overrides={"steps": [0, 10], "probes": [["adjoint"], ["grad_h0"],
                                                                ["grad_h0", "adjoint"]]})
    runs = {(c.steps, c.profile_every, c.lr, c.probes, c.projections, c.checkpoint)
            for c in spec.runs}
    assert runs == {(s, s and 5, 0.01 if s else 0.001, probes,
                     None if probes == ("adjoint",) else 4, probes != ("grad_h0",))
                    for s in (0, 10)
                    for probes in (("adjoint",), ("grad_h0",), ("grad_h0", "adjoint"))}
    assert set(spec.notes) == {
        "--lr applies to training only: dropped from the other runs",
        "--profile-every applies to training only: dropped from the other runs",
        "--projections applies to the forward probes only: dropped from the other runs",
        "--checkpoint applies to the adjoint probe only: dropped from the other runs"}


def test_toml_file_with_base_grid_and_runs(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text("""
seeds = 2
[base]
task = "recall"
seq-len = 12
[grid]
init = ["orthogonal", "identity"]
[[runs]]
cell = "lstm"
forget-bias = 3.0
""")
    spec = gradscope.sweep_spec(config_file=path)
    assert len(spec.runs) == 6
    assert {c.seq_len for c in spec.runs} == {12} and {c.task for c in spec.runs} == {"recall"}
    # command-line options cross and override
    spec = gradscope.sweep_spec(config_file=path, options={"seq_len": [5, 6]}, seeds=1)
    assert len(spec.runs) == 6 and {c.seq_len for c in spec.runs} == {5, 6}


@pytest.mark.parametrize("text, message", [
    ("seeds = 0", "seeds must be a positive integer"),
    ("color = 'red'", r"unknown key\(s\) color"),
    ("[grid]\ncell = 'rnn'", "grid.cell must be a non-empty list"),
    ("[grid]\nhue = ['a']", "unknown sweep axis 'hue'"),
    ("[base]\nseq_len = -3", "--seq-len must be a positive integer, got -3"),
    # TOML arrays and tables where a name goes were TypeErrors ("unhashable type: 'list'")
    ("[base]\ncell = ['rnn']", r"--cell must be a name, got \['rnn'\]"),
    ("[base]\ninit = {a = 1}", r"--init must be a name, got \{'a': 1\}"),
    ("[base]\nprobes = [1, 2]", r"--probes must be probe names \(a comma list\), got \(1, 2\)"),
    ("[base\n", "is not valid TOML"),
    # a seed in base or runs was replaced by the sweep's seeds 0..N-1 without a word
    ("[base]\nseed = 5", "base sets seed, but a sweep's runs take the seeds 0 to N-1 of "
                         r"`seeds = N` \(--seeds\)"),
    ("[[runs]]\ncell = 'rnn'\n[[runs]]\nseed = 5", "runs sets seed"),
    ("[grid]\nseed = [1, 2]", "grid sets seed"),
    ("runs = 5", r"runs must be tables of options \(\[\[runs\]\]\), got 5"),
])
def test_bad_sweep_files_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        gradscope.sweep_spec(config_file=path)
    assert "bad.toml" in str(info.value)


@pytest.mark.parametrize("options, seeds, message", [
    ({"lr": [-1.0]}, None, "--lr must be positive, got -1.0"),
    ({"seq_len": [5, 0]}, None, "--seq-len must be a positive integer, got 0"),
    ({}, 0, "--seeds must be a positive integer, got 0"),
])
def test_bad_flags_over_a_good_file_name_the_flag_not_the_file(tmp_path, options, seeds,
                                                              message):
    """A flag's bad value used to be blamed on the file ("good.toml: --lr must be positive"),
    as if the file held it."""
    path = tmp_path / "good.toml"
    path.write_text("seeds = 2\n[base]\nseq_len = 12\n")
    for source in ({"config_file": path}, {"preset": "smoke"}, {}):
        with pytest.raises(ConfigError) as info:
            gradscope.sweep_spec(**source, options=options, seeds=seeds)
        assert str(info.value) == message


def test_a_bad_file_is_named_even_under_good_flags(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[grid]\nseq_len = [0]\n")
    with pytest.raises(ConfigError, match="bad.toml: --seq-len must be a positive"):
        gradscope.sweep_spec(config_file=path, options={"lr": [0.1]})


def test_probes_in_a_sweep_file_as_an_array_or_a_comma_list(tmp_path):
    """probes = ["grad_h0", "adjoint"] ended the sweep in a traceback (a list in a frozen
    config cannot be hashed)."""
    for value in ('["grad_h0", "adjoint"]', '"grad_h0, adjoint"'):
        path = tmp_path / "probes.toml"
        path.write_text(f"[base]\nprobes = {value}\n[grid]\ncell = ['rnn', 'gru']\n")
        spec = gradscope.sweep_spec(config_file=path)
        assert [c.probes for c in spec.runs] == [("grad_h0", "adjoint")] * 2
        assert len({hash(c) for c in spec.runs}) == 2


def test_presets_expand():
    assert len(preset("smoke").runs) == 3
    standard = preset("standard")
    assert len(standard.runs) == 33 and {c.seed for c in standard.runs} == {0, 1, 2}
    assert set(PRESETS.names()) == {"smoke", "standard", "full"}


def test_same_results_with_one_or_two_workers(tmp_path):
    spec = gradscope.sweep_spec(options={"cell": ["rnn", "gru"], "steps": [3], **{
        k: [v] for k, v in TINY.items()}}, seeds=2)
    for workers in (1, 2):
        gradscope.sweep(spec, tmp_path / str(workers), workers=workers, report=False)
    with Store(tmp_path / "1") as a, Store(tmp_path / "2") as b:
        pa = {(r, s, p): v for r, s, p, _, _, v in a.profiles()}
        pb = {(r, s, p): v for r, s, p, _, _, v in b.profiles()}
        ca, cb = a.curves(), b.curves()
    assert pa.keys() == pb.keys() and len(pa) > 0
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key])
    assert ca.equals(cb)


def test_load_and_export(tmp_path):
    gradscope.sweep(gradscope.sweep_spec(options={"cell": ["lstm"], "steps": [2], **{
        k: [v] for k, v in TINY.items()}}), tmp_path, workers=1, report=False)
    frame = gradscope.load(tmp_path)
    assert set(frame.probe) == {"grad_h0", "jacobian", "adjoint", "grad_c0", "jacobian_c"}
    assert {"cell", "seed", "status", "final_loss", "learned", "slope", "verdict",
            "train_step"} <= set(frame.columns)
    for column in ("seq_len", "hidden", "seed", "steps", "steps_done", "train_step", "horizon"):
        assert frame[column].dtype == "Int64", column  # counts, not SQLite's REAL
    assert frame.diverged_at.isna().all()  # <NA>: no run diverged
    # an adding task has no accuracy: a float column of NaN, not an object column of Nones
    for column in ("accuracy", "final_loss", "forget_bias", "slope", "duration_s"):
        assert frame[column].dtype == np.float64, column
    assert frame.learned.dtype == "boolean" and not frame.learned.any()  # 2 steps: no
    paths = gradscope.export(tmp_path, "csv")
    assert [p.name for p in paths] == ["runs.csv", "profiles.csv", "curves.csv"]
    runs = pd.read_csv(paths[0])
    assert runs.seq_len.dtype == np.int64 and set(runs.seq_len) == {TINY["seq_len"]}
    assert f",{TINY['seq_len']},{TINY['hidden']}," in paths[0].read_text()  # no 20.0
    assert paths[1].read_text().splitlines()[0] == "run_id,train_step,probe,axis,step,log10"
    with pytest.raises(ConfigError, match="unknown format 'xlsx'"):
        gradscope.export(tmp_path, "xlsx")




def test_sigkill_halfway_then_resume_gives_every_run_exactly_once(tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "gradscope", "sweep", "--cell", "rnn,lstm,gru",
            "--init", "pytorch,orthogonal", "--seeds", "3", "--seq-len", "30", "--hidden",
            "8", "--batch", "4", "--steps", "30", "--workers", "2", "--out", str(out),
            "--no-report"]
    total = 3 * 2 * 3
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while count_finished(out / "gradscope.sqlite") < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, at once
    proc.wait()
    done_at_kill = count_finished(out / "gradscope.sqlite")
    assert 3 <= done_at_kill < total, "the kill should land halfway"
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{done_at_kill} already done" in again.stdout
    with Store(out) as store:
        runs = store.runs()
        assert len(runs) == total and runs.run_id.is_unique
        assert (runs.status == "ok").all()
        summaries = store.summaries()
        assert not summaries.duplicated(["run_id", "train_step", "probe"]).any()


def test_seed_stacks_store_what_one_seed_at_a_time_stores(tmp_path):
    spec = gradscope.sweep_spec(options={"cell": ["lstm"], "steps": [3], "dtype": ["float64"],
                                         **{k: [v] for k, v in TINY.items()}}, seeds=3)
    for stack in (1, 3):
        gradscope.sweep(spec, tmp_path / str(stack), workers=1, seed_stack=stack, report=False)
    with Store(tmp_path / "1") as a, Store(tmp_path / "3") as b:
        pa = {(r, s, p): v for r, s, p, _, _, v in a.profiles()}
        pb = {(r, s, p): v for r, s, p, _, _, v in b.profiles()}
        ca, cb = a.curves(), b.curves()
    assert pa.keys() == pb.keys() and len(pa) == 3 * 2 * 5  # runs x snapshots x probes
    for key in pa:
        np.testing.assert_allclose(pb[key], pa[key], rtol=0, atol=1e-9, err_msg=str(key))
    np.testing.assert_allclose(cb.loss, ca.loss, rtol=1e-9)
