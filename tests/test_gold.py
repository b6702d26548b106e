"""Gold files: the report's HTML and `gradscope check`'s outputs (JUnit XML, markdown, JSON,
text), rendered from data built by hand, so that nothing volatile (times, versions, float
rounding of a measurement, matplotlib's PNG bytes) is in them. A change to what users read,
or to a format that CI systems parse, then shows as a diff here.

After a deliberate change: GRADSCOPE_UPDATE_GOLD=1 pytest tests/test_gold.py, and review the
diff of tests/gold/ before committing it.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from gradscope.check import (
    CheckResult,
    rule_baseline,
    rule_finite,
    rule_max_growth,
    rule_min_horizon,
    rule_min_slope,
    to_json,
    to_junit,
    to_markdown,
    to_text,
)
from gradscope.report import html as report_html
from gradscope.report.data import Comparison, Line, ReportData, Row, TheoryRow
from gradscope.summary import Summary, half_life_of

GOLD = Path(__file__).parent / "gold"


def assert_gold(name: str, text: str) -> None:
    path = GOLD / name
    if os.environ.get("GRADSCOPE_UPDATE_GOLD") == "1":
        path.write_text(text, encoding="utf-8")
    want = path.read_text(encoding="utf-8")
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"gold/{name}", "rendered now", n=1))
        pytest.fail(f"{name} differs from its gold file (GRADSCOPE_UPDATE_GOLD=1 to accept "
                    f"a deliberate change):\n{diff[:6000]}")


def _line(label: str, slope: float, seeds: int = 3, theory: float | None = None) -> Line:
    steps = np.arange(1, 6)
    median = slope * steps
    return Line(label, steps, median, median - 0.5, median + 0.5, seeds, theory)


def _report_data() -> ReportData:
    tanh, relu = _line("rnn/tanh pytorch", -0.24, theory=-0.25), _line("rnn/relu pytorch", -0.37)
    lstm = _line("lstm pytorch forget-bias 3", -0.004)
    comparisons = [
        Comparison("activations", "Activation functions", "grad_h0",
                   "vanilla RNN, initialisation pytorch", [tanh, relu]),
        Comparison("gated", "Gated cells", "grad_h0", "against the rnn/tanh pytorch baseline",
                   [tanh, lstm], missing=["gru <b>pytorch</b>"]),
    ]
    skipped = [Comparison("initialisations", "Initialisations", "grad_h0",
                          "vanilla RNN, per activation", [relu], missing=["rnn/tanh identity"])]
    ranking = [
        Row("lstm pytorch forget-bias 3", 3, -0.004, half_life_of(-0.004), float("inf"),
            "stable", 0.0081, 0.1667, "3/3", None),
        Row("rnn/tanh pytorch", 3, -0.24, half_life_of(-0.24), 25.0, "vanishing", 0.17, 0.1667,
            "0/3", None),
        Row("rnn/relu <i>pytorch</i>", 2, None, None, None, "vanishing", None, None, "-", 0.5),
    ]
    theory = [TheoryRow("rnn/tanh pytorch", "lyapunov", "jacobian", -0.25, -0.24, "3/3", ""),
              TheoryRow("lstm pytorch forget-bias 3", "gate-product", "jacobian_c", -0.0041,
                        None, "-", "recurrence not weak")]
    meta = {"runs": 9, "finished": 8, "failed": 1, "commands": ["gradscope sweep --x 1"],
            "gradscope": "0.0.0", "torch": None, "dtype": ["float32", "float64"]}
    return ReportData("grad_h0", comparisons, ["a"], np.zeros((1, 5)), ranking, [], {},
                      [("rnn/sigmoid pytorch seed 2", "ValueError: <boom>")], skipped, meta,
                      theory)


def test_the_report_page_is_its_gold_file():
    data = _report_data()
    images = {f"compare-{c.key}.png": f"png of {c.key}".encode() for c in data.comparisons}
    images["heatmap.png"] = b"png of the heatmap"
    assert_gold("report.html", report_html.render(data, images, "gradscope report: gold"))


def _check_results() -> list[CheckResult]:
    falls = -0.05 * np.arange(1, 41)
    passed = CheckResult(
        "encoder", "grad_h0",
        [rule_finite(None), rule_min_slope(-0.01, False, -0.02),
         rule_min_horizon(None, 40, 30)],
        falls / 5, Summary(-0.01, half_life_of(-0.01), None, "stable", -0.01, -0.4))
    failed = CheckResult(
        "decoder|<b>2</b>*", "adjoint",
        [rule_finite({"step": 31, "where": "state"}), rule_min_slope(-0.05, False, -0.02),
         rule_min_horizon(12, 40, 30), rule_max_growth(np.array([0.0, 2.5, 1.0]), 2.0),
         rule_baseline(falls, falls + 1.5, 1.0, 4, first_step=0),
         rule_min_slope(None, True, -0.02)],
        falls, Summary(-0.05, half_life_of(-0.05), 12, "vanishing", -0.05, -2.0),
        notes=("the forward pass left float range at step 31",), first_step=0)
    return [passed, failed]


@pytest.mark.parametrize("name, render", [
    ("check.junit.xml", to_junit),
    ("check.md", to_markdown),
    ("check.txt", lambda results: to_text(results) + "\n"),
    ("check.json", lambda results: json.dumps(to_json(results), indent=1) + "\n"),
])
def test_the_checks_outputs_are_their_gold_files(name, render):
    assert_gold(name, render(_check_results()))
