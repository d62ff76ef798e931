"""The whole DAG through `dvc repro` on a small slice of the demo, in a scratch copy of the repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.files import copy_project

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e  # the whole DAG through dvc repro (minutes)


def run(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of this repository's files (no outputs, no .venv)."""
    dest = tmp_path_factory.mktemp("repo")
    copy_project(ROOT, dest)
    # start from no results: the committed metrics of the last demo run belong to the full demo
    for output in ("base", "validate", "prepare", "train", "lora", "evaluate", "gate", "card"):
        shutil.rmtree(dest / output, ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    # the embedded demo, whatever the team made of params.yaml and data.dvc (tests never read those)
    shutil.copy2(ROOT / "configs/demo.yaml", dest / "params.yaml")
    shutil.copy2(ROOT / "configs/demo-data.dvc.yaml", dest / "data.dvc")
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy", "--allow-empty"], dest)
    return dest


def test_demo_data_matches_data_dvc(repo):
    """The generator reproduces exactly the data set configs/demo-data.dvc.yaml records (the demo's data.dvc)."""
    recorded = (repo / "data.dvc").read_text()
    run(["sft", "demo", "--out", "data"], repo)
    assert "modified" not in run(["dvc", "status", "data.dvc"], repo).stdout
    run(["dvc", "commit", "--force", "--quiet", "data.dvc"], repo)
    assert (repo / "data.dvc").read_text() == recorded
    assert "up to date" in run(["dvc", "status", "data.dvc"], repo).stdout


def small_params(repo: Path) -> None:
    """The slice's settings, from the demo preset (not from what an earlier test left in params.yaml)."""
    params = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    params["base"]["demo"].update(hidden_size=32, num_layers=2, num_heads=2, pretrain_steps=20, pretrain_batch_size=8)
    params["validate"]["min_rows"] = 1500
    params["train"].update(epochs=2, micro_batch_size=8)
    params["evaluate"].update(limit=16, batch_size=16, max_gen_toks=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the slice gates on wiring, not on learning (the full demo gates on learning)
    (repo / params["gate"]["policy"]).write_text(
        "select_by: golden\nrules:\n  - metric: golden\n    min: 0.0\n  - metric: general\n    max_drop: 1.0\n"
        "versus_lora:\n  min_gain: -1.0\n  max_extra_drop: 1.0\n"
    )


def test_bad_data_stops_the_dag_at_validate(repo):
    small_params(repo)
    run(["sft", "demo", "--out", "data", "--rows", "2000"], repo)
    train = repo / "data/train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines + [lines[7]]))  # one duplicate pair
    result = run(["dvc", "repro"], repo, check=False)
    assert result.returncode != 0
    assert "expect_compound_columns_to_be_unique" in result.stdout + result.stderr
    for downstream in ("prepare", "train", "evaluate/checkpoints.json", "gate", "card"):
        assert not (repo / downstream).exists(), f"{downstream} must not be written"


def test_full_dag_then_nothing_to_do(repo):
    small_params(repo)
    run(["sft", "demo", "--out", "data", "--rows", "2000"], repo)
    run(["dvc", "repro"], repo)

    contract = json.loads((repo / "validate/contract.json").read_text())
    assert contract["passed"] and contract["rows"] == 2000
    stats = json.loads((repo / "prepare/stats.json").read_text())
    assert 0.14 <= stats["replay_share"] <= 0.16 and stats["fill"] > 0.9
    assert sorted(p.name for p in (repo / "train/checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    live = json.loads((repo / "train/live/metrics.json").read_text())
    assert live["step"] == json.loads((repo / "train/metrics.json").read_text())["steps"]
    assert live["train"]["loss"] > 0 and live["train"]["peak_mem_gib"] > 0 and live["train"]["tokens_per_s"] > 0
    loss_curve = (repo / "train/live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_curve[0].split("\t")[:2] == ["step", "loss"] and len(loss_curve) == live["step"] + 1
    assert set(json.loads((repo / "evaluate/checkpoints.json").read_text())) == {"epoch-1", "epoch-2"}
    gate = json.loads((repo / "gate/gate.json").read_text())
    assert gate["passed"] and len(gate["sha256"]) == 64
    assert sorted(p.name for p in (repo / "lora/checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    decision = json.loads((repo / "gate/decision.json").read_text())
    assert decision["lora"] in json.loads((repo / "evaluate/lora.json").read_text())
    assert set(decision["cost"]) == {"full", "lora"} and decision["cost"]["lora"]["seconds"] > 0
    assert "golden" in decision["full_minus_lora"] and "## Full SFT against LoRA" in (repo / "gate/gate.md").read_text()
    card = (repo / "card/README.md").read_text()
    assert "model-index" in card and gate["sha256"] in card
    assert (repo / "card/model.safetensors").exists()

    again = run(["dvc", "repro"], repo).stdout
    assert "didn't change" in again or "up to date" in again
    for stage in ("base", "train", "lora", "evaluate"):
        assert f"Running stage '{stage}'" not in again
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_trackers_follow_the_dag_and_champion_needs_a_passing_gate(repo, mlflow_server, tmp_path, monkeypatch):
    """Issue 15: `train.trackers: [mlflow, wandb]` and each tracker's own environment variables: the
    training runs hold the same per-step metrics as DVCLive, the gate adds its table to the judged
    run and registers the model; the alias `champion` moves only when the gate passes."""
    from mlflow import MlflowClient

    from tests.conftest import wandb_history

    small_params(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["trackers"] = ["mlflow", "wandb"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, value in {
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_EXPERIMENT_NAME": "sft-e2e",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(name, value)
    run(["sft", "demo", "--out", "data", "--rows", "2000"], repo)
    run(["dvc", "repro"], repo)

    client = MlflowClient(mlflow_server)
    for stage in ("train", "lora"):
        ids = json.loads((repo / f"{stage}/metrics.json").read_text())["trackers"]
        losses = [
            float(line.split("\t")[1])
            for line in (repo / f"{stage}/live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
        ]
        mlflow_losses = [m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")]
        assert mlflow_losses == pytest.approx(losses, rel=1e-6) and len(losses) > 10
        assert client.get_run(ids["mlflow"]).data.params["config.lr"] == str(params["train"]["lr"])
        # the training part of the run (the gate appends a second part with the same id, below)
        rows = [
            row
            for part in sorted((tmp_path / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
            for row in wandb_history(part)
            if "train/loss" in row
        ]
        assert [row["train/loss"] for row in rows] == pytest.approx(losses, rel=1e-6)
    gate = json.loads((repo / "gate/gate.json").read_text())
    full = json.loads((repo / "train/metrics.json").read_text())["trackers"]["mlflow"]
    assert gate["passed"] and gate["kind"] == "full"
    assert client.get_run(full).data.tags["eval_gate"] == "passed"
    assert {f.path for f in client.list_artifacts(full, "gate")} >= {"gate/eval_table.json", "gate/gate.md"}
    wandb_id = json.loads((repo / "train/metrics.json").read_text())["trackers"]["wandb"]
    gate_rows = [
        row
        for part in (tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}")
        for row in wandb_history(part)
        if "gate/rules" in row
    ]
    assert len(gate_rows) == 1 and gate_rows[0]["gate/rules"]["nrows"] == len(gate["rules"])
    champion = client.get_model_version_by_alias("tiny-llama-sft-demo", "champion")
    assert champion.run_id == full and champion.tags["weights.sha256"] == gate["sha256"]

    # the same model judged by a stricter policy: registered for the record, the champion stays
    (repo / params["gate"]["policy"]).write_text("select_by: golden\nrules:\n  - metric: golden\n    min: 1.01\n")
    failed = run(["dvc", "repro", "gate"], repo, check=False)
    assert failed.returncode != 0 and "eval gate FAILED: golden" in failed.stdout + failed.stderr
    latest = max(client.search_model_versions("name = 'tiny-llama-sft-demo'"), key=lambda v: int(v.version))
    assert latest.tags["eval_gate"] == "failed" and int(latest.version) == int(champion.version) + 1
    assert client.get_model_version_by_alias("tiny-llama-sft-demo", "champion").version == champion.version


def test_data_diff_against_another_revision(repo):
    """`sft data diff` reads the other revision's data through DVC (here from the local cache)."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run(["sft", "demo", "--out", "data", "--rows", "2000"], repo)
    run(["dvc", "add", "-q", "data"], repo)
    run(git + ["add", "-A"], repo)
    run(git + ["commit", "-qm", "2000 rows"], repo)
    run(["sft", "demo", "--out", "data", "--rows", "2500"], repo)
    report = run(["sft", "data", "diff", "HEAD"], repo).stdout
    assert "| rows | 2,000 | 2,500 | +500 |" in report
    assert (repo / "data-report/lengths.png").read_bytes()[:4] == b"\x89PNG"
    bad = run(["sft", "data", "diff", "no-such-rev"], repo, check=False)
    assert bad.returncode == 1 and "data/train.jsonl@no-such-rev" in bad.stderr + bad.stdout


def test_dvc_repro_trains_fsdp2_on_every_process_of_the_node(repo):
    """Finding 3: `dvc repro` runs `sft train`, which used to stop at "runs under torchrun", so the
    cluster trained outside DVC and `dvc repro` then redid everything. `sft train` now launches
    torchrun itself, one process per GPU (here SkyPilot's count, 2 CPU processes with gloo)."""
    small_params(repo)
    run(["sft", "demo", "--out", "data", "--rows", "2000"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(strategy="fsdp2", epochs=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "SKYPILOT_NUM_GPUS_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
    }
    loss_curve = repo / "train/live/plots/metrics/train/loss.tsv"
    loss_curve.parent.mkdir(parents=True, exist_ok=True)
    loss_curve.write_text("step\tloss\n1\t9.99\n2\t9.98\n")  # a committed curve of an earlier (demo) run
    result = subprocess.run(["dvc", "repro", "train"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((repo / "train/metrics.json").read_text())
    assert metrics["world_size"] == 2
    # finding 15: DVCLive starts its record afresh; nothing of the earlier curve is appended to
    rows = loss_curve.read_text().splitlines()
    assert len(rows) == metrics["steps"] + 1 and "9.99" not in loss_curve.read_text()
    assert "up to date" in run(["dvc", "status", "train"], repo).stdout  # recorded in dvc.lock, nothing to redo


def test_smoke_run_leaves_the_team_data_and_params_alone(repo, tmp_path):
    """Finding 7: `make demo` as the PR smoke run overwrote data/ with the demo set and stopped at
    "differs from data.dvc" on team data. `sft smoke` runs the demo DAG in a scratch copy."""
    small_params(repo)  # the slice's params (and lax gate) become the smoke preset
    shutil.copy2(repo / "params.yaml", tmp_path / "smoke-params.yaml")
    shutil.copy2(ROOT / "configs/llama3-8b-8xh100.yaml", repo / "params.yaml")
    shutil.rmtree(repo / "data", ignore_errors=True)
    team = repo / "data/train.jsonl"
    team.parent.mkdir()
    team.write_text('{"prompt": "team prompt", "response": "team answer"}\n')
    (repo / "gate").mkdir(exist_ok=True)
    (repo / "gate/gate.md").write_text("committed verdict of an earlier run\n")
    before = {p: p.read_bytes() for p in [team, repo / "params.yaml", repo / "data.dvc", repo / "gate/gate.md"]}

    result = run(
        [
            "sft",
            "smoke",
            "--params",
            str(tmp_path / "smoke-params.yaml"),
            "--rows",
            "2000",
            "--work",
            str(tmp_path / "scratch"),
        ],
        repo,
    )
    assert "passed end to end" in result.stdout
    assert {p: p.read_bytes() for p in before} == before, "nothing of the team's project changed"
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["train.jsonl"]
    gate = json.loads((repo / "smoke/gate.json").read_text())
    assert gate["passed"] and "committed verdict" not in (repo / "smoke/gate.md").read_text()
    assert not (tmp_path / "scratch/data.dvc").exists()
