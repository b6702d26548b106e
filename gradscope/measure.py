"""One measurement of a model: every probe's profile on the probe batch, and its summaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import Profiles, Unrolled, measure, measure_groups
from .model import Model
from .probes import Probe
from .results import FIRST_STEP, Snapshot
from .summary import summarize
from .tasks import Batch


def snapshot(model: Model, batch: Batch, probes: Sequence[Probe], *, step: int = 0,
             drop: float, band: float, jacobian_samples: int | None = None,
             projections: int | None = None, seed: int = 0,
             checkpoint: bool = False) -> Snapshot:
    """Measure ``model`` as it is now (``step`` training steps in). With ``jacobian_samples``
    N, the forward probes (grad_*, jacobian*) see the first N sequences only: their cost is
    about H times a forward pass per sequence. With ``projections`` P they are estimates from P
    random directions per part; with ``checkpoint`` the adjoint keeps every ~sqrt(T)-th state
    (see ``engine.measure``)."""
    [one] = _snapshots(model, batch, probes, step, drop, band, jacobian_samples, projections,
                       [seed], checkpoint)
    return one


def snapshot_groups(model: Model, batch: Batch, probes: Sequence[Probe], *, step: int = 0,
                    drop: float, band: float, jacobian_samples: int | None = None,
                    projections: int | None = None, seeds: Sequence[int],
                    checkpoint: bool = False) -> list[Snapshot] | None:
    """``snapshot`` of each seed of a seed stack (gradscope.batched) at once; None when a
    profile left float range (then each seed is to be measured alone)."""
    return _snapshots(model, batch, probes, step, drop, band, jacobian_samples, projections,
                      seeds, checkpoint)


def _snapshots(model: Model, batch: Batch, probes: Sequence[Probe], step: int, drop: float,
               band: float, jacobian_samples: int | None, projections: int | None,
               seeds: Sequence[int], checkpoint: bool) -> list[Snapshot] | None:
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the engine differentiates with respect to states only
    try:
        if not jacobian_samples:
            measured = _measure(model.unroll(batch), probes, projections, seeds, checkpoint)
        else:  # forward probes on the first sequences, the adjoint on all of them
            forward = [p for p in probes if p.pass_ == "forward"]
            reverse = [p for p in probes if p.pass_ == "reverse"]
            a = _measure(model.unroll(batch.take(jacobian_samples, model.groups)), forward,
                         projections, seeds, checkpoint)
            b = _measure(model.unroll(batch), reverse, None, seeds, checkpoint)
            measured = None if a is None or b is None else [
                Profiles({p.name: {**fa.log10, **fb.log10}[p.name] for p in probes},
                         fb.nonfinite or fa.nonfinite) for fa, fb in zip(a, b, strict=True)]
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if measured is None:
        return None
    return [_summarised(profiles, probes, step, drop, band, batch.seq_len)
            for profiles in measured]


def _measure(u: Unrolled, probes: Sequence[Probe], projections: int | None,
             seeds: Sequence[int], checkpoint: bool) -> list[Profiles] | None:
    if u.groups == 1:
        return [measure(u, probes, projections=projections, seed=seeds[0],
                        checkpoint=checkpoint)]
    return measure_groups(u, probes, projections=projections, seeds=seeds,
                          checkpoint=checkpoint)


def _summarised(profiles: Profiles, probes: Sequence[Probe], step: int, drop: float,
                band: float, seq_len: int) -> Snapshot:
    nonfinite = profiles.nonfinite
    summary = {
        p.name: summarize(profiles.log10[p.name], np.arange(seq_len) + FIRST_STEP[p.axis],
                          drop=drop, band=band, overflowed=nonfinite is not None)
        for p in probes
    }
    return Snapshot(step, profiles.log10, summary,
                    None if nonfinite is None else {"step": nonfinite.step,
                                                    "where": nonfinite.where})
