"""Figures, one small function each. Matplotlib runs headless (Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402
from .results import RunResult  # noqa: E402

AXIS_LABEL = {"t": "t steps after h_0", "k": "k steps back from T"}


def profile_figure(result: RunResult) -> plt.Figure:
    """Every probe's log10 magnitude against time distance (log10 values: no float floor)."""
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for name, values in result.profiles.items():
        steps = result.steps(name)
        finite = np.isfinite(values)
        if not finite.any():
            ax.plot([], [], label=f"{name} (exactly zero)" if np.isneginf(values).any()
                    else f"{name} (not computed)")
            continue
        ax.plot(steps[finite], values[finite], lw=1.6,
                label=f"{name} [{AXIS_LABEL[result.axes[name]]}]")
    _theory_lines(ax, result)
    if result.nonfinite:
        where, step = result.nonfinite["where"], result.nonfinite["step"]
        ax.axvline(step, color="red", ls="--", lw=1,
                   label=f"left float range ({where}) at t={step}")
    c = result.config
    ax.set_title(f"{c.label()}, task {c.task}, H={c.hidden}, T={result.task['seq_len']}",
                 fontsize=10)
    ax.set_xlabel("time distance (steps)")
    ax.set_ylabel("log10 gradient magnitude")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _theory_lines(ax: plt.Axes, result: RunResult) -> None:
    """Beside the measured jacobian: the Pascanu bound and the predicted slopes."""
    theory, jac = result.theory, result.profiles.get("jacobian")
    if theory is None or jac is None or not np.isfinite(jac).any():
        return
    t = result.steps("jacobian")
    t0, y0 = t[np.isfinite(jac)][0], jac[np.isfinite(jac)][0]
    if theory.get("pascanu_slope") is not None:
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


def save_figure(fig: plt.Figure, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def comparison_figure(results: list[RunResult], probe: str) -> plt.Figure:
    """One probe of several runs on one axis: which configuration keeps its gradient longest."""
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for result in results:
        values = result.profiles[probe]
        steps = result.steps(probe)
        finite = np.isfinite(values)
        ax.plot(steps[finite], values[finite], lw=1.6, label=result.label())
    axis = results[0].axes[probe]
    ax.set_title(f"{probe}: log10 magnitude against time distance", fontsize=10)
    ax.set_xlabel(f"{AXIS_LABEL[axis]}")
    ax.set_ylabel("log10 gradient magnitude")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
