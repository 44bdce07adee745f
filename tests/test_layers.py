"""The package's layering: every module of hf_mirror sits in one layer, imports only its own layer or lower ones
(imports inside functions count), and no imports go round in a cycle. Read from the source with ast: nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_mirror"

# lowest first; a name is a module or a package (the package and everything in it), relative to hf_mirror
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "distributed", "progress", "terminal", "flags", "integrity", "stacked", "trunk", "fusion",
                    "methods"}),
    ("inputs", {"cache", "ownership", "probes", "corpus", "modeling", "config"}),
    ("mechanics", {"scan", "scoring", "merge", "curvature", "linear_read", "mirror", "runs", "regime"}),
    ("retrieval", {"retrieval"}),
    ("results", {"results", "html", "render", "plots", "report"}),
    ("methods", {"pipeline", "baselines"}),
    ("applications", {"provenance", "demo", "tiny_lm"}),
    ("entry points", {"cli", ""}),  # "": hf_mirror/__init__.py, the public API
]


def _modules() -> dict[str, Path]:
    """Every module by its dotted name relative to hf_mirror ("" for the package itself, "retrieval" for a package)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at any depth (functions, methods, branches), but not under ``if TYPE_CHECKING:``
    (annotations only: never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def _relative(name: str) -> str | None:
    """``hf_mirror.x.y`` -> ``x.y`` (``hf_mirror`` -> ""), None outside the package."""
    if name == "hf_mirror":
        return ""
    return name[len("hf_mirror."):] if name.startswith("hf_mirror.") else None


def _edges(module: str, path: Path) -> set[str]:
    """The hf_mirror modules that ``module`` imports (``from package import submodule`` names the submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_relative(a.name) for a in node.names]
        else:
            if node.level:
                base = ["hf_mirror", *package.split(".")] if package else ["hf_mirror"]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            parent = _relative(name)
            if parent is None:
                continue
            targets = []
            for alias in node.names:
                sub = f"{parent}.{alias.name}" if parent else alias.name
                targets.append(sub if sub in MODULES else parent)
        out.update(t for t in targets if t is not None and t != module)
    return out


GRAPH = {m: _edges(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    """The index of ``module``'s layer: the one naming it or its closest enclosing package."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        for i, (_, members) in enumerate(LAYERS):
            if name in members:
                return i
    raise KeyError(module)


def _needed(target: str) -> list[str]:
    """What importing ``target`` runs: the module and every package above it (their ``__init__``), but not hf_mirror's
    own ``__init__`` (the public API at the top, which every import runs first)."""
    parts = target.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def test_every_module_has_a_layer():
    missing = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"place these modules in a layer of tests/test_layers.py: {missing}"
    named = [m for _, members in LAYERS for m in members]
    assert len(named) == len(set(named)), "a module is named in two layers"
    assert all(m in MODULES for m in named), f"layers name modules that do not exist: {set(named) - set(MODULES)}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in GRAPH.items():
        mine = layer_of(module)
        for target in targets:
            for needed in _needed(target):  # importing a.b runs a/__init__.py first
                theirs = layer_of(needed)
                if theirs > mine:
                    upward.append(f"{module or 'hf_mirror'} ({LAYERS[mine][0]}) -> {needed} ({LAYERS[theirs][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(set(upward)))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(m or "hf_mirror" for m in cycle)


def test_the_checks_see_what_they_must():
    """The walk finds imports inside functions, skips TYPE_CHECKING blocks, and the checks catch a cycle and an upward
    edge."""
    assert "html" in GRAPH["results"]  # imported inside AttributionResult.to_html
    assert "results" not in GRAPH["html"] and "results" not in GRAPH["render"]  # under TYPE_CHECKING
    assert "retrieval" in GRAPH["pipeline"] and "retrieval.ngram" in GRAPH["provenance.generation"]
    assert "pipeline" in GRAPH["provenance.generation"]  # inside generation_provenance
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("retrieval.bm25") == layer_of("retrieval") < layer_of("pipeline") < layer_of("provenance.leakage")
    with pytest.raises(KeyError):
        layer_of("no_such_module")


def test_retrieval_stands_below_the_pipeline_and_provenance():
    """BM25, dense retrieval, the candidates and the saved index import neither the pipeline, provenance nor the
    baselines (which load torch, peft and every scorer)."""
    for module, targets in GRAPH.items():
        if module.split(".")[0] == "retrieval":
            above = {t for t in targets if t.split(".")[0] in ("pipeline", "provenance", "baselines", "methods")}
            assert not above, f"{module} imports {above}"


def test_config_is_data_only():
    """config.py holds the settings (the dataclasses, every default, the parsing of their values) and imports only the
    errors and the flags; what reads a model (block_indices, lora_config) is in mirror.py."""
    assert GRAPH["config"] <= {"errors", "flags"}
    tree = ast.parse(MODULES["config"].read_text())
    takes_a_model = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                     and any(a.arg == "model" for a in f.args.args + f.args.kwonlyargs)]
    assert not takes_a_model
