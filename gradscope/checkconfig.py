"""Configuration of `gradscope check`: ``[tool.gradscope]`` in pyproject.toml or a
gradscope.toml, one table per named check, with the precedence defaults < file < flags.

No torch here. Every error names the file, the check and the key.

    [tool.gradscope]
    baseline = "gradscope-baseline.json"   # where --update-baseline writes (default shown)
    tolerance = 1.0                        # decades below the baseline a window may fall

    [tool.gradscope.checks.encoder]
    model = "mypkg.models:make_encoder"    # a factory; or built-in options: cell = "lstm", ...
    seq-len = 200
    probe = "grad_h0"
    min-slope = -0.02                      # log10 per step
    min-horizon = 150                      # steps
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DEVICES, DTYPES, MAX_SEED, RunConfig
from .errors import ConfigError

DEFAULT_BASELINE = "gradscope-baseline.json"

# Options of a check and their types (the file's spelling uses dashes).
CHECK_OPTIONS: dict[str, tuple[type, ...]] = {
    "model": (str,),  # "package.module:factory"
    "model-args": (dict,),  # keyword arguments for the factory
    "input-size": (int,),  # a user model's input features (random N(0, 1) inputs)
    "seq-len": (int,), "batch": (int,), "seed": (int,),
    "probe": (str,),
    "min-slope": (int, float), "min-horizon": (int,), "max-growth": (int, float),
    "finite": (bool,),
    "tolerance": (int, float), "windows": (int,),
    "device": (str,), "dtype": (str,),
}
OPTIONAL = {"model", "input-size", "min-slope", "min-horizon", "max-growth"}  # None: not given
# Options of a built-in model: the model options of `gradscope run`.
BUILTIN_OPTIONS = {"cell", "activation", "init", "gain", "input-init", "forget-bias",
                   "gate-init", "chrono-tmax", "hidden", "task"}
TOP_OPTIONS = {"checks", "baseline", "tolerance", "windows", "device", "dtype"}


@dataclass(frozen=True)
class CheckSpec:
    name: str  # the check's name; "" for a module profiled outside a check
    source: str  # the file it came from, for messages
    model: str | None = None  # "package.module:factory"; None: a built-in configuration
    model_args: dict = field(default_factory=dict)
    builtin: dict = field(default_factory=dict)  # RunConfig fields of a built-in model
    input_size: int | None = None  # a user model's input features; None: the model's own
    seq_len: int = 100  # steps measured
    batch: int = 8  # sequences measured at once
    seed: int = 0  # seeds the inputs (and a built-in model's weights)
    probe: str = "grad_h0"
    min_slope: float | None = None  # rule: slope >= this (log10 per step)
    min_horizon: int | None = None  # rule: horizon (6 decades down) >= this many steps
    max_growth: float | None = None  # rule: the profile rises at most this many decades
    finite: bool = True  # rule: the forward pass stays finite
    tolerance: float = 1.0  # baseline rule: decades a window may fall below the baseline
    windows: int = 4  # baseline rule: the profile is compared in this many windows
    device: str = "auto"
    dtype: str = "float64"
    flags: bool = field(default=False, compare=False, repr=False)  # from flags: keys are --key

    def __post_init__(self) -> None:
        """The one place a check's values are validated, from a file or from Python
        (``assert_gradient_health``); each error names the source, the check and the key."""
        for key, types in CHECK_OPTIONS.items():
            value = getattr(self, key.replace("-", "_"))
            if value is None and key in OPTIONAL:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                wanted = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{self.where(key)} must be {wanted}, got {value!r}")
        for key in ("seq-len", "batch", "windows", "input-size", "min-horizon"):
            value = getattr(self, key.replace("-", "_"))
            if value is not None and value < 1:
                raise ConfigError(f"{self.where(key)} must be positive, got {value!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"{self.where('seed')} must be from 0 to {MAX_SEED} (torch's "
                              f"generator keeps 32 bits of it), got {self.seed!r}")
        for key in ("min-slope", "max-growth", "tolerance"):
            value = getattr(self, key.replace("-", "_"))
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{self.where(key)} must be a finite number, got {value!r}")
        for key in ("max-growth", "tolerance"):
            value = getattr(self, key.replace("-", "_"))
            if value is not None and value < 0:
                raise ConfigError(f"{self.where(key)} must be >= 0, got {value!r}")
        if self.min_horizon is not None and self.min_horizon > self.seq_len:
            raise ConfigError(f"{self.where('min-horizon')} {self.min_horizon} exceeds seq-len "
                              f"{self.seq_len}: the profile cannot show it; raise seq-len")
        for key, allowed in (("dtype", DTYPES), ("device", DEVICES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{self.where(key)}: unknown {key} {getattr(self, key)!r}; "
                                  "choose from: " + ", ".join(allowed))

    def where(self, key: str | None = None) -> str:
        """Where a message points: the source, the check (none for a profile), the key; a flag
        (``flags``) names itself, but the model is `gradscope profile`'s argument."""
        head = f"{self.source}: check {self.name!r}" if self.name else self.source
        if self.flags and key:
            return head if key == "model" else f"--{key}"
        return head + (f": {key}" if key else "")


@dataclass(frozen=True)
class CheckFile:
    path: Path
    baseline: Path  # the baseline JSON, relative paths taken from the config's folder
    checks: list[CheckSpec]


def find(folder: Path) -> Path:
    """gradscope.toml, else pyproject.toml with a [tool.gradscope] table, in ``folder``."""
    own = folder / "gradscope.toml"
    if own.exists():
        return own
    pyproject = folder / "pyproject.toml"
    if pyproject.exists() and "gradscope" in _read(pyproject).get("tool", {}):
        return pyproject
    raise ConfigError(f"no gradscope.toml and no [tool.gradscope] in pyproject.toml in "
                      f"{folder}; write one (see `gradscope check --help`) or pass --config")


def load(path: Path, overrides: dict | None = None) -> CheckFile:
    """Read and validate every check in ``path``; ``overrides`` (check options, from flags)
    replace the file's values in every check; a bad one is named as the flag it came from."""
    if overrides:
        _check_flags(overrides)
    data = _read(path)
    if path.name == "pyproject.toml":
        if "gradscope" not in data.get("tool", {}):
            raise ConfigError(f"{path} has no [tool.gradscope] table")
        data = data["tool"]["gradscope"]
    where = f"{path}: [tool.gradscope]" if path.name == "pyproject.toml" else str(path)
    unknown = sorted(set(data) - TOP_OPTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: "
                          + ", ".join(sorted(TOP_OPTIONS)))
    checks = data.get("checks")
    if not isinstance(checks, dict) or not checks:
        raise ConfigError(f"{where}: no checks; add a table such as [tool.gradscope.checks."
                          "encoder] (or [checks.encoder] in gradscope.toml)")
    shared = {k: data[k] for k in ("tolerance", "windows", "device", "dtype") if k in data}
    specs = []
    for name, table in checks.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: checks.{name} must be a table, got {table!r}")
        specs.append(_check(name, str(path), {**shared, **table}, overrides or {}))
    baseline = data.get("baseline", DEFAULT_BASELINE)
    if not isinstance(baseline, str):
        raise ConfigError(f"{where}: baseline must be a file name, got {baseline!r}")
    return CheckFile(path, path.parent / baseline, specs)


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def _check_flags(overrides: dict) -> None:
    values = {}
    allowed = set(CHECK_OPTIONS) | BUILTIN_OPTIONS
    for key, value in overrides.items():
        if key.replace("_", "-") not in allowed:  # the caller's slip, not the file's
            raise ConfigError(f"unknown check option {key!r} among the overrides; allowed: "
                              + ", ".join(sorted(allowed)))
        if key.replace("_", "-") in CHECK_OPTIONS:  # a built-in's: _check's message
            values[key.replace("-", "_")] = value
    replace(CheckSpec("", "flags", flags=True), **values)  # CheckSpec validates the values


def _check(name: str, source: str, table: dict, overrides: dict) -> CheckSpec:
    spec = CheckSpec(name, source)
    values: dict = {}
    builtin: dict = {}
    for key, value in {**table, **overrides}.items():
        key = key.replace("_", "-")
        if key in BUILTIN_OPTIONS:
            builtin[key.replace("-", "_")] = value
            continue
        if key not in CHECK_OPTIONS:
            raise ConfigError(f"{spec.where()}: unknown key {key!r}; allowed: "
                              + ", ".join(sorted(set(CHECK_OPTIONS) | BUILTIN_OPTIONS)))
        values[key.replace("-", "_")] = value
    spec = replace(spec, builtin=builtin, **values)  # CheckSpec validates the values
    if spec.model is not None and builtin:
        raise ConfigError(f"{spec.where('model')}: a factory and built-in options "
                          f"({', '.join(sorted(builtin))}) exclude each other; give one")
    if spec.model is None and not builtin:
        raise ConfigError(f"{spec.where()}: give a model: model = \"package.module:factory\", "
                          "or built-in options such as cell = \"lstm\"")
    for key, given in (("input-size", spec.input_size is not None),
                       ("model-args", bool(spec.model_args))):
        if spec.model is None and given:  # a built-in's inputs are its task's
            raise ConfigError(f"{spec.where(key)} applies to a model factory (model = ...); "
                              "a built-in configuration takes its task's inputs and the run "
                              "options (hidden, ...)")
    if spec.model is not None and ":" not in spec.model:
        raise ConfigError(f"{spec.where('model')} must look like \"package.module:factory\", "
                          f"got {spec.model!r}")
    if spec.model is None:  # sizes and names of a built-in: RunConfig's own checks
        try:
            RunConfig(**{**spec.builtin, **_run_fields(spec)})
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{spec.where()}: {e}") from None
    return spec


def _run_fields(spec: CheckSpec) -> dict:
    """The RunConfig fields a built-in check sets besides its model options."""
    return {k: getattr(spec, k) for k in ("seq_len", "batch", "seed", "device", "dtype")}


def run_config(spec: CheckSpec) -> RunConfig:
    """A built-in check's RunConfig (only its probe is measured)."""
    return RunConfig(**{**spec.builtin, **_run_fields(spec), "probes": (spec.probe,)})
