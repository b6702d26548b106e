"""Analytic step Jacobians of the built-in cells: the engine's fast back end.

For a chunk of steps, ``linearize`` computes, vectorised over the whole chunk, the few
coefficient tensors that make J_t = ds_t/ds_{t-1} (and its transpose) one matmul with W_hh and
a handful of elementwise products. The engine's generic back end (forward-mode AD and autograd,
one call per step) stays the reference: the tests hold the two to 1e-10.

Shapes: a chunk covers steps t0+1..t0+C; ``states`` is (C+1, B, S) (s_{t0}..s_{t0+C}), ``xp``
(C, B, G*H) the input projections, ``mask`` (C, B) or None. Directions are (B, K, S) for jvp,
sample-major (each sample's K directions one contiguous K x S matrix, so that per-sample
matmuls read and write them in place); adjoints (B, S) for vjp.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .cells import Cell, affine


def _into(out: Tensor | None) -> dict:
    """The ``out=`` keyword of a torch op where there is a tensor to write into."""
    return {} if out is None else {"out": out}


class Scratch:
    """One flat buffer lent out again and again for tensors of any shape, grown when asked for
    more than it holds. On the CPU a fresh tensor of megabytes is fresh pages from the system,
    zeroed on first touch, every time: the LSTM's per-sample matrices (H = 128, 2 sequences,
    slices of 32 steps: 8 MB) took 5x as long to build in a new tensor per slice. What it lends
    is valid until the next ``take``."""

    def __init__(self) -> None:
        self.flat: Tensor | None = None

    @staticmethod
    def of(work: Scratch | None) -> Scratch:
        """``work``, or a fresh one (a new tensor per ``take``) where there is none."""
        return Scratch() if work is None else work

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape``, of ``like``'s dtype and device."""
        n = math.prod(shape)
        flat = self.flat
        if flat is None or flat.numel() < n or flat.dtype != like.dtype \
                or flat.device != like.device:
            flat = self.flat = like.new_empty(n)
        return flat[:n].view(shape)


class StepOps:
    """The linear maps of one chunk's steps, indexed 0..C-1."""

    STEPS: tuple[str, ...] = ("mask",)  # the tensors with one row per step (C, ...)
    GRAPHED = True  # whether gradscope.cudagraphs may replay its push and pull

    def __init__(self, w_hh: Tensor, mask: Tensor | None) -> None:
        self.w = w_hh  # (G*H, H)
        self.H = w_hh.shape[-1]
        self.mask = None if mask is None else mask[..., None]  # (C, B, 1)

    def jvp(self, i: int, v: Tensor, out: Tensor | None = None, m: Tensor | None = None
            ) -> Tensor:
        """J v for step i, v (B, K, S); into ``out`` (v's shape, not v) where given; ``m``:
        step i's per-sample matrices (``matrices``) where already built. The jvps of cells
        that have them take them with many directions, and v W^T then gate sums with few."""
        if m is None and _many_directions(v, self.H):
            ms = self.matrices(i, i + 1)
            m = None if ms is None else ms[0]
        if self.mask is None:
            return self._jvp(i, v, out, m)
        return torch.where(self.mask[i][:, None], self._jvp(i, v, None, m), v, **_into(out))

    def mapped(self, fn: Callable[[Tensor], Tensor]) -> StepOps:
        """A copy whose every tensor is ``fn`` of this one's."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(other, name, fn(value))
        return other

    def to(self, dtype: torch.dtype) -> StepOps:
        """A copy whose floating-point tensors are in ``dtype`` (the mask stays as it is)."""
        return self.mapped(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def push(self, v: Tensor, a: int, b: int, out: Tensor, work: Scratch | None = None
             ) -> Tensor:
        """Steps a+1..b from v (B, K, S), each step's J v into out[j] (b-a, B, K, S). With
        many directions, every step's per-sample matrices are built at once, a few ops for
        the slice instead of a few per step, in ``work`` where given (one buffer for a whole
        pass)."""
        ms = self.matrices(a, b, work) if _many_directions(v, self.H) else None
        for j, i in enumerate(range(a, b)):
            v = self.jvp(i, v, out=out[j], m=None if ms is None else ms[j])
        return out

    def pull(self, lam: Tensor, a: int, b: int, out: Tensor) -> Tensor:
        """J^T through steps b-1 down to a from lam (B, S): into out (b-a, B, S), out[j] the
        adjoint after j+1 of them (the reverse pass's block, which gradscope.cudagraphs may
        replay like ``push``)."""
        lams = []
        for i in range(b - 1, a - 1, -1):
            lam = self.vjp(i, lam)
            lams.append(lam)
        return torch.stack(lams, out=out)

    def matrices(self, a: int, b: int, work: Scratch | None = None) -> Tensor | None:
        """Gated cells: steps a..b-1's per-sample matrices (b-a, B, H, N) that their jvps with
        many directions multiply by, in ``work`` where given; None for a cell without them."""
        return None

    def vjp(self, i: int, lam: Tensor) -> Tensor:
        out = self._vjp(i, lam)
        return out if self.mask is None else torch.where(self.mask[i], out, lam)

    def _jvp(self, i: int, v: Tensor, out: Tensor | None, m: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        raise NotImplementedError

    # The step's map of a change of its input x (through W_ih, ``w``, (G*H, D)) with the state
    # held: what stacked layers need of each other (``StackedOps``).

    def input_jvp(self, i: int, u: Tensor, w: Tensor) -> Tensor:
        """ds_t/dx_t u for step i, u (B, K, D) -> (B, K, S)."""
        raise NotImplementedError

    def input_vjp(self, i: int, lam: Tensor, w: Tensor) -> Tensor:
        """(ds_t/dx_t)^T lam for step i, lam (B, S) -> (B, D)."""
        raise NotImplementedError


class RNNOps(StepOps):
    """h' = phi(a), a = xp + W h + b: J v = phi'(a) * (v W^T)."""

    STEPS = ("mask", "d")

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None) -> None:
        super().__init__(cell.weight_hh, mask)
        with torch.enable_grad():
            a = (xp + affine(states[:-1], cell.weight_hh, cell.bias_hh)).detach().requires_grad_()
            (self.d,) = torch.autograd.grad(cell.phi(a).sum(), a)  # phi'(a), (C, B, H)

    def _jvp(self, i: int, v: Tensor, out: Tensor | None, m: Tensor | None) -> Tensor:
        return torch.mul(_directions_times(v, self.w), self.d[i][:, None], **_into(out))

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        return affine(self.d[i] * lam, self.w.mT)

    def input_jvp(self, i: int, u: Tensor, w: Tensor) -> Tensor:
        return _directions_times(u, w).mul_(self.d[i][:, None])

    def input_vjp(self, i: int, lam: Tensor, w: Tensor) -> Tensor:
        return affine(self.d[i] * lam, w.mT)


class LSTMOps(StepOps):
    """c' = f c + i g, h' = o tanh(c'), gates from a = xp + W h + b (order i, f, g, o)."""

    STEPS = ("mask", "coef", "f", "oc")

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None,
                 gates: Tensor | None = None) -> None:
        super().__init__(cell.weight_hh, mask)
        H = self.H
        c, c_next = states[:-1, ..., H:], states[1:, ..., H:]
        if gates is None:  # not kept by the trajectory: from h and xp again
            gates = _lstm_gates(cell, states[:-1, ..., :H], xp)
        i, f, g, o = gates.chunk(4, dim=-1)  # sigmoid i, f, o; tanh g
        tc = torch.tanh(c_next)
        # dc' = [i(1-i) g, f(1-f) c, i (1-g^2)] . da_{i,f,g} + f dc
        # dh' = o(1-o) tc da_o + o (1-tc^2) dc'
        coef = gates * (1 - gates)  # (C, B, 4H): sigmoid' of i, f, o (g's is replaced below)
        coef[..., :H] *= g
        coef[..., H:2 * H] *= c
        coef[..., 2 * H:3 * H] = i * (1 - g * g)
        coef[..., 3 * H:] *= tc
        self.coef = coef
        self.f = f
        self.oc = o * (1 - tc * tc)
        self.blocks = _gate_blocks(self.w, H)

    def matrices(self, a: int, b: int, work: Scratch | None = None) -> Tensor:
        """(b-a, B, H, 2H): the o gate's block, and the i, f, g blocks summed (to dc')."""
        H, coef = self.H, self.coef[a:b]
        m = Scratch.of(work).take((*coef.shape[:-1], H, 2 * H), self.w)
        _blocks_sum(self.blocks, coef, (3,), out=m[..., :H])
        _blocks_sum(self.blocks, coef, (0, 1, 2), out=m[..., H:])
        return m

    def _jvp(self, i: int, v: Tensor, out: Tensor | None, m: Tensor | None) -> Tensor:
        # few ops a step: on a GPU each is a kernel launch, and this runs K directions x T steps
        H = self.H
        out = torch.empty_like(v) if out is None else out
        if m is not None:  # the i, f, g blocks summed in per-sample matrices first
            torch.bmm(v[..., :H], m, out=out)  # the o gate's da, dc' less f dc
            to_h = out[..., :H]
        else:
            da = _directions_times(v[..., :H], self.w).mul_(self.coef[i][:, None])  # (B, K, 4H)
            torch.sum(da[..., :3 * H].unflatten(-1, (3, H)), -2, out=out[..., H:])
            to_h = da[..., 3 * H:]
        dc = out[..., H:].addcmul_(self.f[i][:, None], v[..., H:])
        torch.addcmul(to_h, self.oc[i][:, None], dc, out=out[..., :H])
        return out

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        back, dc = self._gates_back(i, lam)
        return torch.cat([affine(back, self.w.mT), self.f[i] * dc], dim=-1)

    def _gates_back(self, i: int, lam: Tensor) -> tuple[Tensor, Tensor]:
        """lam (B, 2H) -> the adjoint of step i's gate pre-activations (B, 4H), and dL/dc'."""
        H = self.H
        lam_h = lam[..., :H]
        dc = torch.addcmul(lam[..., H:], self.oc[i], lam_h)
        return torch.cat([dc, dc, dc, lam_h], dim=-1).mul_(self.coef[i]), dc

    def input_jvp(self, i: int, u: Tensor, w: Tensor) -> Tensor:
        H = self.H
        da = _directions_times(u, w).mul_(self.coef[i][:, None])  # (B, K, 4H)
        dc = torch.sum(da[..., :3 * H].unflatten(-1, (3, H)), -2)
        return torch.cat([torch.addcmul(da[..., 3 * H:], self.oc[i][:, None], dc), dc], dim=-1)

    def input_vjp(self, i: int, lam: Tensor, w: Tensor) -> Tensor:
        return affine(self._gates_back(i, lam)[0], w.mT)


def _lstm_gates(cell: Cell, h: Tensor, xp: Tensor) -> Tensor:
    """h (C, B, H) of steps t-1 and xp (C, B, 4H) of steps t -> the gates (C, B, 4H): sigmoid
    of the i, f, o blocks, tanh of the g block."""
    H = cell.hidden
    if cell.weight_hh.dim() == 2:  # one addmm over the whole chunk
        a = torch.addmm(xp.reshape(-1, 4 * H) + cell.bias_hh, h.reshape(-1, H),
                        cell.weight_hh.T).view(xp.shape)
    else:
        a = xp + affine(h, cell.weight_hh, cell.bias_hh)
    gates = torch.sigmoid(a)
    torch.tanh(a[..., 2 * H:3 * H], out=gates[..., 2 * H:3 * H])
    return gates


class GRUOps(StepOps):
    """h' = (1 - z) n + z h with r, z, n from xp and W h + b (order r, z, n)."""

    STEPS = ("mask", "coef", "z")

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None,
                 input_side: bool = False) -> None:
        """``input_side``: also keep what ``input_jvp`` and ``input_vjp`` need."""
        super().__init__(cell.weight_hh, mask)
        h = states[:-1]
        xr, xz, xn = xp.chunk(3, dim=-1)
        hr, hz, hn = affine(h, cell.weight_hh, cell.bias_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        un = (1 - z) * (1 - n * n)
        # dh' = [un hn r(1-r), (h - n) z(1-z), un r] . d(hr, hz, hn) + z dh
        self.coef = torch.cat([un * hn * r * (1 - r), (h - n) * z * (1 - z), un * r], dim=-1)
        self.z = z
        self.blocks = _gate_blocks(self.w, self.H)
        if input_side:  # the input's n block is not multiplied by r: [.., .., un] . d(xr, xz, xn)
            self.coef_x = torch.cat([self.coef[..., :2 * self.H], un], dim=-1)

    def matrices(self, a: int, b: int, work: Scratch | None = None) -> Tensor:
        """(b-a, B, H, H): the three blocks summed."""
        coef = self.coef[a:b]
        return _blocks_sum(self.blocks, coef, (0, 1, 2),
                           out=Scratch.of(work).take((*coef.shape[:-1], self.H, self.H), self.w))

    def _jvp(self, i: int, v: Tensor, out: Tensor | None, m: Tensor | None) -> Tensor:
        H = self.H
        if m is not None:  # the three blocks summed in per-sample matrices first
            dh = torch.bmm(v, m, **_into(out))
        else:  # (B, K, H)
            dh = _directions_times(v, self.w).mul_(self.coef[i][:, None]).unflatten(-1, (3, H))
            dh = torch.sum(dh, -2, **_into(out))
        return dh.addcmul_(self.z[i][:, None], v)

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        return affine(self.coef[i] * lam.tile(3), self.w.mT) + self.z[i] * lam

    def input_jvp(self, i: int, u: Tensor, w: Tensor) -> Tensor:
        da = _directions_times(u, w).mul_(self.coef_x[i][:, None])  # (B, K, 3H)
        return torch.sum(da.unflatten(-1, (3, self.H)), -2)

    def input_vjp(self, i: int, lam: Tensor, w: Tensor) -> Tensor:
        return affine(self.coef_x[i] * lam.tile(3), w.mT)


class StackedOps(StepOps):
    """Layers of built-in cells, layer k reading the h of layer k-1 at the same step (a
    torch.nn RNN, LSTM or GRU of several layers): the state is the layers' states side by side,
    and J_t v takes the layers bottom up, each adding to its own recurrent jvp the response to
    the new h below it; J_t^T lam top down, each passing the adjoint of its input to the layer
    below. ``w_ih``: each layer's input weights (layer 0's unused)."""

    GRAPHED = False  # its per-step tensors sit in the layers' ops, where cudagraphs does not look

    def __init__(self, layers: list[StepOps], w_ih: list[Tensor], width: int) -> None:
        super().__init__(layers[0].w, None)
        self.layers, self.w_ih = layers, w_ih
        self.width = width  # one layer's state: (h, c) or h

    def _parts(self, v: Tensor) -> list[Tensor]:
        return list(v.split(self.width, dim=-1))

    def _jvp(self, i: int, v: Tensor, out: Tensor | None, m: Tensor | None) -> Tensor:
        outs: list[Tensor] = []
        for k, (ops, vk) in enumerate(zip(self.layers, self._parts(v), strict=True)):
            new = ops.jvp(i, vk)
            if k:  # the response to this step's new h of the layer below
                new = new + ops.input_jvp(i, outs[-1][..., :self.H], self.w_ih[k])
            outs.append(new)
        return torch.cat(outs, dim=-1, **_into(out))

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        parts = self._parts(lam)
        back: list[Tensor | None] = [None] * len(parts)
        for k in range(len(parts) - 1, -1, -1):
            ops, lam_k = self.layers[k], parts[k]
            back[k] = ops.vjp(i, lam_k)
            if k:  # dL/dh of the layer below at this step, through this layer's input
                below = parts[k - 1]
                parts[k - 1] = torch.cat([below[..., :self.H]
                                          + ops.input_vjp(i, lam_k, self.w_ih[k]),
                                          below[..., self.H:]], dim=-1)
        return torch.cat(back, dim=-1)

    def mapped(self, fn: Callable[[Tensor], Tensor]) -> StackedOps:
        other = super().mapped(fn)
        other.layers = [ops.mapped(fn) for ops in self.layers]
        other.w_ih = [fn(w) for w in self.w_ih]
        return other


OPS = {"rnn": RNNOps, "lstm": LSTMOps, "gru": GRUOps}


# Gated cells' jvps sum gate blocks of (v W^T) * coef. With many directions per sample (the
# exact forward probes push H per part) it is cheaper to sum the blocks of W^T * coef once per
# sample and step, then multiply: an H x H (GRU) or H x 2H (LSTM) matrix per sample instead
# of H x 3H or H x 4H. Measured (2 CPU cores, LSTM, one step): 1.4-1.9x faster with 2H
# directions per sample; slower with few (16-32 random projections), where building the
# matrices costs more than the matmul saves.

def _many_directions(v: Tensor, hidden: int) -> bool:
    """Whether v (B, K, S) holds at least ``hidden`` directions per sample."""
    return v.shape[1] >= hidden


def _directions_times(v: Tensor, w: Tensor) -> Tensor:
    """v W^T for directions v (B, K, D): W (M, D) for every sample, or seed-stacked (S, M, D),
    each seed's for its B/S consecutive samples -> (B, K, M). One matmul either way: a
    sample's directions are rows next to each other, so every seed's rows are one block."""
    if w.dim() == 2:
        return v @ w.T
    return torch.bmm(v.reshape(w.shape[0], -1, v.shape[-1]), w.mT).view(*v.shape[:-1], -1)


def _gate_blocks(w: Tensor, hidden: int) -> Tensor:
    """W_hh (G*H, H) -> its gate blocks transposed, W_g^T, each contiguous: (G, H, H); seed-
    stacked (S, G*H, H) -> (G, S, 1, H, H), to broadcast over each seed's samples."""
    blocks = w.unflatten(-2, (-1, hidden)).mT  # (G, H, H), or (S, G, H, H)
    if w.dim() == 3:
        blocks = blocks.movedim(1, 0)[:, :, None]
    return blocks.contiguous()


def _blocks_sum(blocks: Tensor, coef: Tensor, gates: tuple[int, ...], out: Tensor) -> Tensor:
    """The sum over ``gates`` of W_g^T scaled column-wise by each sample's coefficients of gate
    g (coef (..., B, G*H)) -> (..., B, H, H), into ``out``. One op per gate on contiguous
    blocks: the exact forward probes 1.07-1.15x faster (LSTM and GRU, H = 32-128, T = 1000, 2
    CPU cores, alternately in one process) than scaling W^T whole, then summing its blocks."""
    G, H = blocks.shape[0], blocks.shape[-1]
    lead = coef.shape[:-2]
    if blocks.dim() == 5:  # seed-stacked: the samples are (S, n)
        c = coef.view(*lead, blocks.shape[1], -1, 1, G, H)
        out_ = out.unflatten(len(lead), (blocks.shape[1], -1))
    else:
        c, out_ = coef.view(*lead, -1, 1, G, H), out
    torch.mul(blocks[gates[0]], c[..., gates[0], :], out=out_)
    for g in gates[1:]:
        out_.addcmul_(blocks[g], c[..., g, :])
    return out


@contextmanager
def full_float32() -> Iterator[None]:
    """cuDNN may run float32 RNNs on TensorFloat-32 tensor cores (a 10-bit mantissa) unless
    told not to, and torch allows it by default; gradscope's float32 is float32 throughout."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def has_torch_kernel(cell: str, activation: str | None) -> bool:
    """Whether torch.nn has a fused kernel for this cell: the LSTM, the GRU, and the vanilla
    RNN with tanh or relu (``activation`` None: the RNN's default, tanh)."""
    return cell != "rnn" or (activation or "tanh") in ("tanh", "relu")


def has_fused_adjoint(cell: str, activation: str | None) -> bool:
    """Whether torch.nn's fused kernel can give this cell's adjoint (``FusedAdjoint``): all
    that have one but the GRU, whose W_hn h is multiplied by r inside the step, so that no
    extra input can stand in for h."""
    return cell != "gru" and has_torch_kernel(cell, activation)


def fused_wins_on_cpu(cell: str, hidden: int) -> bool:
    """Whether the fused adjoint beats the closed-form loop on the CPU. Measured (2 cores,
    T=1000, benchmarks/run.py and docs/benchmarks.md): for the LSTM below H = 256 it takes
    0.3-0.9x the loop's time; at 256 they tie, and above, its extra input (an H x 4H matmul
    per step, both ways) costs more than the loop's per-step overhead saves. The vanilla RNN's
    loop is two ops a step: the kernel takes 1.03-1.15x its time."""
    return cell == "lstm" and hidden < 256


def kernel_trains_faster(cell: str, activation: str | None, dtype: torch.dtype,
                         device: torch.device, stacked: bool, masked: bool = False) -> bool:
    """Whether training runs the recurrence in torch.nn's fused kernel (``Cell.kernel_hidden``)
    rather than a loop of step functions under autograd (``Cell.recur``). Measured on the CPU
    (H = 32, T = 200, B = 8 and 32, one thread; benchmarks/run.py --train-paths): for one
    model the kernel is faster for the LSTM (float32 5-10x, float64 1.04-1.06x) and the GRU
    (0.98-1.13x), and the vanilla RNN's loop, two ops a step, is faster than its kernel
    (0.72-0.96x of its time). A seed stack calls the kernel once per seed, which beats the
    stack's one batched loop only for the float32 LSTM (oneDNN's fast path). Where sequences
    end early (``masked``), the loop holds them with one more op a step, and one vanilla RNN
    trains faster in the kernel too (1.02-1.29x, H = 32-64, T = 200-1000, B = 8 and 32, the
    language task). On a GPU a loop is launch-bound: always the kernel."""
    if not has_torch_kernel(cell, activation):
        return False
    if device.type == "cuda":
        return True
    if cell == "rnn":
        return masked and not stacked
    return not stacked or (cell == "lstm" and dtype == torch.float32)


_SCAN = 64  # steps of LSTM gates the cell-state scan holds at once, one op a step (CPU)
_SCAN_GPU = 1024  # on a GPU, where each op is a launch: affine_scan's log2 rounds instead
KEPT_GATES_BYTES = 256 * 2**20  # the LSTM trajectory keeps its gates for the Jacobians up to this


class Linearization:
    """The fast back end of one cell on one batch: the trajectory (``trajectory``) and each
    chunk's step Jacobians (``ops``). The LSTM's trajectory computes every step's gates; where
    they fit in KEPT_GATES_BYTES it keeps them, and ``ops`` on chunks of that trajectory reuses
    them instead of a second matmul over all steps."""

    def __init__(self, cell: Cell, inputs: Callable[[], Tensor], s0: Tensor,
                 lengths: Tensor | None = None) -> None:
        self.cell, self.inputs, self.s0 = cell, inputs, s0
        self.lengths = lengths  # (B,) where sequences end early, each holding its last state
        self.kept: tuple[Tensor, Tensor] | None = None  # (the trajectory, its gates)

    def ops(self, states: Tensor, xp: Tensor, mask: Tensor | None, t0: int) -> StepOps:
        """The maps of steps t0+1..t0+C, ``states`` = s_t0..s_t0+C."""
        if self.cell.name != "lstm":
            return OPS[self.cell.name](self.cell, states, xp, mask)
        return LSTMOps(self.cell, states, xp, mask, self._kept_gates(states, t0))

    def _kept_gates(self, states: Tensor, t0: int) -> Tensor | None:
        """The kept gates of steps t0+1..t0+C, if ``states`` is that chunk of the kept
        trajectory itself (not some other states of those steps)."""
        if self.kept is None:
            return None
        full, gates = self.kept
        n = states.shape[0] - 1
        if t0 + n >= full.shape[0] or states.stride() != full.stride() \
                or states.data_ptr() != full[t0].data_ptr():
            return None
        return gates[t0:t0 + n]

    def fused_wins_on_cpu(self) -> bool:
        return fused_wins_on_cpu(self.cell.name, self.cell.hidden)

    def fused_adjoint(self, length: int, dtype: torch.dtype) -> FusedAdjoint | None:
        """The forward pass of ``FusedAdjoint`` in blocks of ``length`` steps, in ``dtype``, or
        None: for cells without the kernel (``has_fused_adjoint``), seed stacks, and a
        trajectory that leaves float range."""
        cell = self.cell
        if cell.weight_hh.dim() == 3 or not has_fused_adjoint(cell.name, cell.activation):
            return None
        fused = FusedAdjoint(cell, self.inputs(), self.s0, length, dtype, self.lengths)
        return fused if fused.finite else None

    def trajectory(self) -> Tensor:
        """s_0..s_T (T+1, B, S); the same recurrence as ``cell.step``, up to rounding, a
        sequence that ends early holding its last state (as ``Unrolled.step_at`` does).

        The cells torch.nn has (rnn with tanh or relu, lstm, gru) run as its fused kernel
        (oneDNN on the CPU, cuDNN on the GPU), which returns h_1..h_T; the LSTM's c_t then
        follows from its gates, a chunk of steps at a time, and a one-op-per-step scan. Other
        cells, and seed stacks, loop over the steps. Either runs every sequence through all T
        steps: a state depends on earlier steps only, so each sequence's states up to its end
        are its own, and the states after it are then overwritten with the one at its end.
        """
        states = self._every_step()
        if self.lengths is not None:
            for b, n in enumerate(self.lengths.tolist()):
                states[n + 1:, b] = states[n, b]
        return states

    def _every_step(self) -> Tensor:
        """``trajectory`` with every sequence run through all T steps."""
        cell, x, s0 = self.cell, self.inputs(), self.s0
        if cell.weight_hh.dim() == 3 or not has_torch_kernel(cell.name, cell.activation):
            return _looped(cell, cell.drive(x), s0)
        H, T = cell.hidden, x.shape[0]
        module = cell.torch_module().to(device=s0.device)
        states = torch.empty(T + 1, *s0.shape, dtype=s0.dtype, device=s0.device)
        states[0] = s0
        if cell.name != "lstm":
            with full_float32():
                states[1:], _ = module(x, s0[None])
            return states
        h0, c0 = (part.contiguous() for part in s0[None].split(H, dim=-1))  # as cuDNN wants
        with full_float32():
            states[1:, :, :H], _ = module(x, (h0, c0))
        keep = T * s0.numel() * 2 * s0.element_size() <= KEPT_GATES_BYTES  # (T, B, 4H)
        kept = s0.new_empty(T, s0.shape[0], 4 * H) if keep else None
        c = states[:, :, H:]  # a view: the scan writes c_t in place
        rounds = _scan_in_rounds(s0.device)
        scan = _SCAN_GPU if rounds else _SCAN
        for t0 in range(0, T, scan):  # a chunk at a time, so the gates stay in cache
            t1 = min(t0 + scan, T)
            gates = _lstm_gates(cell, states[t0:t1, :, :H], cell.project(x[t0:t1]))
            if kept is not None:
                kept[t0:t1] = gates
            # c_t = f_t c_{t-1} + i_t g_t
            f, ig = gates[..., H:2 * H], gates[..., :H] * gates[..., 2 * H:3 * H]
            if rounds:
                c[t0 + 1:t1 + 1] = affine_scan(f, ig, c[t0])
            else:  # one op a step
                c[t0 + 1:t1 + 1] = ig
                for t in range(t0, t1):
                    c[t + 1].addcmul_(f[t - t0], c[t])
        self.kept = None if kept is None else (states, kept)
        return states


class Layered:
    """The fast back end of stacked layers of one built-in cell kind (a torch.nn RNN, LSTM or
    GRU of several layers, gradscope.usermodel): each layer's trajectory from torch's fused
    kernel on the h of the layer below (``Linearization``), and the chunks' ``StackedOps``."""

    def __init__(self, cells: list[Cell], inputs: Callable[[], Tensor], s0: Tensor) -> None:
        self.cells, self.inputs, self.s0 = cells, inputs, s0
        self.width = len(cells[0].parts) * cells[0].hidden  # one layer's state

    def _layer(self, s: Tensor, k: int) -> Tensor:
        return s[..., k * self.width:(k + 1) * self.width]

    def trajectory(self) -> Tensor:
        """s_0..s_T (T+1, B, S), the layers' states side by side."""
        layers, x = [], self.inputs()
        for k, cell in enumerate(self.cells):
            s0 = self._layer(self.s0, k).contiguous()
            states = Linearization(cell, lambda x=x: x, s0).trajectory()
            layers.append(states)
            x = states[1:, :, :cell.hidden]  # h_1..h_T: the next layer's inputs
        return torch.cat(layers, dim=-1)

    def ops(self, states: Tensor, x: Tensor, mask: Tensor | None, t0: int) -> StackedOps:
        """The maps of steps t0+1..t0+C from ``states`` s_t0..s_t0+C and the inputs x."""
        layers, below = [], x
        for k, cell in enumerate(self.cells):
            mine = self._layer(states, k)
            with torch.no_grad():
                xp = cell.project(below)  # (C, B, G*H)
            extra = {"input_side": True} if k and cell.name == "gru" else {}
            layers.append(OPS[cell.name](cell, mine, xp, mask, **extra))
            below = mine[1:, :, :cell.hidden]
        return StackedOps(layers, [cell.weight_ih for cell in self.cells], self.width)


def _scan_in_rounds(device: torch.device) -> bool:
    """Whether the LSTM's cell-state scan runs as ``affine_scan``: on a GPU."""
    return device.type == "cuda"


def affine_scan(f: Tensor, b: Tensor, c0: Tensor) -> Tensor:
    """c_t = f_t c_{t-1} + b_t for t = 1..n from c_0: f, b (n, ...), c0 (...) -> (n, ...).

    In log2(n) rounds rather than n steps (Hillis and Steele's scan of the affine maps
    c -> f c + b, composed as (f2, b2) after (f1, b1) = (f2 f1, f2 b1 + b2)): on a GPU, where
    each step of the sequential recurrence would be a kernel launch of its own. Products and
    sums only, no division: as accurate as the sequential recurrence, to rounding."""
    a, b = f.clone(), b.clone()
    d = 1
    while d < len(a):
        b[d:] = torch.addcmul(b[d:], a[d:], b[:-d])  # the right side first: old values
        a[d:] = a[d:] * a[:-d]
        d *= 2
    return torch.addcmul(b, a, c0)


def _looped(cell: Cell, drive: Tensor, s0: Tensor) -> Tensor:
    """The recurrence on ``cell.drive`` step by step, without autograd's bookkeeping."""
    states = torch.empty(drive.shape[0] + 1, *s0.shape, dtype=s0.dtype, device=s0.device)
    states[0] = s0
    state = tuple(s0.split(cell.hidden, dim=-1))
    for t, d in enumerate(drive.unbind(0)):
        state = cell.step_driven(d, state)
        torch.cat(state, dim=-1, out=states[t + 1])
    return states


class FusedAdjoint:
    """The adjoint of the built-in rnn (tanh, relu) and lstm from torch's fused kernel's own
    backward (cuDNN on a GPU, oneDNN on the CPU), a block of ``length`` steps at a time.

    The kernel gives the gradients of its inputs, not of the states inside it. So the module
    gets H more inputs z_t = 0, weighted by W_hh as h_{t-1} is (``Cell.torch_module(tied=True)``):
    the recurrence is unchanged, and dL/dz_t = W_hh^T dL/da_t = dL/dh_{t-1}, the h-part of the
    adjoint at every step. The forward runs once, block by block, each block's graph kept
    until its backward; the engine feeds each block's backward its incoming adjoint
    renormalised, and checks the range of what comes back (a block that leaves the safe range
    is redone step by step from the block's start state, kept in ``starts``).

    The kernel runs in ``dtype``, which may be wider than the cell's (float64 for a float32
    cell: a wider range, so longer blocks); ``starts`` and ``final`` are in the cell's dtype,
    the adjoints it returns in ``dtype``.

    Each block keeps its outputs h_t in its graph (the kernel saves them anyway), so that
    gradients may enter there too (``back``'s ``inject``): the losses of steps inside a block,
    and those of sequences that end early (``lengths``, (B,)). Those run on to T in the kernel,
    which cannot hold a state; the states after a sequence's end are then not its own, but no
    gradient reaches them, as its loss gradient enters at its own last step. ``final`` holds
    each sequence's h at its end, but c (the LSTM) at T only: NaN for a sequence that ended
    before T (for losses that read h alone).
    """

    def __init__(self, cell: Cell, x: Tensor, s0: Tensor, length: int,
                 dtype: torch.dtype, lengths: Tensor | None = None) -> None:
        H, T = cell.hidden, x.shape[0]
        self.H, self.length, self.dtype = H, length, dtype
        module = cell.torch_module(tied=True).to(device=s0.device, dtype=dtype)
        module.requires_grad_(False)
        x = x.to(dtype)
        lstm = cell.name == "lstm"
        self.starts = s0.new_empty(-(-T // length), *s0.shape)  # s_0, s_L, s_2L, ...
        self.graphs: list[tuple] = []  # per block: (z, c_start, (h_t of its steps, final h, c))
        self.h_out: list[Tensor] = []  # per block: h_t of its steps, kept after its backward
        finite = []  # per block, on the device: asked once at the end (a GPU runs ahead)
        state = s0.to(dtype)
        ends = None if lengths is None else lengths.to(s0.device)
        final_h = state[:, :H]
        with torch.enable_grad(), full_float32():
            for k, t0 in enumerate(range(0, T, length)):
                self.starts[k] = state
                xb = x[t0:t0 + length]
                z = xb.new_zeros(xb.shape[0], *s0.shape[:-1], H, requires_grad=True)
                inputs = torch.cat([xb, z], dim=-1)
                h0 = state[None, :, :H].contiguous()  # cuDNN wants contiguous states
                if lstm:
                    c0 = state[None, :, H:].clone(memory_format=torch.contiguous_format)
                    c0.requires_grad_(True)
                    seq, (h, c) = module(inputs, (h0, c0))
                    outputs = (h, c)
                else:
                    c0 = None
                    seq, h = module(inputs, h0)
                    outputs = (h,)
                state = torch.cat(outputs, dim=-1)[0].detach()
                outputs = (seq, *outputs)
                if ends is not None:
                    here = (ends > t0) & (ends <= t0 + xb.shape[0])  # (B,): ends in this block
                    at_end = seq.detach()[(ends - t0 - 1).clamp(0, xb.shape[0] - 1),
                                          torch.arange(ends.shape[0], device=ends.device)]
                    final_h = torch.where(here[:, None], at_end, final_h)
                self.graphs.append((z, c0, outputs))
                self.h_out.append(seq.detach())
                finite.append(torch.isfinite(state).all())
        # if not, the caller measures the usual way, which says where
        self.finite = bool(torch.stack(finite).all())
        if ends is not None:
            state = torch.cat([final_h, state[:, H:].masked_fill((ends < T)[:, None], math.nan)],
                              dim=-1)
        self.final = state.to(s0.dtype)  # s_T (B, S), or each sequence's at its end (h)

    def back(self, k: int, adj: Tensor, inject: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Block k (steps kL+1..kL+n) from adj = dL/ds_{kL+n} (scaled): the h-parts of
        dL/ds_t for t = kL..kL+n-1 (n, B, H), and dL/ds_{kL} whole (B, S). ``inject``
        (n, B, H): gradients of the block's outputs h_kL+1..h_kL+n that enter there (where
        sequences end early, or losses are read at many steps; not included in the h-parts
        returned for those steps). The block's graph is freed."""
        z, c0, outputs = self.graphs[k]
        self.graphs[k] = ()
        H, adj = self.H, adj.to(self.dtype)
        grads = (adj[None, :, :H], adj[None, :, H:])[:len(outputs) - 1]
        if inject is None:  # no gradient enters inside the block
            outputs = outputs[1:]
        else:
            grads = (inject.to(self.dtype), *grads)
        wrt = (z,) if c0 is None else (z, c0)
        with full_float32():
            got = torch.autograd.grad(outputs, wrt, grads)
        lam_h = got[0]  # dL/dz_t = dL/dh_{t-1}
        start = lam_h[0] if c0 is None else torch.cat([lam_h[0], got[1][0]], dim=-1)
        return lam_h, start

    def hidden(self, k: int) -> Tensor:
        """h_t of block k's steps (n, B, H), in ``dtype``: the graph's own outputs, kept after
        its ``back`` (for the loop, where it takes over)."""
        return self.h_out[k]
