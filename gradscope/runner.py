"""One run, start to finish: check the configuration, build, measure, train, measure again.

``execute`` writes nothing; the API saves its result, and sweeps send it to their store.
"""

from __future__ import annotations

import math
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import torch

from .cells import CELLS
from .config import RunConfig
from .engine import GPU_DTYPE, gpu_slices_bytes
from .errors import ConfigError
from .linear import KEPT_GATES_BYTES, fused_wins_on_cpu, has_fused_adjoint
from .measure import snapshot
from .model import Built, build, generator, validate
from .probes import PROBES, Probe, probes_for
from .results import RunResult, Snapshot, Training
from .tasks import Batch
from .theory import predict
from .train import EVAL_BATCH, OPTIMIZERS, TrainOutcome, train
from .version import __version__


def check_config(config: RunConfig) -> tuple[torch.device, list[Probe]]:
    """Every check of a configuration, before any work: raises ConfigError."""
    OPTIMIZERS.get(config.optimizer)  # an unknown name before an option that does not apply
    validate(config)
    device = resolve_device(config.device)
    probes = resolve_probes(config)
    check_memory(config, probes, device)
    return device, probes


def memory_estimate(config: RunConfig, probes: list[Probe],
                    device: torch.device | None = None) -> int:
    """Bytes a run holds at its peak, before anything is allocated: the stored trajectory and
    loss gradients (2 x T x B x S), the inputs' projections (T x B x G x H), and the forward
    probes' K directions (a few copies of K x B x S), and the LSTM gates its trajectory keeps
    (linear.KEPT_GATES_BYTES at most); where the adjoint may come from the fused kernel, its
    graph too (about 8 values per hidden unit, sample and step, as measured by
    ``benchmarks/run.py --memory``). With ``checkpoint``, the adjoint's checkpoints and one
    segment (about 2 sqrt(T) states) and a chunk of projections."""
    cell = CELLS.get(config.cell)
    itemsize = 8 if config.dtype == "float64" else 4
    T = config.seq_len + (20 if config.task == "copy" else 0)
    B, H = config.batch, config.hidden
    S = H * len(cell.parts)
    K = H * len({p.wrt for p in probes if p.pass_ == "forward"})
    if config.checkpoint:
        kept = 4 * (math.isqrt(T) + 64)  # checkpoints, a segment, its loss gradients
        return itemsize * (kept * B * S + 256 * B * len(cell.gates) * H + 4 * K * B * S)
    kept = min(T * B * 4 * H * itemsize, KEPT_GATES_BYTES) if config.cell == "lstm" else 0
    on_gpu = device is not None and device.type == "cuda"
    fused = any(p.pass_ == "reverse" for p in probes) \
        and has_fused_adjoint(config.cell, config.activation) \
        and (on_gpu or fused_wins_on_cpu(config.cell, H))
    graph = 8 * T * B * H * (GPU_DTYPE.itemsize if on_gpu else itemsize) if fused else 0
    slices = gpu_slices_bytes(device, T * K * B * S)
    return itemsize * (2 * (T + 1) * B * S + T * B * len(cell.gates) * H + 4 * K * B * S) \
        + kept + graph + slices


def check_memory(config: RunConfig, probes: list[Probe], device: torch.device) -> None:
    check_fits(memory_estimate(config, probes, device), device, "this run",
               f"--seq-len {config.seq_len} x --batch {config.batch} x --hidden "
               f"{config.hidden}, {config.dtype}",
               "lower --seq-len, --batch or --hidden, use --dtype float32, choose fewer --probes"
               + ("" if config.checkpoint else ", or add --checkpoint (the adjoint then keeps "
                  "every ~sqrt(T)-th state and recomputes the rest)"))


def check_fits(need: int, device: torch.device, what: str, sizes: str, advice: str) -> None:
    """Raise ConfigError, with the estimate, where ``need`` bytes are more than 80% of what
    is free on ``device``: ``what`` needs about N GiB (``sizes``) ...: ``advice``."""
    have = available_bytes(device)
    if have is not None and need > 0.8 * have:
        raise ConfigError(f"{what} needs about {need / 2**30:.1f} GiB ({sizes}) and about "
                          f"{have / 2**30:.1f} GiB is free on {device}: {advice}")


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for a run on ``device`` (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:  # closed: no ResourceWarning
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def execute(config: RunConfig, command: str | None = None,
            on_phase: Callable[[str], None] = lambda phase: None) -> RunResult:
    """Measure one configuration's per-step gradient-flow profiles; with ``steps``, also train
    it by BPTT and measure again every ``profile_every`` steps and at the end.
    ``on_phase(text)`` is told what the run does next ("measuring the profiles at step 0",
    "training: 12 of 400 steps done", ...), for a display of its progress.

    Raises ConfigError for bad input before any work is done.
    """
    device, probes = check_config(config)
    built = build(config, device)
    built.model.requires_grad_(False)  # measurement differentiates states only; train() flips it

    def measure_now(step: int) -> Snapshot:
        on_phase(f"measuring the profiles at step {step}")
        return snapshot(built.model, built.batch, probes, step=step, seed=config.seed,
                        **snapshot_options(config))

    initial = measure_now(0)
    if config.theory_k > 0:
        on_phase("the theory: Lyapunov exponents")
    theory = initial_theory(config, built, initial)
    training = None
    if config.steps > 0:
        training = _train(config, built, device, measure_now, on_phase)
    return assemble(config, built, initial, theory, training, device, command)


def forward_work(config: RunConfig, probes: list[Probe]) -> int:
    """Multiply-adds of one measurement's forward probes, about: each of K directions per
    sequence (H, or ``projections``, per part they start from) goes through every step's
    recurrent matrix (G*H x H)."""
    cell = CELLS.get(config.cell)
    starts = len({p.wrt for p in probes if p.pass_ == "forward"})
    directions = starts * (config.projections or config.hidden)
    sequences = config.jacobian_samples or config.batch
    return sequences * directions * config.seq_len * len(cell.gates) * config.hidden ** 2


def forward_cost_note(config: RunConfig, probes: list[Probe],
                      device: torch.device) -> str | None:
    """A line for the user where a run's forward probes will take long on a CPU: above 1e12
    multiply-adds in all, with a time at 4e10 a second (2 cores of this project's machines:
    an LSTM of H = 256 over T = 1000, 32 sequences, 4.3e12 in 102 s) and the options that cut
    it; None otherwise."""
    measurements = 1
    if config.steps:
        every = config.profile_every or config.steps
        measurements += config.steps // every + (config.steps % every > 0)
    work = forward_work(config, probes) * measurements
    if device.type != "cpu" or work <= 1e12:
        return None
    sequences = config.jacobian_samples or config.batch
    cheaper = [f"--jacobian-samples {n}" for n in (4,) if n < sequences]
    if not config.projections and config.hidden >= 64:
        cheaper.append(f"--projections 32 (estimates; {config.hidden // 32}x fewer directions)")
    times = f" in {measurements} measurements" if measurements > 1 else ""
    kind = "estimated" if config.projections else "exact"
    return (f"the {kind} forward probes on {sequences} sequences take about {work:.0e} "
            f"multiply-adds{times}, about {work / 4e10:.0f} s on 2 CPU cores"
            + (f"; {' or '.join(cheaper)} costs less" if cheaper else ""))


def snapshot_options(config: RunConfig) -> dict:
    """The options of ``measure.snapshot`` that a configuration sets."""
    return dict(drop=config.horizon_drop, band=config.stable_decades,
                jacobian_samples=config.jacobian_samples, projections=config.projections,
                checkpoint=config.checkpoint)


def initial_theory(config: RunConfig, built: Built, initial: Snapshot,
                   exponents: np.ndarray | None = None) -> dict | None:
    """Theory beside the measurement at initialisation, unless turned off or out of range."""
    if config.theory_k <= 0 or initial.nonfinite is not None:
        return None
    measured = {name: s.slope for name, s in initial.summary.items()}
    return predict(built.model, built.model.unroll(built.batch), measured, k=config.theory_k,
                   init=config.init, jacobian=initial.profiles.get("jacobian"),
                   exponents=exponents).to_dict()


def assemble(config: RunConfig, built: Built, initial: Snapshot, theory: dict | None,
             training: Training | None, device: torch.device,
             command: str | None) -> RunResult:
    return RunResult(
        config=config,
        task={"name": built.task.name, "variant": built.task.variant,
              "seq_len": built.batch.seq_len, "chance_loss": built.task.chance(config.seq_len)},
        profiles=initial.profiles,
        axes={p.name: p.axis for p in resolve_probes(config)},
        summary=initial.summary,
        nonfinite=initial.nonfinite,
        meta=run_meta(device, config.dtype, command),
        training=training,
        theory=theory,
    )


def training_batches(config: RunConfig, built: Built, device: torch.device,
                     ) -> tuple[Callable[[], Batch], Batch]:
    """(the next training batch, the held-out batch) of a configuration's seeded streams."""
    dtype = getattr(torch, config.dtype)
    train_gen = generator(config.seed, "train")
    eval_batch = built.task.generate(config.seq_len, EVAL_BATCH, generator(config.seed, "eval"))
    return (lambda: built.task.generate(config.seq_len, config.batch,
                                        train_gen).to(device, dtype),
            eval_batch.to(device, dtype))


def training_result(outcome: TrainOutcome, snapshots: list[Snapshot],
                    chance: float) -> Training:
    return Training(curve=outcome.curve, steps_done=outcome.steps_done,
                    diverged_at=outcome.diverged_at, final_loss=outcome.final_loss,
                    chance_loss=chance, accuracy=outcome.accuracy, learned=outcome.learned,
                    snapshots=snapshots)


def _train(config: RunConfig, built: Built, device: torch.device,
           measure_now: Callable[[int], Snapshot],
           on_phase: Callable[[str], None]) -> Training:
    chance = built.task.chance(config.seq_len)
    next_batch, eval_batch = training_batches(config, built, device)
    snapshots: list[Snapshot] = []

    def on_step(step: int) -> None:
        if config.profile_every and step % config.profile_every == 0:
            snapshots.append(measure_now(step))
        on_phase(f"training: {step} of {config.steps} steps done")

    [outcome] = train(built.model, steps=config.steps, optimizer=config.optimizer, lr=config.lr,
                      clip=config.clip, next_batch=next_batch, eval_batch=eval_batch,
                      chance=chance, on_step=on_step)
    if not snapshots or snapshots[-1].step != outcome.steps_done:
        snapshots.append(measure_now(outcome.steps_done))  # the trained model, always
    return training_result(outcome, snapshots, chance)


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


def run_meta(device: torch.device, dtype: str, command: str | None) -> dict:
    """Versions, device, dtype, time and command: the `meta` of a result."""
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
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }
