"""Code fingerprints derived from the code itself: the import closure of a stage module, read as source.

A stage's cached output may be reused only while the code that produced it is unchanged. Hand-kept
dependency lists go stale (an edit to a module nobody listed reuses old results: Kubeflow #7939, ZenML
#3975, Flyte #4672), so the fingerprint is computed from the source tree instead:

* **modules** -- the stage module and every ``cmflow`` module it imports, transitively, at module level
  *or inside functions* (found by parsing the source with :mod:`ast`, never by importing it), plus the
  packages that contain them (their ``__init__`` runs on import). Imports under ``if TYPE_CHECKING:``
  are left out: they never run. Each module contributes the sha256 of its source bytes.
* **data** -- the package data files those packages ship (every non-Python file in a package folder and in
  its non-package sub-folders, e.g. the digits feature-net weights in ``cmflow/metrics/weights/``), by
  sha256.
* **versions** -- the installed versions of the numerical libraries every stage computes with (torch,
  numpy).

The fingerprint is kept as these three maps (so ``cmflow cache explain`` can name the module that
changed) and folded into the cache key. Results of parsing are memoised per file on (mtime, size).
"""

from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "VERSIONED_PACKAGES",
    "Fingerprint",
    "Import",
    "SourceTree",
    "fingerprint",
    "module_imports",
]

PACKAGE = "cmflow"
VERSIONED_PACKAGES = ("torch", "numpy")
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".py", ".pyc", ".pyo")

Where = Literal["module", "function", "type_checking"]


@dataclass(frozen=True)
class Import:
    """One ``cmflow`` module named by an import statement, and where the statement sits."""

    name: str
    where: Where
    line: int


@dataclass(frozen=True)
class SourceTree:
    """Maps ``cmflow.*`` module names to files under ``root`` (the folder that holds the ``cmflow`` package)."""

    root: Path

    @classmethod
    def installed(cls) -> SourceTree:
        return cls(Path(__file__).resolve().parent.parent)

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        file = base.with_suffix(".py")
        return file if file.is_file() else None

    def is_package(self, module: str) -> bool:
        return self.root.joinpath(*module.split("."), "__init__.py").is_file()

    def modules(self) -> list[str]:
        """Every module of the package, sorted."""
        names = []
        for path in sorted((self.root / PACKAGE).rglob("*.py")):
            if _SKIP_DIRS.intersection(path.parts):
                continue
            parts = path.relative_to(self.root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return names


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's code consists of; ``components()`` goes into the cache key."""

    modules: dict[str, str] = field(default_factory=dict)  # module name -> sha256 of its source
    data: dict[str, str] = field(default_factory=dict)  # path relative to the root -> sha256
    versions: dict[str, str] = field(default_factory=dict)  # distribution -> version

    def components(self) -> dict[str, Any]:
        return {
            "modules": dict(sorted(self.modules.items())),
            "data": dict(sorted(self.data.items())),
            "versions": dict(sorted(self.versions.items())),
        }


# -- reading imports -----------------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, tree: SourceTree) -> list[str]:
    """The ``cmflow`` modules an import statement loads (``from a import b`` loads ``a.b`` if it is one)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = _resolve(node, module, is_package)
        candidates = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            candidates.append(sub if alias.name != "*" and tree.path(sub) is not None else base)
    found = []
    for name in candidates:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        while name and tree.path(name) is None:  # "cmflow.x.attr" -> "cmflow.x"
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


@lru_cache(maxsize=4096)
def _parse(path: str, mtime_ns: int, size: int, module: str, is_package: bool, root: str) -> tuple:
    source = Path(path).read_bytes()
    tree = SourceTree(Path(root))
    found: list[Import] = []

    def visit(body: list[ast.stmt], where: Where) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.extend(Import(n, where, node.lineno) for n in _names(node, module, is_package, tree))
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.body, "type_checking")
                visit(node.orelse, where)
                continue
            inner: Where = (
                "function"
                if where == "module" and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                else where
            )
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], inner)
                elif isinstance(child, ast.excepthandler):
                    visit(child.body, inner)

    visit(ast.parse(source, filename=path).body, "module")
    return hashlib.sha256(source).hexdigest(), tuple(found)


def _read(module: str, tree: SourceTree) -> tuple[str, tuple[Import, ...]]:
    path = tree.path(module)
    if path is None:
        raise ModuleNotFoundError(f"no source for {module} under {tree.root}")
    stat = path.stat()
    return _parse(str(path), stat.st_mtime_ns, stat.st_size, module, tree.is_package(module), str(tree.root))


def module_imports(module: str, tree: SourceTree | None = None) -> tuple[Import, ...]:
    """Every ``cmflow`` import statement of ``module`` (module level, in functions, under TYPE_CHECKING)."""
    return _read(module, tree or SourceTree.installed())[1]


# -- the closure ----------------------------------------------------------------------------------------------


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(module: str, tree: SourceTree | None = None) -> dict[str, str]:
    """``{module: sha256}`` of ``module`` and everything it imports at run time, transitively."""
    tree = tree or SourceTree.installed()
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        digest, imports = _read(name, tree)
        seen[name] = digest
        pending.extend(p for p in _parents(name) if tree.path(p) is not None)
        pending.extend(i.name for i in imports if i.where != "type_checking")
    return seen


def _data_files(package: str, tree: SourceTree) -> dict[str, str]:
    folder = tree.root.joinpath(*package.split("."))
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not (here / d / "__init__.py").exists()
        )
        for name in sorted(filenames):
            if not name.endswith(_SKIP_SUFFIXES):
                path = here / name
                found[path.relative_to(tree.root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def fingerprint(module: str, tree: SourceTree | None = None) -> Fingerprint:
    """The fingerprint of a stage module: its import closure, their packages' data files, library versions."""
    tree = tree or SourceTree.installed()
    modules = closure(module, tree)
    data: dict[str, str] = {}
    for name in modules:
        if tree.is_package(name):
            data.update(_data_files(name, tree))
    return Fingerprint(modules, data, {d: _version(d) for d in VERSIONED_PACKAGES})
