"""The import order of docs/design.md's package map, read from the code's own imports.

Every `import` and `from ... import` in fbnet_jax/ and data_pipelines/ counts, at module level or
inside a function (a function-level import is a dependency that waits; it is still one). A layer
may import itself and the layers below it; `train` and `serve` are siblings and never import each
other; `data_pipelines` imports nothing of fbnet_jax but `core`, and only `eval` and the layers
above it read data. The modules of both packages form no import cycle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fbnet_jax", "data_pipelines")

# docs/design.md#package-map: each layer and what it may import (besides itself).
BELOW = {
    "core": set(),
    "config": {"core"},
    "model": {"config", "core"},
    "runtime": {"model", "config", "core"},
    "eval": {"runtime", "model", "config", "core", "data"},
    "train": {"eval", "runtime", "model", "config", "core", "data"},
    "serve": {"eval", "runtime", "model", "config", "core", "data"},
    "cli": {"train", "serve", "eval", "runtime", "model", "config", "core", "data"},
    # The package's own __init__ and __main__: the public facade, above everything.
    "top": {"cli", "train", "serve", "eval", "runtime", "model", "config", "core", "data"},
    "data": {"core"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "data_pipelines":
        return "data"
    if len(parts) == 1 or parts[1] == "__main__":
        return "top"
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module of the two packages) for every import statement in the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b` imports the module a.b when there is one, else a's name b.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else source for alias in node.names]
        else:
            continue
        found += [(node.lineno, target) for target in targets
                  if target.split(".")[0] in PACKAGES]
    return found


def scan(root: Path) -> dict[str, list[tuple[int, str]]]:
    files = {module_name(p, root): p for package in PACKAGES
             for p in sorted((root / package).rglob("*.py"))}
    return {name: imports_of(path, root, set(files)) for name, path in files.items()}


def forbidden(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        mine = layer_of(module)
        for line, target in imports:
            theirs = layer_of(target)
            if theirs != mine and theirs not in BELOW[mine]:
                problems.append(f"{module}:{line} imports {target} ({mine} -> {theirs})")
    return problems


def cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    edges = {m: sorted({t for _, t in imports if t in graph and t != m})
             for m, imports in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = itertools.count()

    def visit(node):
        index[node] = low[node] = next(counter)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_imports_follow_the_layers():
    assert forbidden(scan(REPO)) == []


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is not a cycle of the house.
    graph = {m: [(line, t) for line, t in imports if not m.startswith(t + ".")]
             for m, imports in scan(REPO).items()}
    assert cycles(graph) == []


def test_every_layer_is_a_package_of_the_map():
    layers = {p.name for p in (REPO / "fbnet_jax").iterdir()
              if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == set(BELOW) - {"top", "data"}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # serve never imports train, even inside a function.
    ({"fbnet_jax/serve/predict.py": "def f():\n    from fbnet_jax.train import loop\n",
      "fbnet_jax/train/loop.py": ""},
     ["fbnet_jax.serve.predict:2 imports fbnet_jax.train.loop (serve -> train)"]),
    # data_pipelines reads only core of the library.
    ({"data_pipelines/pipeline.py": "from fbnet_jax.eval import metrics\n",
      "fbnet_jax/eval/metrics.py": ""},
     ["data_pipelines.pipeline:1 imports fbnet_jax.eval.metrics (data -> eval)"]),
    # A relative import upwards.
    ({"fbnet_jax/model/losses.py": "from ..runtime import state\n",
      "fbnet_jax/runtime/state.py": ""},
     ["fbnet_jax.model.losses:1 imports fbnet_jax.runtime.state (model -> runtime)"]),
    # Downwards is fine.
    ({"fbnet_jax/train/loop.py": "from fbnet_jax.eval import metrics\nimport data_pipelines\n",
      "fbnet_jax/eval/metrics.py": ""}, []),
])
def test_the_checker_names_a_forbidden_import(tmp_path, files, expected):
    assert forbidden(scan(_tree(tmp_path, files))) == expected


def test_the_checker_finds_a_cycle(tmp_path):
    root = _tree(tmp_path, {"fbnet_jax/eval/report.py": "from fbnet_jax.eval import compound\n",
                            "fbnet_jax/eval/compound.py":
                                "def f():\n    from fbnet_jax.eval import report\n"})
    assert cycles(scan(root)) == [["fbnet_jax.eval.compound", "fbnet_jax.eval.report"]]


def test_the_design_notes_name_every_module():
    # docs/design.md's "### Modules" block names every module of both packages by file name.
    text = (REPO / "docs" / "design.md").read_text()
    block = text.split("### Modules", 1)[1].split("```", 2)[1]
    names = {p.name for package in PACKAGES for p in (REPO / package).rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py")}
    assert sorted(n for n in names if n not in block) == []
