"""The public Python API: what the CLI calls, and what notebooks use.

>>> import gradscope
>>> result = gradscope.run(cell="lstm", forget_bias=3.0, task="recall", seq_len=200)
>>> result.summary["jacobian_c"].slope  # log10 per step on the cell-state path
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .errors import ConfigError
from .files import check_writable_dir, ensure_writable_dir
from .plots import comparison_figure, profile_figure, save_figure
from .registry import ALL
from .results import RunResult
from .runner import check, execute


def run(config: RunConfig | None = None, *, out: str | Path | None = None,
        command: str | None = None, **options) -> RunResult:
    """Measure one configuration's per-step gradient-flow profiles; with ``steps``, also train
    it by BPTT and measure again every ``profile_every`` steps and at the end.

    ``options`` are RunConfig fields (``cell="gru", seq_len=500``); they override ``config``.
    With ``out``, writes ``out/result.json`` and ``out/profile.png`` (each atomically).

    >>> r = run(cell="rnn", activation="tanh", init="pytorch", task="adding", seq_len=1000)
    >>> r.summary["grad_h0"].verdict
    'vanishing'
    """
    config = (config or RunConfig()).replace(**options) if options else (config or RunConfig())
    # Everything the user gave is checked before any folder is made or any work is done.
    check(config)
    if out is not None:
        check_writable_dir(Path(out))  # creates nothing: a failed run leaves no folder behind
    result = execute(config, command)
    if out is not None:
        save_run(result, ensure_writable_dir(Path(out)))
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


def registries() -> dict[str, list[tuple[str, str]]]:
    """Every registry: kind -> [(name, one-line help)], for `gradscope list`."""
    return {kind: [(e.name, e.help) for e in reg] for kind, reg in ALL.items()}
