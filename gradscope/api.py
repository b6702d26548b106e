"""The public Python API: what the CLI calls, and what notebooks use.

>>> import gradscope
>>> result = gradscope.run(cell="lstm", forget_bias=3.0, task="recall", seq_len=200)
>>> result.summary["jacobian_c"].slope  # log10 per step on the cell-state path
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .cells import CELLS
from .config import RunConfig
from .engine import measure
from .errors import ConfigError
from .files import ensure_writable_dir
from .model import build
from .plots import comparison_figure, profile_figure, save_figure
from .probes import PROBES, Probe, probes_for
from .registry import ALL
from .results import FIRST_STEP, RunResult
from .summary import summarize
from .version import __version__


def run(config: RunConfig | None = None, *, out: str | Path | None = None,
        command: str | None = None, **options) -> RunResult:
    """Measure one configuration's per-step gradient-flow profiles.

    ``options`` are RunConfig fields (``cell="gru", seq_len=500``); they override ``config``.
    With ``out``, writes ``out/result.json`` and ``out/profile.png`` (each atomically).

    >>> r = run(cell="rnn", activation="tanh", init="pytorch", task="adding", seq_len=1000)
    >>> r.summary["grad_h0"].verdict
    'vanishing'
    """
    config = (config or RunConfig()).replace(**options) if options else (config or RunConfig())
    # Everything the user gave is checked before any folder is made or any work done.
    device = resolve_device(config.device)
    probes = resolve_probes(config)
    built = build(config, device)
    built.model.requires_grad_(False)  # probes differentiate with respect to states only
    out_dir = ensure_writable_dir(Path(out)) if out is not None else None

    profiles = measure(built.model.unroll(built.batch), probes)

    overflowed = profiles.nonfinite is not None
    axes = {p.name: p.axis for p in probes}
    result = RunResult(
        config=config,
        task={
            "name": built.model.task.name,
            "variant": built.model.task.variant,
            "seq_len": built.batch.seq_len,
            "chance_loss": built.model.task.chance(config.seq_len),
        },
        profiles=profiles.log10,
        axes=axes,
        summary={
            p.name: summarize(profiles.log10[p.name], _steps(p, built.batch.seq_len),
                              drop=config.horizon_drop, band=config.stable_decades,
                              overflowed=overflowed)
            for p in probes
        },
        nonfinite=None if profiles.nonfinite is None else {
            "step": profiles.nonfinite.step, "where": profiles.nonfinite.where},
        meta=_meta(device, config.dtype, command),
    )
    if out_dir is not None:
        save_run(result, out_dir)
    return result


def compare(runs: list[str | Path], probe: str, out: str | Path | None = None
            ) -> list[RunResult]:
    """Load saved runs and, with ``out``, draw ``probe`` of each on one axis into a PNG.

    >>> compare(["reports/rnn-tanh", "reports/lstm-fb3"], "jacobian", "reports/jacobian.png")
    """
    if not runs:
        raise ConfigError("give at least one result folder to compare")
    results = []
    for path in runs:
        try:
            results.append(RunResult.load(Path(path)))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path} holds no readable gradscope result ({e}); give folders "
                              "written by `gradscope run`") from None
    for path, result in zip(runs, results, strict=True):
        if probe not in result.profiles:
            raise ConfigError(f"{path} has no {probe!r} profile; it has: "
                              + ", ".join(result.profiles))
    if out is not None:
        out = Path(out)
        ensure_writable_dir(out.parent, "--out")
        save_figure(comparison_figure(results, probe), out)
    return results


def save_run(result: RunResult, out_dir: Path) -> None:
    """Write result.json and profile.png into ``out_dir`` (which must exist)."""
    save_figure(profile_figure(result), out_dir / "profile.png")
    result.save_json(out_dir / "result.json")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; "
                          "use --device cpu or auto")
    return torch.device(name)


def resolve_probes(config: RunConfig) -> list[Probe]:
    cell = CELLS.get(config.cell)
    allowed = probes_for(cell.parts)
    names = list(config.probes) if config.probes is not None else allowed
    for name in names:
        PROBES.get(name)  # unknown names fail with the list of every probe
        if name not in allowed:
            raise ConfigError(f"probe {name!r} does not apply to the {config.cell} cell; "
                              "it offers: " + ", ".join(allowed))
    return [PROBES.get(name) for name in dict.fromkeys(names)]


def registries() -> dict[str, list[tuple[str, str]]]:
    """Every registry: kind -> [(name, one-line help)], for `gradscope list`."""
    return {kind: [(e.name, e.help) for e in reg] for kind, reg in ALL.items()}


def _steps(probe: Probe, T: int) -> np.ndarray:
    return np.arange(T) + FIRST_STEP[probe.axis]


def _meta(device: torch.device, dtype: str, command: str | None) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "gradscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "dtype": dtype,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }
