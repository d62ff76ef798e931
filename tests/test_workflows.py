"""The train and release workflows keep their order of checks, and the lint `make lint` runs does
catch what it is there for (a known-bad workflow and task file are rejected)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SKY_PYTHON = ROOT / ".venv-sky/bin/python"


def workflow(name):
    return yaml.safe_load((ROOT / ".github/workflows" / name).read_text())


def steps(name, job):
    return workflow(name)["jobs"][job]["steps"]


def test_train_launches_once_per_ref_and_marks_the_commit_pending():
    train = workflow("train.yml")
    on = train[True]  # YAML 1.1 reads the key `on` as True
    assert on["push"]["branches"] == ["main"] and "workflow_dispatch" in on
    assert {"data.dvc", "params.yaml", "dvc.yaml", "pipeline/**", "evals/**", "sky/**"} <= set(on["push"]["paths"])
    assert train["concurrency"]["cancel-in-progress"] is False
    runs = [s.get("run", "") for s in steps("train.yml", "launch")]
    pending = next(i for i, r in enumerate(runs) if "--state pending" in r)
    launch = next(i for i, r in enumerate(runs) if "jobs launch sky/train.yaml --async" in r)
    assert pending < launch and train["jobs"]["launch"]["permissions"]["statuses"] == "write"
    assert "skypilot==0.14.1" in "".join(runs)


def test_release_checks_the_gate_before_it_pulls_or_publishes():
    release = workflow("release.yml")
    assert release[True]["push"]["tags"] == ["v*"]
    assert release["jobs"]["publish"]["environment"] == "hf-release"
    runs = [s.get("run", "") for s in steps("release.yml", "publish")]
    order = [
        next(i for i, r in enumerate(runs) if needle in r)
        for needle in ("sft status require", "dvc pull card", "sft publish")
    ]
    assert order == sorted(order)


def test_pr_comment_is_posted_only_from_this_repository():
    comment = next(s for s in steps("pr.yml", "test-and-smoke") if "sft pr-comment" in s.get("run", ""))
    assert '[ "$HEAD_REPO" = "$GITHUB_REPOSITORY" ]' in comment["run"]
    assert workflow("pr.yml")[True].keys() == {"pull_request"}  # never pull_request_target


BAD_WORKFLOW = """name: bad
on: pull_request
permissions: write-all
jobs:
  x:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
"""


@pytest.mark.parametrize(
    "command",
    [
        ["actionlint"],
        ["zizmor", "--offline", "--quiet"],
        ["check-jsonschema", "--builtin-schema", "vendor.github-workflows"],
    ],
    ids=lambda c: c[0],
)
def test_each_linter_rejects_a_bad_workflow(tmp_path, command):
    if not (BIN / command[0]).exists():
        pytest.skip(f"{command[0]} is not installed (pip install -e '.[test]')")
    bad = tmp_path / ".github/workflows/bad.yml"
    bad.parent.mkdir(parents=True)
    text = BAD_WORKFLOW if command[0] != "check-jsonschema" else BAD_WORKFLOW.replace("runs-on", "runs_on")
    bad.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN")}
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:], str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode != 0, done.stdout + done.stderr


@pytest.mark.skipif(not SKY_PYTHON.exists(), reason="make lint creates .venv-sky (SkyPilot's own environment)")
def test_sky_validate_names_a_misspelled_field(tmp_path):
    task = yaml.safe_load((ROOT / "sky/train.yaml").read_text())
    task["resourcs"] = task.pop("resources")
    del task["secrets"]["GITHUB_TOKEN"]
    bad = tmp_path / "train.yaml"
    bad.write_text(yaml.safe_dump(task))
    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    done = subprocess.run(
        [str(SKY_PYTHON), str(ROOT / "sky/validate.py"), str(bad)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert "resourcs" in done.stderr and "secrets: must declare GITHUB_TOKEN" in done.stderr


def test_status_commands_need_only_what_train_yml_installs():
    """train.yml installs typer, pydantic and pyyaml only (not torch) before `python -m pipeline.cli status set`."""
    code = (
        "import sys, pipeline.cli, pipeline.github; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'transformers', 'dvc', "
        "'huggingface_hub', 'pandas', 'requests'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("data", ["demo", "a team's"])
def test_a_pr_without_its_data_uses_the_demo_data_only_where_data_dvc_names_it(data, tmp_path):
    """pr.yml's data step without a remote (or on a fork PR, without its secrets): the template's own
    data.dvc gets the regenerated demo data; a team's gets no stand-in, and the steps that read data
    are skipped with a warning instead of failing on a missing file or checking the wrong data."""
    step = next(s for s in steps("pr.yml", "test-and-smoke") if s.get("id") == "data")
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(BIN.parent)
    git = ["git", "-C", str(clone), "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    demo = (ROOT / "configs/demo-data.dvc.yaml").read_text()  # never the fork's own data.dvc
    (clone / "data.dvc").write_text(demo if data == "demo" else re.sub(r"md5: [0-9a-f]{32}", "md5: " + "0" * 32, demo))
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-am", "data.dvc"], check=True)
    outputs = tmp_path / "outputs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"GITHUB_OUTPUT": str(outputs)}
    run = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=clone, env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "data.dvc"], capture_output=True, text=True, check=True
    ).stdout
    assert dirty == ""  # data.dvc as committed
    if data == "demo":
        assert outputs.read_text() == "source=demo\n"
        assert (clone / "data/train.jsonl").is_file()
    else:
        assert outputs.read_text() == "source=none\n"
        assert not (clone / "data").exists()
        assert "::warning::data/ cannot be fetched" in run.stdout
        # the PR comment must not show the committed contract as if it were this PR's
        assert (clone / "validate/contract.md").read_text().startswith("## Data contract: not run")
    for name in ("Data contract", "Training data statistics", "GPU memory and cost plan"):
        gated = next(s for s in steps("pr.yml", "test-and-smoke") if s.get("name", "").startswith(name))
        assert gated["if"] == "steps.data.outputs.source != 'none'", name
