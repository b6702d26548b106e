"""Run configuration: one frozen dataclass, with a comment on every field, and the checks that
need no registry (sizes, dtypes, devices). Names are checked against the registries when the
model and task are built (``model.build``); both raise ConfigError with the line a user sees.

No torch here: this is the lowest layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError

DTYPES = ("float64", "float32")
MAX_SEEDS = 8  # seeds per stack: more buys little on a CPU and multiplies peak memory
MAX_SEED = 2**32 - 1  # torch's CPU generator keeps 32 bits of a seed: 2**32 would replay 0
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """What ``gradscope run`` measures, one field per option; invalid values raise ConfigError
    naming the option. ``gradscope.run(**fields)`` builds one.

    >>> RunConfig(cell="rnn", activation="relu", init="identity", seq_len=500)
    >>> RunConfig().replace(hidden=128, probes="grad_h0,adjoint")
    """

    cell: str = "rnn"  # cell registry name: rnn | lstm | gru
    activation: str | None = None  # rnn only; None means tanh
    init: str = "pytorch"  # recurrent-matrix initialisation (applied per gate block)
    gain: float = 1.0  # scale g of the recurrent initialisation (g*Q, g*I, N(0, g^2/H), ...)
    input_init: str = "pytorch"  # initialisation of the input matrix W_ih
    forget_bias: float | None = None  # effective keep-gate bias (LSTM f, GRU z); None: scheme's
    gate_init: str = "none"  # gate-bias scheme: none | chrono (LSTM and GRU only)
    chrono_tmax: int | None = None  # chrono's T_max; None means the task's sequence length
    task: str = "adding"  # task registry name
    seq_len: int = 100  # the task's length parameter T (copy: the delay; inputs are T+20 long)
    hidden: int = 64  # hidden size H
    batch: int = 32  # sequences per measurement
    seed: int = 0  # seeds the weights and the task data
    dtype: str = "float64"  # arithmetic of the model and the probes (log-scales are float64)
    device: str = "auto"  # auto picks cuda when available
    probes: tuple[str, ...] | None = None  # probe names to measure; None: all the cell supports
    steps: int = 0  # BPTT training steps (0: measure at initialisation only)
    optimizer: str = "adam"  # adam | rmsprop | sgd
    lr: float = 1e-3  # learning rate
    clip: float | None = 1.0  # gradient-norm clipping (Pascanu et al. 2013); 0 or None: off
    profile_every: int = 0  # also measure every K training steps (0: at the start and end only)
    theory_k: int = 8  # Lyapunov exponents computed beside the theory; 0 turns theory off
    jacobian_samples: int | None = None  # forward probes on the first N sequences; None: all
    projections: int | None = None  # forward probes estimated from P random directions; None: exact
    checkpoint: bool = False  # adjoint: keep every ~sqrt(T)-th state, recompute the rest
    horizon_drop: float = 6.0  # horizon = first step where a profile has fallen this many decades
    stable_decades: float = 1.0  # a profile whose fitted change stays within +-this is "stable"

    def __post_init__(self) -> None:
        for name in ("cell", "activation", "init", "input_init", "gate_init", "task",
                     "optimizer"):  # registry names (a sweep file may hold anything)
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "activation" and value is None):
                raise ConfigError(f"{flag(name)} must be a name, got {value!r}")
        for name in ("seq_len", "hidden", "batch"):
            value = getattr(self, name)
            if not is_count(value, 1):
                raise ConfigError(f"{flag(name)} must be a positive integer, got {value!r}")
        for name in ("steps", "profile_every", "theory_k"):
            value = getattr(self, name)
            if not is_count(value, 0):
                raise ConfigError(f"{flag(name)} must be a non-negative integer, got {value!r}")
        _finite("lr", self.lr)
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr!r}")
        if self.clip == 0:  # off, wherever it is given: the command line, a sweep file, Python
            object.__setattr__(self, "clip", None)
        if self.clip is not None:
            _finite("clip", self.clip)
            if self.clip < 0:
                raise ConfigError(f"--clip must be positive, or 0 to turn clipping off; got "
                                  f"{self.clip!r}")
        if not is_count(self.seed, 0) or self.seed > MAX_SEED:
            raise ConfigError(f"--seed must be an integer from 0 to {MAX_SEED} (torch's "
                              f"generator keeps 32 bits of it), got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r} for --dtype; choose from: "
                              + ", ".join(DTYPES))
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} for --device; choose from: "
                              + ", ".join(DEVICES))
        _finite("gain", self.gain)
        if self.gain <= 0:
            raise ConfigError(f"--gain must be positive, got {self.gain!r}")
        if self.forget_bias is not None:
            _finite("forget_bias", self.forget_bias)
        if self.jacobian_samples is not None and (
            not isinstance(self.jacobian_samples, int) or self.jacobian_samples < 1
        ):
            raise ConfigError("--jacobian-samples must be a positive integer, got "
                              f"{self.jacobian_samples!r}")
        if self.jacobian_samples is not None and self.jacobian_samples > self.batch:
            raise ConfigError(f"--jacobian-samples {self.jacobian_samples} is more than the "
                              f"--batch of {self.batch} sequences; give 1 to {self.batch}, or "
                              "leave it out to use them all")
        if not isinstance(self.checkpoint, bool):
            raise ConfigError(f"checkpoint must be true or false, got {self.checkpoint!r}")
        if self.projections is not None and (
            not isinstance(self.projections, int) or self.projections < 1
        ):
            raise ConfigError(f"--projections must be a positive integer, got "
                              f"{self.projections!r}")
        if self.chrono_tmax is not None and (
            not isinstance(self.chrono_tmax, int) or self.chrono_tmax < 3
        ):
            raise ConfigError(f"--chrono-tmax must be an integer >= 3, got {self.chrono_tmax!r}")
        _finite("horizon_drop", self.horizon_drop)
        if self.horizon_drop <= 0:
            raise ConfigError(f"--horizon-drop must be positive, got {self.horizon_drop!r}")
        _finite("stable_decades", self.stable_decades)
        if self.stable_decades < 0:
            raise ConfigError(f"--stable-decades must be >= 0, got {self.stable_decades!r}")
        if self.probes is not None:
            if isinstance(self.probes, str):  # "grad_h0,adjoint", as on the command line
                object.__setattr__(self, "probes", tuple(
                    name.strip() for name in self.probes.split(",") if name.strip()))
            elif isinstance(self.probes, list):  # a TOML array: a config must stay hashable
                object.__setattr__(self, "probes", tuple(self.probes))
            if not isinstance(self.probes, tuple) or not all(
                    isinstance(name, str) for name in self.probes):
                raise ConfigError(f"--probes must be probe names (a comma list), got "
                                  f"{self.probes!r}")
            if len(self.probes) == 0:
                raise ConfigError("--probes must name at least one probe")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.probes is not None:
            d["probes"] = list(self.probes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        _known(d)
        return cls(**d)  # probes: to_dict's list becomes a tuple in __post_init__

    def replace(self, **changes) -> RunConfig:
        _known(changes)
        return replace(self, **changes)

    def label(self, context: tuple[str, ...] = ()) -> str:
        """A short name for the model: 'rnn/tanh orthogonal', 'lstm pytorch forget-bias 3'."""
        return describe(self.to_dict(), context)


def _known(options: dict) -> None:
    """Refuse names that are not RunConfig's fields, in one line that lists them."""
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown run option(s) {', '.join(unknown)}; allowed: "
                          + ", ".join(sorted(known)))


def describe(c: dict, context: tuple[str, ...] | list[str] = ()) -> str:
    """The name of the model a config dict describes, plus the ``context`` fields named."""
    parts = [c["cell"] if c["cell"] != "rnn" else f"rnn/{c.get('activation') or 'tanh'}",
             c["init"]]
    if c.get("gain", 1.0) != 1.0:
        parts.append(f"g={c['gain']:g}")
    if c.get("forget_bias") is not None:
        parts.append(f"forget-bias {c['forget_bias']:g}")
    if c.get("gate_init", "none") != "none":
        parts.append(c["gate_init"])
    if c.get("input_init", "pytorch") != "pytorch":
        parts.append(f"input {c['input_init']}")
    parts += [f"{k.replace('_', '-')} {c[k]}" for k in context]
    return " ".join(parts)


def is_count(value: object, least: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def flag(field_name: str) -> str:
    """The option that sets a RunConfig field: seq_len -> --seq-len."""
    return "--" + field_name.replace("_", "-")


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number, got {value!r}")
