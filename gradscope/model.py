"""A model for a task: input encoder -> recurrent cell -> linear readout, built from a RunConfig,
and its ``unroll`` into the engine's flat-state recurrence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cells import CELLS, Cell, affine
from .config import RunConfig, flag
from .engine import Unrolled
from .errors import ConfigError
from .inits import check_schemes, initialise
from .linear import Linearization, kernel_trains_faster
from .probes import PROBES, READ_BY, unread, unread_applies_to
from .tasks import TASKS, Batch, Task

EMBEDDING_DIM = 32  # token tasks: size of the embedding that feeds the cell


class Projected:
    """The cell's input drive W_ih x_t + b_ih, (T, B, G*H), computed a chunk of steps at a time
    and cached, so that streamed probes never hold it whole (it is G*H/D times the inputs)."""

    CHUNK = 256

    def __init__(self, model: Model, inputs: Tensor) -> None:
        self.model, self.inputs = model, inputs
        cell = model.cell
        self.shape = (inputs.shape[0], inputs.shape[1], len(cell.gates) * cell.hidden)
        self._cached: tuple[int, Tensor] | None = None

    def _project(self, index: slice) -> Tensor:
        with torch.no_grad():
            return self.model.cell.project(self.model.encode(self.inputs[index]))

    def __getitem__(self, index: int | slice) -> Tensor:
        if isinstance(index, slice):
            return self._project(index)
        t0 = (index // self.CHUNK) * self.CHUNK
        if self._cached is None or self._cached[0] != t0:
            self._cached = (t0, self._project(slice(t0, t0 + self.CHUNK)))
        return self._cached[1][index - t0]


class Model(nn.Module):
    def __init__(self, cell: Cell, task: Task, embedding: nn.Embedding | None) -> None:
        super().__init__()
        self.cell = cell
        self.task = task
        self.embedding = embedding
        self.readout = nn.Linear(cell.hidden, task.n_out)
        # S > 1: every weight is seed-stacked (gradscope.batched) and the batch is S groups
        self.groups = 1
        # training's recurrence: torch.nn's fused kernel (True) or the step loop (False);
        # None: where linear.kernel_trains_faster says so
        self.kernel: bool | None = None

    def encode(self, inputs: Tensor) -> Tensor:
        """(T, B, D) features or (T, B) token ids -> (T, B, D) cell inputs."""
        if self.embedding is None:
            return inputs
        table = self.embedding.weight
        if table.dim() == 2:
            return self.embedding(inputs)
        ids = inputs.unflatten(1, (self.groups, -1))  # (T, S, B/S): each group its own table
        seed = torch.arange(self.groups, device=ids.device)[:, None]
        return table[seed, ids].flatten(1, 2)

    def group_mean(self, x: Tensor) -> Tensor:
        """(..., B) -> (..., S): the mean over each seed's samples (S = 1: the batch mean)."""
        return x.unflatten(-1, (self.groups, -1)).mean(dim=-1)

    def step_losses(self, h: Tensor, batch: Batch, first: int = 1) -> Tensor:
        """h (n, B, H) of steps first..first+n-1 -> (n, B) per-sample loss of the readout.

        Final-target tasks score every step against the one target; per-step tasks against
        that step's target.
        """
        y = affine(h, self.readout.weight, self.readout.bias)  # (n, B, n_out)
        n = h.shape[0]
        if self.task.per_step:
            target = batch.targets[first - 1:first - 1 + n]  # (n, B)
        else:
            target = batch.targets.expand(n, *batch.targets.shape)
        if self.task.loss == "mse":
            return ((y - target) ** 2).sum(-1)
        return F.cross_entropy(y.flatten(0, 1), target.flatten(), reduction="none").view(n, -1)

    def hidden_states(self, batch: Batch) -> Tensor:
        """h_1..h_T (T, B, H) under autograd (training): by torch.nn's fused kernel where it
        is faster, else by a plain loop; ended samples hold."""
        mask = self.mask(batch)
        cell, x = self.cell, self.encode(batch.inputs)
        kernel = self.kernel
        if kernel is None:
            kernel = kernel_trains_faster(cell.name, cell.activation, x.dtype, x.device,
                                          stacked=self.groups > 1, masked=mask is not None)
        if kernel and (batch.lengths is None or bool((batch.lengths > 0).all())):
            hs = cell.kernel_hidden(x)
            if batch.lengths is None:
                return hs
            # the kernel runs every sequence to T; a state depends on earlier steps only, so
            # each one's states up to its end are its own, and after it each holds the one at
            # its end: taken from there (the steps past the end get no gradient)
            steps = torch.arange(hs.shape[0], device=hs.device)[:, None]
            held = torch.minimum(steps, batch.lengths[None, :].to(hs.device) - 1)  # (T, B)
            return hs.gather(0, held[..., None].expand_as(hs))
        state = cell.initial_state(x.shape[1])
        if self.groups == 1 or mask is not None:
            return cell.recur(cell.drive(x), state, mask)
        # a seed stack keeps its tensors split by seed, seed-major: one bmm a step, no reshapes
        state = tuple(part.unflatten(0, (self.groups, -1)) for part in state)
        return cell.recur(cell.drive(x, seed_major=True), state, grouped=True).flatten(1, 2)

    def loss(self, batch: Batch) -> Tensor:
        """The task loss L = sum_t w_t mean_b loss_t, the quantity the engine's adjoint traces."""
        return self.group_losses(batch).sum()

    def group_losses(self, batch: Batch) -> Tensor:
        """(S,): each seed's task loss (S = 1: the task loss); their sum trains all S at once,
        each seed's weights receiving exactly its own gradient."""
        hs = self.hidden_states(batch)
        if self.task.per_step:
            weights = self.loss_weights(batch).to(hs)
            return (weights[:, None] * self.group_mean(self.step_losses(hs, batch))).sum(0)
        return self.group_mean(self.step_losses(hs[-1:], batch))[0]  # only step T has weight

    @torch.no_grad()
    def accuracy(self, batch: Batch) -> list[float] | None:
        """Each seed's fraction of correct predictions where the task is scored; None for
        regression."""
        if self.task.loss != "ce":
            return None
        hs = self.hidden_states(batch)
        tail = (self.task.accuracy_tail or batch.seq_len) if self.task.per_step else 1
        y = affine(hs[-tail:], self.readout.weight, self.readout.bias)
        targets = batch.targets[-tail:] if self.task.per_step else batch.targets[None]
        hits = (y.argmax(-1) == targets).double()  # (tail, B)
        return self.group_mean(hits).mean(0).tolist()

    def loss_weights(self, batch: Batch) -> Tensor:
        """(T,) weights that turn per-step losses into the task loss L."""
        T = batch.seq_len
        if self.task.per_step:
            return torch.full((T,), 1.0 / T)
        w = torch.zeros(T)
        w[-1] = 1.0  # ended samples hold their state, so step T reads their last real step
        return w

    def mask(self, batch: Batch) -> Tensor | None:
        if batch.lengths is None:
            return None
        steps = torch.arange(batch.seq_len, device=batch.lengths.device)
        return steps[:, None] < batch.lengths[None, :]  # (T, B)

    def unroll(self, batch: Batch) -> Unrolled:
        cell = self.cell
        H = cell.hidden

        def losses(states: Tensor, first: int) -> Tensor:
            return self.step_losses(states[..., :H], batch, first)

        s0 = torch.cat(cell.initial_state(batch.inputs.shape[1]), dim=-1)  # (B, n_parts*H)
        return unroll_cell(cell, lambda: self.encode(batch.inputs),
                           Projected(self, batch.inputs),  # (T, B, G*H), a chunk at a time
                           s0, losses, self.loss_weights(batch).to(s0.device),
                           mask=self.mask(batch), lengths=batch.lengths, groups=self.groups,
                           losses_read_h=True)


def unroll_cell(cell: Cell, inputs: Callable[[], Tensor], xs: Tensor | Projected, s0: Tensor,
                losses: Callable[[Tensor, int], Tensor], weights: Tensor, *,
                mask: Tensor | None = None, lengths: Tensor | None = None,
                groups: int = 1, losses_read_h: bool = False) -> Unrolled:
    """The engine's view of a built-in cell, with its fast back end: ``inputs`` gives the
    cell's inputs x (T, B, D) (for torch's fused kernel), ``xs`` their projections
    W_ih x + b_ih (T, B, G*H); ``lengths`` (B,) where sequences end early (``mask``);
    ``losses_read_h``: whether ``losses`` read the states' h-part only."""
    H = cell.hidden
    assert s0.shape[1] == len(cell.parts) * H

    def step(xp: Tensor, s: Tensor) -> Tensor:
        return torch.cat(cell.step(xp, s.split(H, dim=-1)), dim=-1)

    fast = Linearization(cell, inputs, s0, lengths)
    return Unrolled(
        step=step,
        s0=s0,
        xs=xs,
        parts=cell.parts,
        losses=losses,
        weights=weights,
        mask=mask,
        groups=groups,
        linearize=fast.ops,
        fast_trajectory=fast.trajectory,
        fused_adjoint=fast.fused_adjoint,
        fused_on_cpu=fast.fused_wins_on_cpu(),
        losses_read_h=losses_read_h,
    )


@dataclass(frozen=True)
class Built:
    model: Model
    batch: Batch  # the probe batch: the sequences every profile is measured on
    task: Task


# Independent random streams of one seed: the weights, the probe batch, the training batches
# and the held-out evaluation batch.
STREAMS = ("weights", "probe", "train", "eval")


def generator(seed: int, stream: str) -> torch.Generator:
    k = STREAMS.index(stream)
    return torch.Generator().manual_seed(seed if k == 0 else (seed * 1_000_003 + 7919 * k) % 2**63)


def validate(config: RunConfig) -> None:
    """Every name and combination in ``config``, checked without drawing anything."""
    TASKS.get(config.task).check_length(config.seq_len)
    cell = CELLS.get(config.cell)
    cell.check_activation(config.activation)
    check_schemes(cell, init=config.init, input_init=config.input_init,
                  forget_bias=config.forget_bias, gate_init=config.gate_init)
    idle = idle_options(config)
    if idle:
        raise ConfigError(idle[0].error())


TRAINING_OPTIONS = ("optimizer", "lr", "clip", "profile_every")  # read by training alone


@dataclass(frozen=True)
class Idle:
    """An option of a run given a value that nothing reads (``--checkpoint`` with no adjoint
    probe): ``validate`` refuses it, a sweep drops it with a note."""

    field: str  # the RunConfig field
    option: str  # where it was given: "--checkpoint", "gradscope.profile: checkpoint"
    applies_to: str  # what reads it, in words: "the adjoint probe"
    not_to: str  # what the run has instead: "--probes grad_h0"
    remedy: str  # "add adjoint to --probes"

    def error(self) -> str:
        return (f"{self.option} applies to {self.applies_to}, not to {self.not_to}; "
                f"{self.remedy} or leave it out")

    def note(self) -> str:
        return f"{self.option} applies to {self.applies_to} only: dropped from the other runs"


def idle_options(config: RunConfig) -> list[Idle]:
    """The options of ``config`` given a value that nothing in its run reads."""
    idle = []
    if config.chrono_tmax is not None and config.gate_init != "chrono":
        idle.append(Idle("chrono_tmax", "--chrono-tmax", "--gate-init chrono",
                         f"--gate-init {config.gate_init}", "add --gate-init chrono"))
    if not config.steps:  # the training options, where they are not the defaults
        for name in TRAINING_OPTIONS:
            if getattr(config, name) != RunConfig.__dataclass_fields__[name].default:
                idle.append(Idle(name, flag(name), "training",
                                 "a run with --steps 0", "add --steps N"))
    if config.probes is not None and all(name in PROBES for name in config.probes):
        chosen = [PROBES.get(name) for name in config.probes]
        for name in unread(chosen, {f: getattr(config, f) for f in READ_BY}):
            applies_to, add = unread_applies_to(name)
            idle.append(Idle(name, flag(name), applies_to,
                             "--probes " + ",".join(config.probes), f"add {add} to --probes"))
    return idle


def build(config: RunConfig, device: torch.device) -> Built:
    """The model (weights drawn from the seed) and one batch of task data (from the seed).

    Raises ConfigError for unknown names and combinations that make no sense.
    """
    task = TASKS.get(config.task)
    CELLS.get(config.cell)  # an unknown cell fails before any data is drawn
    dtype = getattr(torch, config.dtype)
    weights_gen = generator(config.seed, "weights")
    batch = task.generate(config.seq_len, config.batch, generator(config.seed, "probe"))
    # Weights are drawn in float64 whatever the run's dtype, so that g*I and g*Q are exact
    # to float64 precision (the identities the tests check); then cast.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = _draw_model(config, task, batch.seq_len, weights_gen)
    finally:
        torch.set_default_dtype(previous)
    return Built(model.to(device=device, dtype=dtype), batch.to(device, dtype), task)


def _draw_model(config: RunConfig, task: Task, seq_len: int,
                weights_gen: torch.Generator) -> Model:
    embedding = None
    input_size = task.input_size
    if task.tokens:
        embedding = nn.Embedding(task.input_size, EMBEDDING_DIM)
        nn.init.normal_(embedding.weight, generator=weights_gen)
        input_size = EMBEDDING_DIM
    cell = CELLS.get(config.cell)(input_size, config.hidden, config.activation)
    initialise(
        cell,
        init=config.init,
        gain=config.gain,
        input_init=config.input_init,
        forget_bias=config.forget_bias,
        gate_init=config.gate_init,
        t_max=config.chrono_tmax or seq_len,
        generator=weights_gen,
    )
    model = Model(cell, task, embedding)
    bound = 1.0 / config.hidden**0.5
    with torch.no_grad():
        model.readout.weight.uniform_(-bound, bound, generator=weights_gen)
        model.readout.bias.uniform_(-bound, bound, generator=weights_gen)
    return model
