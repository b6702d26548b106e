"""Executors: run configurations somewhere and yield their outcomes as they finish.

One small interface (``Executor.run(jobs) -> Iterator[Outcome]``), three implementations. A job
is a list of configurations that differ only in their seed (``batched.group_seeds``): it runs as
one seed stack (``batched.execute_seeds``) and yields one outcome per configuration.

- ``InlineExecutor``: in this process, one after another (``--workers 1``; no isolation).
- ``LocalExecutor``: worker processes on this machine, one torch thread each (the default).
- ``RayExecutor``: Ray tasks on a local or remote Ray cluster (``gradscope[ray]``).

Whatever runs where, outcomes come back to the driver, which alone writes the store. A run whose
worker process dies (killed, out of memory, a crash in native code) is retried up to
``retries`` times on a fresh worker, then reported as failed with the reason; the other runs
carry on. A run that raises is reported as failed at once (its error would repeat). A stack of
seeds whose worker dies, or that raises, is split into its seeds, which run one by one, so that
one bad seed (or a stack too big for memory) costs the others nothing.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Protocol

import torch

from .batched import execute_seeds
from .config import RunConfig
from .errors import ConfigError
from .results import RunResult
from .runner import execute

DEFAULT_RETRIES = 2
# Fault injection for the test suite: a run with this seed kills its own worker process.
CRASH_SEED_ENV = "GRADSCOPE_TEST_CRASH_SEED"


@dataclass(frozen=True)
class Outcome:
    config: RunConfig
    result: RunResult | None  # None when the run failed
    error: str | None  # the failure, in one line
    duration_s: float


Job = list[RunConfig]  # configurations that differ only in their seed


def execute_job(job: Job) -> list[Outcome]:
    """Run a job with one torch thread: a stack of seeds, or one configuration. A run that
    raises becomes a failed Outcome; a stack that raises is run again seed by seed."""
    if os.environ.get(CRASH_SEED_ENV) in {str(c.seed) for c in job}:
        os.kill(os.getpid(), signal.SIGKILL)
    torch.set_num_threads(1)
    if len(job) == 1:
        return [_execute_one(job[0])]
    start = time.perf_counter()
    try:
        results = execute_seeds(job, command="gradscope sweep")
    except Exception:  # find out which seed fails, and keep the others
        return [_execute_one(config) for config in job]
    each = (time.perf_counter() - start) / len(job)
    return [Outcome(c, r, None, each) for c, r in zip(job, results, strict=True)]


def _execute_one(config: RunConfig) -> Outcome:
    start = time.perf_counter()
    try:
        result = execute(config, command="gradscope sweep")
        return Outcome(config, result, None, time.perf_counter() - start)
    except Exception as e:  # a run that fails must not stop the sweep
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"
        return Outcome(config, None, error, time.perf_counter() - start)


class Executor(Protocol):
    """Runs jobs and yields one outcome per configuration as they finish, in any order."""

    def run(self, jobs: list[Job]) -> Iterator[Outcome]: ...


class InlineExecutor:
    """In this process, one after another."""

    def run(self, jobs: list[Job]) -> Iterator[Outcome]:
        threads = torch.get_num_threads()
        try:
            for job in jobs:
                yield from execute_job(job)
        finally:
            torch.set_num_threads(threads)


def _serve(conn) -> None:
    """A worker process: run what the driver sends until it sends None."""
    while (job := conn.recv()) is not None:
        conn.send(execute_job(job))


@dataclass
class _Worker:
    process: object
    conn: object
    job: tuple[Job, int] | None = None  # (job, attempt) in flight


class LocalExecutor:
    """Worker processes on this machine; the driver knows which run each one holds, so a dead
    worker's run, and only that run, is retried."""

    def __init__(self, workers: int, retries: int = DEFAULT_RETRIES) -> None:
        self.workers = workers
        self.retries = retries

    def run(self, jobs: list[Job]) -> Iterator[Outcome]:
        context = get_context("spawn")
        queue = deque((job, 0) for job in jobs)
        pool: list[_Worker] = []

        def start() -> _Worker:
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            return _Worker(process, ours)

        try:
            while queue or any(w.job for w in pool):
                idle = sum(w.job is None for w in pool)
                while len(queue) > idle and len(pool) < self.workers:  # no more than work
                    pool.append(start())
                    idle += 1
                for w in pool:
                    if w.job is None and queue:
                        w.job = queue.popleft()
                        w.conn.send(w.job[0])
                busy = [w for w in pool if w.job]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn not in ready and w.process.sentinel not in ready:
                        continue
                    try:
                        outcomes = w.conn.recv()
                    except (EOFError, OSError):  # the worker died holding w.job
                        pool.remove(w)
                        w.process.join()
                        job, attempt = w.job
                        if len(job) > 1:  # a stack: its seeds one by one, with fresh tries
                            queue.extendleft(([config], 0) for config in reversed(job))
                        elif attempt < self.retries:
                            queue.appendleft((job, attempt + 1))
                        else:
                            yield Outcome(job[0], None, f"worker process died "
                                          f"({_exit(w.process)}) on each of {attempt + 1} tries",
                                          0.0)
                        continue
                    w.job = None
                    yield from outcomes
        finally:
            for w in pool:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in pool:
                w.process.join(timeout=2)
                if w.process.is_alive():
                    w.process.kill()


def _exit(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class RayExecutor:
    """Ray tasks: one CPU each, ``gpus_per_run`` of a GPU each (0.25 packs four on a GPU).

    ``address``: None starts a local Ray instance for this sweep; "auto" or "ray://host:port"
    joins an existing cluster (KubeRay, Slurm, VMs), whose nodes need gradscope installed.
    """

    def __init__(self, address: str | None = None, gpus_per_run: float = 0.0,
                 retries: int = DEFAULT_RETRIES, num_cpus: int | None = None) -> None:
        self.address = address
        self.gpus_per_run = gpus_per_run
        self.retries = retries
        self.num_cpus = num_cpus

    def run(self, jobs: list[Job]) -> Iterator[Outcome]:
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            options = {}
            if self.address is None and self.num_cpus is not None:  # no more CPUs than work
                options["num_cpus"] = min(self.num_cpus, max(1, len(jobs)))
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     **options)
        task = ray.remote(num_cpus=1, num_gpus=self.gpus_per_run,
                          max_retries=self.retries)(execute_job)
        pending = {task.remote(job): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        yield from ray.get(ref)
                    except Exception as e:  # the task's worker died on every try
                        if len(job) > 1:  # a stack: its seeds one by one
                            pending.update({task.remote([c]): [c] for c in job})
                            continue
                        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        yield Outcome(job[0], None, f"ray task failed on each of "
                                      f"{self.retries + 1} tries: {type(e).__name__}: {reason}",
                                      0.0)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'gradscope[ray]'") from None
    return ray


EXECUTORS = ("local", "ray")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def make_executor(name: str = "local", *, workers: int | None = None,
                  retries: int = DEFAULT_RETRIES, address: str | None = None,
                  gpus_per_run: float = 0.0) -> Executor:
    """The executor a sweep's options describe; ConfigError for options that make no sense."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r} for --executor; choose from: "
                          + ", ".join(EXECUTORS))
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    if gpus_per_run < 0:
        raise ConfigError(f"--gpus-per-run must be >= 0, got {gpus_per_run}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    if name == "ray":
        import_ray()
        return RayExecutor(address, gpus_per_run, retries, num_cpus=workers)
    if address is not None or gpus_per_run:
        raise ConfigError("--address and --gpus-per-run apply to --executor ray")
    workers = default_workers() if workers is None else workers
    return InlineExecutor() if workers == 1 else LocalExecutor(workers, retries)
