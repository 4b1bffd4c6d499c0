"""The shape of the code: one-way imports, typed stages, one encoder per result type."""

from __future__ import annotations

import typing
from pathlib import Path

import grimp
import pytest

import dicomnode
from dicomnode.pipelines import types
from dicomnode.results.encode import ENCODERS

REPO = Path(dicomnode.__file__).resolve().parents[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a graph: its strongly connected components of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_dicomnode_is_in_an_import_circle() -> None:
    """Every import counts, also those inside functions and under TYPE_CHECKING."""
    graph = grimp.build_graph("dicomnode")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def test_the_layer_contracts_in_pyproject_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()
    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=str(REPO / "pyproject.toml")) is True


def test_the_stage_types_module_is_a_leaf() -> None:
    """``pipelines.types`` imports no stage: only the data types of the layers below."""
    graph = grimp.build_graph("dicomnode")
    imported = graph.find_modules_directly_imported_by("dicomnode.pipelines.types")
    assert imported <= {
        "dicomnode.inference.box",
        "dicomnode.inference.geometry",
        "dicomnode.inference.registry",
        "dicomnode.volume",
    }


def test_every_study_result_type_has_an_encoder() -> None:
    assert set(typing.get_args(types.StudyAnalysis)) == set(ENCODERS)


def test_a_receiving_process_does_not_load_opencv_or_keras() -> None:
    """``serve`` (and so every receiving process) imports the pipeline registry and the
    stage types, not the workers' libraries."""
    import subprocess
    import sys

    code = (
        "import dicomnode.serve, sys; "
        "print(sorted({'cv2', 'keras', 'tensorflow'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"
