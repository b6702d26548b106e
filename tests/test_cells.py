"""Each cell's step function computes what torch.nn.RNN / LSTM / GRU compute with its weights."""

import pytest
import torch

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
