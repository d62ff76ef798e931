"""`sft validate` on every fixture: bad data is refused with a message naming file, line (or row)
and field, the DAG stops there (exit 1, nothing downstream written); good data in each accepted
shape passes."""

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import cli

FIXTURES = Path(__file__).parent / "fixtures"
BAD = sorted(p.name for p in (FIXTURES / "bad_data").iterdir() if p.is_dir())
GOOD = sorted(p.name for p in (FIXTURES / "good_data").iterdir() if p.is_dir())
PARAMS = {  # a fixture folder's own params.yaml is merged over these, section by section
    "validate": {
        "min_rows": 20,
        "max_response_chars": 200,
        "eval_sets": ["data/golden.jsonl"],
        "min_rows_per_source": 5,
        "min_replay_share": 0,
    },
    "data": {"replay": None},
    "prepare": {"max_seq_len": 128},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base")
    tokenizer.save_pretrained(path)
    return path


def run_validate(folder: Path, tmp_path: Path, base_dir: Path):
    """`sft validate` on a fixture folder, with the demo's tokenizer, or the real template family its
    `tokenizer.txt` names (data with reasoning or tools needs a template that renders them)."""
    shutil.copytree(
        folder, tmp_path / "data", ignore=shutil.ignore_patterns("expected.txt", "params.yaml", "tokenizer.txt")
    )
    family = folder / "tokenizer.txt"
    if family.exists():
        from tests.template_families import family_tokenizer

        family_tokenizer(family.read_text().strip()).save_pretrained(tmp_path / "tokenizer")
    else:  # validate reads the tokenizer/ stage, never base/
        shutil.copytree(base_dir, tmp_path / "tokenizer")
    params = {k: dict(v) for k, v in PARAMS.items()}
    own = folder / "params.yaml"
    for section, values in (yaml.safe_load(own.read_text()) if own.exists() else {}).items():
        params[section].update(values)
    train = next(folder.glob("train.*")).name
    params["data"]["train"] = f"data/{train}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(cli.app, ["validate"]), f"data/{train}"


def test_the_corpus_covers_every_failure_mode():
    assert len(BAD) >= 15 and len(GOOD) >= 2


@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_refused(case, tmp_path, monkeypatch, base_dir):
    monkeypatch.chdir(tmp_path)
    result, train = run_validate(FIXTURES / "bad_data" / case, tmp_path, base_dir)
    assert result.exit_code == 1, result.output
    assert train in result.output or "data/replay." in result.output  # the file at fault
    for expected in (FIXTURES / "bad_data" / case / "expected.txt").read_text().splitlines():
        assert expected in result.output, f"{case}: {expected!r} not in:\n{result.output}"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    allowed = {"params.yaml", "validate/contract.json", "validate/contract.md"}
    assert all(
        p in allowed or p.split("/")[0] in ("data", "tokenizer") or p.startswith("validate/data-docs/") for p in written
    ), f"nothing downstream is written: {sorted(written)}"


@pytest.mark.parametrize("case", GOOD)
def test_good_data_passes(case, tmp_path, monkeypatch, base_dir):
    monkeypatch.chdir(tmp_path)
    result, _ = run_validate(FIXTURES / "good_data" / case, tmp_path, base_dir)
    assert result.exit_code == 0, result.output
    assert "data contract passed" in result.output
    assert "| **FAIL** |" not in (tmp_path / "validate" / "contract.md").read_text()
    assert (tmp_path / "validate" / "data-docs" / "index.html").exists()


def test_prepare_packs_only_the_data_that_passed_the_contract(tmp_path, monkeypatch, base_dir):
    """A contract that passed on other data (an edit after `sft validate`, or a failed validate
    that left the last passing contract) never lets prepare through."""
    monkeypatch.chdir(tmp_path)
    result, train = run_validate(FIXTURES / "good_data" / GOOD[0], tmp_path, base_dir)
    assert result.exit_code == 0, result.output
    with open(train, "ab") as f:  # a row appended after validation
        f.write(Path(train).read_bytes().splitlines(keepends=True)[0])
    result = CliRunner().invoke(cli.app, ["prepare"])
    assert result.exit_code == 1
    assert "validate/contract.json: made for other data than data/" in result.output, result.output
    assert not (tmp_path / "prepare").exists()
