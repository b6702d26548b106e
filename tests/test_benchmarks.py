"""The benchmark scripts run: a dry run of each at toy sizes on the CPU, so that a lent GPU's
few minutes (benchmarks/gpu_check.sh) are not lost to a script that no longer starts. No
timing is judged here; the numbers are docs/benchmarks.md's."""

import os
import re
import subprocess
import sys
from pathlib import Path

from gradscope import engine

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _rows(table: str, first: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith(f"| {first}")]


def test_the_benchmark_prints_a_ratio_for_every_case_it_is_given():
    out = _script("benchmarks/run.py", "--cases", "lstm:6:30,rnn:6:30", "--no-memory",
                  "--naive-t", "10")
    assert out.startswith("machine: ")
    rows = _rows(out, "lstm") + _rows(out, "rnn")
    assert [row[:3] for row in rows] == [["lstm", "6", "30"], ["rnn", "6", "30"]]
    for row in rows:
        ratios = [cell for cell in row if re.fullmatch(r"\d+\.\d+x", cell)]
        assert len(ratios) == 3, row  # adjoint, exact and estimated against the fused run
        assert row[-1].endswith("x") and "(from T=10" in row[-2]  # naive, scaled


def test_the_benchmark_refuses_a_malformed_case_in_one_line():
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--cases", "lstm:8"], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and "give CELL:H:T" in done.stderr.splitlines()[-1]


def test_the_gpu_parts_dry_run_times_every_plan_and_picks_one(tmp_path):
    pick = tmp_path / "pick"
    out = _script("benchmarks/gpu_parts.py", "--device", "cpu", "--hidden", "6", "--steps",
                  "60", "--pick", str(pick))
    for plan in engine.GPU_PLANS:
        assert f"GPU plan '{plan}'" in out
    assert pick.read_text().strip() in engine.GPU_PLANS


def test_the_gpu_check_script_parses_and_calls_scripts_that_exist():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    called = re.findall(r"python3 (?:-m pytest \S+ \S+ \S+ \S+ --durations=\d+ )?(\S+\.py)",
                        script)
    assert called == ["tests/test_gpu.py", "benchmarks/gpu_parts.py", "benchmarks/run.py"]
    assert all((ROOT / path).is_file() for path in called)
