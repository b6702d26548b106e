"""What the literature says, measured at initialisation on the standard preset's configurations
(one seed, no training, small sizes): the report's headline claims, as tests."""

import pytest

import gradscope

BASE = dict(task="adding", seq_len=60, hidden=32, batch=8, dtype="float32")


def _slope(probe="grad_h0", **options):
    return gradscope.run(**{**BASE, **options}, probes=(probe,)).summary[probe].slope


@pytest.fixture(scope="module")
def slopes():
    return {
        "sigmoid": _slope(cell="rnn", activation="sigmoid", init="pytorch"),
        "tanh": _slope(cell="rnn", activation="tanh", init="pytorch"),
        "tanh-orthogonal": _slope(cell="rnn", activation="tanh", init="orthogonal"),
        "tanh-identity": _slope(cell="rnn", activation="tanh", init="identity"),
        "irnn": _slope(cell="rnn", activation="relu", init="identity"),
        "lstm": _slope("jacobian_c", cell="lstm"),
        "lstm-fb3": _slope("jacobian_c", cell="lstm", forget_bias=3.0),
    }


def test_sigmoid_vanishes_faster_than_tanh_and_both_fast(slopes):
    assert slopes["sigmoid"] < slopes["tanh"] < -0.15


@pytest.mark.parametrize("remedy", ["tanh-orthogonal", "tanh-identity", "irnn"])
def test_orthogonal_and_identity_keep_the_gradient_far_longer(slopes, remedy):
    assert slopes[remedy] > slopes["tanh"] / 10  # at least ten times shallower


def test_raised_forget_bias_holds_the_cell_state_path(slopes):
    assert slopes["lstm"] < -0.1 and slopes["lstm-fb3"] > -0.02
