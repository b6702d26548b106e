"""Probes: what the engine measures at every step, each one small spec behind one contract.

A probe reads either the forward (tangent) pass or the reverse (adjoint) pass of the engine and
returns, for one step, ln of the magnitude it measures, combined over the batch. The engine
converts to log10 at the end. Every probe has a brute-force twin in tests/bruteforce.py.

Names and meaning (H-path part "h", LSTM cell-state part "c"):

- ``grad_h0[t] = ||dL_t/dh_0||``: L_t is the batch-mean task loss of the readout at step t; the
  norm is over the whole (B, H) initial state. t = 1..T.
- ``jacobian[t] = ||dh_t/dh_0||_F``: per sample, combined as the root mean square over the batch
  (a batch-size-free number: sqrt(mean_b ||J_b||_F^2)). t = 1..T.
- ``adjoint[k] = ||dL/dh_{T-k}||``: L is the task loss; the signal BPTT sends back k steps.
  k = 0..T-1. When lengths vary, k counts back from each sequence's own last step, and the
  norm at k is over the sequences that have a step there.
- ``grad_c0``, ``jacobian_c``: the same on the LSTM's cell state c (c_0 is an input of its own,
  so these are unambiguous). There is no ``adjoint_c``: autograd's dL/dc_t also runs through
  h_t = o_t tanh(c_t) inside the same step, which a per-step state adjoint does not see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .registry import Registry


@dataclass(frozen=True)
class ForwardStep:
    """The forward pass at C consecutive steps t: d s_t / d(initial state), renormalised per
    direction (the engine hands probes a chunk of steps at once)."""

    # (C, B, K, S): column k of ds_t/ds_0 per sample, divided by exp(log_scale): of a norm
    # within float range (near 1 where renormalised at every step), or zero
    tangent: Tensor
    log_scale: Tensor  # (C, B, K) float64: ln of the factor each column was divided by
    columns: dict[str, slice]  # part -> which of the K directions start in that part of s_0
    rows: dict[str, slice]  # part -> which of the S state coordinates belong to it
    grad: Tensor  # (C, B, S): dL_t/ds_t, the loss gradient at each step (zero outside "h")
    # part -> ln of the weight of a squared column sum: 0 for unit directions (exact), -ln P
    # for P random projections (then a sum over columns estimates the squared norm)
    ln_weight: dict[str, float] = field(default_factory=dict)
    groups: int = 1  # the batch is this many seeds' samples, seed-major: combine each apart
    # (C, B, K, P): the plain norm (``norm``'s sum of squares) of each part of the state in
    # each direction, which the engine takes for its own checks; None: probes take their own
    part_norms: Tensor | None = None
    # the rows of the state that the losses read (where ``grad`` may be nonzero): the first
    # layer's "h" where the engine knows so (``Unrolled.losses_read_h``), else all
    grad_rows: slice = field(default_factory=lambda: slice(None))

    def plain_norms(self, part: str) -> Tensor | None:
        """(C, B, K): each direction's plain norm over ``part``'s rows, or None."""
        if self.part_norms is None:
            return None
        return self.part_norms[..., list(self.rows).index(part)]


@dataclass(frozen=True)
class ReverseStep:
    """The reverse pass at n consecutive steps T-k: dL/ds_{T-k}, scaled per sample."""

    adjoint: Tensor  # (n, B, S), of norm near 1 per sample (or zero)
    log_scale: Tensor  # (n, B) float64: ln of the factor each was divided by
    rows: dict[str, slice]


@dataclass(frozen=True)
class Probe:
    name: str
    pass_: str  # "forward" or "reverse"
    wrt: str | None  # forward: the part of the initial state it differentiates with respect to
    of: str  # the part of the state at step t it reads ("h", "c"; "h@2" for a second layer)
    axis: str  # "t" (steps 1..T after h_0) or "k" (steps 0..T-1 back from T)
    # (context, probe) -> ln magnitude in float64: forward probes get a chunk of C steps and
    # return (C, S), combined over each seed's part of the batch (S = 1 but for seed stacks);
    # reverse probes get n steps and return (n, B), per sample, for the engine to align and
    # combine.
    measure: Callable[..., Tensor]

    def __call__(self, ctx: ForwardStep | ReverseStep) -> Tensor:
        return self.measure(ctx, self)

    def applies_to(self, parts: tuple[str, ...]) -> bool:
        return self.of in parts and (self.wrt is None or self.wrt in parts)


PROBES: Registry[Probe] = Registry("probe", "--probes")


def norm(x: Tensor, plain: Tensor | None = None) -> Tensor:
    """||x|| along the last dim, in x's dtype, zero only where x is. The squares of float32
    values below ~1e-23 are zero and above ~1e19 infinite: where the plain norm (a sum of
    squares; ``plain`` where already taken) is not well inside the range where its sum of
    squares is exact, x is divided by its largest |entry| first."""
    if plain is None:
        plain = torch.linalg.vector_norm(x, dim=-1)
    info = torch.finfo(x.dtype)
    # below sqrt(tiny/eps), the squares' subnormal rounding could matter; above sqrt(max),
    # the sum may have overflowed
    exact = (plain >= math.sqrt(info.tiny / info.eps)) & (plain <= math.sqrt(info.max))
    if x.device.type != "cuda" and bool(exact.all()):  # a GPU computes both: no waiting
        return plain
    top = _largest(x)
    return torch.where(exact, plain, torch.linalg.vector_norm(x / top[..., None], dim=-1) * top)


def _largest(x: Tensor) -> Tensor:
    """The largest |entry| along the last dim, 1 where all are zero: a divisor that brings x's
    entries to at most 1 without under- or overflow in the division."""
    top = x.abs().amax(dim=-1)
    return torch.where(top > 0, top, torch.ones_like(top))


def _ln_norm(x: Tensor, plain: Tensor | None = None) -> Tensor:
    """ln ||x|| along the last dim, -inf where the norm is exactly zero, in float64."""
    return torch.log(norm(x, plain).double())


def _ln_rms_batch(ln_sq: Tensor, groups: int) -> Tensor:
    """(..., B) ln of squared norms -> (..., S) ln sqrt(mean_b exp(ln_sq)) over each group."""
    ln_sq = ln_sq.unflatten(-1, (groups, -1))
    return 0.5 * (torch.logsumexp(ln_sq, -1) - math.log(ln_sq.shape[-1]))


def _jacobian(ctx: ForwardStep, probe: Probe) -> Tensor:
    cols, rows = ctx.columns[probe.wrt], ctx.rows[probe.of]
    plain = ctx.plain_norms(probe.of)
    ln_col = _ln_norm(ctx.tangent[:, :, cols, rows], None if plain is None else plain[..., cols]) \
        + ctx.log_scale[..., cols]  # (C, B, K_p)
    return _ln_rms_batch(torch.logsumexp(2 * ln_col, -1) + ctx.ln_weight.get(probe.wrt, 0.0),
                         ctx.groups)  # (C, S)


def _grad(ctx: ForwardStep, probe: Probe) -> Tensor:
    cols = ctx.columns[probe.wrt]
    # (C, B, K_p): the entries of (ds_t/dp_0)^T g_t, with g_t divided by its largest entry
    # (a small loss gradient times a small part of the state would underflow; ln of the
    # divisor is added back). Each column of the tangent has a norm within the safe range, so
    # the products underflow only where a part of the state is below ~1e-19 of another's
    # (float32), in a slice renormalised at its end: then they read as zero.
    read = ctx.grad_rows
    grad = ctx.grad[..., read]
    top = _largest(grad)  # (C, B)
    # one product per sample and step, g_t as a row times the tangent's columns, which read
    # the tangent where it lies (as a matrix-vector product, 10x slower on the CPU), on the
    # rows where g_t may be nonzero
    unit_grad = (grad / top[..., None]).to(ctx.tangent.dtype)
    dots = (unit_grad[..., None, :] @ ctx.tangent[:, :, cols, read].mT)[..., 0, :]
    ln_abs = torch.log(dots.abs().double()) + torch.log(top.double())[..., None] \
        + ctx.log_scale[..., cols]
    per_group = (2 * ln_abs).unflatten(1, (ctx.groups, -1))  # (C, S, B/S, K_p)
    return 0.5 * (torch.logsumexp(per_group, (2, 3)) + ctx.ln_weight.get(probe.wrt, 0.0))


def _adjoint(ctx: ReverseStep, probe: Probe) -> Tensor:
    # Per sample: the engine aligns sequences of different lengths at their ends, then combines.
    return _ln_norm(ctx.adjoint[..., ctx.rows[probe.of]]) + ctx.log_scale  # (n, B)


PROBES.add("grad_h0", Probe("grad_h0", "forward", "h", "h", "t", _grad),
           "||dL_t/dh_0||, t = 1..T: the loss at step t, traced back to h_0")
PROBES.add("jacobian", Probe("jacobian", "forward", "h", "h", "t", _jacobian),
           "||dh_t/dh_0||_F, t = 1..T: RMS over the batch")
PROBES.add("adjoint", Probe("adjoint", "reverse", None, "h", "k", _adjoint),
           "||dL/dh_{T-k}||, k = 0..T-1: what BPTT sends back k steps")
PROBES.add("grad_c0", Probe("grad_c0", "forward", "c", "c", "t", _grad),
           "LSTM: ||dL_t/dc_0||, t = 1..T")
PROBES.add("jacobian_c", Probe("jacobian_c", "forward", "c", "c", "t", _jacobian),
           "LSTM: ||dc_t/dc_0||_F, t = 1..T: the cell-state path")


def probes_for(parts: tuple[str, ...]) -> list[str]:
    """Every registered probe that applies to a state with these parts."""
    return [e.name for e in PROBES if e.value.applies_to(parts)]


def layer_probes(parts: tuple[str, ...]) -> list[Probe]:
    """For stacked layers (parts "h@2", "c@2", ...): the gradient with respect to each deeper
    layer's initial state, ``grad_h0@2`` = ||dL_t/dh^(2)_0||, and likewise ``grad_c0@2``."""
    return [Probe(f"grad_{p.split('@')[0]}0@{p.split('@')[1]}", "forward", p, p, "t", _grad)
            for p in parts if "@" in p]


# Options of a run that only one pass reads: given with no probe of that pass, they do nothing.
READ_BY = {"projections": "forward", "jacobian_samples": "forward", "checkpoint": "reverse"}
_PASS_WORDS = {"forward": ("the forward probes", "grad_h0 or jacobian"),
               "reverse": ("the adjoint probe", "adjoint")}


def unread(chosen: list[Probe], options: dict[str, object]) -> list[str]:
    """The ``options`` (READ_BY field -> value; None or False: not given) that no probe of
    ``chosen`` reads: the forward probes' with no forward probe, the adjoint's with no
    adjoint."""
    passes = {p.pass_ for p in chosen}
    return [name for name, value in options.items()
            if value is not None and value is not False and READ_BY[name] not in passes]


def unread_applies_to(name: str) -> tuple[str, str]:
    """What an option of READ_BY applies to, and the probe names to add for it, in words."""
    return _PASS_WORDS[READ_BY[name]]
