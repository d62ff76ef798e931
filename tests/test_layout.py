"""The house rules issue 27 set, kept by tests: short functions, an engine that knows nothing of LoRA,
a command line that only dispatches."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONGEST_BODY = 70  # lines after the docstring ("about 60")
TABLES = {("pipeline/contract.py", "_rows")}  # declarative: one expectation after another


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def body_lines(node) -> int:
    body = node.body
    documented = len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return node.end_lineno - (body[1] if documented else body[0]).lineno + 1


def test_no_function_in_the_package_is_long():
    long = {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({body_lines(node)} lines)"
        for path in (ROOT / "pipeline").rglob("*.py")
        for node in functions(path)
        if body_lines(node) > LONGEST_BODY and (path.relative_to(ROOT).as_posix(), node.name) not in TABLES
    }
    assert not long, "split these: " + ", ".join(sorted(long))


def test_the_engine_does_not_import_lora():
    """train/ takes what trains and how a checkpoint is exported from its caller (stages/train.py)."""
    for path in (ROOT / "pipeline/train").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"pipeline.lora", "peft"} & imported, f"{path.relative_to(ROOT)} imports LoRA"
        assert "peft_config" not in path.read_text(), f"{path.relative_to(ROOT)} tests for a PEFT model"


def test_the_command_line_only_dispatches():
    """Every stage command in cli.py is a few lines: parse options, run the stage, print."""
    tree = ast.parse((ROOT / "pipeline/cli.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert body_lines(node) <= 12, f"pipeline/cli.py {node.name}: move its logic into pipeline/stages/"
