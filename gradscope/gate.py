"""`gradscope check` at work: measure every configured check with the exact engine, then judge
it with the rules of ``gradscope.check``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .check import (
    Baseline,
    CheckResult,
    read_baseline,
    rule_baseline,
    rule_finite,
    rule_max_growth,
    rule_min_horizon,
    rule_min_slope,
    write_baseline,
)
from .checkconfig import CheckFile, CheckSpec, run_config
from .engine import Unrolled, measure
from .errors import ConfigError
from .model import build
from .modelprofile import prepare
from .probes import PROBES, Probe, probes_for
from .results import FIRST_STEP
from .runner import check_config, resolve_device
from .summary import slope_text, summarize


def run_checks(checks: CheckFile, *, only: list[str] | None = None,
               update_baseline: bool = False,
               on_phase: Callable[[str], None] = lambda phase: None) -> list[CheckResult]:
    """Measure and judge the checks (all, or those named in ``only``). With
    ``update_baseline``, write the measured profiles as the new baseline instead of comparing.
    ``on_phase(text)`` is told which check is measured ("check encoder, 1 of 3")."""
    names = [c.name for c in checks.checks]
    for name in only or []:
        if name not in names:
            raise ConfigError(f"no check {name!r} in {checks.path}; it has: " + ", ".join(names))
    selected = [c for c in checks.checks if not only or c.name in only]
    baseline = read_baseline(checks.baseline)
    compared = {} if update_baseline else {
        spec.name: _recorded(spec, baseline[spec.name]) for spec in selected
        if spec.name in baseline}  # all before anything is measured
    results = []
    for i, spec in enumerate(selected, 1):
        on_phase(f"check {spec.name}, {i} of {len(selected)}")
        results.append(judge(spec, compared.get(spec.name)))
    if update_baseline:
        write_baseline(checks.baseline, results, keep=baseline)
    return results


def _recorded(spec: CheckSpec, baseline: Baseline) -> np.ndarray:
    """The baseline's profile, if it was recorded for the probe the check measures."""
    if baseline.probe not in (None, spec.probe):
        raise ConfigError(f"{spec.where('probe')} is {spec.probe!r}, but the baseline was "
                          f"recorded for {baseline.probe!r}: run `gradscope check "
                          "--update-baseline`")
    return baseline.log10


def judge(spec: CheckSpec, baseline: np.ndarray | None, module: object | None = None
          ) -> CheckResult:
    """Measure one check (``module``: a model object given directly, as from the API)."""
    unrolled, probes = _prepare(spec, module)
    available = [p.name for p in probes]
    if spec.probe not in available:
        raise ConfigError(f"{spec.where('probe')} {spec.probe!r} does not apply to this model; "
                          "it offers: " + ", ".join(available))
    main = next(p for p in probes if p.name == spec.probe)
    extra = [p for p in probes if "@" in p.name]  # each deeper layer's initial state
    profiles = measure(unrolled, [main, *extra])
    steps = np.arange(unrolled.seq_len) + FIRST_STEP[main.axis]
    overflowed = profiles.nonfinite is not None
    summary = summarize(profiles.log10[main.name], steps, overflowed=overflowed)
    profile = profiles.log10[main.name]
    rules = []
    if spec.finite:
        rules.append(rule_finite(None if profiles.nonfinite is None else
                                 {"step": profiles.nonfinite.step,
                                  "where": profiles.nonfinite.where}))
    if spec.min_slope is not None:
        rules.append(rule_min_slope(summary.slope, bool(np.isneginf(profile).any()),
                                    spec.min_slope))
    if spec.min_horizon is not None:
        rules.append(rule_min_horizon(summary.horizon, len(profile), spec.min_horizon))
    if spec.max_growth is not None:
        rules.append(rule_max_growth(profile, spec.max_growth))
    notes = []
    if baseline is not None:
        try:
            rules.append(rule_baseline(profile, baseline, spec.tolerance, spec.windows,
                                       FIRST_STEP[main.axis]))
        except ConfigError as e:
            raise ConfigError(f"{spec.where()}: {e}") from None
    for p in extra:
        s = summarize(profiles.log10[p.name], steps, overflowed=overflowed)
        notes.append(f"{p.name} {slope_text(s, profiles.log10[p.name], FIRST_STEP[p.axis])}")
    return CheckResult(spec.name, main.name, rules, profile, summary, tuple(notes), spec,
                       baseline, FIRST_STEP[main.axis])


def _prepare(spec: CheckSpec, module: object | None) -> tuple[Unrolled, list[Probe]]:
    try:
        device = resolve_device(spec.device)
        if module is None and spec.model is None:  # a built-in configuration
            config = run_config(spec)
            check_config(config)
            built = build(config, device)
            built.model.requires_grad_(False)
            names = probes_for(built.model.cell.parts)
            return built.model.unroll(built.batch), [PROBES.get(n) for n in names]
        ready = prepare(spec, module, device, reverse=spec.probe == "adjoint")
        return ready.unrolled, ready.probes
    except ConfigError as e:
        if str(e).startswith(spec.source):
            raise
        raise ConfigError(f"{spec.where()}: {e}") from None
