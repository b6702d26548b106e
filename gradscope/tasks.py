"""Synthetic long-dependency tasks: seeded generators with their chance-level losses.

Definitions and baselines follow ../shared/TASKS.md; each task's ``variant`` says which version
ran. A generator is ``make(T, B, generator) -> Batch`` and is deterministic given the generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .registry import Registry


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # (T, B, D) float features, or (T, B) int64 token ids for a token task
    targets: Tensor  # final target: (B,) int64 classes or (B, 1) float; per step: (T, B) int64
    lengths: Tensor | None = None  # (B,) int64 real lengths when they vary; None: all T
    per_step: bool = False  # targets are (T, B), one per step

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[0]

    def take(self, n: int, groups: int = 1) -> Batch:
        """The first n sequences (of each of ``groups`` equal, consecutive groups)."""
        size = self.inputs.shape[1] // groups
        keep = torch.cat([torch.arange(g * size, g * size + min(n, size)) for g in range(groups)])
        targets = self.targets[:, keep] if self.per_step else self.targets[keep]
        lengths = None if self.lengths is None else self.lengths[keep]
        return Batch(self.inputs[:, keep], targets, lengths, self.per_step)

    @staticmethod
    def stack(batches: Sequence[Batch]) -> Batch:
        """Batches of one length side by side, seed-major: the batch of a seed stack."""
        first = batches[0]
        lengths = None if first.lengths is None else torch.cat([b.lengths for b in batches])
        return Batch(torch.cat([b.inputs for b in batches], dim=1),
                     torch.cat([b.targets for b in batches], dim=1 if first.per_step else 0),
                     lengths, first.per_step)

    def to(self, device: torch.device, dtype: torch.dtype) -> Batch:
        def move(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x.to(device, dtype if x.is_floating_point() else None)

        return Batch(move(self.inputs), move(self.targets), move(self.lengths), self.per_step)


@dataclass(frozen=True)
class Task:
    name: str
    variant: str  # which version of the task this is, in words
    input_size: int  # features per step, or the vocabulary size of a token task
    n_out: int  # readout outputs: 1 for regression, else the number of classes
    loss: str  # "mse" or "ce"
    per_step: bool  # targets at every step (copy) rather than one at the end
    min_len: int  # smallest T that the definition allows
    chance: Callable[[int], float]  # T -> loss of a model that learned nothing
    make: Callable[[int, int, torch.Generator], Batch]
    tokens: bool = False  # inputs are token ids fed through an embedding
    accuracy_tail: int | None = None  # per-step tasks: accuracy over the last N steps only

    def check_length(self, seq_len: int) -> None:
        if seq_len < self.min_len:
            raise ConfigError(f"--seq-len {seq_len} is too short for the {self.name} task; "
                              f"it needs at least {self.min_len}")

    def generate(self, seq_len: int, batch: int, generator: torch.Generator) -> Batch:
        self.check_length(seq_len)
        return self.make(seq_len, batch, generator)


TASKS: Registry[Task] = Registry("task", "--task")


def _randint(low: Tensor | int, high: Tensor | int, size: tuple[int, ...],
             gen: torch.Generator) -> Tensor:
    """Uniform integers in [low, high), with per-element bounds allowed."""
    u = torch.rand(size, generator=gen, dtype=torch.float64)
    return (low + (u * (torch.as_tensor(high) - low)).floor()).long()


def _one_hot(symbols: Tensor, n: int) -> Tensor:
    return F.one_hot(symbols, n).to(torch.float64)


# --- adding -----------------------------------------------------------------------------------

def _adding(T: int, B: int, gen: torch.Generator) -> Batch:
    values = torch.rand(T, B, generator=gen, dtype=torch.float64)
    first = _randint(0, T // 2, (B,), gen)
    second = _randint(T // 2, T, (B,), gen)
    marker = torch.zeros(T, B, dtype=torch.float64)
    cols = torch.arange(B)
    marker[first, cols] = 1.0
    marker[second, cols] = 1.0
    target = values[first, cols] + values[second, cols]
    return Batch(torch.stack([values, marker], dim=-1), target[:, None])


TASKS.add("adding", Task(
    name="adding",
    variant="values U[0,1]; one marker in each half; target the sum at the last step; MSE",
    input_size=2, n_out=1, loss="mse", per_step=False, min_len=2,
    chance=lambda T: 1 / 6, make=_adding,
), "sum of two marked U[0,1] values (Le et al. 2015); chance MSE 1/6")


# --- copy -------------------------------------------------------------------------------------

COPY_SYMBOLS, COPY_DATA = 10, 10  # alphabet size (0 blank, 1-8 data, 9 delimiter); data length


def _copy(T: int, B: int, gen: torch.Generator) -> Batch:
    data = _randint(1, 9, (COPY_DATA, B), gen)
    blank = torch.zeros(T - 1, B, dtype=torch.long)
    delim = torch.full((1, B), 9, dtype=torch.long)
    tail = torch.zeros(COPY_DATA, B, dtype=torch.long)
    symbols = torch.cat([data, blank, delim, tail])  # (T + 20, B)
    targets = torch.cat([torch.zeros(T + COPY_DATA, B, dtype=torch.long), data])
    return Batch(_one_hot(symbols, COPY_SYMBOLS), targets, per_step=True)


TASKS.add("copy", Task(
    name="copy",
    variant="10 symbols from {1..8}, T-1 blanks, delimiter, 10 blanks; CE over all T+20 steps",
    input_size=COPY_SYMBOLS, n_out=9, loss="ce", per_step=True, min_len=1,
    chance=lambda T: COPY_DATA * math.log(8) / (T + 2 * COPY_DATA), make=_copy,
    accuracy_tail=COPY_DATA,
), "copying memory over a delay T (Arjovsky et al. 2016); chance 10 ln 8 / (T+20)")


# --- temporal order ---------------------------------------------------------------------------

def _temporal_order(windows: tuple[tuple[float, float], ...]) -> Callable[..., Batch]:
    def make(T: int, B: int, gen: torch.Generator) -> Batch:
        symbols = _randint(2, 6, (T, B), gen)  # distractors 2..5
        cols = torch.arange(B)
        label = torch.zeros(B, dtype=torch.long)
        for lo, hi in windows:
            pos = _randint(int(lo * T), int(hi * T), (B,), gen)
            bit = _randint(0, 2, (B,), gen)  # 0 = A, 1 = B
            symbols[pos, cols] = bit
            label = 2 * label + bit
        return Batch(_one_hot(symbols, 6), label)

    return make


TASKS.add("temporal-order", Task(
    name="temporal-order",
    variant="2-bit: A/B at [0.1T,0.2T) and [0.5T,0.6T) among distractors; 4 classes; CE",
    input_size=6, n_out=4, loss="ce", per_step=False, min_len=10,
    chance=lambda T: math.log(4), make=_temporal_order(((0.1, 0.2), (0.5, 0.6))),
), "order of two A/B symbols (Hochreiter & Schmidhuber 1997); chance ln 4")

TASKS.add("temporal-order-3bit", Task(
    name="temporal-order-3bit",
    variant="3-bit: A/B at [0.1T,0.2T), [0.3T,0.4T), [0.6T,0.7T); 8 classes; CE",
    input_size=6, n_out=8, loss="ce", per_step=False, min_len=10,
    chance=lambda T: math.log(8), make=_temporal_order(((0.1, 0.2), (0.3, 0.4), (0.6, 0.7))),
), "order of three A/B symbols; chance ln 8")


# --- recall -----------------------------------------------------------------------------------

RECALL_K = 8


def _recall(T: int, B: int, gen: torch.Generator) -> Batch:
    symbol = _randint(1, RECALL_K + 1, (B,), gen)
    symbols = torch.zeros(T, B, dtype=torch.long)
    symbols[0] = symbol
    return Batch(_one_hot(symbols, RECALL_K + 1), symbol - 1)


TASKS.add("recall", Task(
    name="recall",
    variant=f"one of K={RECALL_K} symbols at step 1, then blanks; name it at the last step; CE",
    input_size=RECALL_K + 1, n_out=RECALL_K, loss="ce", per_step=False, min_len=1,
    chance=lambda T: math.log(RECALL_K), make=_recall,
), f"recall the first of T symbols; chance ln {RECALL_K}")


# --- language ---------------------------------------------------------------------------------

LANGUAGES = {
    "Spain": "Spanish", "France": "French", "Germany": "German", "Italy": "Italian",
    "Portugal": "Portuguese", "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish",
    "Japan": "Japanese", "China": "Chinese",
}
CITIES = ("Berlin", "Paris", "Madrid", "Rome", "Lisbon", "Athens", "Warsaw", "Stockholm",
          "Tokyo", "Beijing", "London", "Vienna")
OPENING = ("<country>", "is", "where", "I", "grew", "up", ",", "but")
CLOSING = ("I", "speak", "fluent")
CLAUSES = (  # fillers; their places may name other cities and countries
    ("I", "now", "live", "in", "<city>", "."),
    ("my", "sister", "moved", "to", "<country>", "."),
    ("we", "often", "visit", "<city>", "."),
    ("last", "year", "I", "worked", "in", "<country>", "."),
    ("the", "weather", "in", "<city>", "is", "nice", "."),
    ("friends", "from", "<city>", "came", "by", "."),
)
PAD = "<pad>"
VOCAB = (PAD, *LANGUAGES, *CITIES, *sorted(
    {w for c in (OPENING, CLOSING, *CLAUSES) for w in c if not w.startswith("<")}))
TOKEN = {w: i for i, w in enumerate(VOCAB)}
COUNTRIES = tuple(LANGUAGES)
MIN_LANGUAGE_LEN = len(OPENING) + len(CLOSING)


def _pick(options: tuple[str, ...], gen: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _language(T: int, B: int, gen: torch.Generator) -> Batch:
    ids = torch.full((T, B), TOKEN[PAD], dtype=torch.long)
    lengths = torch.empty(B, dtype=torch.long)
    label = torch.empty(B, dtype=torch.long)
    for b in range(B):
        budget = int(torch.randint(max(MIN_LANGUAGE_LEN, T // 2), T + 1, (1,), generator=gen))
        country = int(torch.randint(len(COUNTRIES), (1,), generator=gen))
        words = [COUNTRIES[country], *OPENING[1:]]
        while True:  # add random clauses while any fits: lengths end within 4 of the budget
            fits = [c for c in CLAUSES if len(words) + len(c) + len(CLOSING) <= budget]
            if not fits:
                break
            clause = fits[int(torch.randint(len(fits), (1,), generator=gen))]
            words += [_pick(COUNTRIES, gen) if w == "<country>" else
                      _pick(CITIES, gen) if w == "<city>" else w for w in clause]
        words += CLOSING
        ids[: len(words), b] = torch.tensor([TOKEN[w] for w in words])
        lengths[b] = len(words)
        label[b] = country
    return Batch(ids, label, lengths)


TASKS.add("language", Task(
    name="language",
    variant="'<country> is where I grew up , but' + filler clauses + 'I speak fluent' -> the "
            f"language; {len(LANGUAGES)} languages; lengths vary in [T/2, T]; CE",
    input_size=len(VOCAB), n_out=len(LANGUAGES), loss="ce", per_step=False,
    min_len=MIN_LANGUAGE_LEN, chance=lambda T: math.log(len(LANGUAGES)), make=_language,
    tokens=True,
), f"'Spain is where I grew up, ... I speak fluent ___'; chance ln {len(LANGUAGES)}")


def decode(ids: Tensor) -> str:
    """Token ids (T,) -> the sentence, without padding (for docs and tests)."""
    return " ".join(VOCAB[i] for i in ids.tolist() if VOCAB[i] != PAD)
