"""Figures, one small function each. Matplotlib runs headless (Agg)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .check import CheckResult, figure_files
from .files import atomic_write
from .results import ModelProfile, RunResult
from .summary import DEFAULT_DROP, zeros_from_start

AXIS_LABEL = {"t": "t steps after h_0", "k": "k steps back from T"}


def plain_text(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """A figure function whose texts are shown as they are: a check's name or a model's repr
    may hold '$', which matplotlib would parse as math, and fail on ('$\\q$')."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs) -> Figure:
        with matplotlib.rc_context({"text.parse_math": False}):  # each Text keeps it
            return draw(*args, **kwargs)
    return drawn


@plain_text
def profile_figure(result: RunResult | ModelProfile) -> Figure:
    """Every probe's log10 magnitude against time distance (log10 values: no float floor);
    a run's theory beside them."""
    fig, ax = new_figure((8, 4.8), 110)
    for name, values in result.profiles.items():
        steps = result.steps(name)
        if not np.isfinite(values).any():
            ax.plot([], [], label=f"{name} (exactly zero)" if np.isneginf(values).any()
                    else f"{name} (not computed)")
            continue
        draw_measured(ax, steps, values, f"{name} [{AXIS_LABEL[result.axes[name]]}]")
    _whole_axis(ax, [result.steps(name) for name in result.profiles])
    _theory_lines(ax, result)
    if result.nonfinite:
        where, step = result.nonfinite["where"], result.nonfinite["step"]
        ax.axvline(step, color="red", ls="--", lw=1,
                   label=f"left float range ({where}) at t={step}")
    ax.set_title(result.title(), fontsize=10)
    ax.set_xlabel("time distance (steps)")
    ax.set_ylabel("log10 gradient magnitude")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _theory_lines(ax: Axes, result: RunResult | ModelProfile) -> None:
    """Beside the measured jacobian: the Pascanu bound and the predicted slopes."""
    theory, jac = result.theory, result.profiles.get("jacobian")
    if theory is None or jac is None or not np.isfinite(jac).any():
        return
    t = result.steps("jacobian")
    t0, y0 = t[np.isfinite(jac)][0], jac[np.isfinite(jac)][0]
    if isinstance(result, RunResult) and theory.get("pascanu_slope") is not None:
        bound = 0.5 * np.log10(result.config.hidden) + t * theory["pascanu_slope"]
        ax.plot(t, bound, color="grey", ls="--", lw=1, label="Pascanu bound on jacobian")
    for p in theory["predictions"]:
        if p["probe"] == "jacobian" and p["predicted"] is not None:
            ax.plot(t, y0 + p["predicted"] * (t - t0), ls=":", lw=1.2,
                    label=f"{p['name']} prediction ({p['predicted']:+.3f}/step)")
    # keep the measured profiles in view: a bound that grows would flatten them
    measured = np.concatenate([v[np.isfinite(v)] for v in result.profiles.values()])
    lo, hi = measured.min(), measured.max()
    pad = 0.08 * (hi - lo) + 0.5
    ax.set_ylim(lo - pad, hi + pad)


def draw_measured(ax: Axes, steps: np.ndarray, values: np.ndarray, label: str,
                  zeros: bool = True, **style) -> None:
    """A measured profile's finite values, and (``zeros``) in its label the step from which it
    is exactly zero, which no point of a log plot shows; a lone finite value as a dot, which a
    line would not show."""
    finite, zero = np.isfinite(values), zeros_from_start(values)
    if zeros and zero.any():
        label += f", exactly zero from step {steps[np.argmax(zero)]}"
    style = {"lw": 1.6, "ms": 5, **style}
    ax.plot(steps[finite], values[finite], label=label,
            marker="o" if finite.sum() == 1 else None, **style)


def _whole_axis(ax: Axes, steps: list[np.ndarray]) -> None:
    """Every step measured in view, the exactly-zero and not-computed ones too."""
    lo, hi = min(s[0] for s in steps), max(s[-1] for s in steps)
    pad = 0.02 * (hi - lo) + 0.5
    ax.set_xlim(lo - pad, hi + pad)


def new_figure(size: tuple[float, float], dpi: int, rows: int = 1, cols: int = 1,
               **subplots) -> tuple[Figure, Axes | np.ndarray]:
    """A figure and its axes, outside pyplot: no backend is chosen and no global figure list
    is kept, so that drawing here neither changes a notebook's backend nor needs a display."""
    fig = Figure(figsize=size, dpi=dpi)
    return fig, fig.subplots(rows, cols, **subplots)


def save_figure(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


@plain_text
def comparison_figure(results: list[RunResult | ModelProfile], probe: str) -> Figure:
    """One probe of several runs on one axis: which configuration keeps its gradient longest."""
    fig, ax = new_figure((8, 4.8), 110)
    for result in results:
        draw_measured(ax, result.steps(probe), result.profiles[probe], result.label())
    _whole_axis(ax, [result.steps(probe) for result in results])
    axis = results[0].axes[probe]
    ax.set_title(f"{probe}: log10 magnitude against time distance", fontsize=10)
    ax.set_xlabel(f"{AXIS_LABEL[axis]}")
    ax.set_ylabel("log10 gradient magnitude")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


@plain_text
def check_figure(result: CheckResult) -> Figure:
    """One check's profile against its rules, each drawn where the check has it: the
    least-squares fit beside the ``min-slope`` limit (both through the fit's centre), the
    steps before ``min-horizon`` in which the profile may not fall 6 decades, the
    ``max-growth`` ceiling, and the baseline with its tolerance (the rule compares window
    means, so a dip below the dashed line within a window can still pass)."""
    fig, ax = new_figure((8, 4.8), 110)
    profile, spec, summary = result.profile, result.spec, result.summary
    steps = np.arange(len(profile)) + result.first_step
    finite = np.isfinite(profile)
    shown = [profile[finite]]  # what the y range must keep in view
    # exact zeros and steps not computed get a line each below, not a note in this label
    draw_measured(ax, steps, profile, f"{result.probe}, measured", zeros=False, color="C0")
    _whole_axis(ax, [steps])
    for mask, what in ((zeros_from_start(profile), "exactly zero"),
                       (np.isnan(profile), "not computed")):
        if mask.any():
            ax.axvline(steps[np.argmax(mask)], color="C3", ls="--", lw=1,
                       label=f"{what} from step {steps[np.argmax(mask)]}")
    if result.baseline is not None and len(result.baseline) == len(profile):
        base = np.where(np.isfinite(result.baseline), result.baseline, np.nan)
        tolerance = spec.tolerance if spec else 0.0
        ax.plot(steps, base, color="grey", lw=1.2, label="baseline")
        ax.plot(steps, base - tolerance, color="grey", lw=1, ls="--",
                label=f"baseline - {_decades(tolerance)} (window means compared)")
        shown.append(base[np.isfinite(base)] - tolerance)
    if summary.slope is not None:
        x, y = steps[finite], profile[finite]
        centre = (x.mean(), y.mean())
        ax.plot(x, centre[1] + summary.slope * (x - centre[0]), color="C0", ls=":", lw=1.2,
                label=f"fit, {summary.slope:+.4f} log10/step")
        if spec and spec.min_slope is not None:
            ax.plot(x, centre[1] + spec.min_slope * (x - centre[0]), color="C3", ls="-.",
                    lw=1.2, label=f"min-slope, {spec.min_slope:+.4f} log10/step")
    horizon = spec is not None and spec.min_horizon is not None and summary.start is not None
    growth = spec is not None and spec.max_growth is not None and summary.start is not None
    if horizon:
        shown.append(np.array([summary.start - DEFAULT_DROP]))
    if growth:
        ceiling = summary.start + spec.max_growth
        ax.axhline(ceiling, color="C1", ls="--", lw=1,
                   label=f"max-growth: {_decades(spec.max_growth)} above the start")
        shown.append(np.array([ceiling]))
    values = np.concatenate(shown)
    if values.size:
        pad = 0.08 * np.ptp(values) + 0.5
        ax.set_ylim(values.min() - pad, values.max() + pad)
    if horizon:  # down to the axes' floor, now that it is known
        ax.fill_between([steps[0], min(spec.min_horizon, steps[-1])], ax.get_ylim()[0],
                        summary.start - DEFAULT_DROP, color="C3", alpha=0.12, lw=0,
                        label=f"min-horizon: not {_decades(DEFAULT_DROP)} down before "
                              f"step {spec.min_horizon}")
    failed = [f"{x.rule} by {x.shortfall}" if x.shortfall else x.rule
              for x in result.rules if not x.passed]
    ax.set_title(f"check {result.name}: " + ("passed" if not failed else
                                            "FAILED\n" + "; ".join(failed)), fontsize=10)
    ax.set_xlabel(AXIS_LABEL["k" if result.first_step == 0 else "t"])
    ax.set_ylabel(f"log10 {result.probe}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _decades(n: float) -> str:
    return f"{n:g} decade" + ("" if n == 1 else "s")


def write_check_figures(results: list[CheckResult], folder: Path) -> list[Path]:
    """``check_figure`` of every check into ``folder``, each named by ``check.figure_files``."""
    paths = [folder / file for file in figure_files([r.name for r in results])]
    for r, path in zip(results, paths, strict=True):
        save_figure(check_figure(r), path)
    return paths
