"""gradscope: exact per-timestep gradient-flow profiles for recurrent networks."""

from .api import (
                  assert_gradient_health,
                  check,
                  compare,
                  export,
                  load,
                  registries,
                  run,
                  sweep,
                  sweep_spec,
)
from .config import RunConfig
from .errors import ConfigError, GradscopeError
from .report import write_report
from .results import RunResult
from .version import __version__

__all__ = [
    "ConfigError", "GradscopeError", "RunConfig", "RunResult", "__version__",
    "assert_gradient_health", "check", "compare", "export", "load", "registries", "run", "sweep",
    "sweep_spec", "write_report",
]
