"""Report Python files and functions over the size budget (exemplars P18).

    python tools/size_budget.py [--max-file-lines 1000] [--max-function-lines 150] [PATH ...]

Scans ``packages/*/src`` by default (kernels' ``csrc/`` is C++ and not scanned). Exits 1 when
something is over budget, printing ``path:line  kind  name  lines``. Waivers live in
``WAIVERS`` below, each with its reason.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# "path" or "path::function" -> why it may exceed the budget.
WAIVERS: dict[str, str] = {}


def scan(paths: list[Path], max_file: int, max_function: int) -> list[str]:
    problems = []
    for root in paths:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            text = path.read_text()
            lines = text.count("\n") + 1
            if lines > max_file and rel not in WAIVERS:
                problems.append(f"{rel}:1  file  -  {lines} lines (budget {max_file})")
            for node in ast.walk(ast.parse(text, filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    key = f"{rel}::{node.name}"
                    if length > max_function and key not in WAIVERS:
                        problems.append(
                            f"{rel}:{node.lineno}  function  {node.name}  {length} lines "
                            f"(budget {max_function})"
                        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--max-file-lines", type=int, default=1000)
    parser.add_argument("--max-function-lines", type=int, default=150)
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "packages").glob("*/src"))
    problems = scan(paths, args.max_file_lines, args.max_function_lines)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
