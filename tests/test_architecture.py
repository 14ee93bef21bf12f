"""The code's shape, as docs/ARCHITECTURE.md describes it: layers, imports, named functions, and
functions short enough to read. Static checks on the source; nothing is imported or run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

PKG = ROOT / "sftkit"
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def module_name(path: Path) -> str:
    return path.relative_to(PKG).with_suffix("").as_posix()


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def doc_layer_rows() -> list[list[str]]:
    """The modules column of each row of the table under '## Layers', top layer first."""
    table = DOC.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| layer")]
    return [re.findall(r"`([\w/]+)`", row.split("|")[2]) for row in rows]


def doc_layers() -> dict[str, int]:
    """module -> layer number (0 = top)."""
    return {m: depth for depth, row in enumerate(doc_layer_rows()) for m in row}


def sftkit_imports(path: Path) -> set[str]:
    """The sftkit modules a file imports (the package root as "__init__"), lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sftkit":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "sftkit"]
        for name in names:
            mod = name.removeprefix("sftkit").lstrip(".").replace(".", "/") or "__init__"
            if mod in MODULES:
                found.add(mod)
            elif mod.endswith("/__init__") or f"{mod}/__init__" in MODULES:
                found.add(f"{mod}/__init__")
    return found


def test_every_module_is_in_exactly_one_layer():
    layers = doc_layers()
    listed = [m for row in doc_layer_rows() for m in row]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    missing = sorted(set(MODULES) - set(layers) - {"data/__init__"})
    assert not missing, f"modules missing from docs/ARCHITECTURE.md: {missing}"
    stale = sorted(set(layers) - set(MODULES))
    assert not stale, f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"


def test_imports_only_go_down():
    layers = doc_layers()
    layers["data/__init__"] = layers["data/dataset"]
    upward = [f"{mod} -> {dep}" for mod, path in MODULES.items() for dep in sftkit_imports(path)
              if layers[dep] < layers[mod]]
    assert not upward, f"imports against the layers of docs/ARCHITECTURE.md: {upward}"


def import_cycles() -> list[list[str]]:
    """Chains of imports that come back to where they started (lazy imports inside functions
    count: Python never fails on them, but the modules still cannot be read or tested apart): the
    shortest one through each module that is on one, each once, as [a, b, c, a] from its first
    module in sorted order."""
    graph = {mod: sorted(sftkit_imports(path) - {mod}) for mod, path in MODULES.items()}
    found = set()
    for start in graph:
        came_from, todo = {}, [start]
        while todo and start not in came_from:  # breadth first: the shortest way back to start
            mod = todo.pop(0)
            for dep in graph.get(mod, []):
                if dep not in came_from:
                    came_from[dep] = mod
                    todo.append(dep)
        if start in came_from:
            cycle, mod = [], start
            while not cycle or mod != start:
                cycle.append(mod)
                mod = came_from[mod]
            cycle.reverse()
            first = cycle.index(min(cycle))
            found.add(tuple(cycle[first:] + cycle[:first]))
    return sorted([*cycle, cycle[0]] for cycle in found)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that stand alone as statements (module, class, function
    and attribute docstrings): prose, not code."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def checkpoint_names() -> dict[str, str]:
    """NAME -> text of every module-level string constant of sftkit/checkpoint.py: the names of
    the files and folders of a checkpoint and of final/ (`rng_{rank}.pt`: a template)."""
    return {t.id: node.value.value for node in ast.parse(MODULES["checkpoint"].read_text()).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets if isinstance(t, ast.Name)}


def spelled_names(path: Path, names: dict[str, str]) -> list[str]:
    """Where `path` spells one of `names` in code (not in a docstring). A name with a dot, dash,
    underscore or placeholder is looked for in every string (its text before any placeholder); a
    plain word ("final", "model") only where it is a path (an operand of `/`, or after a slash) or
    the value of a module-level constant."""
    tree = ast.parse(path.read_text())
    prose = docstrings(tree)
    pathlike = {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                for side in (node.left, node.right)}
    pathlike |= {id(node.value) for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
            continue
        for const, name in names.items():
            plain = re.fullmatch(r"\w+", name) and "_" not in name
            hit = (id(node) in pathlike and node.value == name
                   or re.search(rf"/{name}(/|$)", node.value)) if plain else name.split("{")[0] in node.value
            if hit:
                found.append(f"sftkit/{module_name(path)}.py:{node.lineno} spells {node.value!r} (checkpoint.{const})")
    return found


def test_checkpoint_file_names_are_spelled_only_in_checkpoint_py():
    names = checkpoint_names()
    assert {"FINAL_DIR", "STATE_DIR", "MODEL_DIR", "TRAINER_STATE", "DCP_DIR", "RNG_FILE"} <= set(names)
    spelled = [hit for mod, path in MODULES.items() if mod != "checkpoint" for hit in spelled_names(path, names)]
    assert not spelled, f"checkpoint file names outside sftkit/checkpoint.py: {spelled}"


def test_the_data_package_never_sees_the_run_config():
    for mod, path in MODULES.items():
        if mod.startswith("data/"):
            bad = sftkit_imports(path) & {"config", "__init__"}
            assert not bad, f"sftkit/{mod}.py imports {bad}"


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def test_the_flow_names_real_files_and_functions():
    flow = DOC.split("## One batch", 1)[1]
    rows = [ln.split("|") for ln in flow.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 10
    for row in rows:
        file = re.search(r"`(sftkit/[\w/]+\.py)`", row[2]).group(1)
        assert (ROOT / file).is_file(), file
        for fn in re.findall(r"`([\w.]+)`", row[3]):
            assert fn in defined_names(ROOT / file), f"{file} defines no {fn}"


def function_lengths():
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"sftkit/{mod}.py:{node.name}", node.end_lineno - node.lineno + 1


def test_functions_are_short_and_the_loop_shorter():
    lengths = dict(function_lengths())
    assert not {k: n for k, n in lengths.items() if n > 80}, "functions over 80 lines"
    assert lengths["sftkit/train.py:fit"] < 60


def sftkit_module_aliases(tree: ast.AST) -> set[str]:
    """The names a file binds to sftkit modules: `import sftkit.train` binds sftkit,
    `from sftkit import train` binds train."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "sftkit"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sftkit":
            for a in node.names:
                if f"{node.module}/{a.name}".replace(".", "/").removeprefix("sftkit/") in MODULES:
                    names.add(a.asname or a.name)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_never_patches_sftkit(path):
    """The benches measure sftkit as it ships: no assignment to an attribute of an sftkit module."""
    tree = ast.parse(path.read_text())
    aliases = sftkit_module_aliases(tree)
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            root = t
            while isinstance(root, ast.Attribute):
                root = root.value
            assert not (isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in aliases), \
                f"{path.name}:{node.lineno} assigns to an attribute of an sftkit module"
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "setattr":
            first = node.args[0] if node.args else None
            assert not (isinstance(first, ast.Name) and first.id in aliases), f"{path.name}:{node.lineno} setattr"
