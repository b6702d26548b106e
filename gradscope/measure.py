"""One measurement of a model: every probe's profile on the probe batch, and its summaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import Profiles, measure
from .model import Model
from .probes import Probe
from .results import FIRST_STEP, Snapshot
from .summary import summarize
from .tasks import Batch


def snapshot(model: Model, batch: Batch, probes: Sequence[Probe], *, step: int = 0,
             drop: float, band: float, jacobian_samples: int | None = None,
             projections: int | None = None, seed: int = 0) -> Snapshot:
    """Measure ``model`` as it is now (``step`` training steps in). With ``jacobian_samples``
    N, the forward probes (grad_*, jacobian*) see the first N sequences only: their cost is
    about H times a forward pass per sequence. With ``projections`` P they are estimates from P
    random directions per part (see ``engine.measure``)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the engine differentiates with respect to states only
    try:
        if not jacobian_samples:
            profiles = measure(model.unroll(batch), probes, projections=projections, seed=seed)
        else:  # forward probes on the first sequences, the adjoint on all of them
            forward = [p for p in probes if p.pass_ == "forward"]
            reverse = [p for p in probes if p.pass_ == "reverse"]
            a = measure(model.unroll(batch.take(jacobian_samples)), forward,
                        projections=projections, seed=seed)
            b = measure(model.unroll(batch), reverse)
            log10 = {**a.log10, **b.log10}
            profiles = Profiles({p.name: log10[p.name] for p in probes},
                                b.nonfinite or a.nonfinite)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    nonfinite = profiles.nonfinite
    summary = {
        p.name: summarize(profiles.log10[p.name],
                          np.arange(batch.seq_len) + FIRST_STEP[p.axis],
                          drop=drop, band=band, overflowed=nonfinite is not None)
        for p in probes
    }
    return Snapshot(step, profiles.log10, summary,
                    None if nonfinite is None else {"step": nonfinite.step,
                                                    "where": nonfinite.where})
