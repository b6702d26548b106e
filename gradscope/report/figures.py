"""The report's figures, one small function each: data in, matplotlib figure out."""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..plots import draw_measured, new_figure, plain_text
from .data import Comparison, Line

AXIS = {"grad_h0": "t (steps after h_0)", "jacobian": "t (steps after h_0)",
        "jacobian_c": "t (steps after c_0)", "grad_c0": "t (steps after c_0)",
        "adjoint": "k (steps back from the loss)"}


def _lines(ax: Axes, lines: list[Line], bands: bool = True) -> None:
    colours = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"].colors
    for i, line in enumerate(lines):
        colour = colours[i % len(colours)]
        finite = np.isfinite(line.median)
        draw_measured(ax, line.steps, line.median, color=colour, lw=1.8,
                      label=f"{line.label} ({line.seeds} seed{'s' if line.seeds > 1 else ''})")
        band = np.isfinite(line.low) & np.isfinite(line.high)
        if bands and line.seeds > 1 and band.any():
            ax.fill_between(line.steps[band], line.low[band], line.high[band], color=colour,
                            alpha=0.18, lw=0)
        if line.theory_slope is not None and finite.any():  # Lyapunov: the asymptotic rate
            x0, y0 = line.steps[finite][0], line.median[finite][0]
            xs = line.steps[finite][[0, -1]]
            ax.plot(xs, y0 + line.theory_slope * (xs - x0), color=colour, lw=1, ls=":")


@plain_text
def comparison(c: Comparison) -> Figure:
    """One probe against time distance, one line per configuration, min-max band over seeds."""
    fig, ax = new_figure((8.5, 4.8), 100)
    _lines(ax, c.lines)
    ax.set_title(f"{c.title}: {c.probe} ({c.fixed}); dotted: Lyapunov prediction",
                 fontsize=9)
    ax.set_xlabel(AXIS.get(c.probe, "step"))
    ax.set_ylabel(f"log10 {c.probe}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left")
    fig.tight_layout()
    return fig


@plain_text
def heatmap(labels: list[str], matrix: np.ndarray, probe: str, first: int = 1) -> Figure:
    """Configuration x timestep, colour = log10 magnitude (median over seeds); ``first``: the
    step of the first column."""
    fig, ax = new_figure((8.5, 0.9 + 0.32 * max(len(labels), 2)), 100)
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(first - 0.5, first + matrix.shape[1] - 0.5, len(labels) - 0.5,
                              -0.5))
    ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
    ax.set_xlabel(AXIS.get(probe, "step"))
    ax.set_title(f"log10 {probe} per configuration and step (best first)", fontsize=10)
    fig.colorbar(image, ax=ax, label="log10", pad=0.01)
    fig.tight_layout()
    return fig


@plain_text
def training_curves(lines: list[Line]) -> Figure:
    """Training loss relative to chance (1 = a model that learned nothing)."""
    fig, ax = new_figure((8.5, 4.5), 100)
    _lines(ax, lines, bands=False)  # minibatch noise makes min-max bands unreadable here
    ax.axhline(1.0, color="black", ls="--", lw=1, label="chance")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="learned below this")
    top = max((np.nanmax(x.high) for x in lines if np.isfinite(x.high).any()), default=1.5)
    ax.set_ylim(0, min(max(1.6, 1.05 * top), 3.0) if math.isfinite(top) else 3.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss / chance loss")
    ax.set_title("Training curves (moving average, median over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    return fig


@plain_text
def over_training(panels: dict[str, list[Line]], probe: str) -> Figure:
    """Small multiples: each configuration's profile at each measured training step."""
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = new_figure((3.2 * cols, 2.6 * rows), 100, rows, cols, squeeze=False,
                           sharey=True)
    for ax, (label, lines) in zip(axes.flat, panels.items(), strict=False):
        colours = matplotlib.colormaps["plasma"](np.linspace(0, 0.85, len(lines)))
        for colour, line in zip(colours, lines, strict=True):
            draw_measured(ax, line.steps, line.median, line.label, color=colour, lw=1.3, ms=3)
        ax.set_title(label, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6.5, loc="lower left")
    fig.suptitle(f"log10 {probe} while training (darker: earlier)", fontsize=10)
    fig.tight_layout()
    return fig


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
