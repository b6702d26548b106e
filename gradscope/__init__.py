"""gradscope: exact per-timestep gradient-flow profiles for recurrent networks.

The API's functions are imported on first use (PEP 562), so that importing the package, and
the command line's help and usage errors, do not wait for torch, pandas and matplotlib.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .errors import ConfigError, GradscopeError
from .version import __version__

_LAZY = {  # name -> the module that defines it
    **dict.fromkeys(("assert_gradient_health", "check", "compare", "cost_note", "export",
                     "load", "profile", "ranking", "registries", "report_probe", "run",
                     "sweep", "sweep_spec"), "api"),
    "write_report": "report",
    "RunResult": "results",
    "ModelProfile": "results",
}

__all__ = [
    "ConfigError", "GradscopeError", "ModelProfile", "RunConfig", "RunResult", "__version__",
    "assert_gradient_health", "check", "compare", "cost_note", "export", "load", "profile",
    "ranking", "registries", "report_probe", "run", "sweep", "sweep_spec", "write_report",
]

if TYPE_CHECKING:
    from .api import (
        assert_gradient_health,
        check,
        compare,
        cost_note,
        export,
        load,
        profile,
        ranking,
        registries,
        report_probe,
        run,
        sweep,
        sweep_spec,
    )
    from .report import write_report
    from .results import ModelProfile, RunResult


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package, and two of them are named
    like API functions (gradscope.check, gradscope.sweep): the functions keep those names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    """The API (``__all__``), for completion in a notebook: not this file's own imports."""
    return sorted(__all__)
