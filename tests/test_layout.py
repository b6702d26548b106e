"""The architecture, checked: data flows one way, and the lowest layers and the CLI hold no
torch code."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "gradscope"

# Each module may import only modules of a lower or equal layer (STYLE.md: lower layers never
# import higher ones).
LAYERS = [
    {"version", "errors", "registry", "config", "files", "summary", "checkconfig"},  # no torch
    {"activations", "cells", "inits", "tasks", "probes", "linear", "cudagraphs"},  # the zoo
    {"engine"},
    {"model", "usermodel"},
    {"results", "train", "check"},
    {"plots", "measure", "store", "theory"},
    {"runner"},
    {"batched", "modelprofile"},
    {"executors"},
    {"sweep", "report", "gate"},
    {"api", "__init__"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
NO_TORCH = {"version", "errors", "registry", "config", "files", "summary", "results", "plots",
            "store", "report", "cli", "checkconfig", "check"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within gradscope
                if node.module:
                    found.add("gradscope." + node.module.split(".")[0])
                else:
                    found.update("gradscope." + a.name for a in node.names)
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py")) + ["report"]


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(RANK), set(MODULES) - set(RANK)


def _files(module: str) -> list[Path]:
    if (PACKAGE / module).is_dir():  # a subpackage is one layer
        return sorted((PACKAGE / module).glob("*.py"))
    return [PACKAGE / f"{module}.py"]


def _imports_of(module: str) -> set[str]:
    names = set()
    for path in _files(module):
        for name in _imports(path):
            if path.parent.name == module and name.startswith("gradscope."):
                # inside the subpackage, "from .data" is a sibling; "from ..store" is above
                names.add(name if name.split(".")[1] in RANK else f"gradscope.{module}")
            else:
                names.add(name)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    for name in _imports_of(module):
        if name.startswith("gradscope.") and name != "gradscope.__init__":
            target = name.split(".")[1]
            assert RANK[target] <= RANK[module], f"{module} imports the higher layer {target}"
        if module in NO_TORCH:
            assert not name.split(".")[0] == "torch", f"{module} imports torch"
