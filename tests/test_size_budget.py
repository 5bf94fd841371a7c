"""Files and functions stay within the size budget (tools/size_budget.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("size_budget", ROOT / "tools" / "size_budget.py")
size_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(size_budget)


def test_packages_within_budget():
    problems = size_budget.scan(sorted((ROOT / "packages").glob("*/src")), 1000, 150)
    assert not problems, "over the size budget:\n" + "\n".join(problems)


def test_budget_checker_flags_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(200))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    problems = size_budget.scan([tmp_path], 1000, 150)
    assert len(problems) == 1 and "long" in problems[0] and "201 lines" in problems[0]
