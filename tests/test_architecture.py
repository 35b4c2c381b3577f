"""The layering of the code base, checked from the source with ``ast`` (imports inside functions count).

- no import cycle among the project's modules;
- the packages of ``apem`` depend one way: data -> nn -> models -> inference -> eval -> train ->
  release -> dataplane/research -> cli, and ``apem`` never imports the KFP side (``apem_kfp``);
- ``components`` never import ``pipelines``;
- no function outside tests is longer than 60 lines;
- the model names have one source, the registry.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = {"apem": "apem", "components": "apem_kfp.components", "pipelines": "apem_kfp.pipelines"}
# lower index = lower layer; a module may import its own layer and the ones below
APEM_LAYERS = ["data", "nn", "models", "inference", "eval", "train", "release", "dataplane", "research", "cli"]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, str]:
    found = {}
    for folder, package in SOURCE_DIRS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    found[module] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """Every project module ``module`` imports, at any depth of its code."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_package() -> None:
    assert {"apem.data.spec", "apem.models.apem_model", "apem_kfp.components.train",
            "apem_kfp.pipelines.daily_retrain"} <= set(MODULES)
    assert "apem.data.spec" in GRAPH["apem.train.from_dirs"]  # imports are resolved, not just listed


def test_no_import_cycles() -> None:
    assert _cycles() == []


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "apem" or len(parts) < 2 or parts[1] not in APEM_LAYERS:
        return None
    return APEM_LAYERS.index(parts[1])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("apem.")))
def test_apem_imports_point_down_only(module: str) -> None:
    upward = sorted(t for t in GRAPH[module]
                    if t.startswith("apem_kfp") or (_layer(t) is not None and _layer(module) is not None
                                                    and _layer(t) > _layer(module)))
    assert upward == [], f"{module} imports a higher layer"


def test_components_never_import_pipelines() -> None:
    offenders = {m: sorted(t for t in GRAPH[m] if t.startswith("apem_kfp.pipelines"))
                 for m in MODULES if m.startswith("apem_kfp.components")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_long_functions() -> None:
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path}:{node.name} ({lines})")
    assert long == []


def test_model_names_have_one_source() -> None:
    """No hard-coded list of model names outside the registry's decorators."""
    from apem.models import list_models

    names = list_models()
    assert names[:3] == ["apem", "single_task", "shared_bottom"] and len(names) == 12
    for module, path in MODULES.items():
        text = open(path).read()
        assert not all(f'"{n}"' in text for n in ("single_task", "shared_bottom", "mmoe", "ple")), \
            f"{module} spells out the model list; use apem.models.list_models()"
