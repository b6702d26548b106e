"""Sweeps: expand a grid (or a preset, or a TOML file) into runs, execute them with an executor
(``gradscope.executors``: local processes or Ray), and stream every finished run into the
store, which only this process writes.

A sweep's runs are RunConfigs. Axes that make no sense for a cell collapse instead of failing:
an LSTM or GRU ignores the activation axis, a vanilla RNN the gate options; each collapse is
reported once as a note, and the duplicates it makes are dropped.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from .batched import group_seeds
from .cells import CELLS
from .config import MAX_SEEDS, RunConfig, is_count
from .errors import ConfigError
from .executors import Executor, Outcome
from .model import idle_options
from .registry import Registry
from .store import Store, run_id

RUN_FIELDS = {f.name for f in fields(RunConfig)}
_DEFAULTS = RunConfig()


@dataclass(frozen=True)
class SweepSpec:
    runs: tuple[RunConfig, ...]  # every run, seeds included, in order
    notes: tuple[str, ...] = ()  # combinations that were skipped or collapsed, in words


def normalise(config: RunConfig) -> tuple[RunConfig, list[str]]:
    """Drop options that do not apply to the cell (or to its gate scheme); say what was
    dropped."""
    gated = CELLS.get(config.cell).keep_gate is not None
    notes = []
    if not gated and config.activation is None:
        config = config.replace(activation="tanh")  # the default, named: one run, one id
    if gated and config.activation is not None:
        config = config.replace(activation=None)
        notes.append(f"--activation does not apply to {config.cell}: ran it once without")
    if not gated and (config.forget_bias is not None or config.gate_init != "none"):
        config = config.replace(forget_bias=None, gate_init="none")
        notes.append("gate options (--forget-bias, --gate-init) do not apply to rnn: ran it "
                     "without")
    for idle in idle_options(config):
        config = config.replace(**{idle.field: getattr(_DEFAULTS, idle.field)})
        notes.append(idle.note())
    return config, notes


def expand(base: RunConfig, grid: dict[str, list], seeds: Iterable[int],
           extra: Iterable[dict] = (), overrides: dict[str, list] | None = None) -> SweepSpec:
    """The product of ``grid`` axes over ``base`` (plus explicit ``extra`` runs), crossed with
    the product of ``overrides`` (which win), per seed."""
    combos = _product(grid) if grid else []
    combos += list(extra)
    if overrides:
        combos = [{**c, **o} for c in combos for o in _product(overrides)]
    runs: dict[str, RunConfig] = {}
    notes: dict[str, None] = {}
    for combo in combos:
        for seed in seeds:
            config = _config(base, {**combo, "seed": seed})
            if config.forget_bias is not None and config.gate_init != "none":
                notes["--forget-bias with --gate-init chrono: skipped (both set the bias)"] = None
                continue
            config, said = normalise(config)
            notes.update(dict.fromkeys(said))
            runs.setdefault(run_id(config), config)
    if not runs:
        raise ConfigError("the sweep has no runs")
    return SweepSpec(tuple(runs.values()), tuple(notes))


def _product(axes: dict[str, list]) -> list[dict]:
    for name in axes:
        if name not in RUN_FIELDS or name == "seed":
            raise ConfigError(f"unknown sweep axis {name!r}; allowed: "
                              + ", ".join(sorted(RUN_FIELDS - {'seed'})))
    names = list(axes)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(axes[n] for n in names))]


def _config(base: RunConfig, changes: dict) -> RunConfig:
    try:
        return base.replace(**changes)
    except TypeError as e:  # a value of the wrong type deep in validation
        raise ConfigError(f"bad value among {changes}: {e}") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def from_mapping(data: dict, source: str, *, overrides: dict[str, list] | None = None,
                 seeds: int | None = None) -> SweepSpec:
    """A sweep from TOML-shaped data: ``seeds`` (a count), ``[base]`` options for every run,
    ``[grid]`` axes (lists), and ``[[runs]]`` tables of explicit runs (added to the grid).

    ``overrides`` (the command line's options, each a list of values) come last: every run is
    crossed with their product and takes their values. ``seeds`` replaces the data's count.
    """
    allowed = {"seeds", "base", "grid", "runs", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: "
                          + ", ".join(sorted(allowed)))
    if seeds is None:
        seeds = data.get("seeds", 1)
        if not is_count(seeds, 1):
            raise ConfigError(f"{source}: seeds must be a positive integer, got {seeds!r}")
    elif not is_count(seeds, 1):
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    try:
        return _expand_data(data, source, seeds, overrides)
    except ConfigError as e:
        if overrides:  # the file or preset alone: is the fault its own, or the flags'?
            try:
                _expand_data(data, source, seeds, None)
            except ConfigError:
                pass
            else:
                raise  # the flags' values (each names its flag), or with the file's
        raise ConfigError(f"{source}: {e}") from None


def _expand_data(data: dict, source: str, seeds: int,
                 overrides: dict[str, list] | None) -> SweepSpec:
    base, axes, runs = _table(data, "base", source), _table(data, "grid", source), \
        data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ConfigError(f"runs must be tables of options ([[runs]]), got {runs!r}")
    for name, tables in (("base", [base]), ("grid", [axes]), ("runs", runs)):
        if any("seed" in table for table in tables):  # each seed of the sweep would replace it
            raise ConfigError(f"{name} sets seed, but a sweep's runs take the seeds 0 to N-1 "
                              "of `seeds = N` (--seeds); leave seed out (one seed of your "
                              "own: gradscope run --seed S)")
    base = _config(RunConfig(), {_key(k): v for k, v in base.items()})
    grid = {}
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k} must be a non-empty list, got {v!r}")
        grid[_key(k)] = v
    runs = [{_key(k): v for k, v in run.items()} for run in runs]
    if not grid and not runs:
        runs = [{}]
    return expand(base, grid, range(seeds), runs, overrides or {})


def _table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table of options, got {value!r}")
    return value


def load_toml(path: Path) -> dict:
    """The data of a TOML sweep file (see ``from_mapping``)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


# --- presets ----------------------------------------------------------------------------------

PRESETS: Registry[dict] = Registry("preset", "--preset")

PRESETS.add("smoke", {
    "description": "seconds: three tiny configurations, for CI",
    "seeds": 1,
    "base": {"task": "adding", "seq_len": 20, "hidden": 8, "batch": 8, "steps": 10,
             "profile_every": 5, "dtype": "float32"},
    "runs": [{"cell": "rnn", "activation": "tanh", "init": "pytorch"},
             {"cell": "rnn", "activation": "relu", "init": "identity"},
             {"cell": "lstm", "forget_bias": 1.0}],
}, "seconds: three tiny configurations, trained 10 steps (for CI)")

_LECTURE = [
    # 1. activation functions, PyTorch's default initialisation
    *({"cell": "rnn", "activation": a, "init": "pytorch"}
      for a in ("sigmoid", "tanh", "relu", "linear")),
    # 2. initialisation: orthogonal and identity against the default
    {"cell": "rnn", "activation": "tanh", "init": "orthogonal"},
    {"cell": "rnn", "activation": "tanh", "init": "identity"},
    {"cell": "rnn", "activation": "relu", "init": "identity"},  # the IRNN
    # 3. gated cells
    {"cell": "lstm", "init": "pytorch"},
    {"cell": "lstm", "init": "pytorch", "forget_bias": 3.0},
    {"cell": "lstm", "init": "pytorch", "gate_init": "chrono"},
    {"cell": "gru", "init": "pytorch"},
]

PRESETS.add("standard", {
    "description": "minutes on 2 cores: the lecture's three comparisons, trained briefly",
    "seeds": 3,
    "base": {"task": "adding", "seq_len": 100, "hidden": 32, "batch": 32, "steps": 300,
             "lr": 0.01, "profile_every": 100, "dtype": "float32"},
    "runs": _LECTURE,
}, "minutes on 2 cores: activations, initialisations, gated cells; 3 seeds, 300 steps")

PRESETS.add("full", {
    "description": "hours: every cell x activation x initialisation, 5 seeds, 2000 steps",
    "seeds": 5,
    "base": {"task": "adding", "seq_len": 200, "hidden": 64, "batch": 32, "steps": 2000,
             "lr": 0.001, "profile_every": 250},
    "grid": {"cell": ["rnn", "lstm", "gru"],
             "activation": ["tanh", "relu", "sigmoid", "linear"],
             "init": ["pytorch", "xavier-uniform", "kaiming", "orthogonal", "identity",
                      "normal"]},
    "runs": [{"cell": "lstm", "forget_bias": 1.0}, {"cell": "lstm", "forget_bias": 3.0},
             {"cell": "lstm", "gate_init": "chrono"}, {"cell": "gru", "gate_init": "chrono"}],
}, "hours: every cell x activation x initialisation, 5 seeds, 2000 steps")


def preset(name: str, **options) -> SweepSpec:
    return from_mapping(PRESETS.get(name), f"preset {name}", **options)


# --- the sweep --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepReport:
    total: int  # runs in the sweep
    skipped: int  # already finished in the store (a resumed sweep)
    finished: int  # finished now
    failed: list[tuple[RunConfig, str]]  # failed now, with the reason


def run_sweep(spec: SweepSpec, store: Store, executor: Executor, *, command: str,
              meta: dict, on_progress: Callable[[Outcome, int, int], None] = lambda *a: None,
              stack_seeds: int = MAX_SEEDS) -> SweepReport:
    """Run every configuration not yet finished in ``store``; write each as it arrives.

    Configurations that differ only in their seed run as seed stacks of up to ``stack_seeds``
    (gradscope.batched; 1: one by one), with the same results. ``on_progress(outcome, done,
    todo)`` runs after each run is stored. The caller checks the configurations first
    (``runner.check_config``), before the store exists.
    """
    done_before = store.finished_ids()
    todo = [c for c in spec.runs if run_id(c) not in done_before]
    store.add_sweep(_utc_now(), command, meta)
    failed: list[tuple[RunConfig, str]] = []
    finished = 0
    for outcome in executor.run(group_seeds(todo, max(1, stack_seeds))):
        store.add(outcome.config, outcome.result, error=outcome.error,
                  duration_s=outcome.duration_s, finished_utc=_utc_now())
        if outcome.result is None:
            failed.append((outcome.config, outcome.error or "unknown error"))
        else:
            finished += 1
        on_progress(outcome, finished + len(failed), len(todo))
    return SweepReport(len(spec.runs), len(spec.runs) - len(todo), finished, failed)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
