"""Run results as tidy, versioned data: ``result.json`` (schema ``gradscope.run/1``) and pandas.

result.json layout::

    {"schema": "gradscope.run/1",
     "config": {...RunConfig...},
     "task": {"name", "variant", "seq_len", "chance_loss"},
     "profiles": {"<probe>": {"axis": "t" | "k", "first_step": 1 | 0, "log10": [...]}},
     "summary": {"<probe>": {"slope", "half_life", "horizon", "verdict", "start", "end"}},
     "nonfinite": null | {"step": t, "where": "state" | "tangent" | "underflow"},
     "training": null | {"steps_done", "diverged_at", "final_loss", "chance_loss", "accuracy",
                         "learned", "curve": [...], "snapshots": [{"step", "profiles",
                         "summary", "nonfinite"}, ...]},
     "theory": null | {"lyapunov", "spectral_radius", "sigma_max", "gamma", "pascanu_slope",
                       "pascanu_case", "bound_holds", "mean_field", "gate_mean",
                       "predictions": [{"name", "probe", "predicted", "measured", "agrees",
                                        "caveats"}]},
     "meta": {"gradscope", "torch", "python", "device", "dtype", "time_utc", "command"}}

A user's own module measured whole (``gradscope profile``, ``ModelProfile``) is saved with
schema ``gradscope.model/1``: ``model`` (the factory's import path or the module's repr),
``seq_len``, ``batch``, ``input_size``, ``seed``, ``projections``, and ``profiles``,
``summary``, ``nonfinite``, ``meta`` and ``theory`` (its ``lyapunov`` and ``predictions``
only) as above; ``load_result`` reads either.

``profiles`` and ``summary`` are measured at initialisation; with training, ``snapshots`` holds
the same measured after ``step`` training steps.

In ``log10`` lists, null stands for a value that is not a finite number: exactly zero (the
profile's true log10 is -inf) or, at and after ``nonfinite.step``, not computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd

from .config import RunConfig
from .files import atomic_write_text
from .summary import (
    SUMMARY_CAPTION,
    SUMMARY_COLUMNS,
    VERDICT_COLOURS,
    Summary,
    json_safe,
    left_range,
    summary_row,
)

SCHEMA = "gradscope.run/1"
MODEL_SCHEMA = "gradscope.model/1"  # a user's own module: ModelProfile
FIRST_STEP = {"t": 1, "k": 0}  # axis -> the step of the first value


def _log10_array(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _verdicts(summary: dict[str, Summary]) -> str:
    """Each probe's verdict and slope, for a line of text."""
    return ", ".join(
        name + f" {s.verdict}" + ("" if s.slope is None else f" ({s.slope:+.4f}/step)")
        for name, s in summary.items())


@dataclass(frozen=True, repr=False)
class Snapshot:
    """Profiles measured once, on the probe batch, after ``step`` training steps."""

    step: int  # training steps taken before this measurement (0: initialisation)
    profiles: dict[str, np.ndarray]  # probe -> (T,) log10; -inf exactly zero; NaN not computed
    summary: dict[str, Summary]
    nonfinite: dict | None  # {"step", "where"} when the forward pass left float range

    def __repr__(self) -> str:
        return f"<Snapshot at step {self.step}: {_verdicts(self.summary)}>"

    def to_dict(self) -> dict:
        return {"step": self.step,
                "profiles": {k: json_safe(v) for k, v in self.profiles.items()},
                "summary": {k: s.to_dict() for k, s in self.summary.items()},
                "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, d: dict) -> Snapshot:
        return cls(d["step"], {k: _log10_array(v) for k, v in d["profiles"].items()},
                   {k: Summary(**s) for k, s in d["summary"].items()}, d["nonfinite"])


@dataclass(frozen=True, repr=False)
class Training:
    """What BPTT training did: the loss curve, the outcome against chance, and snapshots."""

    curve: list[float]  # training loss after steps 1..steps_done
    steps_done: int
    diverged_at: int | None  # step whose loss or gradient was NaN/Inf; training stopped there
    final_loss: float | None  # held-out loss at the end; None when training diverged or
    # the trained model's held-out loss is not finite (its last update left float range)
    chance_loss: float
    accuracy: float | None  # held-out accuracy (classification tasks)
    learned: bool  # final_loss <= LEARNED_FRACTION (0.5) of chance_loss
    snapshots: list[Snapshot]  # profiles during training (steps > 0)

    def outcome(self) -> str:
        """What training came to, in one line."""
        if self.diverged_at is not None:
            return (f"training diverged at step {self.diverged_at} (loss or gradient not "
                    "finite)")
        trained = f"trained {self.steps_done} step{'' if self.steps_done == 1 else 's'}"
        if self.final_loss is None:  # every step's loss was finite, the trained model's is not
            return (f"{trained}: the held-out loss is not finite (the trained model's forward "
                    "pass left float range): not learned")
        accuracy = f", accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        return (f"{trained}: held-out loss {self.final_loss:.4g} against chance "
                f"{self.chance_loss:.4g}{accuracy}: {'learned' if self.learned else 'not learned'}")

    def __repr__(self) -> str:
        n = len(self.snapshots)
        return f"<Training {self.outcome()}; {n} snapshot{'' if n == 1 else 's'}>"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("steps_done", "diverged_at", "final_loss",
                                           "chance_loss", "accuracy", "learned")}
        d["curve"] = json_safe(self.curve)
        d["snapshots"] = [s.to_dict() for s in self.snapshots]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Training:
        return cls(curve=[math.nan if v is None else v for v in d["curve"]],
                   steps_done=d["steps_done"], diverged_at=d["diverged_at"],
                   final_loss=d["final_loss"], chance_loss=d["chance_loss"],
                   accuracy=d["accuracy"], learned=d["learned"],
                   snapshots=[Snapshot.from_dict(s) for s in d["snapshots"]])


class Profiled:
    """What a run's and a module's results share: per-step log10 profiles keyed by probe,
    each on its own axis (``profiles``, ``axes``)."""

    profiles: dict[str, np.ndarray]
    axes: dict[str, str]
    summary: dict[str, Summary]
    nonfinite: dict | None
    meta: dict  # versions, device, dtype, time, command

    def title(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict) -> Profiled:
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a result.json (or the folder that holds one) of this kind: a run's
        (``RunResult.load``) or a module's (``ModelProfile.load``)."""
        return cls.from_dict(_read(path))

    def range_note(self) -> str | None:
        """Where the measurement left float range, if it did."""
        if self.nonfinite is None:
            return None
        further = "; float64 reaches further" if self.meta.get("dtype") == "float32" else ""
        return f"{left_range(self.nonfinite)}; later steps are not computed{further}"

    def notes(self) -> list[str]:
        """What a summary table does not say, a line each."""
        return [note for note in (self.range_note(),) if note]

    def __repr__(self) -> str:
        """One line: what was measured and each probe's verdict and slope (the arrays are in
        ``profiles``)."""
        return f"<{type(self).__name__} {self.title()}: {_verdicts(self.summary)}>"

    def _repr_html_(self) -> str:
        """A notebook's view: the summary table, as ``gradscope run`` prints it, and its notes
        (``gradscope.plots.profile_figure`` draws the profiles)."""
        rows = "".join(
            "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells[:-1])
            + f'<td style="color: {VERDICT_COLOURS[cells[-1]]}">{cells[-1]}</td></tr>'
            for cells in (summary_row(name, s, self.profiles[name])
                          for name, s in self.summary.items()))
        head = "".join(f"<th>{column}</th>" for column in SUMMARY_COLUMNS)
        notes = "".join(f"<br>{escape(note)}" for note in self.notes())
        return (f"<div><b>{type(self).__name__}</b> {escape(self.title())}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
                f"<small>{SUMMARY_CAPTION}{notes}</small></div>")

    def steps(self, probe: str) -> np.ndarray:
        first = FIRST_STEP[self.axes[probe]]
        return np.arange(first, first + len(self.profiles[probe]))

    def profiles_dict(self) -> dict:
        return {name: {"axis": self.axes[name], "first_step": FIRST_STEP[self.axes[name]],
                       "log10": json_safe(values)}
                for name, values in self.profiles.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save_json(self, path: Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: probe, axis, step, log10 (NaN where not finite)."""
        frames = [
            pd.DataFrame({"probe": name, "axis": self.axes[name], "step": self.steps(name),
                          "log10": np.where(np.isfinite(v), v, np.nan)})
            for name, v in self.profiles.items()
        ]
        return pd.concat(frames, ignore_index=True)


def _profiles_from(d: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return ({name: _log10_array(p["log10"]) for name, p in d["profiles"].items()},
            {name: p["axis"] for name, p in d["profiles"].items()})


@dataclass(frozen=True, repr=False)
class RunResult(Profiled):
    """One built-in configuration measured (``gradscope.run``): each probe's per-step log10
    profile, its summary, the theory beside it and, with ``steps``, the training run.

    >>> r = gradscope.run(cell="lstm", forget_bias=3.0, seq_len=200)
    >>> r.summary["grad_h0"].slope, r.summary["grad_h0"].verdict   # log10 per step
    >>> r.to_frame()                      # tidy: probe, axis, step, log10
    >>> RunResult.load("runs/lstm-pytorch-adding-T200-s0/result.json")
    """

    config: RunConfig
    task: dict  # name, variant, seq_len (steps actually run), chance_loss
    profiles: dict[str, np.ndarray]  # probe -> (T,) log10 magnitudes; -inf zero, NaN not computed
    axes: dict[str, str]  # probe -> "t" (steps after h_0) or "k" (steps back from T)
    summary: dict[str, Summary]
    nonfinite: dict | None  # {"step", "where"} when the forward pass left float range
    meta: dict
    training: Training | None = None  # with --steps: the training run and its snapshots
    theory: dict | None = None  # gradscope.theory.Theory.to_dict() at initialisation

    @property
    def initial(self) -> Snapshot:
        """The measurement at initialisation, as a snapshot."""
        return Snapshot(0, self.profiles, self.summary, self.nonfinite)

    @property
    def snapshots(self) -> list[Snapshot]:
        """Every measurement: at initialisation, then during training."""
        return [self.initial, *(self.training.snapshots if self.training else [])]

    def label(self) -> str:
        """A short name for the run: 'rnn/tanh orthogonal task adding seq-len 300'."""
        return self.config.label(("task", "seq_len"))

    def title(self) -> str:
        """The run in one line, for a figure: 'lstm pytorch, task recall, H=64, T=300'."""
        c = self.config
        return f"{c.label()}, task {c.task}, H={c.hidden}, T={self.task['seq_len']}"

    def notes(self) -> list[str]:
        return ([self.training.outcome()] if self.training else []) + super().notes()

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "config": self.config.to_dict(),
            "task": self.task,
            "profiles": self.profiles_dict(),
            "summary": {name: s.to_dict() for name, s in self.summary.items()},
            "nonfinite": self.nonfinite,
            "training": None if self.training is None else self.training.to_dict(),
            "theory": self.theory,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result (schema {d.get('schema')!r})")
        profiles, axes = _profiles_from(d)
        return cls(
            config=RunConfig.from_dict(d["config"]),
            task=d["task"],
            profiles=profiles,
            axes=axes,
            summary={name: Summary(**s) for name, s in d["summary"].items()},
            nonfinite=d["nonfinite"],
            meta=d["meta"],
            training=None if d.get("training") is None else Training.from_dict(d["training"]),
            theory=d.get("theory"),
        )


@dataclass(frozen=True, repr=False)
class ModelProfile(Profiled):
    """A user's own module measured whole (``gradscope.profile``): every probe it offers,
    each deeper layer's initial state among them (``grad_h0@2``), on random N(0, 1) inputs
    with the loss a fixed random projection of the top layer's h (as `gradscope check`).

    >>> p = gradscope.profile(torch.nn.GRU(8, 32, num_layers=2), seq_len=300)
    >>> p.summary["grad_h0@2"].horizon    # steps until the second layer's h_0 fell 6 decades
    """

    model: str  # what was measured: the factory's import path, or the module's repr
    seq_len: int  # steps measured
    batch: int  # sequences measured
    input_size: int  # features per step of the random inputs
    seed: int  # seeds the inputs and the loss's projection
    profiles: dict[str, np.ndarray]  # probe -> (T,) log10; -inf exactly zero; NaN not computed
    axes: dict[str, str]  # probe -> "t" (steps after h_0) or "k" (steps back from T)
    summary: dict[str, Summary]
    nonfinite: dict | None  # {"step", "where"} when the forward pass left float range
    meta: dict  # versions, device, dtype, time, command, as a run's
    projections: int | None = None  # forward probes estimated from this many directions
    theory: dict | None = None  # theory.predict_module: Lyapunov exponents, their prediction

    def label(self) -> str:
        return f"{self.model}, seq-len {self.seq_len}"

    def title(self) -> str:
        return f"{self.model}, T={self.seq_len}, B={self.batch}"

    def to_dict(self) -> dict:
        return {"schema": MODEL_SCHEMA,
                **{k: getattr(self, k) for k in ("model", "seq_len", "batch", "input_size",
                                                  "seed", "projections")},
                "profiles": self.profiles_dict(),
                "summary": {name: s.to_dict() for name, s in self.summary.items()},
                "nonfinite": self.nonfinite, "theory": self.theory, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> ModelProfile:
        if d.get("schema") != MODEL_SCHEMA:
            raise ValueError(f"not a {MODEL_SCHEMA} result (schema {d.get('schema')!r})")
        profiles, axes = _profiles_from(d)
        return cls(**{k: d[k] for k in ("model", "seq_len", "batch", "input_size", "seed",
                                        "projections", "nonfinite", "theory", "meta")},
                   profiles=profiles, axes=axes,
                   summary={name: Summary(**s) for name, s in d["summary"].items()})


def load_result(path: Path) -> RunResult | ModelProfile:
    """A saved result.json (or its folder), of a run or of a user's module, by its schema."""
    d = _read(path)
    kinds = {SCHEMA: RunResult, MODEL_SCHEMA: ModelProfile}
    if d.get("schema") not in kinds:
        raise ValueError(f"not a gradscope result (schema {d.get('schema')!r})")
    return kinds[d["schema"]].from_dict(d)


def _read(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    return json.loads(path.read_text(encoding="utf-8"))
