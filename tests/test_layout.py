"""The architecture, checked: data flows one way, and the lowest layers and the CLI hold no
torch code."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "gradscope"

# Each module may import only modules of a lower or equal layer (STYLE.md: lower layers never
# import higher ones).
LAYERS = [
    {"version", "errors", "registry", "config", "files", "summary"},  # no torch
    {"activations", "cells", "inits", "tasks", "probes"},  # the zoo
    {"engine"},
    {"model"},
    {"results", "train"},
    {"plots", "measure"},
    {"runner"},
    {"api", "__init__"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
NO_TORCH = {"version", "errors", "registry", "config", "files", "summary", "results", "plots",
            "cli"}


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


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(RANK), set(MODULES) - set(RANK)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    for name in _imports(PACKAGE / f"{module}.py"):
        if name.startswith("gradscope.") and name != "gradscope.__init__":
            target = name.split(".")[1]
            assert RANK[target] <= RANK[module], f"{module} imports the higher layer {target}"
        if module in NO_TORCH:
            assert not name.split(".")[0] == "torch", f"{module} imports torch"
