"""Each cell's step function computes what torch.nn.RNN / LSTM / GRU compute with its weights."""

import pytest
import torch

from gradscope import cells
from gradscope.cells import CELLS
from gradscope.errors import ConfigError


@pytest.mark.parametrize("name, activation", [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None),
                                              ("gru", None)])
def test_cell_matches_torch_nn(name, activation):
    torch.manual_seed(0)
    cell = CELLS.get(name)(5, 7, activation).double()
    for p in cell.parameters():  # every weight and bias nonzero and distinct
        torch.nn.init.normal_(p, 0, 0.5)
    reference = cell.torch_module()
    x = torch.randn(30, 4, 5, dtype=torch.float64)
    state = tuple(torch.randn(4, 7, dtype=torch.float64) for _ in cell.parts)
    hs, final = cell(x, state)
    if name == "lstm":
        ref_hs, (ref_h, ref_c) = reference(x, (state[0][None], state[1][None]))
        torch.testing.assert_close(final[1], ref_c[0], rtol=1e-12, atol=1e-12)
    else:
        ref_hs, ref_h = reference(x, state[0][None])
    torch.testing.assert_close(hs, ref_hs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final[0], ref_h[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_gated_cells_refuse_an_activation(name):
    with pytest.raises(ConfigError, match="does not apply to the .* cell"):
        CELLS.get(name)(3, 4, "relu")


def test_step_takes_leading_batch_dims():
    # the engine's forward pass pushes K directions as an extra leading dimension
    cell = CELLS.get("lstm")(3, 4).double()
    xp = cell.project(torch.randn(2, 3, dtype=torch.float64))
    state = tuple(torch.randn(5, 2, 4, dtype=torch.float64) for _ in cell.parts)
    out = cell.step(xp, state)
    for k in range(5):
        single = cell.step(xp, tuple(s[k] for s in state))
        for a, b in zip(out, single, strict=True):
            torch.testing.assert_close(a[k], b)


def _stepped(cell, drive, state, mask):
    """The reference for ``Cell.recur``: one ``cell.step`` at a time, autograd forming every
    gradient (``drive``: W_ih x + b_ih, b_hh not folded in)."""
    hs = []
    for t in range(drive.shape[0]):
        new = cell.step(drive[t], state)
        if mask is not None:
            new = tuple(torch.where(mask[t][:, None], n, o)
                        for n, o in zip(new, state, strict=True))
        hs.append(new[0])
        state = new
    return torch.stack(hs)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layout", ["one", "stacked", "grouped", "masked", "stacked, masked"])
@pytest.mark.parametrize("tapped", [True, False])
def test_recur_gives_autograds_gradients(name, layout, tapped, monkeypatch):
    """Training's loop (``Cell.recur``; ``tapped``: W_hh's gradient in one matmul after the
    steps, ``_RecurrentWeight``) gives the same h_t and the same gradient of every weight as
    autograd through each step, for one model, a seed stack (rows seed-major, or split by
    seed with each seed's steps together), and sequences that end early."""
    monkeypatch.setattr(cells, "TAPPED_ROWS", 64 if tapped else 0)
    torch.manual_seed(1)
    S, n, T = (3 if "stacked" in layout or layout == "grouped" else 0), 4, 12
    cell = CELLS.get(name)(2, 5).double()
    if S:
        for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            w = getattr(cell, attr)
            setattr(cell, attr, torch.nn.Parameter(torch.randn(S, *w.shape, dtype=w.dtype)))
    B = (S or 1) * n
    x = torch.randn(T, B, 2, dtype=torch.float64)
    mask = None
    if "masked" in layout:
        lengths = torch.randint(3, T + 1, (B,))
        mask = torch.arange(T)[:, None] < lengths[None, :]
    state = cell.initial_state(B)
    state = tuple(torch.randn_like(part) for part in state)
    target = torch.randn(T, B, 5, dtype=torch.float64)

    def grads(run):
        cell.zero_grad()
        hs = run()
        (hs * target).sum().backward()
        return [hs.detach()] + [p.grad.clone() for p in cell.parameters()]

    want = grads(lambda: _stepped(cell, cell.project(x), state, mask))
    if layout == "grouped":
        def ours():
            drive = cell.drive(x, seed_major=True)  # (S, T, n, G*H)
            split = tuple(part.unflatten(0, (S, n)) for part in state)
            return cell.recur(drive, split, grouped=True).flatten(1, 2)
    else:
        def ours():
            return cell.recur(cell.drive(x), state, mask)
    got = grads(ours)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradient wanted: the plain loop, the same states
        torch.testing.assert_close(ours(), want[0], rtol=1e-12, atol=1e-12)
