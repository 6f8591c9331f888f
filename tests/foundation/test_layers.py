"""The layer table of docs/architecture.md, checked on the source: imports point down, never up or round.

Every ``cmflow`` import statement counts -- at module level and inside functions -- except those under
``if TYPE_CHECKING:`` (they never run). Each module may import modules of its own layer or lower layers
only, the import graph has no cycle, and each layer's third-party imports stay within what it may use.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from cmflow.fingerprint import SourceTree, module_imports

# (layer, module prefixes), lowest first; a module belongs to the first layer with a matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("cmflow.errors", "cmflow.redact")),
    ("math", ("cmflow.diffusion", "cmflow.models", "cmflow.metrics")),
    ("loops", ("cmflow.training",)),
    ("io", ("cmflow.storage", "cmflow.data", "cmflow.loaders")),
    ("core", ("cmflow.spec", "cmflow.stage", "cmflow.cache", "cmflow.fingerprint", "cmflow.gc")),
    ("services", ("cmflow.mlflow_client", "cmflow.registry", "cmflow.serving", "cmflow.interop")),
    ("distributed", ("cmflow.distributed",)),
    ("stages", ("cmflow.stages",)),
    ("engine", ("cmflow.validate", "cmflow.engine", "cmflow.submit", "cmflow.schedule", "cmflow.scheduler")),
    ("cli", ("cmflow.cli",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
HEAVY = {"ray", "mlflow", "fsspec", "s3fs", "pydantic", "typer", "yaml", "rich", "boto3", "botocore"}
# third-party packages a layer must not import (anywhere in its modules)
FORBIDDEN: dict[str, set[str]] = {
    "base": HEAVY | {"torch", "numpy"},
    "math": HEAVY | {"PIL", "sklearn", "torchvision"},
    "loops": HEAVY | {"PIL", "sklearn", "torchvision"},
    "io": {"ray", "mlflow", "pydantic", "typer", "rich"},
    "core": {"ray", "mlflow", "typer", "rich", "torch"},
    "services": {"ray", "typer", "rich"},
    "distributed": {"mlflow", "typer", "rich"},
    "stages": {"typer", "rich"},
    "engine": {"typer"},
    "cli": set(),
}
TREE = SourceTree.installed()
MODULES = [m for m in TREE.modules() if m != "cmflow"]


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")


def third_party(module: str) -> Iterator[tuple[str, int]]:
    path = TREE.path(module)
    assert path is not None
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module: str) -> None:
    mine = RANK[layer_of(module)]
    for found in module_imports(module, TREE):
        if found.where == "type_checking" or found.name == "cmflow":
            continue
        theirs = layer_of(found.name)
        assert RANK[theirs] <= mine, (
            f"{module} ({layer_of(module)}) imports {found.name} ({theirs}) at line {found.line}, {found.where} "
            "level: an upward import"
        )


@pytest.mark.parametrize("module", MODULES)
def test_third_party_imports_fit_the_layer(module: str) -> None:
    banned = FORBIDDEN[layer_of(module)]
    bad = sorted({(name, line) for name, line in third_party(module) if name in banned})
    assert not bad, f"{module} ({layer_of(module)}) imports {bad}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = {
        m: {i.name for i in module_imports(m, TREE) if i.where != "type_checking" and i.name != "cmflow"}
        for m in MODULES
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, "import cycle: " + " -> ".join(path[path.index(node) :] + [node])
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for module in MODULES:
        visit(module, [])
