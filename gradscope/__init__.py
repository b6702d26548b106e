"""gradscope: exact per-timestep gradient-flow profiles for recurrent networks."""

__version__ = "0.1.0"

from .api import registries, run  # noqa: E402
from .config import RunConfig  # noqa: E402
from .errors import ConfigError, GradscopeError  # noqa: E402
from .results import RunResult  # noqa: E402

__all__ = ["ConfigError", "GradscopeError", "RunConfig", "RunResult", "registries", "run"]
