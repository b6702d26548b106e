"""One run, start to finish: check the configuration, build, measure, train, measure again.

``execute`` writes nothing; the API saves its result, and sweeps send it to their store.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from .cells import CELLS
from .config import RunConfig
from .errors import ConfigError
from .measure import snapshot
from .model import Built, build, generator, validate
from .probes import PROBES, Probe, probes_for
from .results import RunResult, Snapshot, Training
from .theory import predict
from .train import EVAL_BATCH, OPTIMIZERS, train
from .version import __version__


def check_config(config: RunConfig) -> tuple[torch.device, list[Probe]]:
    """Every check of a configuration, before any work: raises ConfigError."""
    validate(config)
    device = resolve_device(config.device)
    probes = resolve_probes(config)
    OPTIMIZERS.get(config.optimizer)
    check_memory(config, probes, device)
    return device, probes


def memory_estimate(config: RunConfig, probes: list[Probe]) -> int:
    """Bytes a run holds at its peak, before anything is allocated: the stored trajectory and
    loss gradients (2 x T x B x S), the inputs' projections (T x B x G x H), and the forward
    probes' K directions (a few copies of K x B x S)."""
    cell = CELLS.get(config.cell)
    itemsize = 8 if config.dtype == "float64" else 4
    T = config.seq_len + (20 if config.task == "copy" else 0)
    B, H = config.batch, config.hidden
    S = H * len(cell.parts)
    K = H * len({p.wrt for p in probes if p.pass_ == "forward"})
    return itemsize * (2 * (T + 1) * B * S + T * B * len(cell.gates) * H + 4 * K * B * S)


def check_memory(config: RunConfig, probes: list[Probe], device: torch.device) -> None:
    need = memory_estimate(config, probes)
    have = _available_bytes(device)
    if have is not None and need > 0.8 * have:
        raise ConfigError(
            f"this run needs about {need / 2**30:.1f} GiB (--seq-len {config.seq_len} x --batch "
            f"{config.batch} x --hidden {config.hidden}, {config.dtype}) and about "
            f"{have / 2**30:.1f} GiB is free on {device}: lower --seq-len, --batch or "
            "--hidden, use --dtype float32, or choose fewer --probes")


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def execute(config: RunConfig, command: str | None = None) -> RunResult:
    """Measure one configuration's per-step gradient-flow profiles; with ``steps``, also train
    it by BPTT and measure again every ``profile_every`` steps and at the end.

    Raises ConfigError for bad input before any work is done.
    """
    device, probes = check_config(config)
    built = build(config, device)
    built.model.requires_grad_(False)  # measurement differentiates states only; train() flips it

    def measure_now(step: int) -> Snapshot:
        return snapshot(built.model, built.batch, probes, step=step, drop=config.horizon_drop,
                        band=config.stable_decades, jacobian_samples=config.jacobian_samples,
                        projections=config.projections, seed=config.seed)

    initial = measure_now(0)
    theory = None
    if config.theory_k > 0 and initial.nonfinite is None:
        measured = {name: s.slope for name, s in initial.summary.items()}
        theory = predict(built.model, built.model.unroll(built.batch), measured,
                         k=config.theory_k, init=config.init,
                         jacobian=initial.profiles.get("jacobian")).to_dict()
    chance = built.task.chance(config.seq_len)
    training = None
    if config.steps > 0:
        training = _train(config, built, device, chance, measure_now)
    result = RunResult(
        config=config,
        task={"name": built.task.name, "variant": built.task.variant,
              "seq_len": built.batch.seq_len, "chance_loss": chance},
        profiles=initial.profiles,
        axes={p.name: p.axis for p in probes},
        summary=initial.summary,
        nonfinite=initial.nonfinite,
        meta=_meta(device, config.dtype, command),
        training=training,
        theory=theory,
    )
    return result


def _train(config: RunConfig, built: Built, device: torch.device, chance: float,
           measure_now: Callable[[int], Snapshot]) -> Training:
    dtype = getattr(torch, config.dtype)
    train_gen = generator(config.seed, "train")
    eval_batch = built.task.generate(config.seq_len, EVAL_BATCH, generator(config.seed, "eval"))
    snapshots: list[Snapshot] = []

    def on_step(step: int) -> None:
        if config.profile_every and step % config.profile_every == 0:
            snapshots.append(measure_now(step))

    [outcome] = train(
        built.model, steps=config.steps, optimizer=config.optimizer, lr=config.lr,
        clip=config.clip,
        next_batch=lambda: built.task.generate(config.seq_len, config.batch,
                                               train_gen).to(device, dtype),
        eval_batch=eval_batch.to(device, dtype), chance=chance, on_step=on_step,
    )
    if not snapshots or snapshots[-1].step != outcome.steps_done:
        snapshots.append(measure_now(outcome.steps_done))  # the trained model, always
    return Training(curve=outcome.curve, steps_done=outcome.steps_done,
                    diverged_at=outcome.diverged_at, final_loss=outcome.final_loss,
                    chance_loss=chance, accuracy=outcome.accuracy, learned=outcome.learned,
                    snapshots=snapshots)


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
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }
