"""The command line: parse options, call the API, print with rich. No torch code here."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.box import SIMPLE
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .check import figure_files, to_json, to_junit, to_markdown
from .config import MAX_SEEDS, RunConfig, flag
from .errors import ConfigError, GradscopeError
from .files import atomic_write_text, check_output_file
from .summary import (
    SUMMARY_CAPTION,
    SUMMARY_COLUMNS,
    half_life_text,
    number_text,
    slope_text,
    summary_row,
)
from .version import __version__

if TYPE_CHECKING:
    from .results import RunResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: option help may contain [brackets]
)  # the app's help is its callback's docstring (_gradscope)
out_console = Console()
err_console = Console(stderr=True, highlight=False)


def _print_version(asked: bool) -> None:
    if asked:  # torch's version from its metadata: importing it takes seconds
        out_console.print(f"gradscope {__version__} (torch {_installed('torch')}, python "
                          f"{platform.python_version()})", markup=False, highlight=False)
        raise typer.Exit()


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@app.callback()
def _gradscope(version: bool = typer.Option(False, "--version", is_eager=True,
                                            callback=_print_version,
                                            help="Print the versions of gradscope, torch "
                                                 "and python, and exit.")) -> None:
    """Measure how gradients vanish or explode with time distance in recurrent networks."""


DEFAULTS = RunConfig()
_ARGV: list[str] = []  # the arguments of this invocation, set by main()


def _api():
    """gradscope.api, imported when a command runs: it brings torch, pandas and matplotlib,
    which --help and usage errors need not wait for."""
    from . import api

    return api


@contextmanager
def _phases() -> Iterator[Callable[[str], None]]:
    """A spinner on stderr that shows a run's phase and the time it has taken, gone when the
    run ends; where stderr is not a terminal (CI logs, pipes), nothing."""
    if not err_console.is_terminal:
        yield lambda phase: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                  TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("starting")
        yield lambda phase: progress.update(task, description=phase)


@app.command("run", epilog="Example:  gradscope run --cell lstm --forget-bias 3 --task recall")
def run_command(
    cell: str = typer.Option(DEFAULTS.cell, help="rnn | lstm | gru (see `gradscope list`)."),
    activation: str = typer.Option(None, help="rnn only: tanh | relu | sigmoid | linear | ... "
                                   "[default: tanh]"),
    init: str = typer.Option(DEFAULTS.init, help="Recurrent-matrix initialisation."),
    gain: float = typer.Option(DEFAULTS.gain, help="Scale g of the recurrent initialisation."),
    input_init: str = typer.Option(DEFAULTS.input_init, help="Input-matrix initialisation."),
    forget_bias: float = typer.Option(None, help="Effective keep-gate bias (LSTM f, GRU z)."),
    gate_init: str = typer.Option(DEFAULTS.gate_init, help="none | chrono (LSTM and GRU)."),
    chrono_tmax: int = typer.Option(None, help="Chrono's T_max [default: the sequence length]."),
    task: str = typer.Option(DEFAULTS.task, help="adding | copy | temporal-order | recall | ..."),
    seq_len: int = typer.Option(DEFAULTS.seq_len, help="The task's length T."),
    hidden: int = typer.Option(DEFAULTS.hidden, help="Hidden size H."),
    batch: int = typer.Option(DEFAULTS.batch, help="Sequences measured at once."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seeds weights and data (0 to 2**32 - 1)."),
    dtype: str = typer.Option(DEFAULTS.dtype, help="float64 | float32."),
    device: str = typer.Option(DEFAULTS.device, help="auto | cpu | cuda."),
    probes: str = typer.Option(None, help="Comma list of probes [default: all the cell has]."),
    steps: int = typer.Option(DEFAULTS.steps, help="Train by BPTT for this many steps first."),
    optimizer: str = typer.Option(DEFAULTS.optimizer, help="adam | rmsprop | sgd."),
    lr: float = typer.Option(DEFAULTS.lr, help="Learning rate."),
    clip: float = typer.Option(DEFAULTS.clip, help="Gradient-norm clipping; 0 turns it off."),
    profile_every: int = typer.Option(DEFAULTS.profile_every,
                                      help="Also measure every K training steps (with "
                                           "--steps)."),
    theory_k: int = typer.Option(DEFAULTS.theory_k, help="Lyapunov exponents to compute beside "
                                                         "the theory; 0 turns theory off."),
    projections: int = typer.Option(None, help="Estimate the forward probes from P random "
                                               "directions per part (error ~ sqrt(2/P)) "
                                               "[default: exact]."),
    jacobian_samples: int = typer.Option(None, help="Forward probes on the first N sequences, "
                                                    "N <= --batch (cost ~ H forward passes "
                                                    "each) [default: all]."),
    checkpoint: bool = typer.Option(False, help="Adjoint: keep every ~sqrt(T)-th state and "
                                                "recompute the rest (memory O(sqrt(T) B H) "
                                                "instead of O(T B H), one more forward pass)."),
    horizon_drop: float = typer.Option(DEFAULTS.horizon_drop,
                                       help="Decades of fall that define the horizon."),
    stable_decades: float = typer.Option(
        DEFAULTS.stable_decades,
        help="Verdict band: a fitted change within +-this many decades is stable."),
    out: Path = typer.Option(None, help="Result folder [default: runs/<cell>-<init>-<task>-T<T>"
                                        "-s<seed>, or -2, -3, ... where that holds another "
                                        "run's result]."),
) -> None:
    """Measure one configuration: per-step gradient magnitudes against time distance.

    Writes result.json and profile.png into --out and prints slope, half-life, horizon and
    verdict per probe. On a terminal, a spinner shows what the run is doing and for how long;
    a run whose forward probes will take long on a CPU says so first, with cheaper options.
    """
    config = RunConfig(
        cell=cell, activation=activation, init=init, gain=gain, input_init=input_init,
        forget_bias=forget_bias, gate_init=gate_init, chrono_tmax=chrono_tmax, task=task,
        seq_len=seq_len, hidden=hidden, batch=batch, seed=seed, dtype=dtype, device=device,
        probes=_comma_list(probes), horizon_drop=horizon_drop, stable_decades=stable_decades,
        steps=steps, optimizer=optimizer, lr=lr, clip=clip,
        profile_every=profile_every, theory_k=theory_k, jacobian_samples=jacobian_samples,
        projections=projections, checkpoint=checkpoint,
    )
    if out is None:
        out = _default_out(_default_name(config), lambda d: d.get("schema") == "gradscope.run/1"
                           and RunConfig.from_dict(d["config"]) == config)
    with _phases() as on_phase:
        result = _api().run(config, out=out, command=" ".join(["gradscope", *_ARGV]),
                            on_phase=on_phase, on_note=lambda note: err_console.print(
                                f"gradscope: note: {note}", markup=False, soft_wrap=True))
    print_result(result)
    print_wrote(out)


@app.command("profile", epilog="Example:  gradscope profile mypkg.models:make_encoder "
                                      "--seq-len 500")
def profile_command(
    model: str = typer.Argument(..., help="package.module:factory, a function (importable from "
                                          "the current folder) that returns a torch.nn.RNN, "
                                          "LSTM, GRU, one of their cells or a step module."),
    model_args: str = typer.Option(None, help="Keyword arguments for the factory, as a JSON "
                                              "object: '{\"hidden\": 64}'."),
    seq_len: int = typer.Option(100, help="Steps measured."),
    batch: int = typer.Option(8, help="Sequences measured at once."),
    input_size: int = typer.Option(None, help="Features per step of the random inputs "
                                              "[default: the model's own]."),
    seed: int = typer.Option(0, help="Seeds the inputs and the loss's random projection (0 "
                                     "to 2**32 - 1)."),
    probes: str = typer.Option(None, help="Comma list of probes [default: all the model "
                                          "offers, each deeper layer's grad_h0@k among them]."),
    projections: int = typer.Option(None, help="Estimate the forward probes from P random "
                                               "directions per part [default: exact]."),
    checkpoint: bool = typer.Option(False, help="Adjoint: keep every ~sqrt(T)-th state and "
                                                "recompute the rest."),
    theory_k: int = typer.Option(8, help="Lyapunov exponents to compute beside the "
                                         "measurement; 0 turns theory off."),
    dtype: str = typer.Option("float64", help="float64 | float32."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    out: Path = typer.Option(None, help="Result folder [default: runs/<factory>-T<T>-s<seed>, "
                                        "or -2, -3, ... where that holds another run's "
                                        "result]."),
) -> None:
    """Measure your own model: every probe's per-step gradient magnitude against time distance.

    Its own weights are unrolled step by step, on random N(0, 1) inputs, with the loss a fixed
    random projection of the top layer's h (as `gradscope check` measures it). Writes
    result.json and profile.png into --out and prints slope, half-life, horizon and verdict per
    probe; `gradscope compare` sets it beside other runs.
    """
    args = _json_object(model_args, "--model-args") if model_args is not None else None
    command = " ".join(["gradscope", *_ARGV])
    if out is None:  # the same module is the same command: its arguments are not all saved
        factory = model.rpartition(":")[2] or "model"
        out = _default_out(f"{factory}-T{seq_len}-s{seed}",
                           lambda d: d.get("schema") == "gradscope.model/1"
                           and d["meta"]["command"] == command)
    with _phases() as on_phase:
        on_phase(f"measuring {model}")
        result = _api().profile(
            model, model_args=args, seq_len=seq_len, batch=batch, input_size=input_size,
            seed=seed, probes=_comma_list(probes), projections=projections,
            checkpoint=checkpoint, theory_k=theory_k, dtype=dtype, device=device, out=out,
            command=command, source="gradscope profile", flags=True)
    print_summary(f"{result.title()}, input size {result.input_size}", result)
    if result.theory is not None:
        print_theory(result.theory)
    print_left_range(result)
    print_wrote(out)


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} is not JSON ({e.msg}); give an object such as "
                          "'{\"hidden\": 64}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object such as '{{\"hidden\": 64}}', got "
                          f"{text}")
    return value


@app.command("list", epilog="Example:  gradscope list")
def list_command() -> None:
    """Print every registry: cells, activations, initialisations, gate schemes, tasks, probes."""
    for kind, entries in _api().registries().items():
        table = Table(title=f"{kind}s", title_justify="left", show_header=False, box=None)
        for name, help_text in entries:
            table.add_row(f"[bold]{name}[/]", help_text)
        out_console.print(table)
        out_console.print()


@app.command("compare", epilog="Example:  gradscope compare runs/a runs/b --probe jacobian")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Result folders written by `gradscope run` or "
                                                "`gradscope profile`."),
    probe: str = typer.Option("jacobian", help="The probe to compare."),
    out: Path = typer.Option(None, help="Write the overlay figure to this PNG file."),
) -> None:
    """Compare saved runs on one probe: a table of summaries and an overlay figure."""
    results = _api().compare(list(runs), probe, out)
    table = Table(title=f"{escape(probe)}: which configuration keeps its gradient longest")
    table.caption = "slope: log10 per step; half-life, horizon: steps"
    table.add_column("run", overflow="fold")
    table.add_column("configuration", overflow="fold")
    for col in ("slope", "half-life", "horizon", "verdict"):
        table.add_column(col, no_wrap=True)
    for path, result in zip(runs, results, strict=True):
        _, slope, half_life, horizon, _, verdict = summary_row(
            probe, result.summary[probe], result.profiles[probe])
        table.add_row(escape(str(path)), escape(result.label()), slope, half_life, horizon,
                      verdict)
    print_table(table)
    if out is not None:
        out_console.print(f"wrote {escape(str(out))}")


# Sweep options: each takes a comma list; (RunConfig field, parser of one value).
SWEEP_AXES = {
    "cell": str, "activation": str, "init": str, "gain": float, "input_init": str,
    "forget_bias": float, "gate_init": str, "task": str, "seq_len": int, "hidden": int,
    "batch": int, "steps": int, "optimizer": str, "lr": float, "clip": float,
    "profile_every": int, "dtype": str,
}


@app.command("sweep", epilog="Example:  gradscope sweep --preset standard --out reports")
def sweep_command(
    preset: str = typer.Option(None, help="smoke | standard | full (see `gradscope list`)."),
    config: Path = typer.Option(None, help="A TOML sweep file: seeds, [base], [grid], "
                                           "[[runs]]."),
    cell: str = typer.Option(None, help="Comma list, e.g. rnn,lstm,gru."),
    activation: str = typer.Option(None, help="Comma list (rnn only), e.g. tanh,relu."),
    init: str = typer.Option(None, help="Comma list, e.g. pytorch,orthogonal,identity."),
    gain: str = typer.Option(None, help="Comma list of gains."),
    input_init: str = typer.Option(None, help="Comma list."),
    forget_bias: str = typer.Option(None, help="Comma list (lstm, gru)."),
    gate_init: str = typer.Option(None, help="Comma list: none,chrono."),
    task: str = typer.Option(None, help="Comma list of tasks."),
    seq_len: str = typer.Option(None, help="Comma list of lengths T."),
    hidden: str = typer.Option(None, help="Comma list of hidden sizes."),
    batch: str = typer.Option(None, help="Comma list of batch sizes."),
    steps: str = typer.Option(None, help="Training steps per run (comma list)."),
    optimizer: str = typer.Option(None, help="adam | rmsprop | sgd (comma list)."),
    lr: str = typer.Option(None, help="Learning rates (comma list)."),
    clip: str = typer.Option(None, help="Clipping thresholds; 0 turns it off (comma list)."),
    profile_every: str = typer.Option(None, help="Measure every K training steps."),
    dtype: str = typer.Option(None, help="float32 | float64."),
    seeds: int = typer.Option(None, help="Seeds per configuration [default: the preset's, "
                                         "or 1]."),
    workers: int = typer.Option(None, help="Worker processes, no more than there are "
                                           "runs [default: the CPU count]; with ray, the "
                                           "CPUs of a local Ray instance."),
    executor: str = typer.Option("local", help="local | ray (pip install 'gradscope[ray]')."),
    address: str = typer.Option(None, help="ray: auto or ray://host:port joins a cluster "
                                           "[default: a local Ray instance]."),
    gpus_per_run: float = typer.Option(0.0, help="ray: GPUs per run (0.25 packs four on one)."),
    retries: int = typer.Option(2, help="Tries more for a run whose worker process dies."),
    seed_stack: int = typer.Option(MAX_SEEDS, help="Runs that differ only in their seed, "
                                   "computed together as one seed stack (same numbers) where "
                                   "a stack is faster; 1: one seed at a time."),
    out: Path = typer.Option(Path("reports"), help="Folder of the store and the report."),
    report: bool = typer.Option(True, help="Write the report when the sweep ends."),
) -> None:
    """Run a grid of configurations in parallel into a results store, then write the report.

    Options take comma lists and override the preset or file. Rerun the same command to resume:
    finished runs are skipped.
    """
    given = {"cell": cell, "activation": activation, "init": init, "gain": gain,
             "input_init": input_init, "forget_bias": forget_bias, "gate_init": gate_init,
             "task": task, "seq_len": seq_len, "hidden": hidden, "batch": batch,
             "steps": steps, "optimizer": optimizer, "lr": lr, "clip": clip,
             "profile_every": profile_every, "dtype": dtype}
    options = {k: _parse_list(k, v) for k, v in given.items() if v is not None}
    spec = _api().sweep_spec(preset=preset, config_file=config, options=options, seeds=seeds)
    for note in spec.notes:
        out_console.print(f"note: {escape(note)}")
    progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=out_console)
    bar = None

    def on_start(todo: int, skipped: int) -> None:
        nonlocal bar
        if skipped:
            out_console.print(f"resuming: {skipped} finished runs in {escape(str(out))} are "
                              "kept")
        bar = progress.add_task("runs", total=todo, failed="")
        progress.start()

    failures = 0

    def on_progress(outcome, done: int, todo: int) -> None:
        nonlocal failures
        if outcome.result is None:
            failures += 1
            progress.console.print(f"failed: {outcome.config.cell} seed {outcome.config.seed}: "
                                   f"{outcome.error}", markup=False)
        progress.update(bar, completed=done,
                        failed=f"[red]{failures} failed[/]" if failures else "")

    try:
        result, index = _api().sweep(spec, out, executor=executor, workers=workers,
                                     retries=retries, address=address,
                                     gpus_per_run=gpus_per_run, report=report,
                                     seed_stack=seed_stack,
                                     command=" ".join(["gradscope", *_ARGV]),
                                     on_progress=on_progress, on_start=on_start)
    finally:
        if bar is not None:  # stopping a display that never started prints a stray line
            progress.stop()
    out_console.print(f"{result.finished} runs finished, {result.skipped} already done, "
                      f"{len(result.failed)} failed, in {out / 'gradscope.sqlite'}")
    print_ranking(_api().ranking(out), _api().report_probe(out))
    if index is not None:
        out_console.print(f"report: {escape(str(index))}")


@app.command("report", epilog="Example:  gradscope report reports")
def report_command(
    folder: Path = typer.Argument(..., help="A folder written by `gradscope sweep`."),
    probe: str = typer.Option(None, help="The probe that the comparisons show [default: "
                                         "grad_h0, or the first the runs measured]."),
) -> None:
    """Write FOLDER/report/index.html (self-contained) and one PNG per figure beside it, and
    print the ranking of its configurations."""
    probe = _api().report_probe(folder, probe)
    index = _api().write_report(folder, probe=probe)
    print_ranking(_api().ranking(folder, probe), probe)
    out_console.print(f"report: {escape(str(index))}")


RANKED = 20  # rows of the ranking printed after a sweep; the report has them all


def print_ranking(rows, probe: str) -> None:
    """The report's ranking table, best first: its first RANKED rows. The seeds and learned
    columns only where they tell something (seed counts that differ; training)."""
    if not rows:
        return
    shown = rows[:RANKED]
    varied = len({r.seeds for r in shown}) > 1
    trained = any(r.learned != "-" for r in shown)
    n = shown[0].seeds
    notes = ["medians over seeds" if varied else f"medians over {n} seed{'s' if n > 1 else ''}",
             "slope: log10 per step", "half-life, horizon: steps (never: not 6 decades down)"]
    if trained:
        notes.append("learned: seeds whose held-out loss fell below half of chance")
    if len(rows) > RANKED:
        notes.append(f"{len(rows) - RANKED} more in the report")
    table = Table(title=f"ranking by the median slope of {probe} at initialisation", box=SIMPLE,
                  padding=(0, 1), collapse_padding=True, pad_edge=False,
                  caption="; ".join(notes))
    columns = ["slope", "half-life", "horizon", "verdict"]
    columns = (["seeds"] if varied else []) + columns + (["learned"] if trained else [])
    table.add_column("configuration", overflow="fold", min_width=16)
    for col in columns:
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
    for r in shown:
        cells = {"seeds": str(r.seeds), "slope": number_text(r.slope, "+.4f"),
                 "half-life": half_life_text(r.half_life, r.slope),
                 "horizon": "never" if r.horizon == math.inf else number_text(r.horizon, ".0f"),
                 "verdict": f"[{VERDICT_COLOUR[r.verdict]}]{r.verdict}[/]",
                 "learned": r.learned}
        table.add_row(escape(r.label), *(cells[c] for c in columns))
    print_table(table)


@app.command("export", epilog="Example:  gradscope export reports --format csv")
def export_command(
    folder: Path = typer.Argument(..., help="A folder written by `gradscope sweep`."),
    format: str = typer.Option("csv", help="csv | parquet (parquet needs pyarrow)."),
) -> None:
    """Export the results store as tables: runs (with summaries), profiles, curves."""
    for path in _api().export(folder, format):
        out_console.print(f"wrote {escape(str(path))}")


@app.command("check", epilog="Example:  gradscope check --plots gradscope-plots --junit-xml "
                                    "junit.xml")
def check_command(
    config: Path = typer.Option(None, help="pyproject.toml or gradscope.toml [default: the one "
                                           "in the current folder]."),
    check: list[str] = typer.Option(None, "--check", help="Run only this check (repeatable)."),
    update_baseline: bool = typer.Option(False, help="Write the measured profiles as the new "
                                                     "baseline."),
    tolerance: float = typer.Option(None, help="Decades a baseline window may fall [file: 1]."),
    seq_len: int = typer.Option(None, help="Override every check's seq-len."),
    batch: int = typer.Option(None, help="Override every check's batch."),
    seed: int = typer.Option(None, help="Override every check's seed."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    dtype: str = typer.Option(None, help="float64 | float32."),
    junit_xml: Path = typer.Option(None, help="Also write a JUnit XML report here."),
    plots: Path = typer.Option(None, help="Also write a PNG per check into this folder: its "
                                          "profile against its rules and baseline."),
    format: str = typer.Option("table", help="table | json (to stdout)."),
) -> None:
    """Gate CI on gradient health: measure every check in [tool.gradscope] and apply its rules.

    Exit code 0 when every rule holds, 1 when one fails, 2 on a usage or configuration error.
    With $GITHUB_STEP_SUMMARY set, a markdown table is appended to it. On a terminal, a
    spinner shows which check is being measured.
    """
    if format not in ("table", "json"):
        raise ConfigError(f"unknown format {format!r} for --format; choose from: table, json")
    if junit_xml is not None:
        check_output_file(junit_xml, ".xml", "--junit-xml")
    overrides = {k: v for k, v in {"tolerance": tolerance, "seq-len": seq_len, "batch": batch,
                                   "seed": seed, "device": device, "dtype": dtype}.items()
                 if v is not None}
    with _phases() as on_phase:
        results, code, checks = _api().check(config, only=check or None,
                                             update_baseline=update_baseline,
                                             overrides=overrides, plots=plots,
                                             on_phase=on_phase)
    if format == "json":
        print(json.dumps(to_json(results), indent=1))
    else:
        print_checks(results)
        if update_baseline:
            out_console.print(f"baseline written: {escape(str(checks.baseline))}")
        if plots is not None:
            files = figure_files([r.name for r in results])
            out_console.print("plots written: " + ", ".join(escape(str(plots / f))
                                                            for f in files))
    if junit_xml is not None:
        atomic_write_text(junit_xml, to_junit(results))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(to_markdown(results))
    raise typer.Exit(int(code))


def print_checks(results) -> None:
    table = Table(title="gradscope check", caption="slope: log10 per step; horizon: steps "
                  "until the gradient has fallen 6 decades", box=SIMPLE, padding=(0, 1),
                  collapse_padding=True, pad_edge=False)
    for col in ("check", "rule", "measured", "limit", "result"):
        table.add_column(col, overflow="fold", no_wrap=col == "rule")
    for r in results:
        for x in r.rules:
            verdict = "[green]pass[/]" if x.passed else f"[red]FAIL[/] by {x.shortfall}"
            table.add_row(escape(f"{r.name} ({r.probe})"), x.rule, escape(x.measured),
                          escape(x.limit), verdict)
    print_table(table)
    for r in results:
        for note in r.notes:
            out_console.print(escape(f"{r.name}: {note}"))
    failed = [r.name for r in results if not r.passed]
    out_console.print(f"[red]failed: {escape(', '.join(failed))}[/]" if failed else
                      f"[green]{len(results)} check{'s' if len(results) != 1 else ''} passed[/]")


def _parse_list(name: str, text: str) -> list:
    parse = SWEEP_AXES[name]
    values = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            value = parse(item)
        except ValueError:
            raise ConfigError(f"{flag(name)}: {item!r} is not "
                              f"{'an integer' if parse is int else 'a number'}") from None
        values.append(value)
    if not values:
        raise ConfigError(f"{flag(name)} needs at least one value")
    return values


VERDICT_COLOUR = {"vanishing": "red", "stable": "green", "exploding": "magenta"}


def print_summary(title: str, result) -> None:
    """A result's summary per probe (a run's or a module's)."""
    table = Table(title=escape(title), caption=SUMMARY_CAPTION)
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col in ("probe", "verdict") else "right",
                         no_wrap=True)
    for name, s in result.summary.items():
        *cells, verdict = summary_row(name, s, result.profiles[name])
        table.add_row(*cells, f"[{VERDICT_COLOUR[verdict]}]{verdict}[/]")
    print_table(table)


def print_table(table: Table) -> None:
    """Print ``table`` with every value whole: on a terminal too narrow for its frame, without
    the frame; too narrow even for that, each row as "column: value" pairs, its lines broken
    between pairs."""
    width = out_console.width
    if _least_width(table) > width:
        table.box, table.show_edge, table.pad_edge = None, False, False
    if _least_width(table) <= width:
        out_console.print(table)
        return
    if table.title:
        out_console.print(table.title, style="italic")
    headers = [str(c.header) for c in table.columns]
    for row in zip(*(c.cells for c in table.columns), strict=True):
        line = Text()  # a row's pairs, a line broken between pairs, its later lines indented
        for header, cell in zip(headers, row, strict=True):
            if not str(cell):
                continue
            pair = Text.from_markup(f"{header}: {cell}" if header else str(cell))
            if line and line.cell_len + 2 + pair.cell_len > width:
                out_console.print(line)
                line = Text("  ")
            line.append("  " if line.plain.strip() else "").append_text(pair)
        out_console.print(line)
    if table.caption:
        out_console.print(table.caption, style="dim")


def _least_width(table: Table) -> int:
    """The narrowest the table renders without cutting a value or splitting a word."""
    options = out_console.options.update_width(10**4)
    return Measurement.get(out_console, options, table).minimum


def print_wrote(out: Path) -> None:
    """The files a run or a profile wrote."""
    out_console.print(f"wrote {escape(str(out / 'result.json'))} and "
                      f"{escape(str(out / 'profile.png'))}")


def print_left_range(result) -> None:
    """Where a result's forward pass left float range, if it did."""
    note = result.range_note()
    if note:
        out_console.print(f"[magenta]{escape(note)}[/]")


def print_result(result: RunResult) -> None:
    c = result.config
    print_summary(f"{c.label()}, task {c.task}, T={result.task['seq_len']}, H={c.hidden}, "
                  f"B={c.batch}", result)
    if result.theory is not None:
        print_theory(result.theory)
    t = result.training
    if t is not None:
        colour = "magenta" if t.diverged_at is not None else "green" if t.learned else "red"
        out_console.print(f"[{colour}]{t.outcome()}[/]")
        last = t.snapshots[-1]
        out_console.print("after training: " + ", ".join(
            f"{name} {slope_text(s, last.profiles[name], int(result.steps(name)[0]))}"
            for name, s in last.summary.items()))
    print_left_range(result)


def print_theory(theory: dict) -> None:
    table = Table(title="theory vs measurement (slopes, log10 per step)")
    for col in ("prediction", "probe", "predicted", "measured", "agrees", "caveats"):
        table.add_column(col, overflow="fold", no_wrap=col != "caveats")
    for p in theory["predictions"]:
        agrees = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[p["agrees"]]
        table.add_row(p["name"], p["probe"], number_text(p["predicted"], "+.4f"),
                      number_text(p["measured"], "+.4f"), agrees, "; ".join(p["caveats"]))
    print_table(table)
    line = "Lyapunov exponents (ln/step): " + ", ".join(
        f"{x:+.3f}" for x in theory["lyapunov"][:4] if x is not None)
    if "sigma_max" in theory:  # a built-in configuration's (a module's theory has no more)
        line += f"; sigma_max(W_hh) = {theory['sigma_max']:.3f}"
        if theory["spectral_radius"] is not None:
            line += f", spectral radius {theory['spectral_radius']:.3f}"
        line += f"; {theory['pascanu_case']}"
    out_console.print(line)
    if theory.get("bound_holds") is False:
        out_console.print("[red]the measured jacobian exceeds the Pascanu bound[/]")


def _comma_list(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _default_out(name: str, holds_this: Callable[[dict], bool]) -> Path:
    """runs/NAME; or, where that holds the result of another run (a default name leaves most
    options out), the first runs/NAME-2, -3, ... that is free or holds this run's
    (``holds_this(result.json's data)``): a default folder never replaces another result."""
    base = out = Path("runs") / name
    n = 2
    while (out / "result.json").exists() and not _holds(out, holds_this):
        out, n = Path("runs") / f"{name}-{n}", n + 1
    if out != base:
        err_console.print(f"gradscope: note: {base} holds the result of another run; writing "
                          f"{out}", markup=False, soft_wrap=True)
    return out


def _holds(folder: Path, holds_this: Callable[[dict], bool]) -> bool:
    try:
        return holds_this(json.loads((folder / "result.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):  # unreadable: keep it
        return False


def _default_name(c: RunConfig) -> str:
    cell = f"{c.cell}-{c.activation}" if c.activation else c.cell
    return f"{cell}-{c.init}-{c.task}-T{c.seq_len}-s{c.seed}"


_INTERRUPTED = ("gradscope: interrupted; nothing half-written is left, and a sweep's finished "
                "runs are saved: run the same command again to resume")


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (a GPU), or the CPU allocator's failure, by its message."""
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and configuration errors are one line on stderr and exit code 2."""
    _ARGV[:] = sys.argv[1:] if argv is None else argv  # recorded in result metadata
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: stop workers, keep results
    try:
        code = app(args=argv, prog_name="gradscope", standalone_mode=False)
    except (ConfigError, typer.TyperException) as e:
        message = e.format_message() if isinstance(e, typer.TyperException) else str(e)
        ctx = getattr(e, "ctx", None)
        if ctx is not None and message == ctx.get_help():  # `gradscope` alone: its help
            err_console.print(message, markup=False, highlight=False)
            sys.exit(2)
        err_console.print(f"gradscope: error: {message}", markup=False, soft_wrap=True)
        sys.exit(2)
    except GradscopeError as e:  # not the user's input: the store, the disk, a lock
        err_console.print(f"gradscope: error: {e}", markup=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print(_INTERRUPTED, markup=False)
        sys.exit(130)
    except RuntimeError as e:  # torch's allocator, where a size got past the estimate
        if not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        err_console.print(f"gradscope: error: out of memory ({first}); lower the sequence "
                          "length, batch or hidden size, or add --checkpoint to a run",
                          markup=False, soft_wrap=True)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C (and our SIGTERM) into this exit code
        err_console.print(_INTERRUPTED, markup=False)
    sys.exit(code if isinstance(code, int) else 0)
