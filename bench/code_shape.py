"""The shape of the code: longest module and function, SQL outside ``app/store/``.

Usage: python -m bench.code_shape
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQL = re.compile(r"^\s*((SELECT|INSERT|UPDATE|DELETE|BEGIN|CREATE|PRAGMA|WITH)\s+\S|(COMMIT|ROLLBACK)\s*$)")


def _sql_literals(tree: ast.AST) -> int:
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            count += 1
        elif isinstance(node, ast.JoinedStr):
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and SQL.match(first.value):
                count += 1
    return count


def main() -> None:
    modules, functions, sql_outside = [], [], {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        tree = ast.parse(text)
        modules.append((len(text.splitlines()), rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
        if not rel.startswith("app/store/"):
            n = _sql_literals(tree)
            if n:
                sql_outside[rel] = n
    modules.sort(reverse=True)
    functions.sort(reverse=True)
    print("longest modules:", *(f"  {n:4d} {p}" for n, p in modules[:3]), sep="\n")
    print("longest functions:", *(f"  {n:4d} {p}" for n, p in functions[:3]), sep="\n")
    print(f"SQL statements outside app/store/: {sum(sql_outside.values())}", sql_outside or "")


if __name__ == "__main__":
    main()
