"""Analytic step Jacobians of the built-in cells: the engine's fast back end.

For a chunk of steps, ``linearize`` computes, vectorised over the whole chunk, the few
coefficient tensors that make J_t = ds_t/ds_{t-1} (and its transpose) one matmul with W_hh and
a handful of elementwise products. The engine's generic back end (forward-mode AD and autograd,
one call per step) stays the reference: the tests hold the two to 1e-10.

Shapes: a chunk covers steps t0+1..t0+C; ``states`` is (C+1, B, S) (s_{t0}..s_{t0+C}), ``xp``
(C, B, G*H) the input projections, ``mask`` (C, B) or None. Directions are (K, B, S) for jvp,
adjoints (B, S) for vjp; both may carry any leading dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cells import Cell


class StepOps:
    """The linear maps of one chunk's steps, indexed 0..C-1."""

    def __init__(self, w_hh: Tensor, mask: Tensor | None) -> None:
        self.w = w_hh  # (G*H, H)
        self.mask = None if mask is None else mask[..., None]  # (C, B, 1)

    def jvp(self, i: int, v: Tensor) -> Tensor:
        out = self._jvp(i, v)
        return out if self.mask is None else torch.where(self.mask[i], out, v)

    def vjp(self, i: int, lam: Tensor) -> Tensor:
        out = self._vjp(i, lam)
        return out if self.mask is None else torch.where(self.mask[i], out, lam)

    def _jvp(self, i: int, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        raise NotImplementedError


class RNNOps(StepOps):
    """h' = phi(a), a = xp + W h + b: J v = phi'(a) * (v W^T)."""

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None) -> None:
        super().__init__(cell.weight_hh, mask)
        with torch.enable_grad():
            a = (xp + states[:-1] @ cell.weight_hh.T + cell.bias_hh).detach().requires_grad_()
            (self.d,) = torch.autograd.grad(cell.phi(a).sum(), a)  # phi'(a), (C, B, H)

    def _jvp(self, i: int, v: Tensor) -> Tensor:
        return self.d[i] * (v @ self.w.T)

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        return (self.d[i] * lam) @ self.w


class LSTMOps(StepOps):
    """c' = f c + i g, h' = o tanh(c'), gates from a = xp + W h + b (order i, f, g, o)."""

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None) -> None:
        super().__init__(cell.weight_hh, mask)
        H = cell.hidden
        h, c = states[:-1, ..., :H], states[:-1, ..., H:]
        a = xp + h @ cell.weight_hh.T + cell.bias_hh
        i, f, g, o = a.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        tc = torch.tanh(f * c + i * g)
        # dc' = [i(1-i) g, f(1-f) c, i (1-g^2)] . da_{i,f,g} + f dc
        # dh' = o(1-o) tc da_o + o (1-tc^2) dc'
        self.coef = torch.cat([i * (1 - i) * g, f * (1 - f) * c, i * (1 - g * g),
                               o * (1 - o) * tc], dim=-1)  # (C, B, 4H)
        self.f = f
        self.oc = o * (1 - tc * tc)
        self.H = H

    def _jvp(self, i: int, v: Tensor) -> Tensor:
        H = self.H
        da = self.coef[i] * (v[..., :H] @ self.w.T)  # (..., 4H)
        dc = da[..., :H] + da[..., H:2 * H] + da[..., 2 * H:3 * H] + self.f[i] * v[..., H:]
        dh = da[..., 3 * H:] + self.oc[i] * dc
        return torch.cat([dh, dc], dim=-1)

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        H = self.H
        lam_h = lam[..., :H]
        dc = torch.addcmul(lam[..., H:], self.oc[i], lam_h)
        back = torch.cat([dc, dc, dc, lam_h], dim=-1).mul_(self.coef[i])
        return torch.cat([back @ self.w, self.f[i] * dc], dim=-1)


class GRUOps(StepOps):
    """h' = (1 - z) n + z h with r, z, n from xp and W h + b (order r, z, n)."""

    def __init__(self, cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None) -> None:
        super().__init__(cell.weight_hh, mask)
        h = states[:-1]
        xr, xz, xn = xp.chunk(3, dim=-1)
        hr, hz, hn = (h @ cell.weight_hh.T + cell.bias_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        un = (1 - z) * (1 - n * n)
        # dh' = [un hn r(1-r), (h - n) z(1-z), un r] . d(hr, hz, hn) + z dh
        self.coef = torch.cat([un * hn * r * (1 - r), (h - n) * z * (1 - z), un * r], dim=-1)
        self.z = z
        self.H = cell.hidden

    def _jvp(self, i: int, v: Tensor) -> Tensor:
        H = self.H
        d = self.coef[i] * (v @ self.w.T)
        return d[..., :H] + d[..., H:2 * H] + d[..., 2 * H:] + self.z[i] * v

    def _vjp(self, i: int, lam: Tensor) -> Tensor:
        return (self.coef[i] * lam.tile(3)) @ self.w + self.z[i] * lam


OPS = {"rnn": RNNOps, "lstm": LSTMOps, "gru": GRUOps}


def linearize(cell: Cell, states: Tensor, xp: Tensor, mask: Tensor | None) -> StepOps:
    return OPS[cell.name](cell, states, xp, mask)




def trajectory(cell: Cell, xp: Tensor, s0: Tensor) -> Tensor:
    """s_0..s_T (T+1, B, S) with few ops per step (fused adds, one sigmoid over all gates);
    the same recurrence as ``cell.step``, for sequences of one length."""
    T, H = xp.shape[0], cell.hidden
    states = torch.empty(T + 1, *s0.shape, dtype=s0.dtype, device=s0.device)
    states[0] = s0
    xpb = xp + cell.bias_hh  # (T, B, G*H)
    w = cell.weight_hh.T
    h = s0[:, :H]
    if cell.name == "lstm":
        c = s0[:, H:]
        for t in range(T):
            a = torch.addmm(xpb[t], h, w)
            gates = torch.sigmoid(a)
            c = torch.addcmul(gates[:, H:2 * H] * c, gates[:, :H], torch.tanh(a[:, 2 * H:3 * H]))
            h = gates[:, 3 * H:] * torch.tanh(c)
            states[t + 1, :, :H] = h
            states[t + 1, :, H:] = c
        return states
    if cell.name == "gru":
        for t in range(T):
            hr, hz, hn = torch.addmm(cell.bias_hh, h, w).chunk(3, dim=-1)
            x = xp[t]
            rz = torch.sigmoid(x[:, :2 * H] + torch.cat([hr, hz], dim=-1))
            n = torch.tanh(torch.addcmul(x[:, 2 * H:], rz[:, :H], hn))
            h = torch.lerp(n, h, rz[:, H:])  # (1 - z) n + z h
            states[t + 1] = h
        return states
    for t in range(T):
        h = cell.phi(torch.addmm(xpb[t], h, w))
        states[t + 1] = h
    return states
