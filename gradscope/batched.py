"""Batched seeds: S runs of one configuration that differ only in their seed, as one computation.

Each seed's model and data are drawn exactly as a run of its own would draw them; then every
weight is stacked along a new leading dimension (``(S, G*H, H)``, ...) and the S probe batches
side by side, seed-major. ``cells.affine`` applies each seed's weights to its own samples, so
one pass of the engine, one Lyapunov pass and one training loop serve all S seeds, and each
seed's numbers are what ``runner.execute`` gives it alone, up to floating-point rounding (the
tests hold them to that).

What a stack cannot share is handed back to the seeds one by one: a measurement that leaves
float range (which seed stopped where is each seed's own story), and a seed whose training
diverges (rerun alone, so that its record stops where a run of its own stops).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from .config import MAX_SEEDS, RunConfig
from .measure import snapshot, snapshot_groups
from .model import Built, Model, build
from .results import RunResult, Snapshot
from .runner import (
    assemble,
    check_config,
    execute,
    initial_theory,
    resolve_device,
    snapshot_options,
    training_batches,
    training_result,
)
from .tasks import Batch
from .theory import lyapunov
from .train import train


def stack_pays(config: RunConfig) -> bool:
    """Whether seeds of this configuration run faster as a stack than one at a time. Measured
    on the CPU (benchmarks/run.py --seeds, 8 seeds, H = 32, T = 200, one thread): with 8
    sequences per seed a stack gave 1.1-4.5x the throughput, and with 32 2.3-2.7x for training
    the RNN and GRU. Not above 16 sequences per seed for profiles alone (exact forward probes
    are arithmetic: 0.8-1.1x at 32, 1.0-1.4x at 16), nor for training the float32 LSTM (0.6x
    at 32, 1.0x at 16): one model trains in oneDNN's LSTM kernel, 5-10x faster than a loop
    (--train-paths), while a stack calls it once per seed and adds its own bookkeeping."""
    on_cpu = config.device != "cuda" and resolve_device(config.device).type == "cpu"
    kernel_alone = config.cell == "lstm" and config.dtype == "float32" and config.steps > 0
    return not (on_cpu and config.batch > 16 and (config.steps == 0 or kernel_alone))


def group_seeds(configs: Sequence[RunConfig], size: int = MAX_SEEDS) -> list[list[RunConfig]]:
    """Configurations that differ only in their seed, together (first-seen order), at most
    ``size`` to a group; one to a group where a stack does not pay (``stack_pays``)."""
    groups: dict[RunConfig, list[list[RunConfig]]] = {}
    for config in configs:
        stacks = groups.setdefault(replace(config, seed=0), [[]])
        if len(stacks[-1]) == (size if stack_pays(config) else 1):
            stacks.append([])
        stacks[-1].append(config)
    return [stack for stacks in groups.values() for stack in stacks]


def stack_models(models: Sequence[Model]) -> Model:
    """One model whose every weight is the S models' weights stacked, seed-major."""
    stacked = copy.deepcopy(models[0])
    for name, _ in models[0].named_parameters():
        owner, _, attr = name.rpartition(".")
        weight = torch.stack([m.get_parameter(name).detach() for m in models])
        setattr(stacked.get_submodule(owner), attr, nn.Parameter(weight))
    stacked.groups = len(models)
    return stacked


def unstack(stacked: Model, like: Model, g: int) -> Model:
    """Seed g of a stack, as a model of its own (a copy of ``like`` with seed g's weights)."""
    model = copy.deepcopy(like)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(stacked.get_parameter(name)[g])
    return model


def execute_seeds(configs: Sequence[RunConfig], command: str | None = None) -> list[RunResult]:
    """``runner.execute`` for each configuration, as one computation; ``configs`` must differ
    only in their seed. Raises ConfigError for bad input before any work is done."""
    if len({replace(c, seed=0) for c in configs}) != 1:
        raise ValueError("execute_seeds: the configurations must differ only in their seed")
    if len(configs) == 1:
        return [execute(configs[0], command)]
    device, probes = check_config(configs[0])
    builts = [build(config, device) for config in configs]
    if len({b.batch.seq_len for b in builts}) != 1:
        return [execute(config, command) for config in configs]
    results = _execute_stack(configs, builts, device, probes, command)
    return [result if result is not None else execute(config, command)  # diverged: alone
            for config, result in zip(configs, results, strict=True)]


def _execute_stack(configs: Sequence[RunConfig], builts: list[Built], device: torch.device,
                   probes: list, command: str | None) -> list[RunResult | None]:
    config = configs[0]
    seeds = [c.seed for c in configs]
    for b in builts:
        b.model.requires_grad_(False)
    model = stack_models([b.model for b in builts]).requires_grad_(False)
    batch = Batch.stack([b.batch for b in builts])

    def measure_now(step: int) -> list[Snapshot]:
        options = snapshot_options(config)
        snaps = snapshot_groups(model, batch, probes, step=step, seeds=seeds, **options)
        if snaps is not None:
            return snaps
        return [snapshot(unstack(model, b.model, g), b.batch, probes, step=step,
                         seed=seeds[g], **options) for g, b in enumerate(builts)]

    initial = measure_now(0)
    # 1. Theory: the Lyapunov exponents of all seeds in one pass; the rest per seed (small).
    exponents = None
    if config.theory_k > 0 and all(s.nonfinite is None for s in initial):
        exponents = lyapunov(model.unroll(batch), config.theory_k)
    theories = [initial_theory(c, b, s, None if exponents is None else exponents[g])
                for g, (c, b, s) in enumerate(zip(configs, builts, initial, strict=True))]
    # 2. Training: one loop for all seeds, each on its own stream of batches.
    trainings: list = [None] * len(configs)
    if config.steps > 0:
        trainings = _train_stack(configs, builts, model, device, measure_now)
    return [None if t is False else
            assemble(c, b, s, theory, t, device, command)
            for c, b, s, theory, t in zip(configs, builts, initial, theories, trainings,
                                          strict=True)]


def _train_stack(configs: Sequence[RunConfig], builts: list[Built], model: Model,
                 device: torch.device, measure_now) -> list:
    """Each seed's Training, or False for a seed that diverged (to be rerun alone)."""
    config = configs[0]
    chance = builts[0].task.chance(config.seq_len)
    streams = [training_batches(c, b, device) for c, b in zip(configs, builts, strict=True)]
    snapshots: list[list[Snapshot]] = [[] for _ in configs]

    def on_step(step: int) -> None:
        if config.profile_every and step % config.profile_every == 0:
            for seed_snaps, snap in zip(snapshots, measure_now(step), strict=True):
                seed_snaps.append(snap)

    outcomes = train(model, steps=config.steps, optimizer=config.optimizer, lr=config.lr,
                     clip=config.clip,
                     next_batch=lambda: Batch.stack([next_batch() for next_batch, _ in streams]),
                     eval_batch=Batch.stack([held_out for _, held_out in streams]),
                     chance=chance, on_step=on_step)
    final = None
    if not snapshots[0] or snapshots[0][-1].step != config.steps:
        final = measure_now(config.steps)  # the trained models, always
    return [False if o.diverged_at is not None else
            training_result(o, snaps + ([final[g]] if final else []), chance)
            for g, (o, snaps) in enumerate(zip(outcomes, snapshots, strict=True))]
