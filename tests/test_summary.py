"""slope, half-life, horizon and verdict: a table of edge cases."""

import math

import numpy as np
import pytest

from gradscope.summary import slope_text, steps_text, summarize, summary_row

t = np.arange(1, 101)


@pytest.mark.parametrize("profile, slope, half_life, horizon, verdict", [
    (-0.25 * t, -0.25, math.log10(2) / 0.25, 25, "vanishing"),  # falls 6 decades at 24 steps back
    (0.0 * t, 0.0, None, None, "stable"),
    (-0.01 * t, -0.01, math.log10(2) / 0.01, None, "stable"),  # -0.99 decades: in the band
    (-0.0102 * t, -0.0102, math.log10(2) / 0.0102, None, "vanishing"),  # -1.0098 decades
    (0.0102 * t, 0.0102, None, None, "exploding"),
    (np.where(t < 50, -0.001 * t, -np.inf), -0.001, math.log10(2) / 0.001, 50, "vanishing"),
])
def test_summary_table(profile, slope, half_life, horizon, verdict):
    s = summarize(profile, t)
    assert s.slope == pytest.approx(slope, abs=1e-12)
    assert (s.half_life is None) == (half_life is None)
    if half_life is not None:
        assert s.half_life == pytest.approx(half_life)
    assert s.horizon == horizon
    assert s.verdict == verdict


def test_horizon_is_relative_to_the_first_value_and_configurable():
    profile = 3.0 - 0.1 * t  # start 2.9 at t = 1
    assert summarize(profile, t).horizon == 61  # 2.9 - 6 = -3.1 reached at t = 61
    assert summarize(profile, t, drop=2.0).horizon == 21


def test_exactly_zero_everywhere_is_vanishing_with_no_slope():
    s = summarize(np.full(100, -np.inf), t)
    assert s.slope is None and s.verdict == "vanishing" and s.horizon == 1


def test_not_computed_values_are_ignored_and_overflow_is_exploding():
    profile = np.where(t < 40, 0.5 * t, np.nan)
    s = summarize(profile, t, overflowed=True)
    assert s.slope == pytest.approx(0.5) and s.verdict == "exploding"
    assert s.end == pytest.approx(0.5 * 39)


def test_verdict_band_is_configurable():
    assert summarize(-0.01 * t, t, band=0.5).verdict == "vanishing"
    assert summarize(-0.05 * t, t, band=5.0).verdict == "stable"


def test_adjoint_axis_starts_at_zero():
    k = np.arange(0, 100)
    assert summarize(-0.5 * k, k).horizon == 12


@pytest.mark.parametrize("steps, text", [
    (1.58, "1.6"), (831.0, "831.0"), (99999.94, "99999.9"), (831409414.3, "8.31e+08"),
])
def test_steps_text(steps, text):
    """Half-lives in tables: one decimal, compact from 1e5 steps up (a profile that barely
    shrinks had printed as 831409414.3, the widest cell of the run table)."""
    assert steps_text(steps) == text


def test_zeros_before_the_start_are_no_fall():
    """A stacked module's adjoint of its first layer is exactly zero at k = 0 (the loss reads
    the top layer): the summary starts at its first finite value, where the horizon used to
    be 0 and the verdict vanishing whatever followed."""
    k = np.arange(0, 100)
    profile = np.where(k == 0, -np.inf, -2.0 - 0.001 * k)
    s = summarize(profile, k)
    assert s.start == pytest.approx(-2.001) and s.horizon is None and s.verdict == "stable"
    falling = np.where(k == 0, -np.inf, -2.0 - 0.5 * k)
    assert summarize(falling, k).horizon == 13  # 6 decades below -2.5 (k = 1) at k = 13
    later_zero = np.where(k == 0, -np.inf, np.where(k < 50, -2.0, -np.inf))
    assert summarize(later_zero, k).horizon == 50
    assert summarize(later_zero, k).verdict == "vanishing"


@pytest.mark.parametrize("profile, cells", [
    (-0.3 * t[:30], ("p", "-0.3000", "1.0", "21", "-9.0", "vanishing")),  # 6 decades below -0.3
    (0.01 * t[:30], ("p", "+0.0100", "inf", "> 30", "0.3", "stable")),  # does not shrink
    # exactly zero from step 2 (a saturated tanh): no slope, so no half-life either
    (np.r_[-1.0, np.full(29, -np.inf)], ("p", "-", "-", "2", "-inf (exact 0)", "vanishing")),
    # not computed at all (the loss of a forward pass that overflowed): no last value
    (np.full(30, np.nan), ("p", "-", "-", "> 30", "-", "stable")),
])
def test_a_summarys_table_row(profile, cells):
    assert summary_row("p", summarize(profile, t[:30]), profile) == cells


def test_slope_text_says_why_a_profile_has_no_slope():
    """A saturated tanh after training is exactly zero from step 1: the line under the table
    said "grad_h0 slope -", as if nothing had been measured."""
    def text(log10, first=1):
        log10 = np.array(log10)
        steps = np.arange(first, first + len(log10))
        return slope_text(summarize(log10, steps), log10, first)

    assert text([-1.0, -2.0, -3.0]) == "slope -1.0000"
    assert text([-np.inf] * 5) == "exactly 0 from step 1"
    assert text([-1.0, -2.0, -np.inf, -np.inf]) == "slope -1.0000"  # a slope: said as such
    # the loss's own gradient at k = 0, then exactly 0
    assert text([2.0, -np.inf, -np.inf], first=0) == "exactly 0 from step 1"
    assert text([np.nan] * 4) == "slope -"  # not computed


def test_run_after_a_saturating_training_says_exactly_zero(tmp_path, capsys):
    from gradscope.cli import main
    with pytest.raises(SystemExit) as info:
        main(["run", "--steps", "20", "--optimizer", "sgd", "--lr", "1e6", "--clip", "0",
              "--seq-len", "20", "--hidden", "8", "--batch", "4", "--theory-k", "0",
              "--out", str(tmp_path / "r")])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code in (0, None)
    assert "after training: grad_h0 exactly 0 from step 1" in out
