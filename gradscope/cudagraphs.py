"""CUDA graphs for the forward probes' push through a slice of steps.

On a GPU a step's closed-form jvp (gradscope.linear) is a handful of small kernels, and the
forward pass runs it T times: the loop is bound by kernel launches, not by arithmetic. A CUDA
graph records a slice's launches once and replays them with one call. Its tensors must stay
at fixed addresses, so the graph reads a static copy of the chunk's coefficients (a StepOps
whose tensors are filled in place for every chunk) and a static tangent, and writes a static
output. A slice is captured the second time its (offset, length, shape) comes up, so that
one-off slices (the last chunk's rest, a block length the decay chose once) stay eager.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .linear import StepOps

ENABLED = True  # off: every slice eager (the tests hold the two to each other)
_MAX_GRAPHS = 16  # captured slices kept per pass; more shapes than this run eager


class GraphedPush:
    """``StepOps.push`` of one forward pass, replayed from CUDA graphs where it repeats."""

    def __init__(self) -> None:
        self.static: StepOps | None = None  # holds the coefficients of ``self.source``
        self.source: StepOps | None = None
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def __call__(self, ops: StepOps, tangent: Tensor, a: int, b: int) -> Tensor | None:
        """The values (b-a, K, B, S) of steps a+1..b from ``tangent``, or None where this slice
        runs eager (first sighting, or a chunk whose coefficients do not fit the static ones).
        The values are the graph's own output: read them before the next call."""
        key = (a, b - a, tuple(tangent.shape), tangent.dtype)
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= _MAX_GRAPHS:
                self.seen.add(key)
                return None
        if not self._load(ops):
            return None
        if key not in self.graphs:
            self.graphs[key] = self._capture(tangent, a, b)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(tangent)
        graph.replay()
        return static_out

    def _load(self, ops: StepOps) -> bool:
        """Copy ``ops``'s tensors into the static ones (the first chunk's shapes; a shorter
        last chunk fills their first steps); False where they do not fit."""
        if ops is self.source:
            return True
        if self.static is None:
            self.static = copy.copy(ops)
            for name, value in vars(ops).items():
                if isinstance(value, Tensor):
                    setattr(self.static, name, value.clone())
            self.source = ops
            return True
        pairs = []
        for name, value in vars(ops).items():
            held = getattr(self.static, name, None)
            if isinstance(value, Tensor) != isinstance(held, Tensor) or type(ops) is not \
                    type(self.static):
                return False
            if isinstance(value, Tensor):
                if value.dtype != held.dtype or value.shape[1:] != held.shape[1:] \
                        or value.shape[0] > held.shape[0]:
                    return False
                pairs.append((held, value, getattr(self.source, name)))
            elif value != getattr(self.static, name):
                return False
        for held, value, before in pairs:
            if value is not before:  # W_hh is the same tensor in every chunk
                held[:value.shape[0]].copy_(value)
        self.source = ops
        return True

    def _capture(self, tangent: Tensor, a: int, b: int) -> tuple:
        static_in = tangent.clone()
        static_out = tangent.new_empty(b - a, *tangent.shape)
        side = torch.cuda.Stream()  # warm up off the capture, as torch's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.static.push(static_in, a, b, static_out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static.push(static_in, a, b, static_out)
        return graph, static_in, static_out


def graphed_push(device: torch.device) -> GraphedPush | None:
    """A GraphedPush for a forward pass on ``device``: on a GPU, where launches set the pace."""
    return GraphedPush() if ENABLED and device.type == "cuda" else None
