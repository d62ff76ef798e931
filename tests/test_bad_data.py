"""Every fixture in tests/fixtures/bad_data is refused with a message naming file, line and field."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import cli

FIXTURES = Path(__file__).parent / "fixtures" / "bad_data"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
PARAMS = """validate:
  min_rows: 20
  max_response_chars: 200
  eval_sets: [data/golden.jsonl]
data:
  replay: null
"""


def test_the_corpus_covers_every_failure_mode():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_refused(case, tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / case, tmp_path / "data")
    (tmp_path / "params.yaml").write_text(PARAMS)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["validate"])
    assert result.exit_code == 1, result.output
    assert "data/train.jsonl" in result.output
    for expected in (FIXTURES / case / "expected.txt").read_text().splitlines():
        assert expected in result.output, f"{case}: {expected!r} not in:\n{result.output}"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"params.yaml", "data/train.jsonl", "data/golden.jsonl", "data/expected.txt",
                       "validate/contract.json", "validate/contract.md"}, "nothing downstream is written"
