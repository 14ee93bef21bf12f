"""Count the assertions of the test suite, per test, so that a commit that moves tests can show
that none was lost: `python tests/count_assertions.py [--table] [DIR]` (DIR: tests/).

An assertion is an `assert` statement or a `pytest.raises` / `pytest.warns` block or call. A test
is a `test_*` function (or method of a `Test*` class) in a `test_*.py` file; a helper's assertions
(in conftest.py or another module) count once, under the helper's name, not once per caller.
Read off the source (ast), so a test that is skipped here still counts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def assertions(node: ast.AST) -> int:
    """`assert` statements plus pytest.raises/pytest.warns uses under `node`."""
    def counts(sub: ast.AST) -> bool:
        if isinstance(sub, ast.Assert):
            return True
        return (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in ("raises", "warns")
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id == "pytest")

    return sum(counts(sub) for sub in ast.walk(node))


def count(root: Path) -> dict[str, int]:
    """{"path::test" or "path::helper": assertions} for every function that holds any (tests: all)."""
    table: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        is_test_file = path.name.startswith("test_")
        for node in tree.body:
            funcs = [(node.name, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            if isinstance(node, ast.ClassDef):
                funcs = [(f"{node.name}::{f.name}", f) for f in node.body
                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for name, func in funcs:
                n = assertions(func)
                is_test = is_test_file and func.name.startswith("test_")
                if is_test or n:
                    table[f"{rel}::{name}"] = n
    return table


def main(argv: list[str]) -> None:
    root = Path(next((a for a in argv if not a.startswith("-")), Path(__file__).parent)).resolve()
    table = count(root)
    if "--table" in argv:
        for name, n in table.items():
            print(f"{n:4d}  {name}")
    tests = sum(1 for name in table if name.rsplit("::", 1)[-1].startswith("test_"))
    print(f"{sum(table.values())} assertions in {len(table)} functions ({tests} tests)")


if __name__ == "__main__":
    main(sys.argv[1:])
