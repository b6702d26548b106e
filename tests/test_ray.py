"""The Ray executor against a local Ray instance (2 CPUs): the same numbers as the local
executor, a killed task retried then recorded, and a killed driver that resumes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import count_finished

import gradscope
from gradscope.executors import CRASH_SEED_ENV
from gradscope.store import Store

try:
    import ray
except ImportError:  # pragma: no cover - CI installs the dev extra, which has ray
    if os.environ.get("CI"):
        raise
    pytest.skip("needs ray (pip install 'gradscope[ray]')", allow_module_level=True)

CRASH_SEED = 7


@pytest.fixture(scope="module")
def local_ray():
    os.environ[CRASH_SEED_ENV] = str(CRASH_SEED)  # before ray.init: Ray's workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    del os.environ[CRASH_SEED_ENV]


def _everything(folder):
    with Store(folder) as store:
        profiles = {(r, s, p): v for r, s, p, _, _, v in store.profiles()}
        curves = store.curves()
        summaries = store.summaries().sort_values(["run_id", "train_step", "probe"])
    return profiles, curves, summaries.reset_index(drop=True)


def test_the_smoke_sweep_gives_identical_results_with_local_and_ray(tmp_path, local_ray):
    spec = gradscope.sweep_spec(preset="smoke")
    gradscope.sweep(spec, tmp_path / "local", executor="local", workers=2, report=False)
    outcome, _ = gradscope.sweep(spec, tmp_path / "ray", executor="ray", report=False)
    assert outcome.finished == 3 and outcome.failed == []
    (pl, cl, sl), (pr, cr, sr) = _everything(tmp_path / "local"), _everything(tmp_path / "ray")
    assert pl.keys() == pr.keys() and len(pl) > 0
    for key in pl:
        np.testing.assert_array_equal(pl[key], pr[key])
    assert cl.equals(cr) and sl.equals(sr)


def test_a_ray_task_whose_worker_dies_is_retried_then_recorded(tmp_path, local_ray):
    spec = gradscope.sweep_spec(seeds=CRASH_SEED + 1, options={
        "cell": ["gru"], "hidden": [3], "batch": [2], "seq_len": [6]})
    outcome, _ = gradscope.sweep(spec, tmp_path, executor="ray", retries=1, report=False)
    assert outcome.finished == CRASH_SEED
    [(config, reason)] = outcome.failed
    assert config.seed == CRASH_SEED and reason.startswith("ray task failed on each of 2 tries")
    with Store(tmp_path) as store:
        runs = store.runs()
    assert len(runs) == CRASH_SEED + 1 and runs.run_id.is_unique




def test_a_killed_ray_driver_resumes_with_every_run_exactly_once(tmp_path):
    # one seed per job (--seed-stack 1), so that runs finish one by one, not four at once: the
    # kill then lands with some runs done and some not
    argv = [sys.executable, "-m", "gradscope", "sweep", "--executor", "ray", "--workers", "2",
            "--cell", "rnn,gru", "--seeds", "4", "--seq-len", "40", "--hidden", "8", "--batch",
            "4", "--steps", "100", "--seed-stack", "1", "--out", str(tmp_path), "--no-report"]
    env = {k: v for k, v in os.environ.items() if k != CRASH_SEED_ENV}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + 180
    while count_finished(tmp_path / "gradscope.sqlite") < 2 and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = count_finished(tmp_path / "gradscope.sqlite")
    assert 2 <= done < 8
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert f"{done} already done" in again.stdout
    with Store(tmp_path) as store:
        runs = store.runs()
    assert len(runs) == 8 and runs.run_id.is_unique and (runs.status == "ok").all()
