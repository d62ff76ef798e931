"""dvc.yaml lists, for each stage, every package module its `sft` command runs: a change to any of them
re-runs the stage, so dvc.lock never certifies results the current code would not produce.

The modules are derived from the code: the command's function in pipeline/cli.py (and the edge every
command runs through, pipeline/cli.py and pipeline/console.py), then every `pipeline` import of each
module reached, those inside functions included (a lazy import still runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EDGE = ("pipeline/cli.py", "pipeline/console.py")  # every `sft <stage>` runs through these


def module_file(name: str) -> str | None:
    """pipeline.x.y -> its file relative to the repository, or None when it is not a module of ours."""
    parts = name.split(".")
    if parts[0] != "pipeline":
        return None
    for candidate in (Path(*parts).with_suffix(".py"), Path(*parts) / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate.as_posix()
    return None


def imported(node: ast.AST) -> set[str]:
    """Files of the pipeline modules imported anywhere under `node` (module level or in functions)."""
    files = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            # `from pipeline.stages import validate`: a submodule when there is one, else a name in the module
            names = [item.module] + [f"{item.module}.{alias.name}" for alias in item.names]
        else:
            continue
        files.update(f for f in map(module_file, names) if f)
    # a submodule's package __init__ runs first
    for f in list(files):
        parent = Path(f).parent
        while parent.name:
            init = parent / "__init__.py"
            if (ROOT / init).is_file():
                files.add(init.as_posix())
            parent = parent.parent
    return files


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(imported(ast.parse((ROOT / f).read_text())) - seen)
    return seen


def command_function(argv: list[str]) -> ast.FunctionDef:
    """The function behind `sft <argv>` in pipeline/cli.py (a typer command of the same name)."""
    tree = ast.parse((ROOT / "pipeline/cli.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    if argv[0] not in functions:
        raise AssertionError(f"dvc.yaml runs `sft {argv[0]}`, which pipeline/cli.py does not define")
    return functions[argv[0]]


def stage_modules(cmd: str) -> set[str]:
    """Every pipeline module file `sft ...` (a dvc.yaml stage's cmd) runs."""
    argv = cmd.split()
    assert argv[0] == "sft", f"{cmd!r}: a stage runs one `sft <stage>` command"
    function = command_function(argv[1:])
    # the edge's own imports are the command's business: cli.py imports every command's options and the
    # release sub-app, which a stage does not run; the command's body says which stage module it runs
    edge = {f for name in EDGE[1:] for f in closure({name})}
    return {EDGE[0]} | edge | closure(imported(function))


def covered(module: str, deps: list[str]) -> bool:
    return any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in deps)


def missing_deps(stages: dict) -> dict[str, list[str]]:
    """Per stage, the modules its command runs that its deps do not list."""
    missing = {}
    for name, stage in stages.items():
        absent = sorted(m for m in stage_modules(stage["cmd"]) if not covered(m, stage.get("deps", [])))
        if absent:
            missing[name] = absent
    return missing


@pytest.fixture(scope="module")
def stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_every_module_it_runs(stages):
    assert missing_deps(stages) == {}, "add these to the stage's deps in dvc.yaml"


def test_a_removed_dependency_is_found(stages):
    """Dropping any one module a stage runs from its deps fails the check, naming stage and module."""
    for name, stage in stages.items():
        listed = [dep for dep in stage["deps"] if dep.startswith("pipeline/")]
        for dep in listed:
            broken = {name: {**stage, "deps": [d for d in stage["deps"] if d != dep]}}
            assert name in missing_deps(broken), f"{name}: removing {dep} went unnoticed"


def test_the_derivation_sees_lazy_imports():
    """`sft validate` runs the contract through prepare's tokenization (imported inside functions too)."""
    modules = stage_modules("sft validate")
    assert {
        "pipeline/stages/validate.py",
        "pipeline/contract.py",
        "pipeline/prepare.py",
        "pipeline/config.py",
        "pipeline/files.py",
        "pipeline/cli.py",
    } <= modules
    assert "pipeline/publish.py" not in modules  # a release command's module is not a stage's


def test_each_listed_module_exists(stages):
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if dep.startswith("pipeline"):
                assert (ROOT / dep).exists(), f"dvc.yaml stage {name}: dep {dep} does not exist"


def test_every_params_dep_is_in_every_params_file(stages):
    """DVC refuses a stage whose params dep the params file lacks: params.yaml and every preset (a team
    copies one over params.yaml) must spell out each key a stage lists, not leave it to the schema."""
    files = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*-*xh*.yaml")), ROOT / "configs/demo.yaml"]
    for path in files:
        params = yaml.safe_load(path.read_text())
        for name, stage in stages.items():
            for key in stage.get("params", []):
                if not isinstance(key, str):
                    continue
                node = params
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{path.name}: no {key} (dvc.yaml stage {name})"
                    node = node[part]
