"""Summaries of one profile: slope, half-life, horizon, verdict. Shared by reports and checks.

Units: a profile is log10 of a magnitude, one value per step. ``slope`` is the least-squares
slope in log10 per step over the finite values (negative: the signal shrinks with time distance).
``half_life`` is the number of steps per halving, log10(2) / -slope (None when it does not
shrink). ``horizon`` is the first step at which the profile lies ``drop`` decades (default 6)
below its start, its first finite value; None when it never does within the profile. An
exactly-zero value (-inf) from the start on counts as having fallen (zeros before it do not;
a profile that is zero wherever computed has fallen at its first step).

Verdict: the fitted change across the profile, ``slope * (last step - first step)`` in decades,
against a band (``band``, default 1 decade): ``exploding`` when the forward pass overflowed or
the change exceeds +band; ``vanishing`` when the profile reaches exact zero or the change is
below -band; ``stable`` otherwise. The verdict is about the measured span: a slope of -0.01 is
stable over 50 steps (half a decade) and vanishing over 1000 (ten decades).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("vanishing", "stable", "exploding")
DEFAULT_DROP = 6.0
DEFAULT_BAND = 1.0


@dataclass(frozen=True)
class Summary:
    slope: float | None  # log10 per step; None when fewer than two finite values
    half_life: float | None  # steps per halving; None when the profile does not shrink
    horizon: int | None  # step where the profile is `drop` decades below its start; None: never
    verdict: str  # vanishing | stable | exploding
    start: float | None  # first finite log10 value
    end: float | None  # last computed log10 value (-inf allowed)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def summarize(
    log10: np.ndarray,
    steps: np.ndarray,
    *,
    drop: float = DEFAULT_DROP,
    band: float = DEFAULT_BAND,
    overflowed: bool = False,
) -> Summary:
    """Summarise one profile; ``steps`` are the x values (t = 1..T or k = 0..T-1)."""
    values = np.asarray(log10, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    computed = ~np.isnan(values)
    finite = np.isfinite(values)
    slope = _slope(steps[finite], values[finite])
    start = float(values[finite][0]) if finite.any() else None
    end = float(values[computed][-1]) if computed.any() else None
    since = _from_start(values)
    zero = since & np.isneginf(values)
    fallen = zero | (since & computed & (values <= (start if start is not None else 0) - drop))
    horizon = int(steps[np.argmax(fallen)]) if fallen.any() else None
    half_life = half_life_of(slope)
    reached_zero = bool(zero.any())
    change = 0.0 if slope is None else slope * float(np.ptp(steps[finite]))  # decades
    if overflowed or change > band:
        verdict = "exploding"
    elif reached_zero or change < -band:
        verdict = "vanishing"
    else:
        verdict = "stable"
    return Summary(slope, half_life, horizon, verdict, start, end)


def half_life_of(slope: float | None) -> float | None:
    """Steps per halving of a profile of this slope (log10 per step); None where it does not
    shrink or has no slope."""
    return math.log10(2) / -slope if slope is not None and slope < 0 else None


def _from_start(values: np.ndarray) -> np.ndarray:
    """Where a profile counts, from its start (its first finite value) on: exact zeros before
    it are no fall (a stacked module's adjoint of the first layer is exactly zero at k = 0, as
    the loss reads the top layer's state); a profile that is exactly zero wherever computed
    counts from its first step."""
    finite = np.isfinite(values)
    return np.arange(len(values)) >= (np.argmax(finite) if finite.any() else 0)


def zeros_from_start(values: np.ndarray) -> np.ndarray:
    """The steps where a profile is exactly zero from its start on: where ``summarize``
    counts it as having fallen to zero."""
    return _from_start(values) & np.isneginf(values)


def steps_text(steps: float) -> str:
    """A number of steps (a half-life) for a table: one decimal, or three significant digits
    from 1e5 up (a profile that barely shrinks has a half-life of millions of steps, whose
    decimals would only widen the column)."""
    return format(steps, ".1f" if abs(steps) < 1e5 else ".3g")


VERDICT_COLOURS = {"vanishing": "#b42318", "stable": "#067647", "exploding": "#7a2e9b"}  # HTML
SUMMARY_COLUMNS = ("probe", "slope", "half-life", "horizon", "last", "verdict")
SUMMARY_CAPTION = ("slope: log10 per step; half-life, horizon: steps; last: log10 at the last "
                   "step")


def summary_row(probe: str, s: Summary, log10: np.ndarray) -> tuple[str, ...]:
    """One profile's summary as the texts of a table's row (SUMMARY_COLUMNS), for a terminal
    and a notebook alike; ``log10``: the profile."""
    if s.end is not None:
        last = "-inf (exact 0)" if s.end == -math.inf else format(s.end, ".1f")
    elif np.isfinite(log10).any():  # a saved result's: JSON's null for its exactly zero end
        last = "-inf (exact 0)"
    else:  # nothing computed (or, saved, nothing but exact zeros: null tells them not apart)
        last = "-"
    return (probe, number_text(s.slope, "+.4f"), half_life_text(s.half_life, s.slope),
            str(s.horizon) if s.horizon is not None else f"> {len(log10)}", last, s.verdict)


def half_life_text(half_life: float | None, slope: float | None) -> str:
    """A half-life for a table: "inf" where the profile does not shrink (slope >= 0), "-"
    where it has no slope (fewer than two finite values: exactly zero from its second step,
    say)."""
    if half_life is not None:
        return steps_text(half_life)
    return "-" if slope is None else "inf"


def slope_text(s: Summary, log10: np.ndarray, first: int) -> str:
    """A profile's slope for a line of prose; where it has none, why: "exactly 0 from step N"
    (``first``: the step of ``log10[0]``) or, nothing finite computed, "slope -"."""
    if s.slope is not None:
        return f"slope {s.slope:+.4f}"
    zeros = zeros_from_start(np.asarray(log10, dtype=float))
    if zeros.any():
        return f"exactly 0 from step {first + int(np.argmax(zeros))}"
    return "slope -"


def number_text(v: float | None, spec: str, none: str = "-") -> str:
    """A number for a table; ``none`` where there is none or it is infinite."""
    if v is None or (isinstance(v, float) and math.isinf(v)):
        return none
    return format(v, spec)


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def json_safe(x):
    """Floats that are not finite become None, through dicts, lists, tuples and arrays: JSON,
    SQLite and the stored profiles have no inf or NaN (what None stands for is documented
    where each is written)."""
    if isinstance(x, float):  # numpy's float64 too
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in x]
    return x


def left_range(nonfinite: dict) -> str:
    """Where and how a measurement left float range, in words (``RunResult.nonfinite``)."""
    step, where = nonfinite["step"], nonfinite["where"]
    if where == "underflow":
        return (f"the forward probes left float range at step {step}: a part of the state "
                "(one layer's, say) fell further below the rest than the dtype holds (about "
                "1e-31 in float32, 1e-292 in float64)")
    return f"the forward pass left float range ({where} not finite) at step {step}"
