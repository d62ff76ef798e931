"""The eval-gate commit status and the one PR comment, against a local GitHub API stand-in."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.github import GitHub, ReleaseRefused, require_success, status_from_gate
from pipeline.pr_comment import build_comment
from tests.fake_github import FakeGitHub
from tests.verdicts import drop_rule, hard_rule, make_verdict

SHA = "a" * 40
PASSED = make_verdict(
    [hard_rule("golden", 0.585, 0.5), drop_rule("general", 0.9875, 0.99)],
    "epoch-3",
    "e96f5e7c52b456843b5d42e8656e3ad8712d693c661b50eb3e10136a2b5c62fb",
)
FAILED = make_verdict(
    [
        hard_rule("golden", 0.13, 0.5),
        drop_rule("general", 0.65, 0.99),
        hard_rule("safety_refusals_on_a_much_longer_metric_name", 0.5, 0.99),
    ],
    "epoch-1",
)


@pytest.fixture
def github(monkeypatch):
    with FakeGitHub() as server:
        monkeypatch.setenv("GITHUB_API_URL", server.api_url)
        monkeypatch.setenv("GITHUB_REPOSITORY", server.repository)
        monkeypatch.setenv("GITHUB_TOKEN", server.token)
        yield server


def sft(*args):
    return CliRunner().invoke(app, list(args))


def write_gate(tmp_path, verdict):
    path = tmp_path / "gate.json"
    path.write_text(verdict.dumps())
    return path


def test_descriptions_from_the_verdict(tmp_path):
    state, text = status_from_gate(write_gate(tmp_path, PASSED))
    assert state == "success"
    assert text == "passed: epoch-3 (golden 0.585, general 0.988), sha256 e96f5e7c52b4"
    state, text = status_from_gate(write_gate(tmp_path, FAILED))
    assert state == "failure"
    assert text.startswith("failed: golden 0.130 fails >= 0.5; general 0.650 fails drop vs base <= 0.05")
    assert len(text) == 140 and text.endswith("…")  # three failing rules do not fit: cut to GitHub's limit
    state, text = status_from_gate(tmp_path / "missing.json")
    assert state == "error" and "stopped before the gate" in text


def test_a_verdict_of_another_shape_is_an_error_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gate.json").write_text(json.dumps({**json.loads(PASSED.dumps()), "passed": "yes"}))
    assert status_from_gate(Path("gate.json")) == (
        "error",
        "unreadable verdict: gate.json: passed: Input should be a valid boolean",
    )
    Path("gate.json").write_text(Path("gate.json").read_text()[:-20])
    state, text = status_from_gate(Path("gate.json"))
    assert state == "error" and text.startswith("unreadable verdict: gate.json: not valid JSON")


def test_a_rule_failed_for_a_missing_score_is_described_not_a_crash(tmp_path):
    """The gate fails closed on a missing score (observed null); the status names it."""
    missing = {
        **hard_rule("refusal", 0.0, 0.9),
        "observed": None,
        "passed": False,
        "problem": "score None is missing or not a finite number",
    }
    state, text = status_from_gate(write_gate(tmp_path, make_verdict([hard_rule("golden", 0.6, 0.5), missing])))
    assert (state, text) == ("failure", "failed: refusal missing fails >= 0.9")


def test_pending_then_verdict_through_the_cli(github, tmp_path):
    result = sft(
        "status",
        "set",
        "--sha",
        SHA,
        "--state",
        "pending",
        "--description",
        "training on SkyPilot",
        "--target-url",
        "https://example.com/run/1",
    )
    assert result.exit_code == 0, result.output
    assert github.statuses[SHA][-1] == {
        "state": "pending",
        "description": "training on SkyPilot",
        "context": "eval-gate",
        "target_url": "https://example.com/run/1",
        "creator": {"login": "github-actions[bot]"},
    }
    result = sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, FAILED)))
    assert result.exit_code == 0, result.output
    assert github.statuses[SHA][-1]["state"] == "failure"
    assert "golden 0.130 fails >= 0.5" in github.statuses[SHA][-1]["description"]
    assert sft("status", "set", "--sha", SHA, "--state", "pending", "--from-gate", "x").exit_code == 1


def test_release_requires_a_successful_eval_gate(github, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_GATE_ACCOUNT", "github-actions[bot]")  # the account of the token these tests set with
    refused = sft("status", "require", "--sha", SHA)
    assert refused.exit_code == 1 and "no 'eval-gate' status" in refused.output
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, FAILED)))
    refused = sft("status", "require", "--sha", SHA)
    assert refused.exit_code == 1 and "'eval-gate' is failure (failed: golden" in refused.output
    sft("status", "set", "--sha", SHA, "--state", "pending", "--description", "retraining")
    assert sft("status", "require", "--sha", SHA).exit_code == 1  # only the latest status counts
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, PASSED)))
    allowed = sft("status", "require", "--sha", SHA)
    assert allowed.exit_code == 0, allowed.output
    # another context passing is no substitute for the gate
    other = "b" * 40
    github.statuses[other] = [{"state": "success", "context": "ci/tests", "description": ""}]
    with pytest.raises(ReleaseRefused):
        require_success(GitHub(github.api_url, github.repository, github.token), other, "github-actions[bot]")


def test_only_the_eval_gate_accounts_status_counts(github, tmp_path, monkeypatch):
    """Anyone with `statuses: write` can set a status named eval-gate; the release counts only the one
    set by the account of the training job's token (EVAL_GATE_ACCOUNT), and refuses without one."""
    bot = github.add_account("acme-sft-bot")
    monkeypatch.setenv("GITHUB_TOKEN", bot)
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, PASSED)))
    unset = sft("status", "require", "--sha", SHA)
    assert unset.exit_code == 1 and "set the repository variable EVAL_GATE_ACCOUNT" in unset.output
    monkeypatch.setenv("EVAL_GATE_ACCOUNT", "acme-sft-bot")
    assert sft("status", "require", "--sha", SHA).exit_code == 0
    monkeypatch.setenv("GITHUB_TOKEN", github.add_account("mallory"))  # a later success from someone else
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, PASSED)))
    newer = sft("status", "require", "--sha", SHA)  # the bot's own newest status still decides
    assert newer.exit_code == 0, newer.output
    monkeypatch.setenv("EVAL_GATE_ACCOUNT", "someone-else")
    forged = sft("status", "require", "--sha", SHA)
    assert forged.exit_code == 1 and "no 'eval-gate' status set by 'someone-else'" in forged.output
    assert "the latest is success by 'mallory'" in forged.output


def test_bad_token_and_missing_env_are_clear(github, monkeypatch):
    monkeypatch.setenv("EVAL_GATE_ACCOUNT", "acme-sft-bot")
    monkeypatch.setenv("GITHUB_TOKEN", "wrong")
    result = sft("status", "require", "--sha", SHA)
    assert result.exit_code == 1 and "HTTP 401" in result.output
    monkeypatch.delenv("GITHUB_REPOSITORY")
    result = sft("status", "require", "--sha", SHA)
    assert result.exit_code == 1 and "set GITHUB_REPOSITORY" in result.output


def test_one_pr_comment_updated_in_place(github, tmp_path, monkeypatch):
    for i in range(105):  # our comment sits on the second page
        github.add_comment(7, f"review {i}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke/gate.md").write_text("## Eval gate: PASSED\n\n![base vs candidate](change.png)\n")
    first = sft("pr-comment", "--post", "7")
    assert first.exit_code == 0 and "created" in first.output
    (tmp_path / "smoke/gate.md").write_text("## Eval gate: FAILED\n")
    second = sft("pr-comment", "--post", "7")
    assert second.exit_code == 0 and "updated" in second.output
    ours = [c for c in github.comments[7] if c["body"].startswith("<!-- sft-pr-comment -->")]
    assert len(ours) == 1 and len(github.comments[7]) == 106
    assert "Eval gate: FAILED" in ours[0]["body"] and "PASSED" not in ours[0]["body"]
    assert (tmp_path / "pr-comment.md").read_text() == ours[0]["body"]


def test_comment_names_missing_reports_and_drops_images(tmp_path):
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan/plan.md").write_text("## GPU plan\n![chart](x.png)\n| a |\n")
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate/gate.md").write_text("## Eval gate: PASSED (committed by the last demo run)\n")
    text = build_comment(tmp_path)
    assert "| a |" in text and "x.png" not in text
    assert "`validate/contract.md` was not produced" in text
    # finding 13: a smoke run that did not run never shows the committed verdict in its place
    assert "`smoke/gate.md` was not produced" in text and "committed by the last demo run" not in text


def test_results_commit_on_top_of_the_trained_commit(github, tmp_path, monkeypatch):
    from pipeline.github import RESULT_FILES

    trained = github.add_commit({"params.yaml": "lr: 1\n", "dvc.lock": "old\n"}, message="merge")
    monkeypatch.chdir(tmp_path)
    assert sft("results", "--sha", trained).exit_code == 1  # nothing to report before the DAG ran
    for name in RESULT_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name} of run 1\n")
    png = b"\x89PNG\r\n\x1a\n\xff\x00"  # not UTF-8: the plot travels as bytes
    (tmp_path / "gate/change.png").write_bytes(png)
    result = sft("results", "--sha", trained)
    assert result.exit_code == 1 and "train/live, lora/live missing" in result.output
    for run in ("train", "lora"):
        (tmp_path / f"{run}/live/plots/metrics/train").mkdir(parents=True)
        (tmp_path / f"{run}/live/plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t2.0\n")
    result = sft("results", "--sha", trained)
    assert result.exit_code == 0, result.output
    first = github.refs[f"heads/results/{trained}"]
    assert github.commits[first]["parents"] == [trained]
    tree = github.trees[github.commits[first]["tree"]]
    assert tree["params.yaml"] == "lr: 1\n" and tree["dvc.lock"] == "dvc.lock of run 1\n"
    # finding 15: the suite's results, the change plot and DVCLive's history reach the results branch
    assert tree["gate/change.png"] == png and tree["evaluate/suite.json"] == "evaluate/suite.json of run 1\n"
    assert tree["train/live/plots/metrics/train/loss.tsv"].startswith("step\tloss")
    assert tree["lora/live/plots/metrics/train/loss.tsv"].startswith("step\tloss")
    (tmp_path / "gate/gate.json").write_text("rerun\n")  # a rerun of the same commit moves the branch
    assert sft("results", "--sha", trained).exit_code == 0
    second = github.refs[f"heads/results/{trained}"]
    assert second != first and github.trees[github.commits[second]["tree"]]["gate/gate.json"] == "rerun\n"


def test_committed_sample_comment_was_built_by_build_comment():
    from pathlib import Path

    from pipeline.pr_comment import SECTIONS

    sample = (Path(__file__).resolve().parents[1] / "docs/pr-comment.md").read_text()
    assert sample.startswith("<!-- sft-pr-comment -->\n## SFT pipeline report")
    for title, name in SECTIONS:
        assert f"<summary>{title}</summary>" in sample
        assert f"`{name}` was not produced" not in sample  # the sample shows every report


def test_status_links_the_skypilot_jobs_own_page_not_the_launching_workflow(github, tmp_path, monkeypatch):
    """Finding 15: the verdict's link pointed at the workflow run that launched the job, which holds no
    training log. Inside a managed job it is the job's dashboard page, found from SKYPILOT_TASK_ID."""
    from pipeline.github import job_page

    dashboard = "https://sky.example.com/dashboard/jobs"
    recovered = "sky-managed-2026-12-05-08-01-02-123456_sft-train-0123456789ab_42-0"  # after a recovery
    assert job_page({"SKYPILOT_TASK_ID": recovered, "JOBS_DASHBOARD_URL": dashboard + "/"}) == f"{dashboard}/42"
    assert job_page({"SKYPILOT_TASK_ID": "sky-2026-12-05-08-01-02-123456_mycluster_3"}) is None  # not managed
    assert job_page({"SKYPILOT_TASK_ID": recovered}) is None  # no dashboard address passed
    secret = {
        "SKYPILOT_TASK_ID": recovered,
        "JOBS_DASHBOARD_URL": "https://admin:s3cret@sky.example.com:8443/dashboard/jobs",
    }
    assert job_page(secret) == "https://sky.example.com:8443/dashboard/jobs/42", "credentials never reach a status"

    monkeypatch.setenv("SKYPILOT_TASK_ID", recovered)
    monkeypatch.setenv("JOBS_DASHBOARD_URL", dashboard)
    sft(
        "status",
        "set",
        "--sha",
        SHA,
        "--from-gate",
        str(write_gate(tmp_path, PASSED)),
        "--target-url",
        "https://github.com/acme/sft/actions/runs/1",
    )
    assert github.statuses[SHA][-1]["target_url"] == f"{dashboard}/42"
    monkeypatch.delenv("SKYPILOT_TASK_ID")
    sft(
        "status",
        "set",
        "--sha",
        SHA,
        "--state",
        "pending",
        "--target-url",
        "https://github.com/acme/sft/actions/runs/1",
    )
    assert github.statuses[SHA][-1]["target_url"] == "https://github.com/acme/sft/actions/runs/1"


def test_a_passing_gate_without_the_jobs_signature_is_reported_as_an_error(github, tmp_path):
    """The training job signs what it gated; a pass it could not sign cannot be released, so the
    status says error (naming the unsigned file) instead of a success the release would then refuse."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, PASSED)), "--signed", str(manifest))
    assert github.statuses[SHA][-1]["state"] == "error" and "is unsigned" in github.statuses[SHA][-1]["description"]
    (tmp_path / "manifest.json.sig").write_text("signature")
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, PASSED)), "--signed", str(manifest))
    assert github.statuses[SHA][-1]["state"] == "success"
    sft("status", "set", "--sha", SHA, "--from-gate", str(write_gate(tmp_path, FAILED)), "--signed", str(manifest))
    assert github.statuses[SHA][-1]["state"] == "failure"


def test_the_comment_flags_changes_to_the_policy_eval_sets_and_release_path_in_bold(tmp_path, monkeypatch):
    """A PR that relaxes the gate (its policy, an eval set, the release path) in the same change as the
    data must say so first, so the reviewer of evals/ sees it."""
    import subprocess

    from pipeline.pr_comment import guarded_changes

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True)

    git("init", "-q", "-b", "main")
    for name, text in {
        "evals/gate.yaml": "rules: [{metric: golden, min: 0.5}]\n",
        "params.yaml": "a: 1\n",
        "data/golden.jsonl": "{}\n",
        "data/refusal.jsonl": "{}\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "base")
    git("checkout", "-qb", "relax")
    (tmp_path / "evals/gate.yaml").write_text("rules: [{metric: golden, min: 0.05}]\n")
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "data/golden.jsonl").write_text('{"prompt": "easier"}\n')
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "relax the gate")
    at_base = {"data/golden.jsonl": b"{}\n", "data/refusal.jsonl": b"{}\n"}

    def read(path, rev):
        if path not in at_base:
            raise FileNotFoundError(path)
        return at_base[path]

    sets = ["data/golden.jsonl", "data/refusal.jsonl", "data/over_refusal.jsonl"]
    flagged = guarded_changes("main", sets, tmp_path, read)
    assert flagged == [
        "evals/gate.yaml",
        "data/golden.jsonl",
        "data/over_refusal.jsonl (not compared: not readable at main through DVC)",
    ]
    body = build_comment(tmp_path, sections=(), guarded=flagged)
    assert "**This pull request changes what decides whether a model ships" in body and "`evals/gate.yaml`" in body
    assert "**" not in build_comment(tmp_path, sections=(), guarded=[])
    # the command pr.yml runs: params.yaml names the eval sets, read at the base through DVC (git here)
    import shutil

    from tests.conftest import ROOT

    shutil.copy(ROOT / "configs/demo.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert sft("pr-comment", "--base", "main").exit_code == 0
    flag = (tmp_path / "pr-comment.md").read_text().split("\n\n")[1]
    assert flag.startswith("**This pull request changes") and "`evals/gate.yaml`" in flag
    assert "`data/golden.jsonl`" in flag
