"""The comparative vanishing-gradient report: ``DIR/report/index.html`` and one PNG per figure.

Built in three steps, data first: ``data.build`` (store -> plain data), ``figures`` (data ->
figures), ``html.render`` (one template). Every file is written to a temporary name and renamed,
so a failure never leaves a half-written report in place of a good one.
"""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write, atomic_write_text, ensure_writable_dir
from ..store import Store
from . import figures
from .data import ReportData, build, report_probe
from .html import render

__all__ = ["ReportData", "build", "report_probe", "write_report"]


def write_report(folder: str | Path, *, probe: str | None = None, title: str | None = None
                 ) -> Path:
    """Write ``folder/report/index.html`` (self-contained) and a PNG per figure beside it, from
    the results store in ``folder``; returns the path of index.html. ``probe``: the one the
    comparisons, heatmap and ranking show (default: grad_h0, else the first measured).

    >>> write_report("reports")
    PosixPath('reports/report/index.html')
    """
    folder = Path(folder)
    with Store(folder, create=False) as store:
        data = build(store, probe)
    images = _images(data)
    out = ensure_writable_dir(folder / "report", "report folder")
    for name, png in images.items():
        atomic_write(out / name, lambda tmp, png=png: tmp.write_bytes(png))
    index = out / "index.html"
    atomic_write_text(index, render(data, images, title or f"gradscope report: {folder.name}"))
    return index


def _images(data: ReportData) -> dict[str, bytes]:
    images = {f"compare-{c.key}.png": figures.png(figures.comparison(c))
              for c in data.comparisons}
    if data.heatmap_labels:
        images["heatmap.png"] = figures.png(
            figures.heatmap(data.heatmap_labels, data.heatmap, data.probe, data.heatmap_first))
    if data.curves:
        images["training-curves.png"] = figures.png(figures.training_curves(data.curves))
    if data.over_training:
        images["over-training.png"] = figures.png(
            figures.over_training(data.over_training, data.probe))
    return images
