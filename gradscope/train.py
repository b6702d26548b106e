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
    final_loss: float | None  # held-out loss after training; None when it diverged
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
) -> TrainOutcome:
    """Train ``model`` in place; ``on_step(step)`` runs after every optimiser step."""
    opt = OPTIMIZERS.get(optimizer)(model.parameters(), lr=lr)
    model.requires_grad_(True)
    curve: list[float] = []
    diverged_at = None
    for step in range(1, steps + 1):
        loss = model.loss(next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
        value = float(loss.detach())
        if not (math.isfinite(value) and math.isfinite(float(norm))):
            diverged_at = step
            break
        opt.step()
        curve.append(value)
        on_step(step)
    model.requires_grad_(False)
    final_loss = accuracy = None
    if diverged_at is None:
        with torch.no_grad():
            value = float(model.loss(eval_batch))
        final_loss = value if math.isfinite(value) else None
        accuracy = model.accuracy(eval_batch)
    learned = final_loss is not None and final_loss <= LEARNED_FRACTION * chance
    return TrainOutcome(curve, len(curve), diverged_at, final_loss, accuracy, learned)
