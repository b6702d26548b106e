"""The report as plain data, built from a results store before anything is drawn.

Runs that differ only by seed form a *configuration*; every figure shows configurations, with
seeds aggregated as the median and the min-max band (in log10).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..config import describe
from ..errors import ConfigError
from ..store import Store
from ..summary import half_life_of

# Options that name a configuration, in the order a label shows them.
NAMING = ("cell", "activation", "init", "gain", "forget_bias", "gate_init", "input_init")
CONTEXT = ("task", "seq_len", "hidden", "batch", "steps", "optimizer", "lr", "clip", "dtype")


@dataclass(frozen=True)
class Line:
    """One configuration's profile (or curve) over its seeds."""

    label: str
    steps: np.ndarray  # x values
    median: np.ndarray  # log10 (or loss), NaN where no seed has a finite value
    low: np.ndarray
    high: np.ndarray
    seeds: int
    theory_slope: float | None = None  # the Lyapunov prediction (log10 per step), median


@dataclass(frozen=True)
class Comparison:
    key: str  # activations | initialisations | gated | cell-state
    title: str
    probe: str
    fixed: str  # what the lines share, in words
    lines: list[Line]
    missing: list[str] = field(default_factory=list)  # configurations without ``probe``

    def shown(self) -> bool:
        """Whether it compares anything: two lines (the cell-state path: one)."""
        return len(self.lines) >= (1 if self.key == "cell-state" else 2)


@dataclass(frozen=True)
class Row:
    """One configuration in the ranking table: medians over seeds; half-life from the median
    slope."""

    label: str
    seeds: int
    slope: float | None
    half_life: float | None
    horizon: float | None  # inf: never reached within the profile
    verdict: str  # the most common verdict over seeds
    final_loss: float | None
    chance_loss: float | None
    learned: str  # "k/n" seeds learned, or "-" when not trained
    accuracy: float | None


@dataclass(frozen=True)
class TheoryRow:
    """One prediction for one configuration: medians over seeds."""

    label: str
    prediction: str  # lyapunov | mean-field | gate-product
    probe: str
    predicted: float | None  # slope, log10 per step
    measured: float | None
    agrees: str  # "k/n" seeds whose prediction agreed within the margin
    caveats: str


@dataclass(frozen=True)
class ReportData:
    probe: str  # the probe the comparisons and ranking use
    comparisons: list[Comparison]
    heatmap_labels: list[str]
    heatmap: np.ndarray  # (configurations, steps) median log10 of ``probe``
    ranking: list[Row]
    curves: list[Line]  # training loss / chance, per configuration
    over_training: dict[str, list[Line]]  # label -> one line per training step measured
    failed: list[tuple[str, str]]  # (configuration, error) for runs that failed
    skipped: list[Comparison] = field(default_factory=list)  # too few lines with the probe
    meta: dict = field(default_factory=dict)
    theory: list[TheoryRow] = field(default_factory=list)
    heatmap_first: int = 1  # the step of the heatmap's first column (the adjoint's k: 0)


class _Labelled(NamedTuple):
    runs: pd.DataFrame  # every run, failed ones too
    ok: pd.DataFrame  # the finished runs, with a "label" column
    varying: list[str]  # the CONTEXT options whose values differ between runs
    groups: dict[str, pd.DataFrame]  # label -> its runs (a configuration's seeds)
    summaries: pd.DataFrame


DEFAULT_PROBE = "grad_h0"


def report_probe(store: Store, probe: str | None = None) -> str:
    """The probe a report of ``store`` shows: ``probe``, which some run must have measured;
    by default grad_h0, or where no run measured it (a sweep of ``probes = ["adjoint"]``),
    the first by name of those measured."""
    measured = store.probes()
    if probe is None:
        return DEFAULT_PROBE if DEFAULT_PROBE in measured or not measured else measured[0]
    if measured and probe not in measured:  # a typo would otherwise replace a report by a blank
        raise ConfigError(f"no run in {store.path.parent} measured probe {probe!r} for --probe; "
                          "choose from: " + ", ".join(measured))
    return probe


def _labelled(store: Store) -> _Labelled:
    """The store's runs named by configuration: what the ranking and the rest of the report
    start from."""
    summaries = store.summaries()
    runs = store.runs()
    ok = runs[runs.status == "ok"].copy()
    configs = [json.loads(c) for c in ok.config]
    varying = [k for k in CONTEXT if len({json.dumps(c.get(k)) for c in configs}) > 1]
    ok["label"] = [describe(c, varying) for c in configs]
    groups = {label: frame for label, frame in ok.groupby("label", sort=False)}
    return _Labelled(runs, ok, varying, groups, summaries)


def ranking(store: Store, probe: str | None = None) -> list[Row]:
    """The report's ranking alone (``build(...).ranking``), without reading any profile;
    ``probe``: see ``report_probe``."""
    probe = report_probe(store, probe)
    labelled = _labelled(store)
    return _ranking(labelled.ok, labelled.summaries, probe, labelled.groups)


def build(store: Store, probe: str | None = None) -> ReportData:
    """Everything the report shows, as plain data; ``probe``: see ``report_probe``."""
    probe = report_probe(store, probe)
    runs, ok, varying, groups, summaries = _labelled(store)
    profiles = _profiles(store, set(ok.run_id))

    theories = {rid: json.loads(t) for rid, t in zip(ok.run_id, ok.theory, strict=True)
                if isinstance(t, str) and t != "null"}

    def line(label: str, which: str, step: int = 0) -> Line | None:
        found = [profiles.get((rid, step, which)) for rid in groups[label].run_id]
        found = [f for f in found if f is not None]
        if not found:
            return None
        first, arrays = found[0][0], [values for _, values in found]  # one axis per probe
        slopes = [theories[rid]["lyapunov"][0] / np.log(10) for rid in groups[label].run_id
                  if rid in theories and theories[rid]["lyapunov"][0] is not None]
        theory = float(np.median(slopes)) if slopes and step == 0 else None
        return _with_theory(_aggregate(label, arrays, first), theory)

    comparisons = _comparisons(ok, probe, line)
    order = _ranking(ok, summaries, probe, groups)
    heat_lines = [line(row.label, probe) for row in order]
    heat_labels = [row.label for row, hl in zip(order, heat_lines, strict=True) if hl]
    heat_lines = [hl for hl in heat_lines if hl]
    width = max((len(hl.median) for hl in heat_lines), default=0)
    heatmap = np.full((len(heat_lines), width), np.nan)
    for i, hl in enumerate(heat_lines):
        heatmap[i, : len(hl.median)] = hl.median

    curves = store.curves()
    curve_lines = []
    for label, frame in groups.items():
        per_run = []
        for rid, chance in zip(frame.run_id, frame.chance_loss, strict=True):
            losses = curves[curves.run_id == rid].loss.to_numpy(dtype=float)
            if len(losses):
                per_run.append(_smooth(losses / chance))
        if per_run:
            curve_lines.append(_aggregate(label, per_run, first=1, log=False))

    over_training = {}
    for label, frame in groups.items():
        steps = sorted({s for (rid, s, p) in profiles if p == probe and rid in set(frame.run_id)})
        if len(steps) > 1:
            over_training[label] = [
                _relabel(line(label, probe, s), f"after {s} steps") for s in steps]

    failed = [(describe(json.loads(r.config), varying) + f" seed {r.seed:g}", r.error or "")
              for r in runs[runs.status != "ok"].itertuples()]
    return ReportData(probe, [c for c in comparisons if c.shown()], heat_labels, heatmap, order,
                      curve_lines, over_training, failed,
                      [c for c in comparisons if not c.shown()], _meta(store, runs),
                      _theory_rows(groups, theories),
                      int(heat_lines[0].steps[0]) if heat_lines else 1)


def _theory_rows(groups: dict, theories: dict[str, dict]) -> list[TheoryRow]:
    rows = []
    for label, frame in groups.items():
        found = [theories[rid] for rid in frame.run_id if rid in theories]
        if not found:
            continue
        for i, first in enumerate(found[0]["predictions"]):
            preds = [t["predictions"][i] for t in found if len(t["predictions"]) > i]
            verdicts = [p["agrees"] for p in preds if p["agrees"] is not None]
            rows.append(TheoryRow(
                label, first["name"], first["probe"],
                _median(pd.Series([p["predicted"] for p in preds], dtype=float)),
                _median(pd.Series([p["measured"] for p in preds], dtype=float)),
                f"{sum(verdicts)}/{len(verdicts)}" if verdicts else "-",
                "; ".join(first["caveats"])))  # the first seed's: others differ in digits
    return rows


def _with_theory(line: Line, theory: float | None) -> Line:
    return Line(line.label, line.steps, line.median, line.low, line.high, line.seeds, theory)


def _profiles(store: Store, run_ids: set[str]
              ) -> dict[tuple[str, int, str], tuple[int, np.ndarray]]:
    """(run, training step, probe) -> (the step of the profile's first value, log10)."""
    return {(rid, step, probe): (first, values)
            for rid, step, probe, _, first, values in store.profiles() if rid in run_ids}


def _aggregate(label: str, arrays: list[np.ndarray], first: int = 1, log: bool = True) -> Line:
    width = max(len(a) for a in arrays)
    stack = np.full((len(arrays), width), np.nan)
    for i, a in enumerate(arrays):
        stack[i, : len(a)] = a
    if log:  # exact zeros (-inf) sit below everything; NaN (not computed) is left out
        stack = np.where(np.isneginf(stack), np.nan, stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        median = np.nanmedian(stack, axis=0)
        low, high = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    return Line(label, np.arange(first, first + width), median, low, high, len(arrays))


def _smooth(values: np.ndarray) -> np.ndarray:
    """A trailing moving average over about 2% of the curve: minibatch noise out, trend in."""
    window = max(1, len(values) // 50)
    if window == 1:
        return values
    series = pd.Series(values)
    return series.rolling(window, min_periods=1).mean().to_numpy()


def _relabel(line: Line, label: str) -> Line:
    return Line(label, line.steps, line.median, line.low, line.high, line.seeds)


def _comparisons(ok: pd.DataFrame, probe: str, line) -> list[Comparison]:
    rnn = ok[ok.cell == "rnn"]
    inits = Counter(rnn.drop_duplicates("label").init)
    ref_init = "pytorch" if inits.get("pytorch", 0) == max(inits.values(), default=0) \
        else (inits.most_common(1)[0][0] if inits else None)
    labels = lambda frame: list(dict.fromkeys(frame.label))  # noqa: E731 (ordered, unique)

    activations = rnn[rnn.init == ref_init]
    per_activation = rnn.drop_duplicates("label").groupby("activation").init.nunique()
    several = set(per_activation[per_activation >= 2].index)
    inits_frame = rnn[rnn.activation.isin(several)]
    ref_act = "tanh" if "tanh" in set(activations.activation) else \
        (activations.activation.mode().iat[0] if len(activations) else None)
    gated = pd.concat([activations[activations.activation == ref_act], ok[ok.cell != "rnn"]])
    lstm = ok[ok.cell == "lstm"]

    def comparison(key, title, which, fixed, frame):
        drawn = {label: line(label, which) for label in labels(frame)}
        return Comparison(key, title, which, fixed, [x for x in drawn.values() if x],
                          [label for label, x in drawn.items() if x is None])

    result = []
    if activations.label.nunique() >= 2:
        result.append(comparison("activations", "Activation functions", probe,
                                 f"vanilla RNN, initialisation {ref_init}", activations))
    if inits_frame.label.nunique() >= 2:
        result.append(comparison("initialisations", "Initialisations", probe,
                                 "vanilla RNN, per activation", inits_frame))
    if ok[ok.cell != "rnn"].label.nunique() >= 1 and gated.label.nunique() >= 2:
        c = comparison("gated", "Gated cells", probe,
                       f"against the rnn/{ref_act} {ref_init} baseline", gated)
        if set(labels(gated[gated.cell == "rnn"])) <= set(c.missing):  # no baseline drawn
            c = replace(c, fixed=f"gated cells alone: the vanilla RNN has no {probe}")
        result.append(c)
    if lstm.label.nunique() >= 1:
        result.append(comparison("cell-state", "LSTM cell-state path", "jacobian_c",
                                 "||dc_t/dc_0||: where the LSTM keeps its memory", lstm))
    return result


def _ranking(ok: pd.DataFrame, summaries: pd.DataFrame, probe: str, groups) -> list[Row]:
    initial = summaries[(summaries.train_step == 0) & (summaries.probe == probe)]
    rows = []
    for label, frame in groups.items():
        s = initial[initial.run_id.isin(frame.run_id)]
        if s.empty:
            continue
        trained = frame[frame.steps_done.notna()]
        slope = _median(s.slope)
        rows.append(Row(
            label=label, seeds=len(frame),
            slope=slope, half_life=half_life_of(slope),
            horizon=_median(s.horizon.fillna(np.inf)),  # never reached counts as infinite
            verdict=Counter(s.verdict).most_common(1)[0][0],
            final_loss=_median(trained.final_loss) if len(trained) else None,
            chance_loss=_median(frame.chance_loss),
            learned=f"{int(trained.learned.sum())}/{len(trained)}" if len(trained) else "-",
            accuracy=_median(trained.accuracy) if len(trained) else None,
        ))
    # best first: the slowest decay (largest slope); runs with no slope last
    return sorted(rows, key=lambda r: -np.inf if r.slope is None else r.slope, reverse=True)


def _median(series: pd.Series) -> float | None:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.median()) if len(values) else None


def _meta(store: Store, runs: pd.DataFrame) -> dict:
    sweeps = store.sweeps()
    metas = [json.loads(m) for m in runs.meta.dropna()]
    first = metas[0] if metas else {}
    return {
        "runs": int(len(runs)),
        "finished": int((runs.status == "ok").sum()),
        "failed": int((runs.status != "ok").sum()),
        "commands": list(dict.fromkeys(sweeps.command)) if len(sweeps) else [],
        "sweep_started_utc": sweeps.started_utc.min() if len(sweeps) else None,
        "last_run_utc": runs.finished_utc.max() if len(runs) else None,
        "gradscope": first.get("gradscope"),
        "torch": first.get("torch"),
        "python": first.get("python"),
        "device": first.get("device_name") or first.get("device"),
        "dtype": sorted({m.get("dtype") for m in metas}) if metas else [],
    }
