"""One measurement of a model: every probe's profile on the probe batch, and its summaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import measure
from .model import Model
from .probes import Probe
from .results import FIRST_STEP, Snapshot
from .summary import summarize
from .tasks import Batch


def snapshot(model: Model, batch: Batch, probes: Sequence[Probe], *, step: int = 0,
             drop: float, band: float) -> Snapshot:
    """Measure ``model`` as it is now (``step`` training steps in)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the engine differentiates with respect to states only
    try:
        profiles = measure(model.unroll(batch), probes)
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
