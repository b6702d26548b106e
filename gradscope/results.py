"""Run results as tidy, versioned data: ``result.json`` (schema ``gradscope.run/1``) and pandas.

result.json layout::

    {"schema": "gradscope.run/1",
     "config": {...RunConfig...},
     "task": {"name", "variant", "seq_len", "chance_loss"},
     "profiles": {"<probe>": {"axis": "t" | "k", "first_step": 1 | 0, "log10": [...]}},
     "summary": {"<probe>": {"slope", "half_life", "horizon", "verdict", "start", "end"}},
     "nonfinite": null | {"step": t, "where": "state" | "tangent"},
     "meta": {"gradscope", "torch", "python", "device", "dtype", "time_utc", "command"}}

In ``log10`` lists, null stands for a value that is not a finite number: exactly zero (the
profile's true log10 is -inf) or, at and after ``nonfinite.step``, not computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig
from .files import atomic_write_text
from .summary import Summary

SCHEMA = "gradscope.run/1"
FIRST_STEP = {"t": 1, "k": 0}  # axis -> the step of the first value


@dataclass(frozen=True)
class RunResult:
    config: RunConfig
    task: dict  # name, variant, seq_len (steps actually run), chance_loss
    profiles: dict[str, np.ndarray]  # probe -> (T,) log10 magnitudes; -inf zero, NaN not computed
    axes: dict[str, str]  # probe -> "t" (steps after h_0) or "k" (steps back from T)
    summary: dict[str, Summary]
    nonfinite: dict | None  # {"step", "where"} when the forward pass left float range
    meta: dict

    def steps(self, probe: str) -> np.ndarray:
        first = FIRST_STEP[self.axes[probe]]
        return np.arange(first, first + len(self.profiles[probe]))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "config": self.config.to_dict(),
            "task": self.task,
            "profiles": {
                name: {
                    "axis": self.axes[name],
                    "first_step": FIRST_STEP[self.axes[name]],
                    "log10": [float(v) if math.isfinite(v) else None for v in values],
                }
                for name, values in self.profiles.items()
            },
            "summary": {name: s.to_dict() for name, s in self.summary.items()},
            "nonfinite": self.nonfinite,
            "meta": self.meta,
        }

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

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result (schema {d.get('schema')!r})")
        profiles = {
            name: np.array([np.nan if v is None else v for v in p["log10"]], dtype=np.float64)
            for name, p in d["profiles"].items()
        }
        return cls(
            config=RunConfig.from_dict(d["config"]),
            task=d["task"],
            profiles=profiles,
            axes={name: p["axis"] for name, p in d["profiles"].items()},
            summary={name: Summary(**s) for name, s in d["summary"].items()},
            nonfinite=d["nonfinite"],
            meta=d["meta"],
        )

    @classmethod
    def load(cls, path: Path) -> RunResult:
        """Read a result.json (or the folder that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "result.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
