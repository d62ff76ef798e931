"""The ruff settings `make lint` runs (pyproject.toml) catch what they are there for, and leave alone
what this repository does on purpose (typer options as defaults, SkyPilot's `sky` package)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"

pytestmark = pytest.mark.skipif(not RUFF.exists(), reason="ruff is not installed (pip install -e '.[test]')")

CLEAN = """import json
from pathlib import Path

import sky
import typer
import yaml

from pipeline.config import load_params


def main(out: Path = typer.Option(Path("data"), help="the folder the demo data set is written to")) -> None:
    print(json.dumps([yaml, sky, load_params, out]))
"""

# unsorted and unused imports, zip without strict=, a mutable default, str.format: one rule set each
BAD = """import yaml
import json
import os


def pairs(a: list, b: list) -> list:
    return list(zip(a, b))


def rows(seen: list = []) -> list:
    return [json, yaml, seen, "{}".format(1)]
"""


def ruff(*args: str) -> subprocess.CompletedProcess:
    """ruff as `make lint` runs it: from the repository root (where it tells first-party imports), its settings."""
    command = [str(RUFF), *args, "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_the_rules_pass_the_repositorys_own_idioms(tmp_path):
    (tmp_path / "clean.py").write_text(CLEAN)
    done = ruff("check", "--output-format", "concise", str(tmp_path / "clean.py"))
    assert done.returncode == 0, done.stdout + done.stderr
    done = ruff("format", "--check", str(tmp_path / "clean.py"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_reject_each_kind_of_finding(tmp_path):
    (tmp_path / "bad.py").write_text(BAD)
    done = ruff("check", "--output-format", "concise", str(tmp_path / "bad.py"))
    assert done.returncode == 1, done.stdout + done.stderr
    found = {line.split(" ")[1] for line in done.stdout.splitlines() if "bad.py:" in line}
    assert {"I001", "F401", "B905", "B006", "UP032"} <= found, done.stdout


def test_format_check_rejects_an_unformatted_file(tmp_path):
    (tmp_path / "ugly.py").write_text("x = {'a':1,\n 'b':2}\n")
    done = ruff("format", "--check", str(tmp_path / "ugly.py"))
    assert done.returncode == 1 and "1 file would be reformatted" in done.stdout, done.stdout + done.stderr
