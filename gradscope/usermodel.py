"""Users' own PyTorch models, unrolled step by step with their own weights for the engine.

Accepted (``SUPPORTED``):

- ``torch.nn.RNN`` / ``LSTM`` / ``GRU``: any ``num_layers``, ``batch_first`` either way, with or
  without biases, an LSTM's ``proj_size`` too; unidirectional; inter-layer dropout is not
  applied (the module is measured as in eval mode).
- ``torch.nn.RNNCell`` / ``LSTMCell`` / ``GRUCell``.
- A subclass of any of the above that overrides ``forward`` is refused (its forward would not
  be measured); one that follows the step protocol is stepped through its own ``step``.
- Any module that follows the step protocol::

      class MyCell(torch.nn.Module):
          input_size: int                       # features per step
          def initial_state(self, batch: int) -> tuple[Tensor, ...]:  # each (batch, H); [0] = h
          def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
              ...                               # x (batch, input_size); same shapes back

  ``step`` takes tensors of the shapes that ``initial_state`` gives, as in training; the
  engine pushes many directions through it at once as more sequences of its batch, so that
  each sequence must be stepped on its own (no mixing across the batch, as batch norm in
  training mode would), and alike each time (no noise): ``_check_steps_alone`` tries it on
  two sequences and refuses it otherwise. The state's tensors may differ in width (h of 64
  values, c of 128).

State parts: the first layer's are "h" (and "c"); a stacked model's layer k adds "h@k"
("c@k"). The loss is a fixed random projection of the top layer's h (seeded, unit norm):
L_t = mean over the batch of r . h_t, and the task loss L = L_T.

An LSTM with ``proj_size`` P < H has an h of P values and a c of H, and a module of the step
protocol may have state tensors of any widths; the engine's parts share one size, so each
part is carried as the widest one's H values, the rest of them always zero. Their directions
stay exactly zero and add nothing: every probe is that of the true values, and the loss's r
lies on h's (``readout``).

A torch.nn RNN (tanh, relu), LSTM or GRU, and their cells, compute exactly what the built-in
cells of gradscope.cells do, a layer each: they take the module's weights and the engine
measures them with its fast back end (closed-form Jacobians, torch's fused kernel; stacked
layers by ``linear.Layered``). Modules of the step protocol go through forward-mode AD and
autograd, one call per step.
"""

from __future__ import annotations

import copy
import importlib
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .cells import CELLS, Cell, State, gru_step, lstm_step, rnn_step
from .engine import Unrolled, gpu_slices_bytes
from .errors import ConfigError
from .linear import Layered, has_fused_adjoint
from .model import unroll_cell

_NOT_USERS = (Path(torch.__file__).parent, Path(__file__).parent)  # torch's code, gradscope's
SUPPORTED = ("torch.nn.RNN, LSTM or GRU; torch.nn.RNNCell, LSTMCell or GRUCell; or a module "
             "with input_size, initial_state(batch) and step(x, state)")


@dataclass(frozen=True)
class Adapted:
    """A recurrent module as a step function over a flat state."""

    module: nn.Module
    input_size: int
    hidden: int
    parts: tuple[str, ...]
    step: Callable[[Tensor, Tensor], Tensor]  # (x_t (B, D), s (..., B, S)) -> s'
    initial_state: Callable[[int], Tensor]  # batch -> (B, S)
    top: str  # the part that the loss reads: the top layer's h
    cells: tuple[Cell, ...] = ()  # the same recurrence as built-in cells, a layer each
    readout: int | None = None  # the top h's true width where narrower than H (padded)


@contextmanager
def importable_from(folder: Path) -> Iterator[None]:
    """Factories may also be imported from ``folder`` (a check file's, which may lie below the
    folder CI runs in), after the current folder, while the block runs."""
    entry = str(Path(folder).resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(min(1, len(sys.path)), entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_factory(path: str, where: str) -> Callable[..., nn.Module]:
    """``"package.module:factory"`` -> the callable; the current folder is importable."""
    module_name, _, attr = path.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of the user's code is a config error
        raise ConfigError(f"{where}: cannot import {module_name} ({type(e).__name__}: {e})"
                          ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{where}: {module_name} has no callable {attr!r}")
    return factory


def make(path: str, args: dict, where: str) -> nn.Module:
    factory = import_factory(path, where)
    try:
        module = factory(**args)
    except Exception as e:
        raise ConfigError(f"{where}: the factory {path} raised {type(e).__name__}: {e}"
                          ) from None
    return module


def adapt(module: object, where: str, dtype: torch.dtype | None = None) -> Adapted:
    """The step-function view of ``module`` (a copy, cast to ``dtype`` when given)."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: the model is {_kind(module)}; expected {SUPPORTED}")
    module = copy.deepcopy(module)
    if dtype is not None:
        module = module.to(dtype)
    module.eval()
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"{where}: the model's weight {name} holds NaN or Inf values")
    module.requires_grad_(False)
    if all(hasattr(module, a) for a in ("initial_state", "step", "input_size")):
        return _protocol(module, where, dtype)  # explicit, even on a torch.nn.LSTM subclass
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        _check_own_forward(module, where)
        return _stacked(module, where) if isinstance(module, nn.RNNBase) else _cell(module)
    inner = [f"{name} ({type(m).__name__})" for name, m in module.named_modules()
             if isinstance(m, nn.RNNBase | nn.RNNCellBase)]
    hint = f"; it holds {', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}: let the " \
        "factory return that" if inner else ""
    raise ConfigError(f"{where}: the model is {_kind(module)}; expected {SUPPORTED}{hint}")


def _check_own_forward(module: nn.Module, where: str) -> None:
    """Refuse a subclass of torch.nn.LSTM (RNN, GRU, a cell) that overrides ``forward``: the
    recurrence is unrolled from the weights, as torch.nn's own forward runs it, so a forward
    of its own would not be measured."""
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))
    if type(module).forward is not base.forward:
        raise ConfigError(
            f"{where}: {type(module).__name__} overrides torch.nn.{base.__name__}'s forward, "
            f"which gradscope does not run (it unrolls torch.nn.{base.__name__}'s recurrence "
            "from the weights): return a plain torch.nn module if your forward only reshapes "
            "or packs, or give the module input_size, initial_state(batch) and step(x, state)")


def _kind(value: object) -> str:
    """``value``'s type with its article, for messages: "a Linear", "an int"."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _steps_for(mode: str) -> tuple[int, Callable[..., State]]:
    """(state tensors per layer, step function(xp, state, w_hh, b_hh))."""
    if mode == "LSTM":
        return 2, lstm_step
    if mode == "GRU":
        return 1, gru_step
    phi = torch.tanh if mode == "RNN_TANH" else torch.relu
    return 1, lambda xp, st, w, b: rnn_step(xp, st, w, b, phi)


def _stacked(m: nn.RNNBase, where: str) -> Adapted:
    if m.bidirectional:
        raise ConfigError(f"{where}: bidirectional {type(m).__name__} reads time both ways; "
                          "gradscope measures one direction: pass a unidirectional module")
    per_layer, cell_step = _steps_for(m.mode)
    H, L, P = m.hidden_size, m.num_layers, getattr(m, "proj_size", 0)
    names = ("h", "c")[:per_layer]
    parts = tuple(n if k == 0 else f"{n}@{k + 1}" for k in range(L) for n in names)
    weights = [(getattr(m, f"weight_ih_l{k}"), getattr(m, f"bias_ih_l{k}", None),
                getattr(m, f"weight_hh_l{k}"), getattr(m, f"bias_hh_l{k}", None))
               for k in range(L)]
    # an LSTM's proj_size P: h' = W_hr (o tanh c'), P values, carried padded to H with zeros
    # (the parts share one size), by the generic back end (no built-in cell projects)
    projections = [getattr(m, f"weight_hr_l{k}") if P else None for k in range(L)]

    def step(x: Tensor, s: Tensor) -> Tensor:
        chunks = s.split(H, dim=-1)
        out, below = [], x
        for k, (w_ih, b_ih, w_hh, b_hh) in enumerate(weights):
            xp = below @ w_ih.T + (0 if b_ih is None else b_ih)
            state = chunks[k * per_layer:(k + 1) * per_layer]
            w_hr = projections[k]
            if w_hr is not None:
                state = (state[0][..., :P], *state[1:])
            new = cell_step(xp, state, w_hh, b_hh)
            below = new[0] if w_hr is None else new[0] @ w_hr.T
            out += [below if w_hr is None else nn.functional.pad(below, (0, H - P)), *new[1:]]
        return torch.cat(out, dim=-1)

    def initial(batch: int) -> Tensor:
        return m.weight_hh_l0.new_zeros(batch, H * per_layer * L)

    top = "h" if L == 1 else f"h@{L}"
    cells = () if P else tuple(_builtin(m.mode, *layer) for layer in weights)
    return Adapted(m, m.input_size, H, parts, step, initial, top, cells, readout=P or None)


def _cell(m: nn.RNNCellBase) -> Adapted:
    mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(m)) or \
        ("RNN_RELU" if getattr(m, "nonlinearity", "tanh") == "relu" else "RNN_TANH")
    per_layer, cell_step = _steps_for(mode)
    H = m.hidden_size

    def step(x: Tensor, s: Tensor) -> Tensor:
        xp = x @ m.weight_ih.T + (0 if m.bias_ih is None else m.bias_ih)
        return torch.cat(cell_step(xp, s.split(H, dim=-1), m.weight_hh, m.bias_hh), dim=-1)

    def initial(batch: int) -> Tensor:
        return m.weight_hh.new_zeros(batch, H * per_layer)

    cell = _builtin(mode, m.weight_ih, m.bias_ih, m.weight_hh, m.bias_hh)
    return Adapted(m, m.input_size, H, ("h", "c")[:per_layer], step, initial, "h", (cell,))


_BUILTIN = {"LSTM": ("lstm", None), "GRU": ("gru", None), "RNN_TANH": ("rnn", "tanh"),
            "RNN_RELU": ("rnn", "relu")}  # torch.nn's mode -> (cell, activation)


def _builtin(mode: str, w_ih: Tensor, b_ih: Tensor | None, w_hh: Tensor,
             b_hh: Tensor | None) -> Cell:
    """The built-in cell with one torch.nn layer's weights (an absent bias is zero): the same
    recurrence, in the same gate order."""
    name, activation = _BUILTIN[mode]
    hidden, inputs = w_hh.shape[1], w_ih.shape[1]
    cell = CELLS.get(name)(inputs, hidden, activation).to(w_hh)
    with torch.no_grad():
        for mine, theirs in ((cell.weight_ih, w_ih), (cell.weight_hh, w_hh),
                             (cell.bias_ih, b_ih), (cell.bias_hh, b_hh)):
            mine.zero_() if theirs is None else mine.copy_(theirs)
    return cell.requires_grad_(False)


def _protocol(m: nn.Module, where: str, dtype: torch.dtype | None) -> Adapted:
    """A module of the step protocol. Its state is cast to the dtype it was measured in (its
    weights'; an ``initial_state`` that makes torch's default float32 would not match the
    float64 they were cast to), and an error inside ``step`` is one line that names it."""
    dtype = dtype or next((p.dtype for p in m.parameters()), None)
    try:
        state = m.initial_state(2)
    except Exception as e:
        raise ConfigError(f"{where}: initial_state(2) raised {_raised(e)}") from None
    if isinstance(state, Tensor):  # iterating it would give its rows as the parts
        raise ConfigError(f"{where}: initial_state(batch) must return a tuple of tensors, one "
                          f"per part of the state; it returned one tensor of shape "
                          f"{tuple(state.shape)}: return (h,), and take and return the state "
                          "as a tuple in step")
    if not isinstance(state, (tuple, list)) or not all(isinstance(t, Tensor) for t in state):
        raise ConfigError(f"{where}: initial_state(batch) must return a tuple of tensors, one "
                          f"per part of the state; it returned {_kinds(state)}")
    state = _cast(state, dtype)
    shapes = [tuple(t.shape) for t in state]
    if not state or any(len(shape) != 2 or shape[0] != 2 for shape in shapes):
        raise ConfigError(f"{where}: initial_state(batch) must return tensors of shape "
                          f"(batch, n); initial_state(2) gave shapes {shapes}")
    sizes = [shape[1] for shape in shapes]
    H, n = max(sizes), len(state)
    parts = ("h", "c", *(f"s{i}" for i in range(3, n + 1)))[:n]

    def padded(tensors: tuple[Tensor, ...]) -> Tensor:  # each part to H values, zeros after
        return torch.cat([t if k == H else nn.functional.pad(t, (0, H - k))
                          for t, k in zip(tensors, sizes, strict=True)], dim=-1)

    def step(x: Tensor, s: Tensor) -> Tensor:
        # The engine pushes many directions at once as leading dimensions of the state (K, B,
        # S); the module sees them as more sequences of its batch, (K*B, n) each, so that its
        # step need only take what it takes in training (torch.cat([x, h], 1), h[:, :k]).
        lead = s.shape[:-2]
        if lead:
            x = x.expand(*lead, *x.shape).reshape(-1, x.shape[-1])
            s = s.reshape(-1, s.shape[-1])
        own = tuple(chunk[..., :k] for chunk, k in zip(s.split(H, dim=-1), sizes, strict=True))
        try:
            new = m.step(x, own)
        except Exception as e:
            raise ConfigError(f"{where}: the model's step raised {_raised(e)}") from None
        if isinstance(new, Tensor) or not all(isinstance(t, Tensor) for t in new):
            raise ConfigError(f"{where}: step(x, state) must return a tuple of tensors, as "
                              f"initial_state does; it returned {_kind(new)}")
        shapes = [tuple(t.shape) for t in new]
        if shapes != [(s.shape[0], k) for k in sizes]:
            raise ConfigError(f"{where}: step(x, state) returned tensors of shapes {shapes} "
                              f"for states of shapes {[tuple(t.shape) for t in own]}: return "
                              "each as it came")
        if not all(t.is_floating_point() for t in new):
            raise ConfigError(f"{where}: step(x, state) returned tensors of dtypes "
                              f"{[str(t.dtype) for t in new]}; return floating-point ones, as "
                              "the state came")
        out = padded(new)
        return out.reshape(*lead, -1, out.shape[-1]) if lead else out

    def initial(batch: int) -> Tensor:
        return padded(_cast(m.initial_state(batch), dtype))

    _check_steps_alone(step, initial(2), int(m.input_size), where)
    return Adapted(m, int(m.input_size), H, parts, step, initial, "h",
                   readout=sizes[0] if sizes[0] < H else None)


def _check_steps_alone(step: Callable[[Tensor, Tensor], Tensor], s: Tensor, input_size: int,
                       where: str) -> None:
    """Refuse a step whose answer for one sequence depends on the others in its batch (batch
    norm, a mean over the batch) or on chance (noise that eval() leaves on): the engine pushes
    its directions through as more sequences of the batch, and steps a trajectory more than
    once, so that either would make every probe silently wrong. Three steps of 2 sequences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, input_size, generator=g, dtype=torch.float64).to(s)
    other = x.clone()
    other[1] = torch.randn(input_size, generator=g, dtype=torch.float64).to(s) * 3 + 1
    with torch.no_grad():
        first, again, changed = step(x, s), step(x, s), step(other, s)

    def same(a: Tensor, b: Tensor) -> bool:
        scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).max())  # a NaN: the engine's to say
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale + 1e-30, equal_nan=True))

    if not same(first, again):
        raise ConfigError(f"{where}: step(x, state) gave two different next states for the "
                          "same x and state (noise, or dropout that eval() does not switch "
                          "off?); gradscope needs a step that gives the same answer each time")
    if not same(first[0], changed[0]):
        raise ConfigError(f"{where}: step(x, state) mixes the sequences of its batch: the "
                          "first one's next state changed when only the second one's input "
                          "did (as batch norm would); gradscope pushes its directions through "
                          "as more sequences of the batch, so each must step on its own")


def _kinds(value: object) -> str:
    """What a value holds, in one line: 'tuple (Tensor (2, 4), int)'."""
    def one(v: object) -> str:
        return f"Tensor {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} ({', '.join(one(v) for v in value)})"
    return one(value)


def _cast(tensors: tuple[Tensor, ...], dtype: torch.dtype | None) -> tuple[Tensor, ...]:
    return tuple(tensors) if dtype is None else tuple(t.to(dtype) for t in tensors)


def _raised(e: Exception) -> str:
    """"ValueError: oops (at cells.py:12)": the error and the innermost line of the user's
    code (not torch's, not gradscope's) on its way, for a one-line message."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if not any(Path(f.filename).is_relative_to(d)
                                        for d in _NOT_USERS)] or frames
    at = f" (at {Path(own[-1].filename).name}:{own[-1].lineno})" if own else ""
    return f"{type(e).__name__}: {e}{at}"


def unroll(a: Adapted, *, seq_len: int, batch: int, seed: int, input_size: int | None,
           device: torch.device) -> Unrolled:
    """The engine's view: random N(0, 1) inputs, the random-projection loss on the top h."""
    d = input_size or a.input_size
    if d != a.input_size:
        raise ConfigError(f"input-size {d} does not match the model's input_size "
                          f"{a.input_size}")
    s0 = a.initial_state(batch).to(device)
    dtype = s0.dtype
    xs = inputs(a, seq_len, batch, seed).to(device, dtype)
    r = projection(a.readout or a.hidden, seed).to(device, dtype)
    r = nn.functional.pad(r, (0, a.hidden - r.shape[0]))  # zero on an h's padding
    index = a.parts.index(a.top)
    top = slice(index * a.hidden, (index + 1) * a.hidden)
    weights = torch.zeros(seq_len, device=device)
    weights[-1] = 1.0

    def losses(states: Tensor, first: int) -> Tensor:
        return states[..., top] @ r

    # one layer: the built-in cell's back end whole (the fused adjoint too); stacked layers:
    # linear.Layered; modules of the step protocol: forward-mode AD and autograd
    a.module.to(device)
    cells = [cell.to(device) for cell in a.cells]
    if len(cells) == 1:
        with torch.no_grad():
            projected = cells[0].project(xs)  # (T, B, G*H)
        return unroll_cell(cells[0], lambda: xs, projected, s0, losses, weights)
    fast = Layered(cells, lambda: xs, s0) if cells else None
    return Unrolled(step=a.step, s0=s0, xs=xs, parts=a.parts, losses=losses, weights=weights,
                    linearize=None if fast is None else fast.ops,
                    fast_trajectory=None if fast is None else fast.trajectory)


def memory_estimate(a: Adapted, seq_len: int, batch: int, device: torch.device,
                    reverse: bool) -> int:
    """Bytes a measurement of ``a`` holds at its peak, about: its inputs (drawn in float64,
    then cast), a few copies of the forward probes' directions (one per state value), and the
    built-in cells' input projections (twice while they are formed). With the adjoint
    (``reverse``) also the stored trajectory and its loss gradients (about twice as much by
    the generic back end, whose steps go through autograd), and for one vanilla RNN or LSTM
    layer the fused kernel's graph (float64 on a GPU); forward probes alone stream the
    trajectory. On a GPU, the forward pass's slices too (``engine.gpu_slices_bytes``).
    Measured on the CPU, B = 8: an LSTM of H = 64 and 256 at T = 20000 within 0.9x-1.1x of
    the growth of peak RSS; an LSTM with a projection (generic back end) at T = 4000 and
    8000, within 1.0x-1.1x of its growth with T, besides a one-off 0.2 GB."""
    s0 = a.initial_state(1)
    itemsize, S = s0.element_size(), s0.shape[1]
    T, B = seq_len, batch
    projections = T * B * sum(c.weight_ih.shape[0] for c in a.cells) * itemsize
    need = T * B * a.input_size * (8 + itemsize) + 4 * S * B * S * itemsize \
        + gpu_slices_bytes(device, T * S * B * S)
    if not reverse:
        return need + 2 * projections
    need += projections + (2 if a.cells else 4) * (T + 1) * B * S * itemsize
    if len(a.cells) == 1 and has_fused_adjoint(a.cells[0].name, a.cells[0].activation):
        need += 8 * T * B * a.hidden * (8 if device.type == "cuda" else itemsize)
    return need


def inputs(a: Adapted, seq_len: int, batch: int, seed: int) -> Tensor:
    """The measurement's inputs (T, B, D), float64: N(0, 1), drawn from the seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seq_len, batch, a.input_size, generator=gen, dtype=torch.float64)


def projection(hidden: int, seed: int) -> Tensor:
    """The loss's readout: a random unit vector r (H,), float64, from its own seeded stream."""
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(2 * seed + 1),
                    dtype=torch.float64)
    return r / r.norm()


def outputs(a: Adapted, x: Tensor) -> Tensor:
    """The top layer's h_1..h_T for inputs x (T, B, D), by the adapted step (for tests)."""
    s = a.initial_state(x.shape[1]).to(x)
    index = a.parts.index(a.top)
    hs = []
    for t in range(x.shape[0]):
        s = a.step(x[t], s)
        hs.append(s[:, index * a.hidden:(index + 1) * a.hidden])
    return torch.stack(hs)


