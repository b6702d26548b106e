"""Activation functions for the vanilla RNN, with gamma = max |phi'| (Pascanu et al. 2013)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import Registry


@dataclass(frozen=True)
class Activation:
    fn: Callable[[torch.Tensor], torch.Tensor]  # elementwise phi
    gamma: float  # sup |phi'(a)|: the factor in the vanishing/exploding bound


ACTIVATIONS: Registry[Activation] = Registry("activation", "--activation")

ACTIVATIONS.add("tanh", Activation(torch.tanh, 1.0), "tanh; phi'(0) = 1, saturates at +-1")
ACTIVATIONS.add("relu", Activation(torch.relu, 1.0), "max(0, a); the IRNN's activation")
ACTIVATIONS.add("sigmoid", Activation(torch.sigmoid, 0.25), "logistic; phi' <= 1/4")
ACTIVATIONS.add("linear", Activation(lambda a: a, 1.0), "identity: h_t = W h_{t-1} + U x_t + b")
ACTIVATIONS.add(
    "leaky-relu",
    Activation(lambda a: F.leaky_relu(a, 0.01), 1.0),
    "max(0.01 a, a)",
)
ACTIVATIONS.add("softsign", Activation(F.softsign, 1.0), "a / (1 + |a|): polynomial tails")
