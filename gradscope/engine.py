"""The measurement engine: exact per-step gradient-flow profiles in O(T), in log space.

Boundary: the engine sees only an ``Unrolled`` recurrence (a step function over a flat state, its
inputs, and per-step losses) and a list of probes; it knows nothing of cells, tasks or reports.
Back ends plug in through the recurrence: ``linearize`` (closed-form step Jacobians, as the
built-in cells give in gradscope.linear) and ``fast_trajectory``; without them, forward-mode
AD and autograd, one call per step. Both are held to each other in the tests.

The algorithm, for T steps:

1. Trajectory: run the recurrence without autograd. The first step whose state is not finite
   stops the run; it is reported, not raised. With an adjoint probe, s_0..s_T are kept
   (memory O(T*B*S)); forward probes alone stream them a chunk at a time (memory independent
   of T).
2. Loss gradients: g_t = dL_t/ds_t for a whole chunk (or all t) at once: one autograd call,
   since L_t reads only s_t.
3. Forward pass (probes grad_*, jacobian*): push the K directions of the initial state (unit
   vectors, exact; or P random ones, an estimate) through the step Jacobians. After every step
   each direction is divided by its norm and ln(norm) is added to its log-scale, so values far
   below float64's range (1e-3000) stay exact. Cost O(T * K * cost(step)), no backward pass.
4. Reverse pass (probe adjoint): lambda_T = dL/ds_T, then lambda_{t-1} = J_t^T lambda_t +
   dL/ds_{t-1}, one vjp per step, renormalised per sample with the same log-scale bookkeeping.

Everything that is reported is ln-magnitude in float64, converted to log10 at the end. A value of
-inf means the quantity is exactly zero (not an underflow); NaN means it was not computed (after
a non-finite forward step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .cudagraphs import GraphedSteps, graphed_steps
from .linear import FusedAdjoint, Scratch, StepOps
from .probes import ForwardStep, Probe, ReverseStep, norm

LN10 = math.log(10.0)
CHUNK = 64  # steps whose Jacobian coefficients the fast back end holds at once
_STACKED = 2**22  # elements of tangents the forward pass stacks before its probes read them
# forward probes alone take the trajectory whole from the fast back end (fewer ops a step)
# while it takes at most this many bytes, and stream it a chunk at a time above: their memory
# stays bounded whatever T
STREAMED_ABOVE = 16 * 2**20
# On a GPU, memory is plentiful and every op is a kernel launch: larger slices (fewer probe
# reads) and a larger trajectory taken whole (the fused kernel rather than a loop of steps).
# 2**27 float64 values (1 GB) let a slice take a whole chunk of GPU_CHUNK steps for 512
# directions of 512 values on 2 sequences (the GPU target case: 40 slices at T = 10000, not
# 80), where each slice costs a round of a few hundred host-side ops and a wait
STACKED_GPU, STREAMED_ABOVE_GPU = 2**27, 2**30
# and both passes run in float64 through chunks of four times the CPU's (``_fused_plan``,
# ``_forward_plan``; gradscope.runner's memory estimate counts them so)
GPU_CHUNK, GPU_DTYPE = 4 * CHUNK, torch.float64


def _on_gpu(x: Tensor) -> bool:
    return x.device.type == "cuda"


def stacked_gpu(device: torch.device) -> int:
    """The values a forward slice may stack on this GPU: STACKED_GPU, or less on a card where
    five such slices (gradscope.runner's memory estimate counts five) would take more than a
    quarter of its memory (below about 21 GB)."""
    if device.type != "cuda":  # the GPU's plan thrown on the CPU (the tests)
        return STACKED_GPU
    total = torch.cuda.get_device_properties(device).total_memory
    return min(STACKED_GPU, total // (4 * 5 * GPU_DTYPE.itemsize))


def gpu_slices_bytes(device: torch.device | None, values: int) -> int:
    """What the forward pass's slices take on a GPU, for ``values`` tangent values over all
    steps (T x K x B x S): it stacks GPU_DTYPE slices of up to ``stacked_gpu`` values, builds
    the slice's per-sample matrices (half a slice for the gated cells;
    linear.StepOps.matrices), its probes take temporaries, and its CUDA graphs' outputs (one
    per slice length, powers of two) hold up to two more: five slices is a bound. 0 off a
    GPU."""
    if device is None or device.type != "cuda" or not values:
        return 0
    return 5 * GPU_DTYPE.itemsize * min(stacked_gpu(device), values)


def _runs_ahead(x: Tensor) -> bool:
    """Whether the device runs ahead of the host (a GPU): reading a value from it then waits
    for everything queued, so checks are read late, together."""
    return _on_gpu(x)


@dataclass(frozen=True)
class Unrolled:
    """A recurrence s_t = step(x_t, s_{t-1}), t = 1..T, on a flat state, with its losses."""

    # (x_t (B, X), s (..., B, S)) -> s' (..., B, S); leading dims broadcast (forward pass).
    # It should close over tensors that do not require grad: the engine differentiates with
    # respect to states only, and graphs built for weights would be wasted work.
    step: Callable[[Tensor, Tensor], Tensor]
    s0: Tensor  # (B, S): the initial state
    xs: Tensor  # (T, B, X): the per-step inputs of ``step`` (or a lazy view with [t], [a:b])
    # names of the state parts, of equal size H; part i occupies s[:, i*H:(i+1)*H]. The first
    # layer's are "h" (and "c"); a stacked model's deeper layers' are "h@2", "c@2", ...
    parts: tuple[str, ...]
    # (states (n, B, S) of steps first..first+n-1, first) -> (n, B) per-sample losses
    losses: Callable[[Tensor, int], Tensor]
    weights: Tensor  # (T,): the task loss is L = sum_t weights[t-1] * mean_b losses[t-1]
    mask: Tensor | None = None  # (T, B) bool; False: sample b has ended, its state is held
    # The fast back end, where the step's Jacobian is known in closed form (built-in cells):
    # (states (C+1, B, S) of steps t0..t0+C, xs (C, B, X), mask (C, B) | None, t0) -> the
    # chunk's StepOps (gradscope.linear). None: forward-mode AD and autograd, one call per step.
    linearize: Callable[[Tensor, Tensor, Tensor | None, int], StepOps] | None = None
    # s_0..s_T at once with fewer ops per step than ``step`` (built-in cells)
    fast_trajectory: Callable[[], Tensor] | None = None
    # The adjoint from the fused kernel's own backward (built-in rnn and lstm, one length):
    # (block length, the kernel's dtype) -> gradscope.linear.FusedAdjoint, its forward done;
    # None where the cell has none or the trajectory left float range
    fused_adjoint: Callable[[int, torch.dtype], FusedAdjoint | None] | None = None
    fused_on_cpu: bool = False  # whether, on the CPU too, it beats the closed-form loop
    # whether ``losses`` read each state's h-part only (the first of ``parts``): then the
    # fused adjoint serves sequences that end early too (``FusedAdjoint``: its states run on
    # past a sequence's end, and it knows each one's h there, not its c)
    losses_read_h: bool = False
    # S > 1: the batch is S seeds' samples, seed-major, with S seeds' weights inside ``step``
    # (gradscope.batched); the loss is the sum of each seed's batch mean and every probe is
    # combined over each seed's samples apart: S measurements in one pass
    groups: int = 1

    def ops(self, states: Tensor, t0: int) -> StepOps:
        """The fast back end's maps for steps t0+1..t0+n, ``states`` = s_t0..s_t0+n."""
        t1 = t0 + states.shape[0] - 1
        mask = None if self.mask is None else self.mask[t0:t1]
        return self.linearize(states, self.xs[t0:t1], mask, t0)

    @property
    def seq_len(self) -> int:
        return self.xs.shape[0]

    def rows(self) -> dict[str, slice]:
        h = self.s0.shape[1] // len(self.parts)
        return {p: slice(i * h, (i + 1) * h) for i, p in enumerate(self.parts)}

    def step_at(self, t: int) -> Callable[[Tensor], Tensor]:
        """s_{t-1} -> s_t for step t (1-based), holding the state of samples that have ended."""
        x = self.xs[t - 1]
        if self.mask is None:
            return lambda s: self.step(x, s)
        m = self.mask[t - 1][:, None]
        return lambda s: torch.where(m, self.step(x, s), s)


@dataclass(frozen=True)
class NonFinite:
    step: int  # the first step t (1-based) whose value was inf or NaN
    # "state" (the forward recurrence overflowed), "tangent" (a direction pushed through it
    # did), or "underflow" (a part of a direction fell below its dtype's range relative to
    # the rest: ``_part_underflows``)
    where: str


@dataclass(frozen=True)
class Profiles:
    log10: dict[str, np.ndarray]  # probe -> (T,) float64; -inf: exactly zero; NaN: not computed
    nonfinite: NonFinite | None  # where the forward pass left float range, if it did


def measure(u: Unrolled, probes: Sequence[Probe], *, projections: int | None = None,
            seed: int = 0, checkpoint: bool = False, fused: bool | None = None) -> Profiles:
    """Every probe's per-step profile, exactly, in O(T) sequential steps.

    With ``projections`` P, the forward probes push P random Gaussian directions per part of
    the initial state instead of all H unit ones: an unbiased estimate of the squared norms,
    with a relative error of about sqrt(2/P), at P/H of the cost.

    The adjoint keeps the trajectory, O(T*B*S) memory; with ``checkpoint`` it keeps every L-th
    state (L about sqrt(T)) and recomputes each segment of L steps when the reverse pass gets
    there: O(sqrt(T)*B*S) memory for one more forward pass, the same numbers.

    ``fused``: the adjoint from the fused kernel's own backward (cuDNN, oneDNN), a block of
    steps at a time, where the recurrence has one (``Unrolled.fused_adjoint``) and the loss is
    read at step T only; blocks that would leave the safe range are redone step by step. None
    (automatic): on a GPU, where a loop of small steps is bound by kernel launches; on the CPU
    where the recurrence says it is faster there (``Unrolled.fused_on_cpu``), for the adjoint
    alone (with forward probes the loop reuses their stored trajectory; the kernel would run
    the forward again).
    """
    assert u.groups == 1, "a seed stack is measured by measure_groups"
    return _measure(u, probes, projections, [seed], checkpoint, fused)[0]


def measure_groups(u: Unrolled, probes: Sequence[Probe], *, projections: int | None = None,
                   seeds: Sequence[int], checkpoint: bool = False) -> list[Profiles] | None:
    """``measure`` for a seed stack of ``u.groups`` seeds: one Profiles per seed, as each seed
    would get alone (``seeds``: each one's projection seed). None where the run left float
    range: which seed stopped where is then for each seed alone to tell."""
    profiles = _measure(u, probes, projections, seeds, checkpoint)
    return None if any(p.nonfinite for p in profiles) else profiles


def _measure(u: Unrolled, probes: Sequence[Probe], projections: int | None,
             seeds: Sequence[int], checkpoint: bool = False,
             fused: bool | None = None) -> list[Profiles]:
    T, G = u.seq_len, u.groups
    out = {p.name: np.full((T, G), np.nan) for p in probes}

    def profiles(nonfinite: NonFinite | None) -> list[Profiles]:
        return [Profiles({k: v[:, g] / LN10 for k, v in out.items()}, nonfinite)
                for g in range(G)]

    forward = [p for p in probes if p.pass_ == "forward"]
    reverse = [p for p in probes if p.pass_ == "reverse"]
    if not reverse and (u.fast_trajectory is None
                        or (T + 1) * u.s0.numel() * u.s0.element_size()
                        > (STREAMED_ABOVE_GPU if _on_gpu(u.s0) else STREAMED_ABOVE)):
        # forward probes alone keep nothing of the past: memory independent of T
        return profiles(_forward_probes(u, lambda: _streamed_chunks(u), forward, out,
                                        projections, seeds))
    if checkpoint:  # one streamed pass for the forward probes and the adjoint's checkpoints
        segmented = Segmented(u)
        chunks = segmented.record(_streamed_chunks(u, grads=bool(forward)))
        recorded = [chunks]  # the first pass records the checkpoints; a second, if any, not
        stop = _forward_probes(u, lambda: recorded.pop() if recorded else _streamed_chunks(u),
                               forward, out, projections, seeds) if forward else None
        for _ in chunks:  # the rest, where the forward probes stopped early (or there are none)
            pass
        nonfinite = stop if segmented.bad is None else NonFinite(segmented.bad, "state")
        if segmented.bad is None:
            _reverse_pass(u, segmented, None, reverse, out)
        return profiles(nonfinite)
    use_fused = _fused_applies(u, fused, bool(forward))
    if use_fused and not forward:  # its forward is the trajectory; it keeps block starts only
        blocks = u.fused_adjoint(*_fused_plan(u)[:2])
        if blocks is not None:  # else it left float range: the usual way tells where
            starts = Segmented(u, blocks.length, blocks.starts)
            _reverse_pass(u, starts, None, reverse, out, blocks)
            return profiles(None)
    states, bad = trajectory(u)  # (T'+1, B, S): the adjoint needs all of it
    nonfinite = None if bad is None else NonFinite(bad, "state")
    if states.shape[0] == 1:
        return profiles(nonfinite)
    g = _loss_grads(u, states[1:]) if forward else None  # (T', B, S)
    if forward:
        stop = _forward_probes(u, lambda: _stored_chunks(states, g, _forward_plan(u)[0]),
                               forward, out, projections, seeds)
        nonfinite = nonfinite or stop
    if bad is None and reverse:  # the task loss needs the whole, finite trajectory
        blocks = u.fused_adjoint(*_fused_plan(u)[:2]) if use_fused else None
        _reverse_pass(u, states, g, reverse, out, blocks)
    return profiles(nonfinite)


def _fused_applies(u: Unrolled, fused: bool | None, with_forward: bool) -> bool:
    """Whether the adjoint comes from the fused kernel (``measure``'s ``fused``)."""
    if fused is None:
        fused = GPU_PLANS[GPU_ADJOINT] is not None if _on_gpu(u.s0) else \
            u.fused_on_cpu and not with_forward
    # the blocks redone step by step need the closed-form back end (``_reverse_fast``)
    if not (fused and u.fused_adjoint is not None and u.linearize is not None
            and u.groups == 1):
        return False
    last_only = _loss_at_last_step_only(u)
    # gradients that enter inside a block (a sequence's end, or a step's own loss; not both)
    # are read off the kernel's h outputs: losses that read h alone
    return (u.mask is None and last_only) or (u.losses_read_h and (u.mask is None or last_only))


class FusedPlan(NamedTuple):
    """How the fused adjoint runs: blocks of ``length`` steps, the kernel in ``dtype``, and
    each block's incoming adjoint lifted ``lift`` decades above norm 1 where it has been
    falling (below, where it has been growing; 0: started at norm 1), so that a block may
    fall (or grow) that much further inside the safe range before its end."""

    length: int
    dtype: torch.dtype
    lift: float = 0.0


# The GPU's adjoint, by name: the fused kernel in blocks of a plan, or (None) the closed-form
# loop with each block of steps replayed from a CUDA graph. On a GPU each kernel block costs
# the kernel's fixed overhead twice (forward, backward) and the steps are bound by launches,
# not arithmetic: the kernel runs in float64, whose range (1e+-154 for norms) lets a block
# span four chunks where a float32 one would often leave the safe range; "kernel-lifted" spans
# eight, each block started 77 decades from norm 1. benchmarks/gpu_parts.py times all three
# side by side, and benchmarks/run.py --gpu-adjoint NAME measures the targets with any one.
GPU_PLANS: dict[str, FusedPlan | None] = {
    "kernel": FusedPlan(GPU_CHUNK, GPU_DTYPE),
    "kernel-lifted": FusedPlan(2 * GPU_CHUNK, GPU_DTYPE, 77.0),
    "loop": None,
}
GPU_ADJOINT = "kernel"


def _fused_plan(u: Unrolled) -> FusedPlan:
    """The fused adjoint's plan: on a GPU, ``GPU_PLANS[GPU_ADJOINT]`` (or ``kernel``'s, where
    the loop is named and ``measure(fused=True)`` asks for the kernel all the same); on the
    CPU, blocks of one chunk in the cell's dtype."""
    if _on_gpu(u.s0):
        return GPU_PLANS[GPU_ADJOINT] or GPU_PLANS["kernel"]
    return FusedPlan(CHUNK, u.s0.dtype)


def _loss_at_last_step_only(u: Unrolled) -> bool:
    """Whether L reads step T alone: the adjoint then has no term to add on the way back."""
    return not bool((u.weights[:-1] != 0).any())


Chunk = tuple[int, Tensor, Tensor | None, NonFinite | None]  # t0, s_t0..s_t1, g_t0+1..g_t1, stop


def _stored_chunks(states: Tensor, g: Tensor, chunk: int) -> Iterator[Chunk]:
    T = states.shape[0] - 1
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        yield t0, states[t0:t1 + 1], g[t0:t1], None


def _streamed_chunks(u: Unrolled, grads: bool = True) -> Iterator[Chunk]:
    """The trajectory and (with ``grads``) its loss gradients a chunk at a time, forgetting the
    last one."""
    s = u.s0
    for t0 in range(0, u.seq_len, CHUNK):
        states = _steps(u, s, t0, min(t0 + CHUNK, u.seq_len))
        finite = torch.isfinite(states.flatten(1)).all(dim=1)
        stop = None
        if not finite.all():  # cut at the first step that left float range
            first = int(torch.nonzero(~finite)[0])
            stop = NonFinite(t0 + first, "state")
            states = states[:first]
        g = _loss_grads(u, states[1:], t0 + 1) if grads and states.shape[0] > 1 else None
        yield t0, states, g, stop
        if stop is not None:
            return
        s = states[-1]


def _steps(u: Unrolled, s: Tensor, a: int, b: int) -> Tensor:
    """s_a..s_b (b-a+1, B, S) from s_a = ``s``, without autograd."""
    states = s.new_empty(b - a + 1, *s.shape)
    states[0] = s
    with torch.no_grad():
        for t in range(a + 1, b + 1):
            states[t - a] = u.step_at(t)(states[t - a - 1])
    return states


def push(u: Unrolled, t: int, s_prev: Tensor, tangent: Tensor) -> Tensor:
    """J_t v for K directions at once: tangent (B, K, S) -> (B, K, S), by forward-mode AD.

    The K directions ride as a leading batch dimension of a dual tensor (the step broadcasts
    over leading dimensions); that is an order of magnitude faster than vmap(jvp) for these
    small per-step ops.
    """
    B, K, S = tangent.shape
    with fwAD.dual_level():
        primal = s_prev.expand(K, B, S).contiguous()
        stepped = u.step_at(t)(fwAD.make_dual(primal, tangent.transpose(0, 1).contiguous()))
        pushed = fwAD.unpack_dual(stepped).tangent
    if pushed is None:  # the step does not read its state (or detaches it): J_t = 0
        return torch.zeros_like(tangent)
    return pushed.transpose(0, 1).contiguous()


def trajectory(u: Unrolled) -> tuple[Tensor, int | None]:
    """s_0..s_T' (T'+1, B, S) without autograd, and the first step whose state is not finite
    (T' = that step - 1), or None."""
    with torch.no_grad():
        return _trajectory(u)


def _trajectory(u: Unrolled) -> tuple[Tensor, int | None]:
    if u.fast_trajectory is not None:
        states = u.fast_trajectory()
        finite = torch.isfinite(states.flatten(1)).all(dim=1)  # one check for all steps
        if finite.all():
            return states, None
        first = int(torch.nonzero(~finite)[0])
        return states[:first], first
    s = u.s0
    states = [s]
    for t in range(1, u.seq_len + 1):
        s = u.step_at(t)(s)
        if not torch.isfinite(s).all():
            return torch.stack(states), t
        states.append(s)
    return torch.stack(states), None


def _loss_grads(u: Unrolled, states: Tensor, first: int = 1) -> Tensor:
    """dL_t/ds_t for the steps of ``states`` at once (L_t reads only s_t): L_t is the batch
    mean of ``u.losses`` (each seed's, in a seed stack)."""
    with torch.enable_grad():
        leaf = states.detach().requires_grad_(True)
        total = u.losses(leaf, first).unflatten(1, (u.groups, -1)).mean(dim=2).sum()
        (g,) = torch.autograd.grad(total, leaf)
    return g


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """x / ||x|| along the last dim (zero stays zero) and ln ||x|| in float64 (-inf for zero)."""
    return _rescaled(x, norm(x))


def _rescaled(x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., S) divided by its norm (...), already taken (zero stays zero), and ln(norm) in
    float64: the renormalisation that both passes carry in their log-scales. A subnormal norm
    divides too: the values then keep the scale that ln(norm) records."""
    return x / torch.where(size > 0, size, torch.ones_like(size))[..., None], \
        torch.log(size.double())


def _block_length(ln_change: Tensor, steps: int, dtype: torch.dtype) -> int:
    """How many steps the next block may take at once, renormalised only at its end: at the
    fastest rate of change seen over the last ``steps`` (ln_change: ln of each sample's or
    direction's factor over them; -inf for exact zeros), half the decades from 1 to the edge
    of the safe range (_in_safe_range), at most CHUNK."""
    return _length_for(float(_fastest(ln_change)), steps, dtype)


def _fastest(ln_change: Tensor) -> Tensor:
    """The largest finite |ln_change|, 0 where none is finite: a scalar on the device."""
    return torch.where(torch.isfinite(ln_change), ln_change.abs(), 0.0).max()


def _length_for(fastest: float, steps: int, dtype: torch.dtype, cap: int = CHUNK) -> int:
    """``_block_length`` from ``_fastest``'s value, at most ``cap``."""
    moved = fastest / math.log(10) / steps
    room = math.log10(torch.finfo(dtype).max) / 2  # decades from 1 to sqrt(max)
    return max(1, min(cap, int(0.5 * room / max(moved, 1e-3))))


def _forward_plan(u: Unrolled) -> tuple[int, torch.dtype]:
    """The forward pass's chunk of stored steps (its slices' longest) and its tangents' dtype.
    On a GPU, with the closed-form back end, each slice costs a fixed round of probe ops
    and waits whatever its length: the tangents are pushed in float64, whose range lets a
    slice run about eight times as many steps before its renormalisation, through chunks of
    four times the CPU's. On the CPU, and for the generic back end (forward-mode AD runs in
    the recurrence's own dtype), CHUNK in the cell's dtype."""
    if _on_gpu(u.s0) and u.linearize is not None:
        return GPU_CHUNK, GPU_DTYPE
    return CHUNK, u.s0.dtype


def _in_safe_range(norms: Tensor, live: Tensor) -> bool:
    """Whether the norms of every live sample or direction lie within [sqrt(tiny), sqrt(max)]
    of their dtype: then a block of steps renormalised only at its end lost nothing inside.
    Plain norms (sums of squares) serve here: one computed within that range is accurate, and
    one whose squares under- or overflowed falls outside it."""
    return bool(_safe_range(norms, live))


def _steps_in_range(norms: Tensor, live: Tensor, lost: Tensor | None = None) -> Tensor:
    """(m,) per step (norms (m, ...)): whether its norms lie in the safe range
    (``_in_safe_range``) and ``lost`` (m,) does not mark it, on the device."""
    ok = _within(norms, live).flatten(1).all(dim=1)  # (m,)
    return ok if lost is None else ok & ~lost


def _first_false(ok: Tensor) -> int:
    """The index of the first False in ok (m,), m where none is, after one wait for the
    device."""
    return len(ok) if bool(ok.all()) else int(ok.logical_not().to(torch.int8).argmax())


def _safe_range(norms: Tensor, live: Tensor) -> Tensor:
    """``_in_safe_range`` as a tensor on the device, not yet waited for."""
    return _within(norms, live).all()


def _within(norms: Tensor, live: Tensor) -> Tensor:
    """Each norm inside [sqrt(tiny), sqrt(max)] of its dtype, or not live (elementwise)."""
    safe = torch.finfo(norms.dtype)
    return (norms >= math.sqrt(safe.tiny)) & (norms <= math.sqrt(safe.max)) | ~live


def _forward_probes(u: Unrolled, chunks: Callable[[], Iterator[Chunk]],
                    probes: Sequence[Probe], out: dict[str, np.ndarray],
                    projections: int | None, seeds: Sequence[int]) -> NonFinite | None:
    """``_forward_pass`` over ``chunks()``; where a part of a direction fell below the range of
    narrower tangents (float32), once more with float64 ones over fresh chunks (``chunks()``
    again), which holds parts 1e-292 apart rather than 1e-31 (the closed-form back end;
    forward-mode AD pushes tangents in the recurrence's own dtype)."""
    stop = _forward_pass(u, chunks(), probes, out, projections, seeds)
    widen = (stop is not None and stop.where == "underflow" and u.linearize is not None
             and _forward_plan(u)[1] != torch.float64)
    return _forward_pass(u, chunks(), probes, out, projections, seeds, torch.float64) \
        if widen else stop


def _forward_pass(u: Unrolled, chunks: Iterator[Chunk], probes: Sequence[Probe],
                  out: dict[str, np.ndarray], projections: int | None,
                  seeds: Sequence[int], wide: torch.dtype | None = None) -> NonFinite | None:
    """The forward probes over ``chunks``, their tangents in ``_forward_plan``'s dtype (or
    ``wide``), into ``out``: None, or where they stopped."""
    rows = u.rows()
    grad_rows = rows[u.parts[0]] if u.losses_read_h else slice(None)  # where g_t lives
    parts = [p for p in u.parts if any(pr.wrt == p for pr in probes)]
    B, S = u.s0.shape
    h = S // len(u.parts)
    # 1. The directions pushed from s_0: one unit vector per coordinate of each probed part
    #    (exact), or P random Gaussian ones per part (an estimate, weighted by 1/P).
    per = projections or h
    columns = {p: slice(i * per, (i + 1) * per) for i, p in enumerate(parts)}
    weights = {p: -math.log(projections) if projections else 0.0 for p in parts}
    cap, dtype = _forward_plan(u)
    dtype = wide or dtype
    # sample-major (B, K, S): each sample's directions one matrix (gradscope.linear)
    tangent = torch.zeros(B, per * len(parts), S, dtype=dtype, device=u.s0.device)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]  # one stream per seed
    for p in parts:
        block = tangent[:, columns[p], rows[p]]  # (B, per, h)
        if projections:  # drawn direction-major, (per, B/S, h) per seed
            for gen, part in zip(gens, block.chunk(u.groups, dim=0), strict=True):
                draw = torch.randn(part.shape[1], part.shape[0], h, generator=gen,
                                   dtype=torch.float64)
                part.copy_(draw.transpose(0, 1))
        else:
            block.copy_(torch.eye(h, dtype=tangent.dtype).expand(B, h, h))
    log_scale = torch.zeros(tangent.shape[:2], dtype=torch.float64, device=u.s0.device)

    length = cap  # the steps a slice may take at once: what the decay seen so far allows
    graphs = graphed_steps(tangent.device)
    stacked = stacked_gpu(tangent.device) if _on_gpu(tangent) else _STACKED
    # one buffer for every slice's pushed values (the probes read them before the next slice),
    # one for the per-sample matrices that the push multiplies by
    scratch = Scratch(), Scratch()
    for t0, states, g, stop in chunks:
        n = states.shape[0] - 1
        ops = u.ops(states, t0) if u.linearize is not None and n else None
        if ops is not None and dtype != states.dtype:
            ops = ops.to(dtype)
        done, redo = 0, 0
        while done < n:  # in slices whose stacked tangents stay small
            m = redo or min(n - done, max(1, stacked // tangent.numel()))
            # 2. Push every direction through the slice's J_t = ds_t/ds_{t-1} (no graph kept),
            #    renormalised once at its end where the closed form allows it and the values
            #    stay in range, else after every step (``_push_steps``; and a slice redone
            #    where a range check read late found its first step out of range).
            pushed, by_steps, in_range = None, False, None
            if ops is not None and length > 1 and not redo:
                m = min(m, length)
                if graphs is not None and m < n - done:  # few lengths: few graphs to capture
                    m = 1 << (m.bit_length() - 1)
                pushed, in_range = _push_block(ops, tangent, done, done + m, graphs, scratch,
                                               len(u.parts), _runs_ahead(tangent))
            if pushed is None:
                pushed, by_steps = _push_steps(u, ops, states, t0, tangent, done, done + m,
                                               len(u.parts)), True
            values_, part_norms, ln_scales, pushed_tangent, ln_last = pushed
            m = values_.shape[0]  # a block may keep fewer steps: the rest is the next slice's
            # 3. The probes, over the slice: each step's values times exp(its log-scale).
            scales = log_scale + ln_scales
            ctx = ForwardStep(values_, scales, columns, rows, g[done:done + m], weights,
                              u.groups, part_norms, grad_rows)
            grown = (torch.isnan(scales) | torch.isposinf(scales)).flatten(1).any(dim=1)
            # a block keeps only steps whose parts stay normal; renormalised a step at a time,
            # a part that still falls that low is beyond the dtype
            lost = _part_underflows(values_, part_norms) if by_steps \
                else torch.zeros_like(grown)
            out_of_range = torch.zeros_like(grown) if in_range is None else ~in_range
            # what the host needs, in one transfer: on a GPU each is a wait for the device
            # (m, probes * G + 4): the probes, whether a step left float range (a value grew
            # out of it, or a part of a direction fell below it), whether a block's step left
            # the safe range (read late), the change
            read = torch.cat([*(probe(ctx) for probe in probes), grown[:, None].double(),
                              lost[:, None].double(), out_of_range[:, None].double(),
                              _fastest(ln_last).expand(m, 1)], dim=1).cpu().numpy()
            cut = int(np.argmax(read[:, -2])) if read[:, -2].any() else m
            bad = np.flatnonzero(read[:cut, -4] + read[:cut, -3])
            keep = int(bad[0]) if len(bad) else cut
            for i, name in enumerate(p.name for p in probes):
                out[name][t0 + done:t0 + done + keep] = read[:keep, i * u.groups:(i + 1) * u.groups]
            if len(bad):
                where = "tangent" if read[keep, -4] else "underflow"
                return NonFinite(t0 + done + keep + 1, where)
            if cut == 0:  # the block's first step left the range: the slice step by step
                redo = m
                continue
            redo = 0
            if cut < m:  # the steps of the block before the first that left the range
                *_, pushed_tangent, ln_last = _block_to(values_, part_norms, cut)
                length = _length_for(float(_fastest(ln_last)), cut, pushed_tangent.dtype, cap)
            else:
                length = _length_for(float(read[0, -1]), m, pushed_tangent.dtype, cap)
            tangent, log_scale = pushed_tangent, log_scale + ln_last
            done += cut
        if stop is not None:
            return stop
    return None


# values, the plain norms of their parts (``_part_norms``), ln-scales, next tangent, its ln-scale
Pushed = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _part_norms(values: Tensor, parts: int) -> Tensor:
    """(m, B, K, P): the plain norm (a sum of squares) of each of the P parts of the state in
    each direction of values (m, B, K, S), one pass over them: the block's range check, the
    part check and the Jacobian probes all read these."""
    return torch.linalg.vector_norm(values.unflatten(-1, (parts, -1)), dim=-1)


def _part_underflows(values: Tensor, part_norms: Tensor) -> Tensor:
    """(m,) per step of a slice's values (m, B, K, S): whether a part of some direction (the
    state of one layer of a stacked model, say) has fallen to within eps of its dtype's
    smallest normal number (its largest entry below tiny/eps: float32 1e-31, float64 1e-292).
    The renormalisation keeps each direction's norm in range, not each part's: such a part
    loses precision, and further down it would read as an exact zero. An exact zero stays
    allowed (a part that the step's map sends to zero). One state part: never. On the CPU the
    entries are read only where a part's plain norm (``part_norms``) is below sqrt(tiny/eps):
    above it, the sum of squares is exact and the largest entry at least norm / sqrt(H),
    far from tiny/eps (a GPU reads them anyway, rather than wait to find out)."""
    parts = part_norms.shape[-1]
    info = torch.finfo(values.dtype)
    if parts == 1 or not _on_gpu(values) and not bool(
            (part_norms < math.sqrt(info.tiny / info.eps)).any()):
        return values.new_zeros(values.shape[0], dtype=torch.bool)
    split = values.unflatten(-1, (parts, -1))
    # each part's largest magnitude (m, B, K, P); two reductions, no |values| written out:
    # 4x faster on the CPU (the LSTM's exact forward probes, H = 128: 1.03x their time)
    largest = torch.maximum(split.amax(dim=-1), split.amin(dim=-1).neg_())
    return ((largest > 0) & (largest < info.tiny / info.eps)).flatten(1).any(dim=1)


def _push_steps(u: Unrolled, ops: StepOps | None, states: Tensor, t0: int, tangent: Tensor,
                a: int, b: int, parts: int = 1) -> Pushed:
    """Steps a+1..b of the chunk, each direction renormalised after every step: the values
    (m, B, K, S) of unit norm (or zero), their ln-scales (m, B, K) relative to the slice's
    start, the last values as the next tangent and its ln-scale."""
    stacked, ln_norms = [], []
    for i in range(a, b):
        # by the cell's closed form where it has one, else by forward-mode AD
        tangent = ops.jvp(i, tangent) if ops is not None else \
            push(u, t0 + i + 1, states[i], tangent)
        tangent, ln_norm = _unit(tangent)
        stacked.append(tangent)
        ln_norms.append(ln_norm)
    ln_scales = torch.cumsum(torch.stack(ln_norms), dim=0)
    values = torch.stack(stacked)
    return values, _part_norms(values, parts), ln_scales, tangent, ln_scales[-1]


def _push_block(ops: StepOps, tangent: Tensor, a: int, b: int, graphs: GraphedSteps | None,
                scratch: tuple[Scratch, Scratch], parts: int = 1, late: bool = False
                ) -> tuple[Pushed | None, Tensor | None]:
    """Steps a+1..b renormalised once, at the end: as ``_push_steps`` (the values then carry
    their own scale). Where a value would leave the safe range, or a live direction reach
    zero, only the steps before the first such one are kept (fewer than b-a: the caller goes
    on from there), or None where that is the first: then it is done step by step, so
    nothing underflows unseen. That check waits for the device; with ``late`` (a GPU) it is
    left to the caller instead, which reads it with the probes: every step is returned, with
    the next tangent from the last, and beside them the steps' flags (m,), True where in
    range (else None). On a GPU
    the steps replay from a CUDA graph where the slice repeats (``graphs``). Else the values
    are written into the first of ``scratch``, and the per-sample matrices that the push
    multiplies by into the second, buffers kept for the whole pass: on the CPU a fresh one
    per slice is fresh pages from the system each time (the exact forward probes of the LSTM,
    H = 128, T = 1000, 2 sequences: 1.08x faster with one buffer for the values, measured
    alternately in one process; the RNN and the GRU unchanged)."""
    values = None if graphs is None else graphs(ops, tangent, a, b)
    if values is None:  # (m, B, K, S), written in place
        into = scratch[0].take((b - a, *tangent.shape), tangent)
        values = ops.push(tangent, a, b, into, scratch[1])
    part_norms = _part_norms(values, parts)  # (m, B, K, P)
    live = (tangent != 0).any(dim=-1)  # a zero direction stays zero
    ok = _steps_in_range(_whole(part_norms), live, _part_underflows(values, part_norms))
    good = b - a if late else _first_false(ok)
    if good == 0:
        return None, None
    return _block_to(values, part_norms, good), ok if late else None


def _whole(part_norms: Tensor) -> Tensor:
    """(..., P) the parts' plain norms -> (...) the whole state's."""
    if part_norms.shape[-1] == 1:
        return part_norms[..., 0]
    return torch.linalg.vector_norm(part_norms, dim=-1)


def _block_to(values: Tensor, part_norms: Tensor, good: int) -> Pushed:
    """A block's first ``good`` steps (values (m, B, K, S), renormalised only at the end):
    their values and part norms, zero ln-scales, and the next tangent from step ``good``."""
    values, part_norms = values[:good], part_norms[:good]
    zeros = torch.zeros(values.shape[:3], dtype=torch.float64, device=values.device)
    return values, part_norms, zeros, *_rescaled(values[-1], _whole(part_norms[-1]))


def _reverse_pass(u: Unrolled, states: Tensor | Segmented, g: Tensor | None,
                  probes: Sequence[Probe], out: dict[str, np.ndarray],
                  fused: FusedAdjoint | None = None) -> None:
    """``states``: s_0..s_T, stored or ``Segmented``; ``g``: the loss gradients of every step if
    the forward pass has them, else None (they are computed here, at the steps that carry
    weight only when that is step T alone); ``fused``: the fused kernel's blocks, where they
    apply (then ``states`` serves the blocks redone step by step)."""
    T, B = u.seq_len, u.s0.shape[0]
    per_sample = {p.name: torch.empty(T, B, dtype=torch.float64, device=u.s0.device)
                  for p in probes}  # ln, by k
    if _loss_at_last_step_only(u) and u.linearize is not None:
        if g is not None:
            last = g[-1]
        else:
            end = states[-1:] if fused is None else fused.final[None]
            last = _loss_grads(u, end, T)[0]
        adj, log_scale = _unit(u.weights[-1].to(last.dtype) * last)  # lambda_T, per sample
        _reverse_fast(u, states, adj, log_scale, probes, per_sample, fused)
    else:
        has_direct = (u.weights != 0).tolist()
        if fused is not None and isinstance(states, Segmented):  # the adjoint alone
            direct = _kernel_direct(u, fused)
        elif isinstance(states, Segmented):
            direct = states.direct()
        else:
            g = g if g is not None else _loss_grads(u, states[1:])
            direct = u.weights.to(g.dtype)[:, None, None] * g  # (T, B, S): dL/ds_t via L_t
        adj, log_scale = _unit(direct[T - 1])  # lambda_T, per sample
        t = T
        if fused is not None:
            t, adj, log_scale = _reverse_fused(u, fused, adj, log_scale, probes, per_sample,
                                               (direct, has_direct))
            adj = adj.to(u.s0.dtype)  # of norm 1: the loop's dtype holds it
        _reverse_general(u, states, direct, has_direct, adj, log_scale, probes, per_sample, t)
    lengths = None if u.mask is None else u.mask.sum(0).cpu()
    for name, ln in per_sample.items():
        for g, part in enumerate(ln.cpu().chunk(u.groups, dim=1)):  # each seed's samples
            here = None if lengths is None else lengths.chunk(u.groups)[g]
            out[name][:, g] = _end_aligned_norm(part, here).numpy()


def _ops_at(u: Unrolled, states: Tensor, t: int, cache: list) -> tuple[StepOps, int]:
    """The closed-form maps of the CHUNK steps around step t (cached in ``cache``: a pass
    walks its steps in order) and t's index among them; ``states``: s_0..s_T', T' <= T."""
    t0 = ((t - 1) // CHUNK) * CHUNK
    if not cache or cache[0] != t0:
        cache[:] = [t0, u.ops(states[t0:min(t0 + CHUNK, states.shape[0] - 1) + 1], t0)]
    return cache[1], t - 1 - t0


def step_forward(u: Unrolled, states: Tensor, t: int, tangent: Tensor, cache: list) -> Tensor:
    """J_t v for K directions, tangent (B, K, S) -> (B, K, S): by the cell's closed form
    (``_ops_at``) or by forward-mode AD (``push``)."""
    if u.linearize is None:
        return push(u, t, states[t - 1], tangent)
    ops, i = _ops_at(u, states, t, cache)
    return ops.jvp(i, tangent)


def _step_back(u: Unrolled, states: Tensor, t: int, adj: Tensor, cache: list) -> Tensor:
    """J_t^T adj: by the cell's closed form (``_ops_at``) or by autograd."""
    if u.linearize is None:
        with torch.enable_grad():
            s_prev = states[t - 1].detach().requires_grad_(True)
            stepped = u.step_at(t)(s_prev)
            if not stepped.requires_grad:  # the step does not read its state: J_t = 0
                return torch.zeros_like(adj)
            (back,) = torch.autograd.grad(stepped, s_prev, adj, allow_unused=True)
        return torch.zeros_like(adj) if back is None else back
    ops, i = _ops_at(u, states, t, cache)
    return ops.vjp(i, adj)


def _reverse_fast(u: Unrolled, states: Tensor | Segmented, adj: Tensor, log_scale: Tensor,
                  probes: Sequence[Probe], per_sample: dict[str, Tensor],
                  fused: FusedAdjoint | None = None) -> None:
    """The loss is read at step T only: no term to add on the way back, so the adjoint is a
    product of closed-form vjps. It runs in blocks of steps that are renormalised together at
    the block's end, so a step costs one vjp; a block whose values leave the safe range (or hit
    zero) is redone a step at a time, so nothing underflows unseen. With ``fused``, a block of
    the fused kernel's backward comes first, under the same check (``_reverse_fused``)."""
    T, rows = u.seq_len, u.rows()
    cache: list = []
    # on a GPU a block's vjps replay from a CUDA graph (``_back_steps``)
    graphs = None if u.linearize is None else graphed_steps(u.s0.device, "pull")
    length, t = CHUNK, T  # adj = lambda_t / exp(log_scale), of norm 1 (or 0) per sample
    if fused is not None:
        t, adj, log_scale = _reverse_fused(u, fused, adj, log_scale, probes, per_sample)
        adj = adj.to(u.s0.dtype)  # of norm 1: the loop's dtype holds it
        # where a block left the range, the rest runs without the kernel, a step at a time
        # at first (a decay this fast would fail again, each time a block's backward wasted)
        length = 1
    while t >= 1:
        # 1. A block: lambda_t, ..., lambda_{t-n+1} from adj, ending at an ops chunk's start;
        #    exit = lambda_{t-n}, which starts the next block (not needed after step 1).
        n = min(length, t - ((t - 1) // CHUNK) * CHUNK)
        # (n or n+1, B, S), (., B); a step at a time (n = 1), the exit may be tiny
        values, norms = _back_steps(u, states, adj, t, n, cache, graphs=graphs)
        live = norms[0] > 0  # a zero adjoint stays exactly zero
        if not _in_safe_range(norms[1:], live) and n > 1:
            length = 1  # 2. redo it with every step renormalised
            continue
        # 3. The probes over the block, then the block's exit renormalised.
        exit_ = _probed_block(values, norms, n, log_scale, T - t, rows, probes, per_sample)
        if exit_ is not None:
            adj, log_scale, length = exit_
        t -= n


def _back_steps(u: Unrolled, states: Tensor | Segmented, adj: Tensor, t: int, n: int,
                cache: list, direct: Tensor | None = None, has_direct: Sequence[bool] = (),
                inv: Tensor | None = None, graphs: GraphedSteps | None = None
                ) -> tuple[Tensor, Tensor]:
    """lambda_t (``adj``) down to lambda_{t-n} (that exit where t-n >= 1) by one vjp a step,
    renormalised nowhere: (n or n+1, B, S), and their norms (., B). With ``direct``, each
    step's own loss term dL/ds_{s-1} (where ``has_direct``) times ``inv`` is added
    (``_general_block``). Without, the vjps replay from ``graphs`` where given (the block
    lies within one chunk of ops: it ends at a chunk's start)."""
    vjps = min(n, t - 1)
    if graphs is not None and direct is None and vjps > 0:
        ops, i = _ops_at(u, states, t, cache)  # step t is ops' step i
        pulled = graphs(ops, adj, i + 1 - vjps, i + 1)
        if pulled is not None:
            values = torch.cat([adj[None], pulled])
            return values, norm(values)
    block = [adj]
    for s in range(t, max(t - n, 1), -1):  # each takes lambda_s to lambda_{s-1}
        back = _step_back(u, states, s, block[-1], cache)
        if direct is not None and has_direct[s - 2]:
            back = torch.addcmul(back, direct[s - 2], inv)
        block.append(back)
    values = torch.stack(block)
    return values, norm(values)


def _probed_block(values: Tensor, norms: Tensor, n: int, log_scale: Tensor, k: int,
                  rows: dict[str, slice], probes: Sequence[Probe],
                  per_sample: dict[str, Tensor]) -> tuple[Tensor, Tensor, int] | None:
    """A reverse block read: the probes over lambda_t..lambda_{t-n+1} (``values[:n]``, each
    divided by exp(log_scale); k = T - t), then its exit (``values[n]``, where the block has
    one) renormalised: (exit, its log_scale, the next block's length), or None."""
    ctx = ReverseStep(values[:n], log_scale.expand(n, -1), rows)
    for probe in probes:
        per_sample[probe.name][k:k + n] = probe(ctx)
    if values.shape[0] == n:
        return None
    adj, ln_exit = _rescaled(values[n], norms[n])
    return adj, log_scale + ln_exit, _block_length(ln_exit, n, adj.dtype)


def _reverse_fused(u: Unrolled, fused: FusedAdjoint, adj: Tensor, log_scale: Tensor,
                   probes: Sequence[Probe], per_sample: dict[str, Tensor],
                   terms: tuple[Tensor | _BlockDirect, list[bool]] | None = None
                   ) -> tuple[int, Tensor, Tensor]:
    """``_reverse_fast`` by the fused kernel's backward, a block of its steps at a time from
    step T down: the h-parts of lambda_t..lambda_t0+1 for the probes, lambda_t0 whole to go
    on with. On a GPU nothing here waits for the device: each block's range check is kept as
    a flag and all are read once, at the end (on the CPU, each at once). Returns (0, ...)
    where every block stayed in range;
    else (t, adj, log_scale) at the start of the first block that did not, for the
    closed-form loop to redo from there (what later blocks wrote, it overwrites).

    Where sequences end early (``u.mask``), a sequence whose end L lies before t waits: its
    adj is its loss gradient dL/ds_L (scaled), which the loop would carry unchanged through
    the held steps down to L, and the kernel, whose states run on, takes at L, as the
    gradient of that step's output. Its values at steps after L stay zero; no probe reads
    them (``_end_aligned_norm``).

    ``terms`` (direct, has_direct), where losses are read at many steps (``_reverse_general``):
    each step's own term dL/ds_s, brought to the block's scale, enters as the gradient of that
    step's output, and step t0's joins the block's exit; a term that cannot be brought to it
    (an adjoint exactly zero, or one far below the term) fails the block's range check."""
    T, h, L = u.seq_len, u.rows()["h"], fused.length
    lift = _fused_plan(u).lift * LN10  # ln of the lift, applied per sample on the device
    entries, kept = [], []
    t, adj = T, adj.to(fused.dtype)
    up = torch.full_like(log_scale, lift)  # (B,) float64
    shift = up  # the first block is taken to fall
    ends = None if u.mask is None else u.mask.sum(dim=0)  # (B,) each sequence's last step
    while t >= 1:
        t0 = ((t - 1) // L) * L
        n = t - t0
        entries.append((t, adj, log_scale))
        waiting = (adj, log_scale)  # as they enter the block, for those still waiting after it
        if lift:  # the block starts at exp(shift), its log-scale lowered to match
            adj, log_scale = adj * torch.exp(shift).to(adj.dtype)[:, None], log_scale - shift
        alive = (adj != 0).any(dim=-1)  # (B,)
        incoming, inject, live, live_exit = adj, None, alive, alive
        exit_term = None
        if ends is not None:
            incoming, inject, live, live_exit = _entering_at_ends(adj, alive, ends, t, t0, h)
        elif terms is not None and any(terms[1][max(t0, 1) - 1:t - 1]):  # steps t0..t-1
            inject, exit_term = _terms_in_block(terms[0], log_scale, t, t0, h)
            live = live_exit = torch.ones_like(alive)  # every sample at norm 1, all checked
        lam_h, exit_ = fused.back(t0 // L, incoming, inject)  # (n, B, H) of t0..t-1, (B, S)
        if exit_term is not None:  # lambda_t0 = J^T lambda_t0+1 + dL/ds_t0, scaled
            exit_ = exit_ + exit_term.to(exit_.dtype)
        values = torch.cat([incoming[None, :, h], lam_h.flip(0)[:-1]])  # (n, B, H): t..t0+1
        if inject is not None:  # lambda_L = dL/ds_L where a sequence's gradient enters
            values = values + inject.flip(0)
        norms = torch.linalg.vector_norm(values[1:], dim=-1)
        live = live.expand(n - 1, -1)
        if t0 > 0:  # lambda_t0's norm last
            norms = torch.cat([norms, torch.linalg.vector_norm(exit_, dim=-1)[None]])
            live = torch.cat([live, live_exit[None]])
        kept.append(_safe_range(norms, live))
        if not _runs_ahead(adj) and not bool(kept[-1]):  # nothing to gain by going on
            return entries[-1]
        ctx = ReverseStep(values, log_scale.expand(n, -1), {"h": h})
        for probe in probes:
            per_sample[probe.name][T - t:T - t + n] = probe(ctx)
        if t0 > 0:
            adj, ln_exit = _rescaled(exit_, norms[-1])
            log_scale = log_scale + ln_exit
            falling = torch.where(ln_exit < shift, up, -up)
            if ends is not None:  # those still waiting keep their gradient as it was
                started = ends > t0
                adj = torch.where(started[:, None], adj, waiting[0])
                log_scale = torch.where(started, log_scale, waiting[1])
                falling = torch.where(started, falling, up)
            if lift:  # the next block is lifted where this one fell, lowered where it grew
                shift = falling
        t = t0
    left = torch.nonzero(~torch.stack(kept).cpu())  # the one wait for the device
    return (0, adj, log_scale) if not len(left) else entries[int(left[0])]


def _entering_at_ends(adj: Tensor, alive: Tensor, ends: Tensor, t: int, t0: int, h: slice
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_reverse_fused``'s block t0+1..t where sequences end early (``ends`` (B,)): its
    incoming adjoint (zero for those whose end lies before t), the gradients that enter its
    outputs h_t0+1..h_t at those ends (n, B, H), and which of its values (steps t-1..t0+1:
    up to each one's end) and of its exits are live ((n-1, B), (B,))."""
    below = torch.arange(t - 1, t0, -1, device=adj.device)[:, None]  # (n-1, 1): t-1..t0+1
    incoming = torch.where((ends < t)[:, None], 0, adj)
    at_end = (below == ends)[..., None]  # (n-1, B, 1)
    inject = (at_end * adj[None, :, h]).flip(0)  # (n-1, B, H) of outputs t0+1..t-1
    inject = torch.cat([inject, torch.zeros_like(inject[:1])])  # step t: in ``incoming``
    return incoming, inject, alive & (below <= ends), alive & (ends > t0)


def _terms_in_block(direct: Tensor | _BlockDirect, log_scale: Tensor, t: int, t0: int,
                    h: slice) -> tuple[Tensor, Tensor | None]:
    """``_reverse_fused``'s block t0+1..t where losses are read at many steps: each step's own
    term dL/ds_s divided by exp(log_scale), those of steps t0+1..t-1 to enter the outputs
    h_t0+1..h_t (n, B, H; step t's is in the incoming adjoint already), and step t0's, to join
    the exit (B, S; None at t0 = 0). Inf or NaN where the scale cannot take them."""
    inv = torch.exp(-log_scale)[:, None]  # (B, 1) float64, inf where the adjoint is zero
    rows = [direct[s - 1][:, h] for s in range(t0 + 1, t)]  # (B, H) each
    inside = torch.stack([*rows, torch.zeros_like(direct[t - 1][:, h])])
    return inside * inv, (direct[t0 - 1] * inv if t0 > 0 else None)


def _reverse_general(u: Unrolled, states: Tensor, direct: Tensor, has_direct: list[bool],
                     adj: Tensor, log_scale: Tensor, probes: Sequence[Probe],
                     per_sample: dict[str, Tensor], t: int) -> None:
    """Losses at many steps (copy): lambda_{t-1} = J_t^T lambda_t + dL/ds_{t-1}, from step t
    (``adj``: lambda_t) down. As in
    ``_reverse_fast``, a block of steps at a time, renormalised at its end, each step's own term
    brought to the block's scale (``_general_block``); a block that cannot be is redone a step
    at a time, each step's two terms combined in log space."""
    T, rows = u.seq_len, u.rows()
    cache: list = []
    length = CHUNK  # adj = lambda_t / exp(log_scale), of norm 1 (or 0) per sample
    while t >= 1:
        # 1. A block: lambda_t, ..., lambda_{t-n+1} from adj, ending at an ops chunk's start,
        #    and the exit lambda_{t-n}, which starts the next block (not needed after step 1).
        n = min(length, t - ((t - 1) // CHUNK) * CHUNK)
        block = _general_block(u, states, direct, has_direct, adj, log_scale, t, n, cache) \
            if n > 1 else None
        if block is not None:
            exit_ = _probed_block(*block, n, log_scale, T - t, rows, probes, per_sample)
            if exit_ is not None:
                adj, log_scale, length = exit_
            t -= n
            continue
        # 2. One step: lambda_{t-1} = J_t^T lambda_t + dL/ds_{t-1}, combined without leaving
        #    float range.
        ctx = ReverseStep(adj[None], log_scale[None], rows)
        for probe in probes:
            per_sample[probe.name][T - t] = probe(ctx)[0]
        if t == 1:
            break
        back, ln_back = _unit(_step_back(u, states, t, adj, cache))
        ln_back = ln_back + log_scale
        before = log_scale
        if not has_direct[t - 2]:  # most tasks score one step: nothing to add here
            adj, log_scale = back, ln_back
        else:
            here, ln_here = _unit(direct[t - 2])
            top = torch.maximum(ln_back, ln_here)  # (B,)
            live = torch.isfinite(top)
            w_back = torch.where(live, torch.exp(ln_back - top), 0.0).to(adj.dtype)
            w_here = torch.where(live, torch.exp(ln_here - top), 0.0).to(adj.dtype)
            adj, ln_sum = _unit(w_back[:, None] * back + w_here[:, None] * here)
            log_scale = torch.where(live, top + ln_sum, -math.inf)
        length = _block_length(log_scale - before, 1, adj.dtype)
        t -= 1


def _general_block(u: Unrolled, states: Tensor, direct: Tensor, has_direct: list[bool],
                   adj: Tensor, log_scale: Tensor, t: int, n: int, cache: list
                   ) -> tuple[Tensor, Tensor] | None:
    """``_reverse_general``'s steps t..t-n+1 renormalised once, at the end: lambda_t down to
    lambda_{t-n} (that exit where t-n >= 1), (n or n+1, B, S), divided by exp(log_scale), and
    their norms; each step's own term dL/ds_{s-1} is divided by exp(log_scale) to join them.
    None where that cannot be done: an adjoint exactly zero (log_scale -inf: no scale to bring
    a term to) where a term is to be added, or values that leave the safe range (a term far
    above a decayed adjoint, or that overflowed, at the block's scale, included)."""
    terms = {}
    if any(has_direct[s - 2] for s in range(t, max(t - n, 1), -1)):
        if not bool(torch.isfinite(log_scale).all()):
            return None
        inv = torch.exp(-log_scale).to(adj.dtype)[:, None]  # (B, 1), may be inf: checked below
        terms = dict(direct=direct, has_direct=has_direct, inv=inv)
    values, norms = _back_steps(u, states, adj, t, n, cache, **terms)
    # a zero adjoint stays exactly zero where no term is added; where one is, every sample
    # started at norm 1 (a finite log_scale), so that all are checked, NaN and inf included
    if not _in_safe_range(norms[1:], norms[0] > 0):
        return None
    return values, norms


class Segmented:
    """s_0..s_T for the reverse pass from checkpoints: s_0, s_L, s_2L, ... are kept, and the
    segment s_kL..s_(k+1)L is recomputed (and cached, one at a time) when it is indexed. The
    reverse pass reads it backwards, so each segment is recomputed once.

    Supports what the reverse pass asks: ``x[t]``, ``x[a:b]`` within one segment (its end
    state included), ``x[-1:]``, ``shape``.
    """

    def __init__(self, u: Unrolled, length: int | None = None,
                 checkpoints: Tensor | None = None) -> None:
        self.u = u
        T = u.seq_len
        # L: a multiple of CHUNK, so that chunks never straddle segments; about sqrt(T)
        self.L = length or CHUNK * max(1, round(math.sqrt(T) / CHUNK))
        self.bad: int | None = None  # the first step whose state is not finite
        self.cached: tuple[int, Tensor] | None = None  # (k, segment k's states)
        # s_0, s_L, s_2L, ...: (T/L + 1, B, S), filled by ``record`` unless given
        self.checkpoints = u.s0.new_empty(-(-T // self.L) + 1, *u.s0.shape) \
            if checkpoints is None else checkpoints
        self.shape = (T + 1, *u.s0.shape)

    def record(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """The streamed trajectory passed through, its checkpoints kept on the way."""
        for t0, states, g, stop in chunks:
            if t0 % self.L == 0 and states.shape[0]:
                self.checkpoints[t0 // self.L] = states[0]  # a copy: the chunk is not kept
            if stop is not None:
                self.bad = stop.step
            yield t0, states, g, stop

    def segment(self, k: int) -> Tensor:
        if self.cached is None or self.cached[0] != k:
            a = k * self.L
            self.cached = (k, _steps(self.u, self.checkpoints[k], a,
                                     min(a + self.L, self.u.seq_len)))
        return self.cached[1]

    def __getitem__(self, index: int | slice) -> Tensor:
        T = self.u.seq_len
        if isinstance(index, int):
            t = index % (T + 1)
            k = min(t // self.L, (T - 1) // self.L)
            return self.segment(k)[t - k * self.L]
        start, stop, _ = index.indices(T + 1)
        k = min(start // self.L, (T - 1) // self.L)
        if stop - 1 > min((k + 1) * self.L, T):
            raise IndexError("a slice of a Segmented trajectory must lie within one segment")
        return self.segment(k)[start - k * self.L:stop - k * self.L]

    def direct(self) -> _BlockDirect:
        return _BlockDirect(self.u, self.L, lambda k: self.segment(k)[1:])


class _BlockDirect:
    """dL/ds_t through step t's own loss, t = 1..T, indexed t-1, a block of L steps at a time
    from ``block_states(k)``, the states of steps kL+1..(k+1)L."""

    def __init__(self, u: Unrolled, L: int, block_states: Callable[[int], Tensor]) -> None:
        self.u, self.L, self.block_states = u, L, block_states
        self.cached: dict[int, Tensor] = {}  # the last two blocks: a pass reads k, then k-1

    def __getitem__(self, i: int) -> Tensor:
        u, L = self.u, self.L
        k = i // L  # step i+1 lies in block k (steps kL+1..(k+1)L)
        if k not in self.cached:
            g = _loss_grads(u, self.block_states(k), k * L + 1)
            w = u.weights[k * L:k * L + g.shape[0]].to(g.dtype)
            self.cached = {j: v for j, v in self.cached.items() if abs(j - k) == 1}
            self.cached[k] = w[:, None, None] * g
        return self.cached[k][i - k * L]


def _kernel_direct(u: Unrolled, fused: FusedAdjoint) -> _BlockDirect:
    """``_BlockDirect`` from the fused kernel's outputs h_t, for losses that read h alone
    (``Unrolled.losses_read_h``): the other parts are given as zeros."""
    def states(k: int) -> Tensor:
        h = fused.hidden(k).to(u.s0.dtype)
        return torch.cat([h, h.new_zeros(*h.shape[:-1], u.s0.shape[-1] - h.shape[-1])], -1)

    return _BlockDirect(u, fused.length, states)


def _end_aligned_norm(ln: Tensor, lengths: Tensor | None) -> Tensor:
    """(T, B) per-sample ln norms, by k back from step T -> (T,) ln of the norm over the batch,
    by k back from each sequence's own last step.

    A sequence that ended early holds its state, so its adjoint is constant over the held steps:
    its k-th step back from its own end sits at k + (T - length) back from T. At a k past a
    sequence's start it is absent (adds nothing to the norm); past every start the value is NaN.
    """
    if lengths is None:
        return 0.5 * torch.logsumexp(2 * ln, dim=1)
    T = ln.shape[0]
    k = torch.arange(T)[:, None]  # (T, 1)
    source = (k + (T - lengths)[None, :]).clamp(max=T - 1)  # (T, B)
    aligned = torch.where(k < lengths[None, :], ln.gather(0, source), -math.inf)
    total = 0.5 * torch.logsumexp(2 * aligned, dim=1)
    return torch.where(k[:, 0] < lengths.max(), total, math.nan)
