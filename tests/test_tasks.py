"""Task generators: definitions, determinism and chance baselines (../shared/TASKS.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradscope.errors import ConfigError
from gradscope.tasks import CLOSING, LANGUAGES, TASKS, decode


def _gen(name, T, B, seed=0):
    return TASKS.get(name).generate(T, B, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TASKS.names())
def test_generators_are_deterministic_and_seeded(name):
    a, b, c = _gen(name, 40, 16), _gen(name, 40, 16), _gen(name, 40, 16, seed=1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_adding_markers_and_target():
    T, B = 100, 500
    batch = _gen("adding", T, B)
    values, marker = batch.inputs[..., 0], batch.inputs[..., 1]
    assert (marker.sum(0) == 2).all()
    assert (marker[: T // 2].sum(0) == 1).all() and (marker[T // 2:].sum(0) == 1).all()
    torch.testing.assert_close(batch.targets[:, 0], (values * marker).sum(0))
    # predicting 1 scores the chance MSE 1/6 (Var of U1 + U2)
    mse = float(((batch.targets - 1) ** 2).mean())
    assert mse == pytest.approx(TASKS.get("adding").chance(T), abs=0.03)


def test_copy_layout_and_chance():
    T, B = 50, 64
    batch = _gen("copy", T, B)
    symbols = batch.inputs.argmax(-1)
    assert batch.inputs.shape == (T + 20, B, 10)
    data = symbols[:10]
    assert ((data >= 1) & (data <= 8)).all()
    assert (symbols[10:T + 9] == 0).all() and (symbols[T + 9] == 9).all()
    assert (symbols[T + 10:] == 0).all()
    assert torch.equal(batch.targets[T + 10:], data) and (batch.targets[: T + 10] == 0).all()
    # blanks predicted perfectly, data uniformly over the 8 symbols: exactly 10 ln 8 / (T+20)
    logits = torch.full((T + 20, B, 9), -1e9, dtype=torch.float64)
    logits[: T + 10, :, 0] = 0
    logits[T + 10:, :, 1:] = 0
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    assert float(loss) == pytest.approx(TASKS.get("copy").chance(T), rel=1e-9)


@pytest.mark.parametrize("name, windows", [
    ("temporal-order", [(0.1, 0.2), (0.5, 0.6)]),
    ("temporal-order-3bit", [(0.1, 0.2), (0.3, 0.4), (0.6, 0.7)]),
])
def test_temporal_order_positions_and_classes(name, windows):
    T, B = 100, 200
    batch = _gen(name, T, B)
    symbols = batch.inputs.argmax(-1)  # (T, B)
    for b in range(B):
        positions = (symbols[:, b] < 2).nonzero().flatten().tolist()
        assert len(positions) == len(windows)
        label = 0
        for p, (lo, hi) in zip(positions, windows, strict=True):
            assert int(lo * T) <= p < int(hi * T)
            label = 2 * label + int(symbols[p, b])
        assert label == int(batch.targets[b])
    assert TASKS.get(name).chance(T) == pytest.approx(math.log(2 ** len(windows)))


def test_recall_symbol_at_step_one():
    batch = _gen("recall", 30, 64)
    symbols = batch.inputs.argmax(-1)
    assert torch.equal(symbols[0] - 1, batch.targets) and (symbols[1:] == 0).all()


def test_language_sentences():
    T, B = 60, 32
    batch = _gen("language", T, B)
    assert batch.lengths is not None and len(set(batch.lengths.tolist())) > 1
    assert (batch.lengths <= T).all() and (batch.lengths >= T // 2 - 4).all()
    languages = list(LANGUAGES.values())
    for b in range(B):
        sentence = decode(batch.inputs[:, b]).split()
        assert len(sentence) == int(batch.lengths[b])
        assert sentence[1:8] == ["is", "where", "I", "grew", "up", ",", "but"]
        assert sentence[-3:] == list(CLOSING)
        assert LANGUAGES[sentence[0]] == languages[int(batch.targets[b])]
    assert TASKS.get("language").chance(T) == pytest.approx(math.log(len(LANGUAGES)))


@pytest.mark.parametrize("name, T", [("temporal-order", 9), ("adding", 1), ("language", 10)])
def test_too_short_is_a_config_error(name, T):
    with pytest.raises(ConfigError, match=f"too short for the {name} task"):
        _gen(name, T, 4)
