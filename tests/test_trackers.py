"""Trackers beside DVCLive (issue 15): MLflow against a real server on loopback, W&B offline."""

import json

import pytest

from pipeline.artifacts import Verdict
from pipeline.trackers import CHAMPION, TrainingRuns, check_trackers, flatten, log_gate
from tests.conftest import wandb_history
from tests.verdicts import drop_rule, hard_rule, make_verdict

META = {
    "config": {"lr": 3e-5, "epochs": 2, "strategy": "single"},
    "base": {"model": "test/tiny"},
    "data_sha256": "d" * 64,
}
LOSSES = [2.5, 2.0, 1.6, 1.3, 1.1]


def verdict(passed: bool, sha: str, chosen: str = "epoch-2") -> Verdict:
    rules = [hard_rule("golden", 0.8 if passed else 0.3, 0.5), drop_rule("general", 0.91, 0.9, read=-0.01)]
    return make_verdict(
        rules,
        chosen,
        sha,
        others={
            "epoch-1": {"scores": {"golden": 0.2, "general": 0.9}},
            "lora-epoch-2": {"kind": "lora", "scores": {"golden": 0.1, "general": 0.9}},
        },
    )


def train_run(names):
    runs = TrainingRuns(names, "train", META)
    for step, loss in enumerate(LOSSES, start=1):
        runs.log({"train/loss": loss, "train/lr": 1e-5 * step}, step)
    return runs.finish()


def test_a_tracker_without_its_package_or_its_settings_is_refused_before_training(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from pipeline.config import TrainConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(RuntimeError, match=r"train.trackers lists wandb but it is not installed: .*'\.\[wandb\]'"):
        check_trackers(["mlflow", "wandb"])
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # SkyPilot passes a variable the team did not set as empty
    with pytest.raises(RuntimeError, match="lists mlflow but MLFLOW_TRACKING_URI is not set"):
        check_trackers(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_trackers(["mlflow"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(RuntimeError, match="lists wandb but WANDB_API_KEY is not set"):
        check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(["wandb"])
    with pytest.raises(ValidationError, match="trackers"):
        TrainConfig(trackers=["neptune"])
    assert "trackers" not in TrainConfig(trackers=["mlflow"]).model_dump(), "not part of the resume fingerprint"
    assert flatten(META)["config.lr"] == "3e-05" and flatten(META)["base.model"] == "test/tiny"


def test_a_tracker_that_fails_never_stops_training_or_the_verdict(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Nothing listens on the tracking URI: training goes on without that tracker, says so, and the
    gate reports the error instead of raising (its verdict is already written)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert train_run(["mlflow"]) == {}
    assert "warning: mlflow failed to start its run" in capsys.readouterr().err
    logged = log_gate(["mlflow"], {"mlflow": "0" * 32}, verdict(True, "a" * 64), [], tiny_model_dir, "tiny-sft")
    assert logged["mlflow"]["run_id"] == "0" * 32 and "Error" in logged["mlflow"]["error"]
    assert "warning: mlflow failed to take the gate's results" in capsys.readouterr().err


@pytest.mark.e2e  # a real MLflow server (.venv-mlflow)
def test_mlflow_run_eval_table_and_champion_only_when_the_gate_passes(
    mlflow_server, tiny_model_dir, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sft-unit")
    ids = train_run(["mlflow"])
    client = MlflowClient()
    run = client.get_run(ids["mlflow"])
    assert run.data.params["config.lr"] == "3e-05" and run.data.params["data_sha256"] == "d" * 64
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == LOSSES
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    (tmp_path / "gate.md").write_text("## Eval gate: PASSED\n")

    def gate(passed, sha):
        return log_gate(["mlflow"], ids, verdict(passed, sha), [tmp_path / "gate.md"], tiny_model_dir, "tiny-sft")

    first = gate(True, "a" * 64)
    assert first["mlflow"] == {"run_id": ids["mlflow"], "model": "tiny-sft", "version": 1, "alias": CHAMPION}
    table = mlflow.artifacts.load_dict(f"runs:/{ids['mlflow']}/gate/eval_table.json")
    assert table["columns"][:4] == ["metric", "rule", "base", "observed"]
    assert [row[0] for row in table["data"]] == ["golden", "general"] and table["data"][0][3] == 0.8
    history = client.get_metric_history(ids["mlflow"], "eval/golden")
    assert [(m.step, m.value) for m in history] == [(1, 0.2), (2, 0.8)], "full candidates only, step = epoch"
    artifacts = {f.path for f in client.list_artifacts(ids["mlflow"], "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts
    assert client.get_run(ids["mlflow"]).data.tags["eval_gate"] == "passed"

    failed = gate(False, "b" * 64)  # a later candidate that fails: registered for the record, never champion
    assert failed["mlflow"]["version"] == 2 and failed["mlflow"]["alias"] is None
    champion = client.get_model_version_by_alias("tiny-sft", CHAMPION)
    assert champion.version == "1" and champion.tags["weights.sha256"] == "a" * 64
    assert client.get_model_version("tiny-sft", "2").tags["eval_gate"] == "failed"
    assert gate(True, "c" * 64)["mlflow"]["version"] == 3
    assert client.get_model_version_by_alias("tiny-sft", CHAMPION).tags["weights.sha256"] == "c" * 64


def test_wandb_offline_run_holds_the_metrics_and_the_gate(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = train_run(["wandb"])
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    history = wandb_history(run_dir)
    assert [row["train/loss"] for row in history] == LOSSES and [row["_step"] for row in history] == [1, 2, 3, 4, 5]
    (tmp_path / "gate.md").write_text("## Eval gate: FAILED\n")
    logged = log_gate(["wandb"], ids, verdict(False, "a" * 64), [tmp_path / "gate.md"], tiny_model_dir, "tiny-sft")
    assert logged == {"wandb": {"run_id": ids["wandb"]}}
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    gate_rows = [row for run in runs for row in wandb_history(run) if "gate/rules" in row]
    assert len(gate_rows) == 1 and gate_rows[0]["eval/golden"] == 0.3
    (gate_run,) = [run for run in runs if any("gate/rules" in row for row in wandb_history(run))]
    table = json.loads((gate_run / "files" / gate_rows[0]["gate/rules"]["path"]).read_text())
    assert table["columns"][:4] == ["metric", "rule", "base", "observed"]
    assert [row[0] for row in table["data"]] == ["golden", "general"] and table["data"][0][-1] is False


def test_the_cluster_job_gets_the_trackers_settings_and_packages():
    """Each tracker's variables travel from the repository's variables and secrets through train.yml's
    `sky jobs launch --env/--secret` into the task, which declares them (SkyPilot passes nothing else)."""
    import yaml

    from pipeline.trackers import SETTINGS
    from tests.conftest import ROOT

    task = yaml.safe_load((ROOT / "sky/train.yaml").read_text())
    launch = (ROOT / ".github/workflows/train.yml").read_text()
    for name in SETTINGS:
        if name in ("WANDB_MODE", "WANDB_DIR"):  # local runs and tests only
            continue
        declared = (
            "secrets" if name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY") else "envs"
        )
        assert name in task[declared], f"sky/train.yaml {declared} lacks {name}"
        assert (
            f"--{declared[:-1]} {name}" in launch
            and f"{'secrets' if declared == 'secrets' else 'vars'}.{name}" in launch
        )
    assert '".[deepspeed,mlflow,wandb]"' in task["setup"]
