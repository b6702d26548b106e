"""A user's own recurrent module measured whole, as `gradscope run` measures a built-in
configuration: every probe the module offers, each deeper layer's initial state among them
(``gradscope.profile``, ``gradscope profile``). `gradscope check` prepares its modules here too,
and measures the one probe its rules read.

The module's own weights are unrolled step by step (``usermodel``); the inputs are random
N(0, 1) and the loss a fixed random projection of the top layer's h, both seeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import usermodel
from .checkconfig import CheckSpec
from .config import is_count
from .engine import Unrolled, measure
from .errors import ConfigError
from .model import Idle
from .probes import PROBES, Probe, layer_probes, probes_for, unread, unread_applies_to
from .results import FIRST_STEP, ModelProfile
from .runner import check_fits, resolve_device, run_meta
from .summary import summarize
from .theory import predict_module

NAME_WIDTH = 80  # a module's repr longer than this (or of several lines) is named by its class


class Prepared(NamedTuple):
    unrolled: Unrolled  # the engine's view of the module on its inputs
    probes: list[Probe]  # every probe the module offers, deeper layers' initial states last
    name: str  # the factory's import path, or the module's repr
    input_size: int  # features per step of the inputs


def prepare(spec: CheckSpec, module: object | None, device: torch.device, *, reverse: bool
            ) -> Prepared:
    """``module`` (else what ``spec.model``'s factory returns) ready for the engine. Refused
    with an estimate where it cannot fit; ``reverse``: the adjoint, which stores the
    trajectory, is to be measured."""
    if module is None:
        module = usermodel.make(spec.model, spec.model_args, spec.where("model"))
        name = spec.model
    else:
        name = describe(module)
    adapted = usermodel.adapt(module, spec.where("model"), getattr(torch, spec.dtype))
    if spec.input_size is not None and spec.input_size != adapted.input_size:
        raise ConfigError(f"{spec.where('input-size')} {spec.input_size} does not match the "
                          f"model's input_size {adapted.input_size}")
    check_fits(usermodel.memory_estimate(adapted, spec.seq_len, spec.batch, device,
                                         reverse=reverse),
               device, f"{spec.where()}: measuring the model",
               f"seq-len {spec.seq_len} x batch {spec.batch} x its state of "
               f"{len(adapted.parts)} x {adapted.hidden} values, {spec.dtype}",
               "lower --seq-len or --batch" if spec.flags else "lower seq-len or batch")
    try:
        unrolled = usermodel.unroll(adapted, seq_len=spec.seq_len, batch=spec.batch,
                                    seed=spec.seed, input_size=spec.input_size, device=device)
    except ConfigError as e:  # its messages do not know where the check came from
        raise ConfigError(f"{spec.where()}: {e}") from None
    probes = [PROBES.get(n) for n in probes_for(adapted.parts)]
    return Prepared(unrolled, probes + layer_probes(adapted.parts), name,
                    spec.input_size or adapted.input_size)


def describe(module: object) -> str:
    """A module's name for results: its repr where that is one short line
    ('LSTM(16, 64, num_layers=2)'), else its class's name."""
    text = repr(module)
    return text if "\n" not in text and len(text) <= NAME_WIDTH else type(module).__name__


def profile(spec: CheckSpec, module: object | None = None,
            probes: Sequence[str] | None = None, *, projections: int | None = None,
            checkpoint: bool = False, theory_k: int = 8,
            command: str | None = None) -> ModelProfile:
    """Measure ``probes`` (default: every one the module offers) of ``module``, or of what
    ``spec.model``'s factory returns, over ``spec.seq_len`` steps of ``spec.batch`` sequences.

    ``projections`` P: the forward probes are estimated from P random directions per part
    (error about sqrt(2/P)) instead of all H; ``checkpoint``: the adjoint keeps every
    ~sqrt(T)-th state and recomputes the rest; ``theory_k``: Lyapunov exponents beside the
    measurement (0: none).
    """
    if not is_count(theory_k, 0):
        raise ConfigError(f"{spec.where('theory-k')} must be a non-negative integer, got "
                          f"{theory_k!r}")
    if projections is not None and not is_count(projections, 1):
        raise ConfigError(f"{spec.where('projections')} must be a positive integer, got "
                          f"{projections!r}")
    if probes is not None:
        probes = list(dict.fromkeys(probes))
        if not probes:
            raise ConfigError(f"{spec.where('probes')}: give at least one probe, or leave it "
                              "out for every one the model offers")
    device = resolve_device(spec.device)
    ready = prepare(spec, module, device, reverse=probes is None or "adjoint" in probes)
    unrolled = ready.unrolled
    by_name = {p.name: p for p in ready.probes}
    for wanted in probes or []:
        if wanted not in by_name:
            raise ConfigError(f"{spec.where('probes')}: {wanted!r} does not apply to this "
                              "model; it offers: " + ", ".join(by_name))
    chosen = ready.probes if probes is None else [by_name[n] for n in probes]
    idle = unread(chosen, {"projections": projections, "checkpoint": checkpoint})
    if idle:
        applies_to, add = unread_applies_to(idle[0])
        raise ConfigError(Idle(idle[0], spec.where(idle[0]), applies_to,
                               "probes " + ",".join(probes), f"add {add} to the probes").error())
    measured = measure(unrolled, chosen, projections=projections, seed=spec.seed,
                       checkpoint=checkpoint)
    left = measured.nonfinite
    summary = {p.name: summarize(measured.log10[p.name],
                                 np.arange(unrolled.seq_len) + FIRST_STEP[p.axis],
                                 overflowed=left is not None)
               for p in chosen}
    theory = None
    if theory_k and left is None:
        theory = predict_module(unrolled, {n: s.slope for n, s in summary.items()}, k=theory_k)
    return ModelProfile(
        model=ready.name, seq_len=spec.seq_len, batch=spec.batch, input_size=ready.input_size,
        seed=spec.seed, profiles={p.name: measured.log10[p.name] for p in chosen},
        axes={p.name: p.axis for p in chosen}, summary=summary,
        nonfinite=None if left is None else {"step": left.step, "where": left.where},
        meta=run_meta(device, spec.dtype, command), projections=projections, theory=theory)
