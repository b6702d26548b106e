"""Faults, each one tested: dying workers, interrupted drivers, held or broken stores, full
disks, sizes that cannot fit. Nothing finished is ever lost or duplicated."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import count_finished

import gradscope
from gradscope.errors import ConfigError, StoreError
from gradscope.executors import CRASH_SEED_ENV
from gradscope.store import Store

TINY = {"hidden": [3], "batch": [2], "seq_len": [8], "steps": [2]}


def test_a_worker_that_dies_is_retried_then_recorded_as_failed(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_SEED_ENV, "1")  # the run with seed 1 kills its own process
    spec = gradscope.sweep_spec(options={"cell": ["rnn", "gru"], **TINY}, seeds=3)
    outcome, _ = gradscope.sweep(spec, tmp_path, workers=2, retries=2, report=False)
    assert outcome.finished == 4 and len(outcome.failed) == 2
    for config, reason in outcome.failed:
        assert config.seed == 1
        assert reason == "worker process died (killed by SIGKILL) on each of 3 tries"
    with Store(tmp_path) as store:
        runs = store.runs()
    assert len(runs) == 6 and runs.run_id.is_unique
    assert sorted(runs[runs.status == "failed"].seed) == [1, 1]
    # a rerun without the fault retries only the failed runs
    monkeypatch.delenv(CRASH_SEED_ENV)
    again, _ = gradscope.sweep(spec, tmp_path, workers=2, report=False)
    assert (again.skipped, again.finished, again.failed) == (4, 2, [])




@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_driver_stops_cleanly_and_resumes(tmp_path, sig):
    # three stacks of four seeds on two workers: the signal lands while the third runs
    argv = [sys.executable, "-m", "gradscope", "sweep", "--cell", "rnn,gru,lstm", "--seeds", "4",
            "--seq-len", "30", "--hidden", "8", "--batch", "4", "--steps", "30", "--workers",
            "2", "--out", str(tmp_path), "--no-report"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while count_finished(tmp_path / "gradscope.sqlite") < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    done = count_finished(tmp_path / "gradscope.sqlite")
    assert 2 <= done < 12
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{done} already done" in again.stdout
    with Store(tmp_path) as store:
        runs = store.runs()
    assert len(runs) == 12 and runs.run_id.is_unique and (runs.status == "ok").all()


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path):
    spec = gradscope.sweep_spec(options={"cell": ["rnn"], **TINY})
    with Store(tmp_path) as store, store.writer():
        with pytest.raises(StoreError, match="another gradscope sweep is writing to"):
            gradscope.sweep(spec, tmp_path, workers=1, report=False)
    assert gradscope.sweep(spec, tmp_path, workers=1, report=False)[0].finished == 1


def test_a_corrupt_store_is_refused_by_the_command_line_and_kept(tmp_path):
    db = tmp_path / "gradscope.sqlite"
    db.write_bytes(b"\x00garbage" * 1000)
    done = subprocess.run([sys.executable, "-m", "gradscope", "sweep", "--preset", "smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot be used as a results store" in done.stderr
    assert db.read_bytes() == b"\x00garbage" * 1000


def test_a_full_disk_while_storing_stops_the_sweep_and_keeps_what_was_saved(tmp_path,
                                                                           monkeypatch):
    spec = gradscope.sweep_spec(options={"cell": ["rnn", "gru", "lstm"], **TINY})
    calls = []
    original = Store._add_snapshots

    def fill_up(self, rid, result):
        calls.append(rid)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return original(self, rid, result)

    monkeypatch.setattr(Store, "_add_snapshots", fill_up)
    with pytest.raises(StoreError, match="database or disk is full.*rerun the same command"):
        gradscope.sweep(spec, tmp_path, workers=1, report=False)
    with Store(tmp_path) as store:
        assert len(store.runs()) == 1  # the first run, whole; the second rolled back
        assert store.db.execute("SELECT COUNT(DISTINCT run_id) FROM profiles").fetchone() == (1,)
    monkeypatch.undo()
    outcome, _ = gradscope.sweep(spec, tmp_path, workers=1, report=False)
    assert (outcome.skipped, outcome.finished) == (1, 2)


def test_a_full_disk_on_the_command_line_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    from gradscope.cli import main

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(SystemExit) as info:
        main(["run", "--hidden", "2", "--batch", "2", "--seq-len", "5", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "result.json").exists()


def test_running_out_of_memory_past_the_estimate_is_one_line_exit_2(tmp_path, monkeypatch,
                                                                    capsys):
    """Where a size gets past the memory estimate, torch's allocator failure is one line, not
    a traceback, and nothing is written; any other error still surfaces as itself."""
    from gradscope.cli import main

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 32768000000 bytes.\n"
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr("gradscope.api.execute", allocate)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as info:
        main(["run", "--hidden", "2", "--batch", "2", "--seq-len", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "out of memory (" in err and "can't allocate memory" in err and "Traceback" not in err
    assert not out.exists()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a size")

    monkeypatch.setattr("gradscope.api.execute", broken)
    with pytest.raises(RuntimeError, match="a bug, not a size"):
        main(["run", "--hidden", "2", "--batch", "2", "--seq-len", "5", "--out", str(out)])


@pytest.mark.parametrize("options", [
    dict(seq_len=10_000_000, batch=1024, hidden=1024),
    dict(seq_len=2_000_000, batch=256, hidden=512, cell="lstm", dtype="float32"),
])
def test_sizes_that_cannot_fit_are_refused_with_an_estimate(tmp_path, options):
    with pytest.raises(ConfigError, match=r"this run needs about [\d.]+ GiB .* GiB is free"):
        gradscope.run(out=tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()
    spec = gradscope.sweep_spec(options={k: [v] for k, v in options.items()})
    with pytest.raises(ConfigError, match="this run needs about"):
        gradscope.sweep(spec, tmp_path / "sweep", workers=1)
    assert not (tmp_path / "sweep").exists()


def test_bad_values_in_a_sweep_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[base]\ngain = nan\n")
    with pytest.raises(ConfigError, match="s.toml: --gain must be a finite number"):
        gradscope.sweep_spec(config_file=path)
    os.environ.pop(CRASH_SEED_ENV, None)


def test_checkpointing_is_offered_and_shrinks_the_adjoint_memory(tmp_path):
    from gradscope.probes import PROBES
    from gradscope.runner import memory_estimate

    big = dict(seq_len=2_000_000, batch=256, hidden=512, cell="lstm", dtype="float32",
               probes=("adjoint",))
    with pytest.raises(ConfigError, match="or add --checkpoint"):
        gradscope.run(out=tmp_path / "never", **big)
    adjoint = [PROBES.get("adjoint")]
    stored = memory_estimate(gradscope.RunConfig(**big), adjoint)
    kept = memory_estimate(gradscope.RunConfig(**big, checkpoint=True), adjoint)
    assert stored > 500 * kept  # O(T) states against O(sqrt(T))
    assert stored / 2**30 > 5000 and kept / 2**30 < 10


def test_the_memory_estimate_counts_the_fused_kernels_graph():
    """Where the adjoint may come from the fused kernel (the LSTM below H = 256 on the CPU,
    rnn and lstm on a GPU, in float64 there) its graph, about 8 values per hidden unit, sample
    and step, is counted; where the loop runs it is not."""
    import torch

    from gradscope.probes import PROBES
    from gradscope.runner import memory_estimate

    adjoint = [PROBES.get("adjoint")]

    def estimate(device="cpu", **options):
        config = gradscope.RunConfig(**{"seq_len": 10_000, "batch": 32, "dtype": "float32",
                                        **options})
        return memory_estimate(config, adjoint, torch.device(device))

    def graph(hidden, itemsize=4):
        return 8 * 10_000 * 32 * hidden * itemsize

    # on a GPU the kernel runs in float64 (engine._fused_plan): its graph is twice the size
    assert estimate("cuda", cell="lstm", hidden=128) - estimate(cell="lstm", hidden=128) \
        == graph(128, 8) - graph(128)
    assert estimate("cuda", cell="lstm", hidden=256) - estimate(cell="lstm", hidden=256) \
        == graph(256, 8)
    assert estimate("cuda", cell="rnn", hidden=128) - estimate(cell="rnn", hidden=128) \
        == graph(128, 8)
    assert estimate("cuda", cell="gru", hidden=128) == estimate(cell="gru", hidden=128)


def test_a_gpu_slice_and_its_memory_estimate_shrink_on_a_small_card(monkeypatch):
    """A forward slice stacks up to engine.STACKED_GPU values, and the estimate counts five
    slices; on a card where those would take more than a quarter of its memory, both take
    less (an 8 GB card: 5e7 values, not 2**27)."""
    from types import SimpleNamespace

    import torch

    from gradscope import usermodel
    from gradscope.engine import STACKED_GPU, stacked_gpu
    from gradscope.probes import PROBES
    from gradscope.runner import memory_estimate

    cuda = torch.device("cuda")
    config = gradscope.RunConfig(cell="lstm", hidden=256, batch=2, seq_len=10_000)
    jacobian = [PROBES.get("jacobian")]
    users = usermodel.adapt(torch.nn.LSTM(3, 256), "here")  # a check's model, the same sizes
    sizes = {}
    for gigabytes in (141, 80, 8):
        card = SimpleNamespace(total_memory=gigabytes * 10**9)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, c=card: c)
        sizes[gigabytes] = (stacked_gpu(cuda), memory_estimate(config, jacobian, cuda),
                            usermodel.memory_estimate(users, 10_000, 2, cuda, reverse=False))
    assert sizes[141][0] == sizes[80][0] == STACKED_GPU == 2**27
    assert sizes[8][0] == 8 * 10**9 // 160
    assert sizes[141][1] - sizes[8][1] == 5 * 8 * (2**27 - 8 * 10**9 // 160)
    assert sizes[141][2] - sizes[8][2] == 5 * 8 * (2**27 - 8 * 10**9 // 160)
    assert usermodel.memory_estimate(users, 10_000, 2, torch.device("cpu"), reverse=False) \
        == sizes[141][2] - 5 * 8 * 2**27  # no slices counted off a GPU
    assert stacked_gpu(torch.device("cpu")) == STACKED_GPU  # the GPU's plan thrown on the CPU


def test_more_workers_than_runs_start_no_more_processes_than_runs(tmp_path, monkeypatch):
    """--workers 1000 on the 3 runs of the smoke preset started 1000 processes, each importing
    torch, before the first run was handed out: minutes, and gigabytes."""
    import multiprocessing

    from gradscope import executors
    started = []
    real = multiprocessing.get_context("spawn")

    class Counting:
        Pipe = staticmethod(real.Pipe)

        @staticmethod
        def Process(*args, **kwargs):  # noqa: N802 (multiprocessing's name)
            started.append(1)
            return real.Process(*args, **kwargs)

    monkeypatch.setattr(executors, "get_context", lambda method: Counting)
    spec = gradscope.sweep_spec(options={"cell": ["rnn", "gru"], **TINY})
    outcome, _ = gradscope.sweep(spec, tmp_path, workers=64, seed_stack=1, report=False)
    assert outcome.finished == 2 and len(started) == 2


def test_a_local_ray_instance_gets_no_more_cpus_than_runs(monkeypatch):
    """The same for --executor ray --workers N: the local Ray instance it starts is sized by
    N, and Ray may start a worker process per CPU."""
    from gradscope import executors

    class Stop(Exception):
        pass

    asked = {}

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**options):
            asked.update(options)
            raise Stop

    monkeypatch.setattr(executors, "import_ray", lambda: FakeRay)
    jobs = [[gradscope.RunConfig(seed=s)] for s in range(3)]
    for workers, cpus in ((64, 3), (2, 2)):
        with pytest.raises(Stop):
            list(executors.RayExecutor(num_cpus=workers).run(jobs))
        assert asked["num_cpus"] == cpus
