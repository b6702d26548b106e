"""The public Python API: what the CLI calls, and what notebooks use.

>>> import gradscope
>>> result = gradscope.run(cell="lstm", forget_bias=3.0, task="recall", seq_len=200)
>>> result.summary["jacobian_c"].slope  # log10 per step on the cell-state path
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from . import checkconfig
from .check import CheckResult, Exit, exit_code, to_text
from .checkconfig import CheckFile
from .config import MAX_SEEDS, RunConfig
from .errors import ConfigError
from .executors import DEFAULT_RETRIES, Outcome, make_executor
from .files import atomic_write, check_output_file, check_writable_dir, ensure_writable_dir
from .gate import judge, run_checks
from .modelprofile import profile as profile_module
from .plots import (
    check_figure,
    comparison_figure,
    profile_figure,
    save_figure,
    write_check_figures,
)
from .registry import ALL
from .report import data as report_data
from .report import write_report
from .report.data import Row
from .results import ModelProfile, RunResult, load_result
from .runner import check_config, execute, forward_cost_note, resolve_device
from .store import Store, run_id
from .sweep import PRESETS, SweepReport, SweepSpec, from_mapping, load_toml, run_sweep
from .usermodel import importable_from


def run(config: RunConfig | dict | None = None, *, out: str | Path | None = None,
        command: str | None = None, on_phase: Callable[[str], None] = lambda phase: None,
        on_note: Callable[[str], None] = lambda note: None, **options) -> RunResult:
    """Measure one configuration's per-step gradient-flow profiles; with ``steps``, also train
    it by BPTT and measure again every ``profile_every`` steps and at the end.

    ``options`` are RunConfig fields (``cell="gru", seq_len=500``); they override ``config``
    (a RunConfig, or a dict of its fields such as a result's ``config.to_dict()``). With
    ``out``, writes ``out/result.json`` and ``out/profile.png`` (each atomically).
    ``on_phase(text)`` is told what the run does next, for a display of its progress;
    ``on_note(line)``, once its checks have passed, that it will take long (``cost_note``).

    >>> r = run(cell="rnn", activation="tanh", init="pytorch", task="adding", seq_len=1000)
    >>> r.summary["grad_h0"].verdict
    'vanishing'
    """
    config = _config(config, options)
    # Everything the user gave is checked before any folder is made or any work is done.
    device, probes = check_config(config)
    if out is not None:
        check_writable_dir(Path(out))  # creates nothing: a failed run leaves no folder behind
    note = forward_cost_note(config, probes, device)
    if note:
        on_note(note)
    result = execute(config, command, on_phase)
    if out is not None:
        save_run(result, ensure_writable_dir(Path(out)))
    return result


def cost_note(config: RunConfig | dict | None = None, **options) -> str | None:
    """A line to tell the user before a run whose forward probes will take long on a CPU,
    with the options that cut their cost; None where they will not. Raises ConfigError for
    bad input, as ``run`` does.

    >>> cost_note(cell="lstm", hidden=256, seq_len=1000)
    'the exact forward probes on 32 sequences take about 4e+12 multiply-adds, about 107 s on ...'
    """
    config = _config(config, options)
    device, probes = check_config(config)
    return forward_cost_note(config, probes, device)


def _config(config: RunConfig | dict | None, options: dict) -> RunConfig:
    """``config`` (the defaults where None; a dict of RunConfig fields is one) with
    ``options``, RunConfig fields, in its place."""
    if isinstance(config, dict):
        config, options = RunConfig(), {**config, **options}
    if config is not None and not isinstance(config, RunConfig):
        raise ConfigError(f"the config must be a gradscope.RunConfig (or a dict of its "
                          f"fields), got {type(config).__name__} {config!r:.40}; options go "
                          "as keywords: gradscope.run(cell='lstm', seq_len=500)")
    config = config or RunConfig()
    return config.replace(**options) if options else config


def compare(runs: list[str | Path] | str | Path, probe: str, out: str | Path | None = None
            ) -> list[RunResult | ModelProfile]:
    """Load saved runs (of `gradscope run` or `gradscope profile`; one folder or a list) and,
    with ``out``, draw ``probe`` of each on one axis into a PNG.

    >>> compare(["reports/rnn-tanh", "reports/lstm-fb3"], "jacobian", "reports/jacobian.png")
    """
    if isinstance(runs, (str, Path)):  # one folder, not the characters of its name
        runs = [runs]
    if not runs:
        raise ConfigError("give at least one result folder to compare")
    if out is not None:
        check_output_file(Path(out), ".png", "--out")
    results = []
    for path in runs:
        try:
            results.append(load_result(Path(path)))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path} holds no readable gradscope result ({e}); give folders "
                              "written by `gradscope run` or `gradscope profile`") from None
    for path, result in zip(runs, results, strict=True):
        if probe not in result.profiles:
            raise ConfigError(f"{path} has no {probe!r} profile; it has: "
                              + ", ".join(result.profiles))
    if out is not None:
        out = Path(out)
        ensure_writable_dir(out.parent, "--out")
        save_figure(comparison_figure(results, probe), out)
    return results


def profile(model: object, *, seq_len: int = 100, batch: int = 8,
            input_size: int | None = None, seed: int = 0, probes: Sequence[str] | None = None,
            projections: int | None = None, checkpoint: bool = False, theory_k: int = 8,
            dtype: str = "float64", device: str = "auto", model_args: dict | None = None,
            out: str | Path | None = None, command: str | None = None,
            source: str = "gradscope.profile", flags: bool = False) -> ModelProfile:
    """Measure your own module's per-step gradient-flow profiles: every probe it offers
    (``probes`` to choose), each deeper layer's initial state among them, by the exact engine,
    on random N(0, 1) inputs with the loss a fixed random projection of the top layer's h.

    ``model``: a torch.nn.RNN, LSTM or GRU, one of their cells, a module of the step
    protocol, or the import path of a factory that returns one (``"mypkg.models:make"``,
    called with ``model_args``). With ``out``, writes ``out/result.json`` (schema
    ``gradscope.model/1``) and ``out/profile.png``. ``theory_k``: the top Lyapunov exponents
    of its recurrence beside the measurement, the largest predicting the slope of
    ``jacobian`` (0: none). ``source`` starts every error message; with ``flags``, messages
    name the options as command-line flags (``--seq-len``).

    >>> p = profile(torch.nn.LSTM(16, 64, num_layers=2), seq_len=200)
    >>> p.summary["grad_h0@2"].slope  # the second layer's initial state, log10 per step
    """
    if isinstance(probes, str):  # "grad_h0,adjoint", as on the command line
        probes = [name.strip() for name in probes.split(",") if name.strip()]
    factory = isinstance(model, str)
    if factory and ":" not in model:
        raise ConfigError(f"{source}: the model must be an object or look like "
                          f"\"package.module:factory\", got {model!r}")
    if model_args and not factory:
        raise ConfigError(f"{source}: model_args go to a factory; give its import path, or "
                          "call it yourself")
    spec = checkconfig.CheckSpec(
        name="", source=source, model=model if factory else "<object>",
        model_args=model_args or {}, input_size=input_size, seq_len=seq_len, batch=batch,
        seed=seed, device=device, dtype=dtype, flags=flags)
    if out is not None:
        check_writable_dir(Path(out))  # creates nothing: a failed run leaves no folder behind
    result = profile_module(spec, None if factory else model, probes, projections=projections,
                            checkpoint=checkpoint, theory_k=theory_k, command=command)
    if out is not None:
        save_run(result, ensure_writable_dir(Path(out)))
    return result


def save_run(result: RunResult | ModelProfile, out_dir: Path) -> None:
    """Write result.json and profile.png into ``out_dir`` (which must exist)."""
    save_figure(profile_figure(result), out_dir / "profile.png")
    result.save_json(out_dir / "result.json")


def registries() -> dict[str, list[tuple[str, str]]]:
    """Every registry: kind -> [(name, one-line help)], for `gradscope list`.

    >>> [name for name, _ in registries()["inits"]]   # ['pytorch', 'xavier-uniform', ...]
    """
    return {kind: [(e.name, e.help) for e in reg] for kind, reg in ALL.items()}


def sweep_spec(*, preset: str | None = None, config_file: str | Path | None = None,
               options: dict[str, object] | None = None, seeds: int | None = None
               ) -> SweepSpec:
    """The runs of a sweep: a preset or a TOML file (or neither: the defaults), crossed with
    ``options`` (RunConfig field -> list of values, or one value), which override them.

    >>> spec = sweep_spec(options={"cell": ["rnn", "lstm"], "init": "orthogonal"}, seeds=3)
    """
    if options is not None:  # one value is a list of one, a name is not its characters
        options = {k: list(v) if isinstance(v, (list, tuple)) else [v]
                   for k, v in options.items()}
    if preset is not None and config_file is not None:
        raise ConfigError("give --preset or --config, not both")
    if preset is not None:
        data, source = PRESETS.get(preset), f"preset {preset}"
    elif config_file is not None:
        data, source = load_toml(Path(config_file)), str(config_file)
    else:
        data, source = {}, "options"
    return from_mapping(data, source, overrides=options, seeds=seeds)


def sweep(spec: SweepSpec, out: str | Path, *, executor: str = "local",
          workers: int | None = None, retries: int = DEFAULT_RETRIES,
          address: str | None = None, gpus_per_run: float = 0.0, report: bool = True,
          seed_stack: int = MAX_SEEDS, command: str | None = None,
          on_progress: Callable[[Outcome, int, int], None] = lambda *a: None,
          on_start: Callable[[int, int], None] = lambda todo, skipped: None,
          ) -> tuple[SweepReport, Path | None]:
    """Run every configuration of ``spec`` not yet finished in ``out``'s store, then (with
    ``report``) write ``out/report/index.html``. Rerun to resume.

    ``executor``: "local" (``workers`` processes; 1 runs in this process) or "ray" (Ray tasks;
    ``address`` None starts a local Ray, "auto" joins a cluster; ``gpus_per_run``). A run whose
    worker dies is retried ``retries`` times, then recorded as failed. Runs that differ only in
    their seed run ``seed_stack`` at a time as one computation (gradscope.batched; the same
    numbers; 1: one seed at a time).

    >>> outcome, index = sweep(sweep_spec(preset="smoke"), "runs/smoke")
    """
    if not isinstance(spec, SweepSpec):  # a preset's name, say: the spec is made first
        raise ConfigError(f"gradscope.sweep takes a SweepSpec, got {type(spec).__name__} "
                          f"{spec!r:.60}: make one with gradscope.sweep_spec(preset=...), "
                          "(config_file=...) or (options=...)")
    if not isinstance(seed_stack, int) or seed_stack < 1:
        raise ConfigError(f"--seed-stack must be a positive integer, got {seed_stack!r}")
    for config in spec.runs:
        check_config(config)
    runner = make_executor(executor, workers=workers, retries=retries, address=address,
                           gpus_per_run=gpus_per_run)
    folder = ensure_writable_dir(Path(out))
    with Store(folder) as store, store.writer():
        skipped = len(store.finished_ids() & {run_id(c) for c in spec.runs})
        on_start(len(spec.runs) - skipped, skipped)
        result = run_sweep(
            spec, store, runner, command=command or "gradscope.sweep()",
            meta={"notes": list(spec.notes), "runs": len(spec.runs), "executor": executor,
                  "time_utc": datetime.now(UTC).isoformat(timespec="seconds")},
            on_progress=on_progress, stack_seeds=seed_stack)
    index = write_report(folder) if report else None
    return result, index


def load(folder: str | Path) -> pd.DataFrame:
    """The sweep results in ``folder`` as one tidy DataFrame: a row per run, measurement step
    and probe, with configuration, training outcome and summary columns.

    >>> df = load("reports")
    >>> df[df.probe == "grad_h0"].groupby("init").slope.median()
    """
    with Store(Path(folder), create=False) as store:
        return store.frame()


def ranking(folder: str | Path, probe: str | None = None) -> list[Row]:
    """The sweep's configurations, best first by the median slope of ``probe`` at
    initialisation: the report's ranking table as plain data (medians over seeds).
    ``probe``: default grad_h0, else the first measured (``report_probe``).

    >>> [(r.label, r.slope) for r in ranking("reports")][:2]
    [('rnn/relu identity', -0.0024...), ('lstm pytorch forget-bias 3', -0.0036...)]
    """
    with Store(Path(folder), create=False) as store:
        return report_data.ranking(store, probe)


def report_probe(folder: str | Path, probe: str | None = None) -> str:
    """The probe that the report and ranking of ``folder`` show: ``probe``, checked against
    what its runs measured, or by default grad_h0, else the first measured.

    >>> report_probe("reports")
    'grad_h0'
    """
    with Store(Path(folder), create=False) as store:
        return report_data.report_probe(store, probe)


EXPORT_FORMATS = ("csv", "parquet")


def export(folder: str | Path, fmt: str = "csv") -> list[Path]:
    """Write the store's tables as files into ``folder/export/``: runs (tidy, with summaries),
    profiles (one row per step), curves. Parquet needs pyarrow.

    >>> export("reports", "csv")   # [reports/export/runs.csv, .../profiles.csv, .../curves.csv]
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown format {fmt!r} for --format; choose from: "
                          + ", ".join(EXPORT_FORMATS))
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow: pip install pyarrow "
                              "(or gradscope[parquet]); --format csv needs nothing") from None
    folder = Path(folder)
    with Store(folder, create=False) as store:
        tables = {
            "runs": store.frame(),
            "profiles": pd.DataFrame(
                [(rid, step, probe, axis, first + i, float(v))
                 for rid, step, probe, axis, first, values in store.profiles()
                 for i, v in enumerate(values)],
                columns=["run_id", "train_step", "probe", "axis", "step", "log10"]),
            "curves": store.curves(),
        }
    out = ensure_writable_dir(folder / "export", "export folder")
    paths = []
    for name, table in tables.items():
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            atomic_write(path, lambda tmp, t=table: t.to_csv(tmp, index=False))
        else:
            atomic_write(path, lambda tmp, t=table: t.to_parquet(tmp, index=False))
        paths.append(path)
    return paths


def check(config: str | Path | None = None, *, only: list[str] | str | None = None,
          update_baseline: bool = False, overrides: dict | None = None,
          plots: str | Path | None = None, on_phase: Callable[[str], None] = lambda phase: None,
          ) -> tuple[list[CheckResult], Exit, CheckFile]:
    """Run the checks of ``[tool.gradscope]`` (pyproject.toml) or gradscope.toml.

    ``config``: the file (default: found in the current folder); ``overrides``: check options
    that replace the file's in every check (the command line's flags); ``plots``: a folder
    for one PNG per check, its profile drawn against its rules and baseline (written whether
    the rules held or not; checked before anything is measured); ``on_phase(text)`` is told
    which check is measured.

    >>> results, code, _ = check(plots="gradscope-plots")
    >>> code
    <Exit.PASSED: 0>
    """
    if isinstance(only, str):  # one check's name, not its characters
        only = [only]
    path = Path(config) if config is not None else checkconfig.find(Path.cwd())
    checks = checkconfig.load(path, overrides)  # a flag's bad value is refused first
    if overrides and overrides.get("device") is not None:
        resolve_device(overrides["device"])  # a flag's device is the flag's fault, not a check's
    if plots is not None:
        check_writable_dir(Path(plots), "--plots")
    with importable_from(path.parent):  # a factory beside the file, wherever CI runs
        results = run_checks(checks, only=only, update_baseline=update_baseline,
                             on_phase=on_phase)
    if plots is not None:
        write_check_figures(results, ensure_writable_dir(Path(plots), "--plots"))
    return results, exit_code(results), checks


def assert_gradient_health(model: object, *, seq_len: int = 100, batch: int = 8,
                           probe: str = "grad_h0", min_slope: float | None = None,
                           min_horizon: int | None = None, max_growth: float | None = None,
                           finite: bool = True, input_size: int | None = None, seed: int = 0,
                           dtype: str = "float64", device: str = "cpu",
                           plot: str | Path | None = None) -> CheckResult:
    """Measure ``model`` (a torch.nn.RNN/LSTM/GRU, a cell, or a step-protocol module) and raise
    AssertionError, with the table of rules as its message, when a rule fails. ``plot``: a PNG
    file for the profile drawn against the rules, written whether they held or not.

    >>> lstm = torch.nn.LSTM(16, 64, num_layers=2)
    >>> assert_gradient_health(lstm, seq_len=200, min_slope=-0.05)
    """
    spec = checkconfig.CheckSpec(
        name="model", source="assert_gradient_health", model="<object>", seq_len=seq_len,
        batch=batch, probe=probe, min_slope=min_slope, min_horizon=min_horizon,
        max_growth=max_growth, finite=finite, input_size=input_size, seed=seed, dtype=dtype,
        device=device)
    if plot is not None:
        check_output_file(Path(plot), ".png", "plot")
    result = judge(spec, None, module=model)
    if plot is not None:
        ensure_writable_dir(Path(plot).absolute().parent, "plot")
        save_figure(check_figure(result), Path(plot))
    if not result.passed:
        raise AssertionError("gradient health check failed\n" + to_text([result])
                             + (f"\nplot: {plot}" if plot is not None else ""))
    return result

