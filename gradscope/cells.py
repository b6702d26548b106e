"""Recurrent cells as step functions over an explicit state, in PyTorch's conventions.

Every cell holds ``weight_ih (G*H, D)``, ``weight_hh (G*H, H)``, ``bias_ih (G*H,)`` and
``bias_hh (G*H,)`` with the gate blocks in PyTorch's order (LSTM: i, f, g, o; GRU: r, z, n), so
its weights copy one to one into torch.nn.RNN / LSTM / GRU (``torch_module``), which the tests use
to prove that the step functions compute the same thing.

The input projection ``W_ih x + b_ih`` does not depend on the state, so it is computed for all
steps at once (``project``) and the step function takes it as ``xp``. Training unrolls the
steps under autograd with ``recur`` (or torch.nn's fused kernel, ``kernel_hidden``).

Seed-stacked weights: a weight may carry a leading dimension of S seeds (``(S, G*H, H)``, biases
``(S, G*H)``; see gradscope.batched). The batch then holds S groups of equal size, seed-major,
and ``affine`` applies each group's own weights: S independent models in one computation.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .activations import ACTIVATIONS
from .errors import ConfigError
from .registry import Registry

State = tuple[Tensor, ...]  # (h,) or (h, c), each (B, H)


class Cell(nn.Module):
    parts: tuple[str, ...] = ("h",)  # names of the state tensors, in order
    gates: tuple[str, ...] = ("",)  # names of the G gate blocks, in PyTorch's order
    keep_gate: str | None = None  # the gate whose bias sets how much old state survives
    takes_activation = False  # whether --activation means anything for this cell
    activation: str | None = None  # the vanilla RNN's phi; gated cells fix their own

    def __init__(self, input_size: int, hidden: int, activation: str | None = None) -> None:
        super().__init__()
        self.check_activation(activation)
        self.input_size = input_size
        self.hidden = hidden
        g = len(self.gates)
        self.weight_ih = nn.Parameter(torch.empty(g * hidden, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.zeros(g * hidden))
        self.bias_hh = nn.Parameter(torch.zeros(g * hidden))
        # PyTorch's default, so that a cell is usable before any initialisation scheme runs.
        bound = 1.0 / math.sqrt(hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    name = "cell"

    @classmethod
    def check_activation(cls, activation: str | None) -> None:
        """Raise ConfigError unless ``activation`` makes sense for this cell."""
        if activation is None:
            return
        if not cls.takes_activation:
            raise ConfigError(
                f"--activation {activation} does not apply to the {cls.name} cell (its gates "
                "fix their own nonlinearities); leave --activation out or use --cell rnn"
            )
        ACTIVATIONS.get(activation)

    def gate_slice(self, gate: str) -> slice:
        k = self.gates.index(gate)
        return slice(k * self.hidden, (k + 1) * self.hidden)

    def project(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., G*H): the input drive W_ih x + b_ih of every step at once."""
        return affine(x, self.weight_ih, self.bias_ih)

    def initial_state(self, batch: int) -> State:
        w = self.weight_hh
        return tuple(w.new_zeros(batch, self.hidden) for _ in self.parts)

    # b_hh adds to the same pre-activation as W_ih x (rnn, lstm; not the GRU's n gate), so a
    # loop over steps can add it once for all steps (``drive``, ``step_driven``)
    folds_bias = True

    def step(self, xp: Tensor, state: State) -> State:
        return self._step(xp, state, self.weight_hh, self.bias_hh)

    def drive(self, x: Tensor, seed_major: bool = False) -> Tensor:
        """(T, B, D) -> (T, B, G*H): W_ih x + b_ih of every step, plus b_hh where it folds in.
        ``seed_major`` (seed-stacked weights): (S, T, n, G*H) instead, each seed's steps
        together (``recur``'s grouped layout)."""
        b = self.bias_ih + self.bias_hh if self.folds_bias else self.bias_ih  # one reduction
        return affine(x, self.weight_ih, b, seed_major=seed_major)

    def step_driven(self, d: Tensor, state: State) -> State:
        """``step`` on that step's ``drive``: the same recurrence, one add fewer per step."""
        return self._step(d, state, self.weight_hh, None if self.folds_bias else self.bias_hh)

    def _step(self, xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              grouped: bool = False, add: Tensor | None = None) -> State:
        """One step on ``xp`` (W_ih x + b_ih, plus b_hh where it folds in and ``b_hh`` is
        None) with the recurrent weight ``w_hh`` (the cell's, or ``recur``'s detached copy);
        ``add``: a tensor of W_hh h's shape added to it in place of ``b_hh`` (for cells whose
        b_hh does not fold in; ``recur``)."""
        raise NotImplementedError

    def recur(self, drive: Tensor, state: State, mask: Tensor | None = None,
              grouped: bool = False) -> Tensor:
        """h_1..h_T (T, ..., H) of ``drive`` (T, ..., G*H; ``drive``) from ``state``, under
        autograd (training). ``mask`` (T, B): where False, a sample holds its state.
        ``grouped``: a seed stack's tensors kept split by seed: ``drive`` seed-major (S, T, n,
        G*H), state parts (S, n, H), h (T, S, n, H): one batched matmul a step, no reshapes,
        and the drive's gradient comes out in the order of its matmuls (W_ih's, W_hh's).

        Up to TAPPED_ROWS rows (sequences, over all seeds), W_hh's gradient, sum_t da_t^T
        h_{t-1}, is one matmul over all steps after the loop (``_RecurrentWeight``) instead of
        T small ones that autograd would form and add up one by one; the steps multiply by a
        detached W_hh."""
        rows = drive.shape[0] * drive.shape[2] if grouped else drive.shape[1:-1].numel()
        if rows > TAPPED_ROWS or not (torch.is_grad_enabled() and self.weight_hh.requires_grad):
            return self._loop(drive, state, mask, grouped, self.weight_hh)
        held: list[Tensor] = []  # h_0..h_{T-1}, once the loop has run
        if self.folds_bias:  # W_hh h adds to the drive, so da_t is the drive's gradient
            drive = _RecurrentWeight.apply(drive, self.weight_hh, held, grouped)
            base = None
        else:  # W_hh h adds to b_hh
            b = self.bias_hh
            if grouped:  # (S, G*H) over (S, T, n, G*H)
                b = b[:, None, None, :]
            elif b.dim() == 2:  # seed-stacked (S, G*H): each seed's bias over its own rows
                S = b.shape[0]
                b = b[:, None, :].expand(S, rows // S, -1).flatten(0, 1)
            base = _RecurrentWeight.apply(b.expand(*drive.shape[:-1], b.shape[-1]),
                                          self.weight_hh, held, grouped)
        return self._loop(drive, state, mask, grouped, self.weight_hh.detach(), base, held)

    def _loop(self, drive: Tensor, state: State, mask: Tensor | None, grouped: bool,
              w_hh: Tensor, base: Tensor | None = None,
              held: list[Tensor] | None = None) -> Tensor:
        """``recur``'s steps. ``base``: what adds to W_hh h at each step, in place of b_hh
        (None: b_hh, or nothing where it folds into the drive); ``held`` receives
        h_0..h_{T-1}."""
        b_hh = None if self.folds_bias or base is not None else self.bias_hh
        time = 1 if grouped else 0
        adds = [None] * drive.shape[time] if base is None else base.unbind(time)
        h0, hs = state[0], []
        # unbind, not drive[t]: the backward of T indexings would write T full-size zeros
        for t, (d, add) in enumerate(zip(drive.unbind(time), adds, strict=True)):
            new = self._step(d, state, w_hh, b_hh, grouped, add)
            if mask is not None:
                new = tuple(torch.where(mask[t][:, None], n, o)
                            for n, o in zip(new, state, strict=True))
            hs.append(new[0])
            state = new
        if held is not None:
            with torch.no_grad():
                held.append(torch.stack([h0, *hs[:-1]], time))
        return torch.stack(hs)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Plain unrolled loop: x (T, B, D) -> (h_1..h_T (T, B, H), final state)."""
        state = self.initial_state(x.shape[1]) if state is None else state
        xps = self.project(x)
        hs = []
        for t in range(x.shape[0]):
            state = self.step(xps[t], state)
            hs.append(state[0])
        return torch.stack(hs), state

    def _torch_module(self, inputs: int) -> nn.RNNBase:
        raise NotImplementedError

    def torch_module(self, tied: bool = False) -> nn.RNNBase:
        """The torch.nn module (one layer, batch_first=False) with this cell's weights. With
        ``tied``, H more inputs follow the cell's own, weighted by W_hh as h_{t-1} is (the
        fused adjoint of gradscope.linear feeds them zeros and reads their gradients)."""
        module = self._torch_module(self.input_size + (self.hidden if tied else 0))
        module = module.to(self.weight_hh.dtype)
        w_ih = torch.cat([self.weight_ih, self.weight_hh], 1) if tied else self.weight_ih
        with torch.no_grad():
            module.weight_ih_l0.copy_(w_ih)
            module.weight_hh_l0.copy_(self.weight_hh)
            module.bias_ih_l0.copy_(self.bias_ih)
            module.bias_hh_l0.copy_(self.bias_hh)
        return module

    def kernel_hidden(self, x: Tensor) -> Tensor:
        """h_1..h_T (T, B, H) of the cell's inputs x (T, B, D) from the zero state, by
        torch.nn's fused kernel run on this cell's own parameters, so that autograd reaches
        them (training). Seed-stacked weights: one call per seed, on its group of the batch.
        For the cells torch.nn has (``torch_module``)."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        weights = [getattr(self, name) for name in names]
        # a module to call, its own parameters never used; one per thread, as functional_call
        # swaps the parameters in for the call
        kernels = _KERNELS.__dict__.setdefault("modules", {})
        key = (type(self), self.activation, self.input_size, self.hidden, x.dtype, x.device)
        if key not in kernels:
            kernels[key] = self._torch_module(self.input_size).to(x.device, x.dtype)
        module = kernels[key]
        per_seed = [weights] if weights[1].dim() == 2 else list(zip(*weights, strict=True))
        xs = x.chunk(len(per_seed), dim=1)
        outs = []
        with warnings.catch_warnings():  # cuDNN: our weights are not one flat buffer, fine
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            for xg, ws in zip(xs, per_seed, strict=True):
                params = {f"{name}_l0": w for name, w in zip(names, ws, strict=True)}
                outs.append(functional_call(module, params, (xg,))[0])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# Measured (H = 32, T = 200, one thread; a training step's forward and backward, the loop with
# and without ``_RecurrentWeight``, alternately in one process): 1.03-1.22x faster with up to 64
# rows (4-8 sequences for each of 8 seeds, or one model's 8-64), where a step is overhead; from
# 128 rows 0.66-1.06x, mostly slower, as the gradient's reordering by seed for the one matmul
# then costs more than the T small matmuls it replaces.
TAPPED_ROWS = 64

_KERNELS = threading.local()  # .modules: torch.nn modules for kernel_hidden, by shape and dtype

CELLS: Registry[type[Cell]] = Registry("cell", "--cell")


class _RecurrentWeight(torch.autograd.Function):
    """Identity on ``base`` (T, ..., G*H), the term that each step of ``Cell.recur`` adds to
    W_hh h_{t-1}; its backward also gives W_hh's gradient, sum_t da_t^T h_{t-1}: da_t is
    ``base``'s gradient, and ``held[0]`` holds h_0..h_{T-1} (T, ..., H), put there by the loop
    once it has run (before any backward). ``grouped``: both seed-major, (S, T, n, .)."""

    @staticmethod
    def forward(ctx, base: Tensor, w_hh: Tensor, held: list[Tensor], grouped: bool) -> Tensor:
        ctx.held, ctx.grouped = held, grouped
        ctx.seeds = w_hh.shape[0] if w_hh.dim() == 3 else 0
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, S = ctx.held[0], ctx.seeds
        if not S:  # (T*B, G*H)^T (T*B, H)
            return grad, grad.flatten(0, -2).mT @ h.flatten(0, -2), None, None

        def by_seed(x: Tensor) -> Tensor:  # -> (S, T*n, .)
            if ctx.grouped:  # (S, T, n, .): a view
                return x.flatten(1, 2)
            return x.unflatten(1, (S, -1)).movedim(1, 0).flatten(1, 2)  # (T, S*n, .): a copy

        return grad, torch.bmm(by_seed(grad).mT, by_seed(h)), None, None


# The step math, as functions of explicit weights, shared by the cells above and by the
# adapters of users' torch.nn modules (gradscope.usermodel). ``xp`` is W_ih x + b_ih.

def affine(x: Tensor, w: Tensor, b: Tensor | None = None, *, add: Tensor | None = None,
           grouped: bool = False, seed_major: bool = False) -> Tensor:
    """x W^T + b (+ ``add``, of the result's shape). x (..., N, D); w (M, D) and b (M,), or
    seed-stacked w (S, M, D) and b (S, M), which apply to the S consecutive groups of N/S rows
    each -> (..., N, M). ``grouped``: x (S, n, D) already split by seed (a seed stack's
    training loop keeps its tensors so) -> (S, n, M), one batched matmul with ``add`` or b
    folded in, no reshapes. ``seed_major``: x (L, S*n, D) and seed-stacked w -> (S, L, n, M),
    each seed's rows together (the drive of that loop)."""
    if seed_major and w.dim() == 3:  # x (L, S*n, D) -> (S, L, n, M): one bmm, no copy of y
        S, M = w.shape[0], w.shape[1]
        xs = x.unflatten(1, (S, -1)).movedim(1, 0)  # (S, L, n, D)
        lead = xs.shape[1:3]
        xs = xs.reshape(S, -1, xs.shape[-1])
        y = torch.bmm(xs, w.mT) if b is None else torch.baddbmm(b[:, None, :], xs, w.mT)
        return y.view(S, *lead, M)
    if grouped:
        if add is None and b is None:
            return torch.bmm(x, w.mT)
        y = torch.baddbmm(add if add is not None else b[:, None, :], x, w.mT)
        return y + b[:, None, :] if add is not None and b is not None else y
    if add is not None:
        return add + affine(x, w, b)
    if w.dim() == 2:
        y = x @ w.T
        return y if b is None else y + b
    S, M = w.shape[0], w.shape[1]
    if x.dim() == 2:  # a step of the loop: one bmm, views only
        xs = x.view(S, -1, x.shape[-1])
        y = torch.bmm(xs, w.mT) if b is None else torch.baddbmm(b[:, None, :], xs, w.mT)
        return y.view(x.shape[0], M)
    xs = x.unflatten(-2, (S, -1))  # (..., S, n, D)
    lead, n = xs.shape[:-3], xs.shape[-2]
    if xs.shape[-1] <= n:  # broadcasting copies w per leading index: cheap for a narrow w
        if b is not None:  # the bias as a column of w against a column of ones: its gradient
            # is then part of the matmul's, not a reduction over every leading index
            xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)
            w = torch.cat([w, b[:, :, None]], dim=-1)
        return (xs @ w.mT).flatten(-3, -2)
    # else one bmm over the seeds, leading dims folded into its rows (a copy of x, not of w)
    xs = xs.movedim(-3, 0).reshape(S, -1, xs.shape[-1])  # (S, L*n, D)
    y = torch.bmm(xs, w.mT) if b is None else torch.baddbmm(b[:, None, :], xs, w.mT)
    return y.view(S, *lead, n, M).movedim(0, -3).flatten(-3, -2)


# ``grouped``: the tensors of a seed stack kept split by seed, (S, n, ...) (``affine``)

def rnn_step(xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
             phi: Callable[[Tensor], Tensor], grouped: bool = False) -> State:
    (h,) = state
    return (phi(affine(h, w_hh, b_hh, add=xp, grouped=grouped)),)


def lstm_step(xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              grouped: bool = False) -> State:
    h, c = state
    i, f, g, o = affine(h, w_hh, b_hh, add=xp, grouped=grouped).chunk(4, dim=-1)  # (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
             grouped: bool = False, add: Tensor | None = None) -> State:
    """``add``: added to W_hh h in place of b_hh (``Cell.recur``)."""
    (h,) = state
    H = h.shape[-1]
    # split, not slices: autograd then joins the pieces' gradients in one op, not one each
    xrz, xn = xp.split((2 * H, H), dim=-1)
    hrz, hn = affine(h, w_hh, b_hh, add=add, grouped=grouped).split((2 * H, H), dim=-1)
    r, z = torch.sigmoid(xrz + hrz).chunk(2, dim=-1)
    n = torch.tanh(torch.addcmul(xn, r, hn))
    return (torch.lerp(n, h, z),)  # (1 - z) n + z h


@CELLS.register("rnn", "vanilla RNN: h' = phi(W_ih x + b_ih + W_hh h + b_hh); see --activation")
class RNNCell(Cell):
    name = "rnn"
    takes_activation = True

    def __init__(self, input_size: int, hidden: int, activation: str | None = None) -> None:
        super().__init__(input_size, hidden, activation)
        self.activation = activation or "tanh"
        self.phi = ACTIVATIONS.get(self.activation).fn

    def _step(self, xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              grouped: bool = False, add: Tensor | None = None) -> State:
        return rnn_step(xp, state, w_hh, b_hh, self.phi, grouped)

    def _torch_module(self, inputs: int) -> nn.RNN:
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"torch.nn.RNN has no {self.activation} nonlinearity")
        return nn.RNN(inputs, self.hidden, nonlinearity=self.activation)


@CELLS.register("lstm", "LSTM (gates i, f, g, o); state (h, c); the cell-state path is probed too")
class LSTMCell(Cell):
    name = "lstm"
    parts = ("h", "c")
    gates = ("i", "f", "g", "o")
    keep_gate = "f"

    def _step(self, xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              grouped: bool = False, add: Tensor | None = None) -> State:
        return lstm_step(xp, state, w_hh, b_hh, grouped)

    def _torch_module(self, inputs: int) -> nn.LSTM:
        return nn.LSTM(inputs, self.hidden)


@CELLS.register("gru", "GRU (gates r, z, n): h' = (1 - z) n + z h")
class GRUCell(Cell):
    name = "gru"
    gates = ("r", "z", "n")
    keep_gate = "z"
    folds_bias = False  # n = tanh(W_in x + b_in + r (W_hn h + b_hn)): b_hn sits inside r

    def _step(self, xp: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              grouped: bool = False, add: Tensor | None = None) -> State:
        return gru_step(xp, state, w_hh, b_hh, grouped, add)

    def _torch_module(self, inputs: int) -> nn.GRU:
        return nn.GRU(inputs, self.hidden)
