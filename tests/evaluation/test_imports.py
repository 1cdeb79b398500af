"""The layout of dcdit.evaluation: no import cycle between its modules (not even inside functions,
where the old fid.py <-> mnist_classifier.py cycle hid), and no argument parsing in the library."""

from __future__ import annotations

import ast
from pathlib import Path

import dcdit.evaluation

PKG = Path(dcdit.evaluation.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules of dcdit.evaluation that ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dcdit.evaluation."):
            out.add(node.module.split(".")[2])
    return out


def test_evaluation_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    for deps in graph.values():
        deps &= set(graph)
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) != 2:
            state[m] = 1
            for d in sorted(graph[m]):
                visit(d, path + [m])
            state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert graph["metrics"] == set()  # the math depends on nothing else in the package


def test_a_function_level_cycle_is_detected(tmp_path):
    """The checker itself: the pattern of the old fid.py / mnist_classifier.py pair is seen as imports."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    assert _imports(tmp_path / "a.py") == {"b"}


def test_no_argparse_in_the_library():
    for p in PKG.glob("*.py"):
        text = p.read_text()
        assert "argparse" not in text and "add_argument" not in text, f"{p.name} parses arguments; that is dcdit.cli_evaluation's job"
