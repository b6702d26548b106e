import pytest
import torch

from gradscope.config import RunConfig
from gradscope.model import build


@pytest.fixture
def make():
    """Build (model, batch) on the CPU in float64 from RunConfig fields."""

    def _make(**options):
        built = build(RunConfig(**{"dtype": "float64", **options}), torch.device("cpu"))
        built.model.requires_grad_(False)
        return built.model, built.batch

    return _make
