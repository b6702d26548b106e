"""Brute-force twins of the engine's probes: plain autograd in float64, one backward per step.

Deliberately naive (O(T^2) backward passes, no log space): only for small sizes, where nothing
underflows, so that the engine's exact log-space values can be checked against them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradscope.model import Model
from gradscope.tasks import Batch


def _log10_norm(x: torch.Tensor | None) -> float:
    if x is None:
        return -math.inf
    n = float(torch.linalg.vector_norm(x))
    return math.log10(n) if n > 0 else -math.inf


def brute_force(model: Model, batch: Batch) -> dict[str, np.ndarray]:
    """Every probe of the model's cell, by autograd on an ordinary unrolled graph."""
    cell = model.cell
    B, H, T = batch.inputs.shape[1], cell.hidden, batch.seq_len
    dtype = cell.weight_hh.dtype
    state0 = tuple(torch.zeros(B, H, dtype=dtype, requires_grad=True) for _ in cell.parts)
    xs = cell.project(model.encode(batch.inputs))
    mask = model.mask(batch)
    states = [state0]
    s = state0
    for t in range(T):
        new = cell.step(xs[t], s)
        if mask is not None:
            new = tuple(torch.where(mask[t][:, None], n, o) for n, o in zip(new, s, strict=True))
        s = new
        states.append(s)
    losses = model.step_losses(torch.stack([st[0] for st in states[1:]]), batch)  # (T, B)
    step_loss = losses.mean(dim=1)  # L_t
    task_loss = (model.loss_weights(batch).to(dtype) * step_loss).sum()  # L

    out: dict[str, np.ndarray] = {}
    for i, part in enumerate(cell.parts):
        suffix = "" if part == "h" else f"_{part}"
        grad = np.empty(T)
        jac = np.empty(T)
        for t in range(1, T + 1):
            (g,) = torch.autograd.grad(step_loss[t - 1], state0[i], retain_graph=True,
                                       allow_unused=True)
            grad[t - 1] = _log10_norm(g)
            sq = torch.zeros(B, dtype=torch.float64)  # ||d part_t / d part_0||_F^2 per sample
            for j in range(H):
                (row,) = torch.autograd.grad(states[t][i][:, j].sum(), state0[i],
                                             retain_graph=True, allow_unused=True)
                if row is not None:
                    sq += (row.double() ** 2).sum(dim=1)
            rms = float(sq.mean().sqrt())
            jac[t - 1] = math.log10(rms) if rms > 0 else -math.inf
        out[f"grad_{part}0"] = grad
        out[f"jacobian{suffix}"] = jac
    # The adjoint of h: autograd's dL/dh_t for every t (the engine has no adjoint_c), counted
    # back from each sequence's own last step.
    adj = torch.autograd.grad(task_loss, [states[t][0] for t in range(1, T + 1)],
                              retain_graph=True, allow_unused=True)
    lengths = [T] * B if batch.lengths is None else batch.lengths.tolist()
    out["adjoint"] = np.array([
        _log10_norm(torch.stack([adj[n - 1 - k][b] for b, n in enumerate(lengths) if k < n]))
        if k < max(lengths) else math.nan
        for k in range(T)
    ])
    return out


def assert_log10_close(engine: np.ndarray, twin: np.ndarray, rel: float = 1e-6,
                       name: str = "") -> None:
    """Magnitudes agree to ``rel`` relative; exact zeros (-inf) must match exactly."""
    engine, twin = np.asarray(engine), np.asarray(twin)
    assert engine.shape == twin.shape, name
    nan_e, nan_t = np.isnan(engine), np.isnan(twin)
    assert (nan_e == nan_t).all(), f"{name}: not-computed values differ"
    engine, twin = engine[~nan_e], twin[~nan_t]
    zero_e, zero_t = np.isneginf(engine), np.isneginf(twin)
    differ = np.flatnonzero(zero_e != zero_t)
    assert differ.size == 0, f"{name}: exact zeros differ at {differ}"
    both = ~zero_e
    assert np.isfinite(engine[both]).all(), f"{name}: engine has non-finite values"
    ratio = np.abs(10.0 ** (engine[both] - twin[both]) - 1.0)
    worst = int(np.argmax(ratio)) if ratio.size else 0
    assert ratio.size == 0 or ratio.max() <= rel, (
        f"{name}: relative error {ratio.max():.2e} at index {worst}")
