"""BPTT training on a task, with gradient-flow snapshots while the model learns.

Each step draws a fresh batch from the task's seeded stream, backpropagates the task loss
through time, clips the gradient norm (Pascanu et al. 2013) and takes an optimiser step. The
final loss is measured on a held-out batch and judged against the task's chance baseline:
``learned`` means a final loss at most LEARNED_FRACTION of chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .linear import full_float32
from .model import Model
from .registry import Registry
from .tasks import Batch

LEARNED_FRACTION = 0.5  # learned: final loss <= this fraction of the chance-level loss
EVAL_BATCH = 256  # sequences in the held-out batch that scores the final loss

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer", "--optimizer")
OPTIMIZERS.add("adam", torch.optim.Adam, "Adam (Kingma & Ba 2015)")
OPTIMIZERS.add("rmsprop", torch.optim.RMSprop, "RMSprop, as in Arjovsky et al. 2016")
OPTIMIZERS.add("sgd", torch.optim.SGD, "plain stochastic gradient descent")


@dataclass(frozen=True)
class TrainOutcome:
    curve: list[float]  # training loss at steps 1..steps_done
    steps_done: int  # optimiser steps taken (fewer than asked when training diverged)
    diverged_at: int | None  # the step whose loss or gradient was NaN or Inf
    final_loss: float | None  # held-out loss after training; None when it diverged or is
    # not finite (the last update, which no training step checks, can leave float range)
    accuracy: float | None  # held-out accuracy for classification tasks
    learned: bool


def train(
    model: Model,
    *,
    steps: int,
    optimizer: str,
    lr: float,
    clip: float | None,
    next_batch: Callable[[], Batch],
    eval_batch: Batch,
    chance: float,
    on_step: Callable[[int], None] = lambda step: None,
) -> list[TrainOutcome]:
    """Train ``model`` in place; ``on_step(step)`` runs after every optimiser step. One outcome
    per seed of a seed-stacked model (gradscope.batched), else one.

    The optimisers act elementwise, so the seeds of a stacked model train exactly as they would
    alone, given that the gradient is clipped per seed. A seed that diverges is zeroed and left
    out from then on (the caller reruns it alone); a lone model stops there.
    """
    with full_float32():  # the recurrence may run in cuDNN, which would take TF32 otherwise
        return _train(model, steps, optimizer, lr, clip, next_batch, eval_batch, chance,
                      on_step)


def _train(model: Model, steps: int, optimizer: str, lr: float, clip: float | None,
           next_batch: Callable[[], Batch], eval_batch: Batch, chance: float,
           on_step: Callable[[int], None]) -> list[TrainOutcome]:
    opt = OPTIMIZERS.get(optimizer)(model.parameters(), lr=lr)
    model.requires_grad_(True)
    S = model.groups
    curves: list[list[float]] = [[] for _ in range(S)]
    diverged: list[int | None] = [None] * S
    for step in range(1, steps + 1):
        losses = model.group_losses(next_batch())  # (S,)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        norms = _clip(model, clip)
        values = losses.detach().tolist()
        for g in range(S):
            if diverged[g] is None and not (math.isfinite(values[g]) and math.isfinite(norms[g])):
                diverged[g] = step
        if S == 1 and diverged[0] is not None:
            break
        opt.step()
        for g in range(S):
            if diverged[g] is None:
                curves[g].append(values[g])
            elif S > 1:
                _zero_group(model, g)
        on_step(step)
    model.requires_grad_(False)
    with torch.no_grad():
        final = model.group_losses(eval_batch).tolist()
    accuracy = model.accuracy(eval_batch)
    outcomes = []
    for g in range(S):
        loss = final[g] if diverged[g] is None and math.isfinite(final[g]) else None
        learned = loss is not None and loss <= LEARNED_FRACTION * chance
        scored = accuracy is not None and loss is not None
        outcomes.append(TrainOutcome(curves[g], len(curves[g]), diverged[g], loss,
                                     accuracy[g] if scored else None, learned))
    return outcomes


def _clip(model: Model, clip: float | None) -> list[float]:
    """Clip the gradient to norm ``clip`` (Pascanu et al. 2013), each seed's on its own; return
    each seed's norm before clipping."""
    if model.groups == 1:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
        return [float(norm)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (S,)
    if clip:
        coef = (clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms.tolist()


def _zero_group(model: Model, g: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p[g].zero_()
