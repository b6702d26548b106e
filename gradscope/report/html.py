"""The report's one HTML template. Self-contained: CSS inline, figures as data: URIs, no
script, nothing fetched. Every string that came from a user goes through ``escape``."""

from __future__ import annotations

import base64
from html import escape

from ..summary import VERDICT_COLOURS, half_life_text
from .data import Comparison, ReportData, Row

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 19px; margin-top: 34px;
  border-bottom: 1px solid #e3e6ea; padding-bottom: 4px; }
p.lead { color: #4b5565; margin-top: 0; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eceff3; }
figcaption { font-size: 13px; color: #4b5565; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 10px 0; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eceff3; }
th { background: #f1f3f6; font-weight: 600; } td.num { text-align: right;
  font-variant-numeric: tabular-nums; }
nav a { margin-right: 14px; font-size: 14px; } code { background: #f1f3f6; padding: 1px 4px; }
.muted { color: #6b7280; font-size: 13px; }
""" + "".join(f".{verdict} {{ color: {colour}; font-weight: 600; }}\n"
              for verdict, colour in VERDICT_COLOURS.items())

CAPTIONS = {
    "activations": "Same matrix initialisation, different nonlinearities: the steeper the line, "
                   "the faster the gradient vanishes (sigmoid's derivative is at most 1/4).",
    "initialisations": "Same cell, different recurrent matrices: orthogonal and identity (IRNN) "
                       "matrices keep the gradient's magnitude far longer than a random one.",
    "gated": "Gates give the gradient an additive path: LSTM and GRU against a vanilla RNN.",
    "cell-state": "The LSTM's cell-state Jacobian: a raised forget-gate bias (or chrono) keeps "
                  "f close to 1, so the cell state carries the gradient across many steps.",
}


def _num(v: float | None, spec: str) -> str:
    return "&ndash;" if v is None else escape(format(v, spec))


def _dash(text: str) -> str:
    return "&ndash;" if text == "-" else escape(text)


def _img(name: str, data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}" '
            f'data-file="{escape(name)}">')


def _missing(c: Comparison) -> str:
    """The configurations of a comparison that have no profile of its probe, escaped."""
    return escape(", ".join(c.missing))


def _ranking_rows(rows: list[Row]) -> str:
    out = []
    for r in rows:
        loss = "&ndash;" if r.final_loss is None else (
            f"{r.final_loss:.4g} / {r.chance_loss:.4g}" if r.chance_loss else f"{r.final_loss:.4g}")
        out.append(
            f"<tr><td>{escape(r.label)}</td><td class=num>{r.seeds}</td>"
            f"<td class=num>{_num(r.slope, '+.4f')}</td>"
            f"<td class=num>{_dash(half_life_text(r.half_life, r.slope))}</td>"
            f"<td class=num>{'never' if r.horizon == float('inf') else _num(r.horizon, '.0f')}"
            "</td>"
            f"<td class={escape(r.verdict)}>{escape(r.verdict)}</td>"
            f"<td class=num>{loss}</td><td class=num>{_dash(r.learned)}</td>"
            f"<td class=num>{_num(r.accuracy, '.3f')}</td></tr>")
    return "\n".join(out)


def render(data: ReportData, images: dict[str, bytes], title: str) -> str:
    """The whole page; ``images`` maps figure file names to PNG bytes."""
    sections = []
    for c in data.comparisons:
        name = f"compare-{c.key}.png"
        sections.append(
            f'<section id="{escape(c.key)}"><h2>{escape(c.title)}</h2><figure>'
            f"{_img(name, images[name], c.title)}<figcaption>{escape(CAPTIONS.get(c.key, ''))}"
            f" Lines: median over seeds; bands: min&ndash;max. {escape(c.fixed)}."
            + (f" Not drawn, with no {escape(c.probe)}: {_missing(c)}." if c.missing else "")
            + "</figcaption></figure></section>")
    if data.skipped:
        sections.insert(0, "<p class=muted>Not drawn: " + "; ".join(
            f"{escape(c.title)}, too few of its configurations measured "
            f"<code>{escape(c.probe)}</code>" + (f" (not: {_missing(c)})" if c.missing else "")
            for c in data.skipped)
            + ".</p>")
    elif not data.comparisons:
        sections.append("<p class=muted>No comparison applies: the sweep varied neither the "
                        "activation, the initialisation, nor the cell.</p>")
    ranking = (
        '<section id="ranking"><h2>Ranking</h2>'
        f"<p class=muted>Best first by slope of <code>{escape(data.probe)}</code> at "
        "initialisation (log10 per step; half-life and horizon in steps; horizon: where the "
        "profile has fallen 6 decades, never: not within the sequence). Trained loss is the "
        "held-out loss against the task's chance-level loss; learned = below half of chance."
        "</p><table><thead><tr><th>configuration</th><th>seeds</th><th>slope</th>"
        "<th>half-life</th><th>horizon</th><th>verdict</th><th>trained loss / chance</th>"
        "<th>learned</th><th>accuracy</th></tr></thead><tbody>"
        f"{_ranking_rows(data.ranking)}</tbody></table></section>")
    theory = ""
    if data.theory:
        rows = "".join(
            f"<tr><td>{escape(t.label)}</td><td>{escape(t.prediction)}</td>"
            f"<td>{escape(t.probe)}</td><td class=num>{_num(t.predicted, '+.4f')}</td>"
            f"<td class=num>{_num(t.measured, '+.4f')}</td><td class=num>{escape(t.agrees)}</td>"
            f"<td class=muted>{escape(t.caveats)}</td></tr>" for t in data.theory)
        theory = (
            '<section id="theory"><h2>Theory vs measurement</h2><p class=muted>Predicted and '
            "measured slopes at initialisation (log10 per step, medians over seeds). Lyapunov: "
            "the largest exponent of the forward dynamics over ln 10; mean field: 1/2 log10 chi; "
            "gate product: mean log10 of the keep gate. Agrees: seeds within 0.02 + 25% of the "
            "measured slope. A disagreement is a diagnostic: chaos, saturation, or an "
            "initialisation that is not what it claims to be.</p><table><thead><tr>"
            "<th>configuration</th><th>prediction</th><th>probe</th><th>predicted</th>"
            "<th>measured</th><th>agrees</th><th>caveats</th></tr></thead><tbody>"
            f"{rows}</tbody></table></section>")
    extra = []
    for key, heading, caption in (
        ("heatmap.png", "Heatmap", "Every configuration against every step."),
        ("training-curves.png", "Training curves", "Loss relative to chance, median over "
                                                   "seeds."),
        ("over-training.png", "Gradient flow while training",
         "How each configuration's profile changes as the model learns."),
    ):
        if key in images:
            anchor = key.removesuffix(".png")
            extra.append(f'<section id="{anchor}"><h2>{heading}</h2><figure>'
                         f"{_img(key, images[key], heading)}<figcaption>{caption}</figcaption>"
                         "</figure></section>")
    failed = ""
    if data.failed:
        items = "".join(f"<li>{escape(label)}: <code>{escape(error)}</code></li>"
                        for label, error in data.failed)
        failed = f'<section id="failed"><h2>Failed runs</h2><ul>{items}</ul></section>'
    meta_rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(_meta_value(v))}</td></tr>"
        for k, v in data.meta.items())
    nav = " ".join(f'<a href="#{escape(c.key)}">{escape(c.title)}</a>'
                   for c in data.comparisons)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<p class="lead">How the gradient with respect to the initial state vanishes or explodes with
time distance, measured exactly per step (log10, no float floor), for the three remedies:
activation functions, initialisation and gated cells.</p>
<nav>{nav} <a href="#ranking">Ranking</a>{' <a href="#theory">Theory</a>' if theory else ''}
<a href="#metadata">Metadata</a></nav>
{''.join(sections)}
{ranking}
{theory}
{''.join(extra)}
{failed}
<section id="metadata"><h2>Metadata</h2><table>{meta_rows}</table></section>
</main></body></html>
"""


def _meta_value(v) -> str:
    if isinstance(v, list):
        return "; ".join(str(x) for x in v) or "-"
    return "-" if v is None else str(v)
