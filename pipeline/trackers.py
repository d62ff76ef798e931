"""Experiment trackers beside DVCLive, chosen in params.yaml (`train.trackers`): MLflow and Weights &
Biases. Each is an optional extra (`pip install -e '.[mlflow]'`, `'.[wandb]'`) and is configured the
way its users already configure it, through its own environment variables: MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME (and the server's credentials); WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY,
WANDB_MODE=offline. Training logs its parameters and per-step metrics to one run per tracker (rank 0
only); the gate stage goes back to the run of the model it judged and adds the eval table, the gate
report, and (MLflow) the model, registered, with the alias `champion` only when the gate passed."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pipeline.artifacts import Verdict

TRACKERS = ("mlflow", "wandb")
CHAMPION = "champion"  # the registry alias a model gets when, and only when, it passed the gate


# SkyPilot declares every variable of the task, so one a team did not set arrives empty: as unset
SETTINGS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_REGISTERED_MODEL_NAME",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_DIR",
)
# a tracker is a spectator: a server that does not answer costs a few retries, not minutes of idle GPUs
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def _unset_empty_settings() -> None:
    for name in SETTINGS:
        if os.environ.get(name) == "":
            del os.environ[name]


def check_trackers(names: list[str]) -> None:
    """Refuse before training starts (RuntimeError, naming what to do) when a chosen tracker's
    package is missing or it has nowhere to log: MLflow without MLFLOW_TRACKING_URI, W&B online
    without WANDB_API_KEY."""
    _unset_empty_settings()
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"train.trackers lists {', '.join(missing)} but it is not installed: "
            f"pip install -c constraints.txt -e '.[{','.join(missing)}]'"
        )
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise RuntimeError(
            "train.trackers lists mlflow but MLFLOW_TRACKING_URI is not set: point it at your "
            "tracking server (the repository variable on the cluster, docs/ci.md)"
        )
    if (
        "wandb" in names
        and not os.environ.get("WANDB_API_KEY")
        and os.environ.get("WANDB_MODE") not in ("offline", "disabled")
    ):
        raise RuntimeError(
            "train.trackers lists wandb but WANDB_API_KEY is not set (the repository secret on "
            "the cluster, docs/ci.md); WANDB_MODE=offline logs to ./wandb without an account"
        )


def _warn(tracker: str, doing: str, err: Exception) -> None:
    """A tracker failing mid-run is reported and dropped; the run and the verdict go on (DVCLive and
    the stage outputs hold everything it would have shown)."""
    print(
        f"warning: {tracker} failed {doing} and is dropped for this stage: {type(err).__name__}: {err}",
        file=sys.stderr,
        flush=True,
    )


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as tracker parameters: {"train": {"lr": 2e-5}} -> {"train.lr": "2e-05"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_name(stage: str) -> str:
    """`train a1b2c3d` on the cluster (GIT_SHA is the commit the job trains), `train` elsewhere."""
    sha = os.environ.get("GIT_SHA", "")
    return f"{stage} {sha[:7]}" if sha else stage


class TrainingRuns:
    """One run per chosen tracker for a training stage: parameters first, then per-step metrics;
    `finish()` returns each tracker's run id (kept in <stage>/metrics.json for the gate). A tracker
    that fails is reported and dropped: training never stops for it."""

    def __init__(self, names: list[str], stage: str, params: dict):
        self.ids, self._wandb = {}, None
        _unset_empty_settings()
        flat = flatten(params)
        if "mlflow" in names:
            try:
                import mlflow

                run = mlflow.start_run(
                    run_name=run_name(stage), tags={"sft.stage": stage, "sft.git_sha": os.environ.get("GIT_SHA", "")}
                )
                self.ids["mlflow"] = run.info.run_id
                mlflow.log_params(flat)
            except Exception as err:  # noqa: BLE001 - any tracker failure, reported
                _warn("mlflow", "to start its run", err)
                self._drop("mlflow")
        if "wandb" in names:
            try:
                import wandb

                self._wandb = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", "sft"), name=run_name(stage), job_type=stage, config=flat
                )
                self.ids["wandb"] = self._wandb.id
            except Exception as err:  # noqa: BLE001
                _warn("wandb", "to start its run", err)
                self._drop("wandb")

    def _drop(self, tracker: str) -> None:
        self.ids.pop(tracker, None)
        try:
            if tracker == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            elif self._wandb is not None:
                self._wandb.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - already reported; nothing more to do for it
            pass
        if tracker == "wandb":
            self._wandb = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "mlflow" in self.ids:
            try:
                import mlflow

                # batched in the background: one HTTP request per step would slow training to the server's pace
                mlflow.log_metrics(metrics, step=step, synchronous=False)
            except Exception as err:  # noqa: BLE001
                _warn("mlflow", f"at step {step}", err)
                self._drop("mlflow")
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                _warn("wandb", f"at step {step}", err)
                self._drop("wandb")

    def finish(self) -> dict[str, str]:
        """End the runs; the ids of those that got everything."""
        if "mlflow" in self.ids:
            try:
                import mlflow

                mlflow.end_run()  # waits for the queued metrics
            except Exception as err:  # noqa: BLE001
                _warn("mlflow", "to finish its run", err)
                self._drop("mlflow")
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:  # noqa: BLE001
                _warn("wandb", "to finish its run", err)
                self.ids.pop("wandb", None)
        return dict(self.ids)


def eval_table(verdict: Verdict) -> tuple[list[str], list[list]]:
    """The gate's rules as a table, the rows of gate.md: metric, rule, base, observed, the interval end
    it read, the smallest change its items can detect, their number, and whether it passed."""
    columns = ["metric", "rule", "base", "observed", "read", "detectable", "n", "passed"]
    rows = [[r.metric, r.rule, r.base, r.observed, r.read, r.detectable, r.n, r.passed] for r in verdict.rules]
    return columns, rows


def log_gate(
    names: list[str], run_ids: dict[str, str], verdict: Verdict, reports: list[Path], model_dir: Path, model_name: str
) -> dict:
    """Add the gate's outcome to the training run of the model it judged: every candidate's eval
    scores (step = epoch), the rule table, the reports; with MLflow also the model itself, registered
    as `model_name` (MLFLOW_REGISTERED_MODEL_NAME overrides it), tagged with its weights' sha256 and
    the verdict, and given the alias `champion` only when the gate passed. A tracker that fails is
    reported; the verdict stands. Returns what was logged where, or the error."""
    logged: dict[str, dict] = {}
    _unset_empty_settings()
    columns, rows = eval_table(verdict)
    candidates = {name: c.scores for name, c in verdict.candidates.items() if c.kind == verdict.kind}
    for tracker in names:
        if not run_ids.get(tracker):
            print(
                f"warning: train.trackers lists {tracker} but training recorded no {tracker} run; the gate's "
                "results are not logged there",
                file=sys.stderr,
            )
    model_name = os.environ.get("MLFLOW_REGISTERED_MODEL_NAME") or model_name
    if "mlflow" in names and run_ids.get("mlflow"):
        try:
            logged["mlflow"] = _mlflow_gate(
                run_ids["mlflow"], verdict, candidates, columns, rows, reports, model_dir, model_name
            )
        except Exception as err:  # noqa: BLE001 - the verdict stands whatever the tracker does
            _warn("mlflow", "to take the gate's results", err)
            logged["mlflow"] = {"run_id": run_ids["mlflow"], "error": f"{type(err).__name__}: {err}"}
    if "wandb" in names and run_ids.get("wandb"):
        try:
            logged["wandb"] = _wandb_gate(run_ids["wandb"], verdict, candidates, columns, rows)
        except Exception as err:  # noqa: BLE001
            _warn("wandb", "to take the gate's results", err)
            logged["wandb"] = {"run_id": run_ids["wandb"], "error": f"{type(err).__name__}: {err}"}
    return logged


def _mlflow_gate(
    run_id: str,
    verdict: Verdict,
    candidates: dict,
    columns: list,
    rows: list,
    reports: list[Path],
    model_dir: Path,
    model_name: str,
) -> dict:
    import mlflow
    from mlflow import MlflowClient

    outcome = "passed" if verdict.passed else "failed"
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        for name, metrics in candidates.items():
            epoch = name.rsplit("-", 1)[-1]  # epoch-3, lora-epoch-3
            step = int(epoch) if epoch.isdigit() else 0
            mlflow.log_metrics(
                {f"eval/{metric}": value for metric, value in metrics.items() if isinstance(value, (int, float))},
                step=step,
            )
        mlflow.log_metrics({f"base/{metric}": value for metric, value in verdict.base.items()})
        mlflow.log_table(
            data={c: [row[i] for row in rows] for i, c in enumerate(columns)}, artifact_file="gate/eval_table.json"
        )
        for report in reports:
            mlflow.log_artifact(str(report), artifact_path="gate")
        mlflow.set_tags({"eval_gate": outcome, "eval_gate.chosen": verdict.chosen, "weights.sha256": verdict.sha256})
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        source = mlflow.get_artifact_uri("model")
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name,
        source,
        run_id=run_id,
        tags={"eval_gate": outcome, "weights.sha256": verdict.sha256, "checkpoint": verdict.chosen},
    )
    if verdict.passed:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return {
        "run_id": run_id,
        "model": model_name,
        "version": int(version.version),
        "alias": CHAMPION if verdict.passed else None,
    }


def _wandb_gate(run_id: str, verdict: Verdict, candidates: dict, columns: list, rows: list) -> dict:
    import wandb

    # the same run id: W&B appends to the training run (offline, `wandb sync` merges the two parts)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sft"), id=run_id, resume="allow")
    run.log(
        {
            "gate/rules": wandb.Table(columns=columns, data=rows),
            **{
                f"eval/{metric}": value
                for metric, value in candidates.get(verdict.chosen, {}).items()
                if isinstance(value, (int, float))
            },
        }
    )
    run.summary.update(
        {
            "eval_gate": "passed" if verdict.passed else "failed",
            "eval_gate.chosen": verdict.chosen,
            "weights.sha256": verdict.sha256,
        }
    )
    run.finish()
    return {"run_id": run_id}
