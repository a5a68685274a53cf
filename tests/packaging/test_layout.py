"""The package's shape: no import cycle between its modules (imports inside functions count too), no function
outside ``kernels/`` longer than 90 lines, the torchrun entry ``lgvq_fast/train.py`` at most 200 lines."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lgvq_fast"


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path, name, known):
    """The lgvq_fast modules ``path`` imports, anywhere in the file (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _cycle(graph):
    """One import cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph():
    mods = _modules()
    graph = {name: _imports(path, name, mods) for name, path in mods.items()}
    # a package's modules import through the package's __init__ only when they name it; a submodule import
    # (``from lgvq_fast.models.vqgan import ...``) loads the parent package first, which may import the submodule
    # back: that is how Python packages work, not a cycle, so edges from a package to its own submodules are dropped
    return {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}


def test_no_import_cycle():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["lgvq_fast.training.metrics"] = graph["lgvq_fast.training.metrics"] | {"lgvq_fast.train"}
    found = _cycle(graph)
    assert found and found[0] == found[-1] and "lgvq_fast.train" in found


def _long_functions(limit):
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_90_lines_outside_kernels():
    # kernels/ (Triton kernel bodies) lies outside lgvq_fast/ in the source tree
    assert not _long_functions(90)


def test_train_entry_stays_short():
    n = len((PACKAGE / "train.py").read_text().splitlines())
    assert n <= 200, f"lgvq_fast/train.py has {n} lines; its pieces belong in lgvq_fast/training/"


@pytest.mark.parametrize("legacy", ["train_config", "train_utils", "train_graph"])
def test_training_modules_live_in_the_training_package(legacy):
    assert not (PACKAGE / f"{legacy}.py").exists()
