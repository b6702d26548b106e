"""Initialisations: the recurrent matrix (--init, scaled by --gain), the input matrix
(--input-init) and the gate biases (--forget-bias, --gate-init chrono).

Conventions (../shared/TASKS.md): a matrix scheme is applied to every gate block of W (H x H for
W_hh, H x D for W_ih) on its own. ``normal`` draws N(0, g^2/fan_in), so for the square W_hh g is
sigma_w of mean-field theory; ``xavier-*`` give sigma_w = g on W_hh; ``kaiming`` gives
sigma_w^2 = 2 g^2 (the ReLU gain); ``pytorch`` is U(-g/sqrt(H), g/sqrt(H)), PyTorch's default
(sigma_w^2 = g^2/3). Biases are zero, except under ``pytorch``, which also draws both bias
vectors the way torch.nn does, and except the gate schemes below.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .cells import Cell
from .errors import ConfigError
from .registry import Registry

# fn(block (rows, cols), gain, generator) fills the block in place.
MatrixInit = Callable[[Tensor, float, torch.Generator], None]

INITS: Registry[MatrixInit] = Registry("init", "--init")


@INITS.register("pytorch", "U(-g/sqrt(H), g/sqrt(H)) for weights and biases: torch.nn's default")
def _pytorch(w: Tensor, gain: float, gen: torch.Generator) -> None:
    bound = gain / math.sqrt(w.shape[0])
    nn.init.uniform_(w, -bound, bound, generator=gen)


@INITS.register("xavier-uniform", "Glorot uniform with gain g (square W: sigma_w = g)")
def _xavier_uniform(w: Tensor, gain: float, gen: torch.Generator) -> None:
    nn.init.xavier_uniform_(w, gain=gain, generator=gen)


@INITS.register("xavier-normal", "Glorot normal with gain g (square W: sigma_w = g)")
def _xavier_normal(w: Tensor, gain: float, gen: torch.Generator) -> None:
    nn.init.xavier_normal_(w, gain=gain, generator=gen)


@INITS.register("kaiming", "He normal with the ReLU gain, times g: N(0, 2 g^2 / fan_in)")
def _kaiming(w: Tensor, gain: float, gen: torch.Generator) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
    w.mul_(gain)


@INITS.register("orthogonal", "g * Q with Q (semi-)orthogonal")
def _orthogonal(w: Tensor, gain: float, gen: torch.Generator) -> None:
    nn.init.orthogonal_(w, gain=gain, generator=gen)


@INITS.register("identity", "g * I: the IRNN of Le et al. 2015 (with relu, g = 1)")
def _identity(w: Tensor, gain: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        w.copy_(gain * torch.eye(*w.shape, dtype=w.dtype))


@INITS.register("normal", "N(0, g^2 / fan_in): the mean-field convention, g = sigma_w")
def _normal(w: Tensor, gain: float, gen: torch.Generator) -> None:
    nn.init.normal_(w, 0.0, gain / math.sqrt(w.shape[1]), generator=gen)


# Gate-bias schemes: fn(cell, t_max, generator) -> {gate: effective bias (H,)}.
GateInit = Callable[[Cell, int, torch.Generator], dict[str, Tensor]]

GATE_INITS: Registry[GateInit | None] = Registry("gate-init", "--gate-init")
GATE_INITS.add("none", None, "leave the gate biases to --init (and --forget-bias)")


@GATE_INITS.register("chrono",
                     "Tallec & Ollivier 2018: b_f = log u, b_i = -b_f, u ~ U[1, T_max-1]")
def _chrono(cell: Cell, t_max: int, gen: torch.Generator) -> dict[str, Tensor]:
    u = 1 + (t_max - 2) * torch.rand(cell.hidden, generator=gen, dtype=torch.float64)
    log_u = torch.log(u)
    if cell.name == "lstm":
        return {"f": log_u, "i": -log_u}
    return {"z": log_u}  # GRU: z keeps the old state, so it plays the forget gate's part


def check_schemes(cell: type[Cell], *, init: str, input_init: str, forget_bias: float | None,
                  gate_init: str) -> tuple[MatrixInit, MatrixInit, GateInit | None]:
    """The schemes behind the names, or ConfigError for a name or combination that makes no
    sense for ``cell``."""
    rec, gate = INITS.get(init), GATE_INITS.get(gate_init)
    inp = INITS.get(input_init, "--input-init")
    if cell.keep_gate is None and forget_bias is not None:
        raise ConfigError(f"--forget-bias applies to lstm and gru, not to the {cell.name} cell")
    if cell.keep_gate is None and gate is not None:
        raise ConfigError(f"--gate-init {gate_init} applies to lstm and gru, not to the "
                          f"{cell.name} cell")
    if gate is not None and forget_bias is not None:
        raise ConfigError(f"--forget-bias and --gate-init {gate_init} both set the forget-gate "
                          "bias; give one of them")
    return rec, inp, gate


def initialise(
    cell: Cell,
    *,
    init: str,
    gain: float,
    input_init: str,
    forget_bias: float | None,
    gate_init: str,
    t_max: int,
    generator: torch.Generator,
) -> None:
    """Fill every parameter of ``cell`` in place, reproducibly from ``generator``."""
    rec, inp, gate = check_schemes(type(cell), init=init, input_init=input_init,
                                   forget_bias=forget_bias, gate_init=gate_init)
    h = cell.hidden
    with torch.no_grad():
        for k in range(len(cell.gates)):
            rows = slice(k * h, (k + 1) * h)
            rec(cell.weight_hh[rows], gain, generator)
            inp(cell.weight_ih[rows], 1.0, generator)
        for bias in (cell.bias_ih, cell.bias_hh):
            if init == "pytorch":
                bias.uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h), generator=generator)
            else:
                bias.zero_()
        effective: dict[str, Tensor] = {}
        if forget_bias is not None:
            effective[cell.keep_gate] = torch.full((h,), float(forget_bias))
        if gate is not None:
            effective.update(gate(cell, t_max, generator))
        # PyTorch adds two bias vectors; a scheme sets their sum, so b_hh's part is zeroed.
        for name, value in effective.items():
            s = cell.gate_slice(name)
            cell.bias_ih[s] = value.to(cell.bias_ih.dtype)
            cell.bias_hh[s] = 0.0
