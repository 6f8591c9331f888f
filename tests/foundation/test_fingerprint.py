"""Code fingerprints come from the code: the import closure of a stage module, read from source.

A synthetic package tree proves the rules (function-level imports count, TYPE_CHECKING imports and
unrelated modules do not, package data files count); the real tree proves the modules issue #16 found
missing from the old hand-kept lists are in the evaluate stage's fingerprint.
"""

from __future__ import annotations

import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from cmflow import cache
from cmflow.fingerprint import SourceTree, fingerprint, module_imports
from cmflow.stages.table import STAGES


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture()
def tree(tmp_path: Path) -> SourceTree:
    write(tmp_path, "cmflow/__init__.py", '__version__ = "0"\n')
    write(tmp_path, "cmflow/stages/__init__.py", '"""index only"""\n')
    write(
        tmp_path,
        "cmflow/stages/mystage.py",
        """
        from __future__ import annotations
        from typing import TYPE_CHECKING

        from cmflow import errors

        if TYPE_CHECKING:
            from cmflow.typing_only import Thing


        def run() -> int:
            from cmflow.helpers import deep  # only reached from inside a function

            return deep()
        """,
    )
    write(tmp_path, "cmflow/errors.py", "class Oops(Exception): ...\n")
    write(tmp_path, "cmflow/helpers.py", "from .pkg.inner import VALUE\n\ndef deep():\n    return VALUE\n")
    write(tmp_path, "cmflow/pkg/__init__.py", "")
    write(tmp_path, "cmflow/pkg/inner.py", "VALUE = 1\n")
    write(tmp_path, "cmflow/pkg/weights/net.bin", "weights-v1")
    write(tmp_path, "cmflow/typing_only.py", "Thing = int\n")
    write(tmp_path, "cmflow/unrelated.py", "X = 1\n")
    return SourceTree(tmp_path)


def key(tree: SourceTree) -> str:
    return cache.cache_key({"code": fingerprint("cmflow.stages.mystage", tree).components()})


def test_the_closure_follows_function_level_and_relative_imports_only(tree: SourceTree) -> None:
    found = fingerprint("cmflow.stages.mystage", tree)
    assert set(found.modules) == {
        "cmflow",
        "cmflow.stages",
        "cmflow.stages.mystage",
        "cmflow.errors",
        "cmflow.helpers",
        "cmflow.pkg",
        "cmflow.pkg.inner",
    }
    assert set(found.data) == {"cmflow/pkg/weights/net.bin"}
    assert found.versions == {d: metadata.version(d) for d in ("torch", "numpy")}
    where = {(i.name, i.where) for i in module_imports("cmflow.stages.mystage", tree)}
    assert ("cmflow.helpers", "function") in where and ("cmflow.typing_only", "type_checking") in where


@pytest.mark.parametrize(
    ("edited", "changes"),
    [
        ("cmflow/pkg/inner.py", True),  # reached only through a function-level import, then a relative one
        ("cmflow/pkg/weights/net.bin", True),  # a package data file of a package in the closure
        ("cmflow/stages/mystage.py", True),
        ("cmflow/unrelated.py", False),
        ("cmflow/typing_only.py", False),  # imported only for type checking: never runs
    ],
)
def test_an_edit_changes_the_key_exactly_when_the_stage_can_run_the_code(
    tree: SourceTree, edited: str, changes: bool
) -> None:
    before = fingerprint("cmflow.stages.mystage", tree).components()
    old_key = key(tree)
    path = tree.root / edited
    path.write_text(path.read_text() + "\n# edited\n")
    assert (key(tree) != old_key) is changes
    rows = cache.explain({"code": fingerprint("cmflow.stages.mystage", tree).components()}, {"code": before})
    differing = [r.component for r in rows if r.status != "same"]
    if changes:
        name = edited if edited.endswith(".bin") else edited[: -len(".py")].replace("/", ".")
        assert differing == [f"code.{'data' if edited.endswith('.bin') else 'modules'}.{name}"]
    else:
        assert differing == []


def test_a_new_import_adds_the_module_and_explain_reports_it(tree: SourceTree) -> None:
    before = {"code": fingerprint("cmflow.stages.mystage", tree).components()}
    write(
        tree.root,
        "cmflow/helpers.py",
        "from .pkg.inner import VALUE\nimport cmflow.unrelated\n\ndef deep():\n    return VALUE\n",
    )
    rows = cache.explain({"code": fingerprint("cmflow.stages.mystage", tree).components()}, before)
    assert {(r.component, r.status) for r in rows if r.status != "same"} == {
        ("code.modules.cmflow.helpers", "changed"),
        ("code.modules.cmflow.unrelated", "new"),
    }


def test_the_evaluate_stage_fingerprint_covers_what_its_results_depend_on() -> None:
    found = fingerprint(STAGES["evaluate"].fn.__module__)
    # the modules the hand-kept list had left out (issue #16), reached through function-level imports
    for module in (
        "cmflow.data.images",
        "cmflow.models.io",
        "cmflow.diffusion.noise_levels",
        "cmflow.diffusion.solvers",
        "cmflow.diffusion.samplers",
        "cmflow.metrics.extractors",
    ):
        assert module in found.modules, module
    assert "cmflow/metrics/weights/digits_features.safetensors" in found.data
    assert not [m for m in found.modules if m.startswith(("cmflow.engine", "cmflow.cli"))]


def test_the_stage_table_package_does_not_pull_every_stage_into_every_fingerprint() -> None:
    assert "cmflow.stages.evaluate.stage" not in fingerprint("cmflow.stages.demo").modules
    assert len(fingerprint("cmflow.stages.demo").modules) < 10
