"""Gradient-health rules, baselines and exit codes: small pure functions over measured
profiles. No torch here; `gate` measures, this module judges.

Rules (each optional but ``finite``), on one probe's log10 profile:

- ``finite``: the forward pass stayed within float range (no overflow, no NaN).
- ``min-slope``: the least-squares slope (log10 per step) is at least this.
- ``min-horizon``: the profile takes at least this many steps to fall 6 decades below its
  start ("never" passes).
- ``max-growth``: the profile rises at most this many decades above its start (explosion).
- baseline: split the profile into ``windows`` equal windows; in none may the mean of
  (measured - baseline) fall below ``-tolerance`` decades.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple
from xml.etree import ElementTree

import numpy as np

from .checkconfig import CheckSpec
from .errors import ConfigError
from .files import atomic_write_text
from .summary import Summary, json_safe, left_range

BASELINE_SCHEMA = "gradscope.baseline/1"


class Exit(IntEnum):
    PASSED = 0  # every rule of every check held
    FAILED = 1  # a rule failed
    USAGE = 2  # bad command line or configuration


@dataclass(frozen=True)
class RuleResult:
    rule: str  # finite | min-slope | min-horizon | max-growth | baseline
    passed: bool
    measured: str  # what was measured, in words and units
    limit: str  # what the rule asks
    detail: str = ""  # why it failed, e.g. which window and by how much
    shortfall: str = ""  # by how much it failed, short (for tables)


@dataclass(frozen=True, repr=False)
class CheckResult:
    name: str
    probe: str
    rules: list[RuleResult]
    profile: np.ndarray  # log10 per step
    summary: Summary
    notes: tuple[str, ...] = ()
    spec: CheckSpec | None = None  # the check as measured (command-line overrides applied)
    baseline: np.ndarray | None = None  # the log10 profile it was compared with, if any
    first_step: int = 1  # the step of profile[0]: 1 (t after h_0), or 0 for the adjoint's k

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    def __repr__(self) -> str:
        """One line: each rule's result and what it measured (the profile is ``profile``)."""
        rules = ", ".join(f"{r.rule} {'pass' if r.passed else 'FAIL'} ({r.measured})"
                          for r in self.rules)
        return (f"<CheckResult {self.name} ({self.probe}): "
                f"{'passed' if self.passed else 'failed'}: {rules}>")


def rule_finite(nonfinite: dict | None) -> RuleResult:
    if nonfinite is None:
        return RuleResult("finite", True, "finite at every step", "no overflow or NaN")
    step, where = nonfinite["step"], nonfinite["where"]
    under = where == "underflow"
    measured = f"underflow at step {step}" if under else f"{where} not finite at step {step}"
    return RuleResult("finite", False, measured, "no overflow or NaN", left_range(nonfinite),
                      f"{'underflow' if under else 'overflow'} at step {step}")


def rule_min_slope(slope: float | None, exactly_zero: bool, limit: float) -> RuleResult:
    if slope is None:
        measured = "exactly zero" if exactly_zero else "no slope (under two finite values)"
        return RuleResult("min-slope", False, measured, f">= {limit:+.4f} log10/step",
                          "the gradient is " + measured, measured)
    ok = slope >= limit
    return RuleResult("min-slope", ok, f"{slope:+.4f} log10/step", f">= {limit:+.4f} log10/step",
                      "" if ok else f"slope {slope:+.4f} is {limit - slope:.4f} log10/step "
                                    f"below the minimum {limit:+.4f}",
                      "" if ok else f"{limit - slope:.4f} log10/step")


def rule_min_horizon(horizon: int | None, length: int, limit: int) -> RuleResult:
    if horizon is None:
        return RuleResult("min-horizon", True, f"never within {length} steps",
                          f">= {limit} steps")
    ok = horizon >= limit
    return RuleResult("min-horizon", ok, f"{horizon} steps", f">= {limit} steps",
                      "" if ok else f"fell 6 decades after {horizon} steps, {limit - horizon} "
                                    f"short of {limit}",
                      "" if ok else f"{limit - horizon} steps")


def rule_max_growth(profile: np.ndarray, limit: float) -> RuleResult:
    finite = profile[np.isfinite(profile)]
    growth = float(finite.max() - finite[0]) if finite.size else 0.0
    ok = growth <= limit
    return RuleResult("max-growth", ok, f"{growth:+.2f} decades", f"<= {limit:+.2f} decades",
                      "" if ok else f"rose {growth:.2f} decades above its start, "
                                    f"{growth - limit:.2f} more than allowed",
                      "" if ok else f"{growth - limit:.2f} decades")


def rule_baseline(profile: np.ndarray, baseline: np.ndarray, tolerance: float,
                  windows: int, first_step: int = 1) -> RuleResult:
    """Mean difference from the baseline in each of ``windows`` windows; the worst decides.
    ``first_step``: the step of ``profile[0]`` (the adjoint's k starts at 0), for the window
    named."""
    if len(baseline) != len(profile):
        raise ConfigError(f"the baseline has {len(baseline)} steps and the profile "
                          f"{len(profile)}: measure as many steps as the baseline, or record "
                          "it again at this length (`gradscope check --update-baseline` with "
                          "the same options)")
    diff = _clip_zero(profile) - _clip_zero(baseline)
    worst, where = math.inf, ""
    for k, chunk in enumerate(np.array_split(np.arange(len(profile)), windows), start=1):
        if not chunk.size:
            continue
        values = diff[chunk]
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else 0.0
        if mean < worst:
            worst = mean
            where = f"window {k}/{windows} (steps {chunk[0] + first_step}-" \
                    f"{chunk[-1] + first_step})"
    ok = worst >= -tolerance
    return RuleResult("baseline", ok, f"{worst:+.2f} decades in {where}",
                      f">= -{tolerance:g} decades",
                      "" if ok else f"{where} is {-worst:.2f} decades below the baseline "
                                    f"(tolerance {tolerance:g})",
                      "" if ok else f"{-worst - tolerance:.2f} decades in {where}")


def _clip_zero(values: np.ndarray) -> np.ndarray:
    """Exact zeros (-inf) count as far below anything measured, but finitely."""
    return np.where(np.isneginf(values), -1e4, values)


FILE_STEM = 120  # characters of a check's name kept in its figure's file name


def figure_files(names: list[str]) -> list[str]:
    """The file of each check's figure (``--plots``): its name with anything but letters,
    digits, ``.``, ``_`` and ``-`` replaced by ``_``, cut to FILE_STEM characters (a file
    name holds 255 bytes), and a number added where two names would give the same file."""
    files: list[str] = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")[:FILE_STEM] or "check"
        file, n = f"{stem}.png", 2
        while file in files:
            file, n = f"{stem}-{n}.png", n + 1
        files.append(file)
    return files


def exit_code(results: list[CheckResult]) -> Exit:
    return Exit.PASSED if all(r.passed for r in results) else Exit.FAILED


# --- baselines --------------------------------------------------------------------------------

class Baseline(NamedTuple):
    """One check's recorded profile."""

    probe: str | None  # the probe it was recorded for; None in files that lost it (<= 0.x)
    log10: np.ndarray  # per step; -inf exactly zero


def read_baseline(path: Path) -> dict[str, Baseline]:
    """check name -> its recorded profile; {} when there is no baseline file yet."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != BASELINE_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}")
        return {name: Baseline(c.get("probe"), np.array(
                    [-np.inf if v is None else v for v in c["log10"]], dtype=float))
                for name, c in data["checks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a gradscope baseline ({e}); rewrite it with "
                          "`gradscope check --update-baseline`") from None


def write_baseline(path: Path, results: list[CheckResult], keep: dict[str, Baseline]) -> None:
    """Write the measured profiles (other checks' entries in ``keep`` stay), atomically."""
    checks = {name: {"probe": b.probe, "log10": json_safe(b.log10)} for name, b in keep.items()}
    for r in results:
        checks[r.name] = {"probe": r.probe, "log10": json_safe(r.profile)}
    atomic_write_text(path, json.dumps({"schema": BASELINE_SCHEMA, "checks": checks},
                                       indent=1) + "\n")


# --- outputs ----------------------------------------------------------------------------------

def to_json(results: list[CheckResult]) -> dict:
    return {
        "schema": "gradscope.check/1",
        "passed": all(r.passed for r in results),
        "checks": [{"name": r.name, "probe": r.probe, "passed": r.passed,
                    "slope": r.summary.slope, "horizon": r.summary.horizon,
                    "notes": list(r.notes),
                    "rules": [{"rule": x.rule, "passed": x.passed, "measured": x.measured,
                               "limit": x.limit, "detail": x.detail} for x in r.rules]}
                   for r in results],
    }


def to_junit(results: list[CheckResult]) -> str:
    """One <testsuite>; a <testcase> per check and rule, failures with their detail."""
    cases = [(r, x) for r in results for x in r.rules]
    suite = ElementTree.Element("testsuite", name="gradscope", tests=str(len(cases)),
                                failures=str(sum(not x.passed for _, x in cases)), errors="0")
    for r, x in cases:
        case = ElementTree.SubElement(suite, "testcase", classname=f"gradscope.{r.name}",
                                      name=f"{r.probe} {x.rule}")
        if not x.passed:
            failure = ElementTree.SubElement(case, "failure", message=x.detail or x.measured)
            failure.text = f"measured {x.measured}; limit {x.limit}"
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)


def to_markdown(results: list[CheckResult]) -> str:
    head = "passed" if all(r.passed for r in results) else "FAILED"
    lines = [f"### gradscope check: {head}", "",
             "| check | probe | rule | measured | limit | result |", "|---|---|---|---|---|---|"]
    for r in results:
        for x in r.rules:
            cell = "pass" if x.passed else f"**fail**: {x.detail}"
            lines.append(f"| {_md_text(r.name)} | {r.probe} | {x.rule} | {_md(x.measured)} | "
                         f"{_md(x.limit)} | {_md(cell)} |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_text(text: str) -> str:
    """A user's text (a check's name) in a markdown cell, shown as it is: HTML and markdown's
    own marks escaped ('<b>x</b>' or '*x*' would be rendered, not shown)."""
    text = html.escape(text, quote=False)
    return _md(re.sub(r"([\\`*_\[\]#~])", r"\\\1", text))


def to_text(results: list[CheckResult]) -> str:
    """A plain table, for AssertionError messages."""
    rows = [("check", "probe", "rule", "measured", "limit", "result")]
    for r in results:
        for x in r.rules:
            rows.append((r.name, r.probe, x.rule, x.measured, x.limit,
                         "pass" if x.passed else f"FAIL: {x.detail}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True))
                     + "  " + row[5] for row in rows)
