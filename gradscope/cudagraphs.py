"""CUDA graphs for a slice of steps of the closed-form maps: the forward probes' push, and
the reverse pass's pull.

On a GPU a step's closed-form jvp or vjp (gradscope.linear) is a handful of small kernels, and
a pass runs it T times: the loop is bound by kernel launches, not by arithmetic. A CUDA graph
records a slice's launches once and replays them with one call. Its tensors must stay at
fixed addresses, so the graph reads static copies: a StepOps whose per-step tensors
(``StepOps.STEPS``) get the slice's steps copied into their first rows before every replay
(so one graph serves a slice length wherever the slice lies), a static input (the tangent,
or the adjoint), and a static output. A length is captured the second time it comes up, so
that one-off slices (a chunk's rest, a length the decay chose once) stay eager; the forward
pass rounds its slice lengths down to powers of two while graphs are on, so that few lengths
come up (the reverse pass's blocks are its chunks, mostly of one length already).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import StepOps

ENABLED = True  # off: every slice eager (the tests hold the two to each other)
_MAX_GRAPHS = 8  # slice lengths captured per pass; others run eager


class GraphedSteps:
    """``StepOps.push`` of one forward pass (or ``StepOps.pull`` of one reverse pass: ``method``),
    replayed from CUDA graphs where it repeats."""

    def __init__(self, method: str = "push") -> None:
        self.method = method
        self.static: StepOps | None = None  # the coefficients the graphs read
        self.whole: dict[str, Tensor] = {}  # the tensors last copied whole, by name
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def __call__(self, ops: StepOps, tangent: Tensor, a: int, b: int) -> Tensor | None:
        """The method's values over steps a..b-1 from ``tangent`` ((b-a, B, K, S) pushed, or
        (b-a, B, S) pulled), or None where this slice runs eager (a length's first sighting,
        or coefficients that do not fit the static ones). The values are the graph's own
        output: read them before the next call."""
        key = (b - a, tuple(tangent.shape), tangent.dtype)
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= _MAX_GRAPHS:
                self.seen.add(key)
                return None
        if not self._load(ops, a, b):
            return None
        if key not in self.graphs:
            self.graphs[key] = self._capture(tangent, b - a)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(tangent)
        graph.replay()
        return static_out

    def _load(self, ops: StepOps, a: int, b: int) -> bool:
        """Steps a..b-1 of ``ops``'s per-step tensors into the first rows of the static ones,
        its other tensors (W_hh) whole where they changed; False where they do not fit
        (another kind of ops, other shapes, more steps than the static ones hold, ops whose
        tensors sit elsewhere: ``StepOps.GRAPHED``)."""
        if not ops.GRAPHED:
            return False
        if self.static is None or self._short(ops, b - a):
            self.static = ops.mapped(Tensor.clone)
            self.whole.clear()
            self.graphs.clear()  # each reads the static tensors it was captured on
        if type(ops) is not type(self.static):
            return False
        pairs = []
        for name, value in vars(ops).items():
            held = getattr(self.static, name, None)
            if isinstance(value, Tensor) != isinstance(held, Tensor):
                return False
            if not isinstance(value, Tensor):
                if value != held:
                    return False
                continue
            if name in ops.STEPS:
                value, held = value[a:b], held[:b - a]
            elif self.whole.get(name) is value:  # W_hh: the same tensor chunk after chunk
                continue
            if value.dtype != held.dtype or value.shape != held.shape:
                return False
            pairs.append((name, held, value))
        for name, held, value in pairs:
            held.copy_(value)
            if name not in ops.STEPS:
                self.whole[name] = value
        return True

    def _short(self, ops: StepOps, m: int) -> bool:
        """Whether the static per-step tensors hold fewer than the m steps that ``ops``'s hold
        (a reverse pass meets its chunks from the last, which may be the shortest): then the
        static ones are taken again from ``ops``."""
        if type(ops) is not type(self.static):
            return False
        for name in ops.STEPS:
            value, held = getattr(ops, name, None), getattr(self.static, name, None)
            if isinstance(value, Tensor) and isinstance(held, Tensor) \
                    and held.shape[0] < m <= value.shape[0]:
                return True
        return False

    def _capture(self, tangent: Tensor, m: int) -> tuple:
        static_in = tangent.clone()
        static_out = tangent.new_empty(m, *tangent.shape)
        run = getattr(self.static, self.method)
        side = torch.cuda.Stream()  # warm up off the capture, as torch's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(static_in, 0, m, static_out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(static_in, 0, m, static_out)
        return graph, static_in, static_out


def graphed_steps(device: torch.device, method: str = "push") -> GraphedSteps | None:
    """A GraphedSteps for a pass on ``device`` (``method``: "push" forward, "pull" reverse): on
    a GPU, where launches set the pace."""
    return GraphedSteps(method) if ENABLED and device.type == "cuda" else None
