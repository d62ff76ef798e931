"""`sft gate`: apply the gate policy to the evaluations; write gate.json, gate.md and the full-vs-LoRA
decision record; a failed gate is a StageError (the stage exits 1 after writing its report)."""

from __future__ import annotations

import json

from pipeline.artifacts import TrainingMetrics, Verdict, read, write
from pipeline.files import file_manifest, write_text
from pipeline.gate import (
    decide,
    decision_record,
    load_policy,
    plot_change,
    plot_decision,
    render_decision,
    render_markdown,
    run_cost,
)
from pipeline.lora import PREFIX
from pipeline.paths import Paths
from pipeline.stages import StageError
from pipeline.train.checkpoint import list_checkpoints, weights_sha256

RUNS = ("base", "checkpoints", "suite", "lora")  # evaluate/<run>-items.json, each model's per-item scores


def kept_checkpoints(paths: Paths) -> dict:
    kept = {c.name: c for c in list_checkpoints(paths.checkpoints("train"))}
    kept.update({PREFIX + c.name: c for c in list_checkpoints(paths.checkpoints("lora"))})
    return kept


def item_scores(evaluations) -> dict[str, dict]:
    """Per-item scores of every evaluated model, for the paired intervals."""
    items: dict[str, dict] = {}
    for name in RUNS:
        path = evaluations / f"{name}-items.json"
        if name == "lora" and not path.exists():
            continue
        for model, metrics in json.loads(path.read_text()).items():
            items.setdefault(model, {}).update({metric: r["items"] for metric, r in metrics.items()})
    return items


def verdict_of(policy, paths: Paths, kept: dict) -> tuple[Verdict, dict]:
    """The verdict and the per-item scores it was judged on; results for a checkpoint that is not
    kept are named before anything else is read."""
    evaluations = paths.evaluate
    base_scores = json.loads((evaluations / "base.json").read_text())["base"]
    golden = json.loads((evaluations / "checkpoints.json").read_text())
    suite = json.loads((evaluations / "suite.json").read_text())
    candidates = {name: {**scores, **suite.get(name, {})} for name, scores in golden.items()}
    lora = json.loads((evaluations / "lora.json").read_text()) if (evaluations / "lora.json").exists() else {}
    unknown = sorted(set(candidates) - set(kept)) + sorted(set(lora) - set(kept))
    if unknown:
        raise StageError(
            f"{evaluations}: results for {unknown} but no such checkpoint in {paths.checkpoints('train')} "
            f"or {paths.checkpoints('lora')}"
        )
    hashes = {name: weights_sha256(kept[name]) for name in [*candidates, *lora]}
    items = item_scores(evaluations)
    try:
        return decide(policy, base_scores, candidates, hashes, items, lora), items
    except ValueError as err:
        raise StageError(str(err)) from None


def log_to_trackers(params, paths: Paths, verdict: Verdict, chosen) -> str:
    """The verdict, the eval table and (MLflow) the registered model, in the judged run."""
    from pipeline.trackers import log_gate

    run = paths.metrics("lora" if verdict.kind == "lora" else "train")
    run_ids = (read(run, TrainingMetrics).trackers or {}) if run.exists() else {}
    reports = [paths.gate / name for name in ("gate.md", "change.png", "decision.json", "decision.png")]
    logged = log_gate(params.train.trackers, run_ids, verdict, reports, chosen, params.card.repo_id.rsplit("/", 1)[-1])
    return f"trackers: {json.dumps(logged)}"


def run(params, paths: Paths, log=print) -> Verdict:
    """The verdict; its report is printed through `log` before a failed gate raises."""
    try:
        policy = load_policy(params.gate.policy, set(params.evaluate.metrics))
    except ValueError as err:
        raise StageError(str(err)) from None
    kept = kept_checkpoints(paths)
    verdict, items = verdict_of(policy, paths, kept)
    chosen = kept[verdict.chosen]
    verdict.path = str(chosen)
    verdict.files = file_manifest(chosen)  # weights, config, tokenizer, chat template: all of it
    out = paths.gate
    out.mkdir(parents=True, exist_ok=True)
    plot_change(verdict, out / "change.png")
    verdict.plot = "change.png"
    costs = {
        name: run_cost(read(paths.metrics(run), TrainingMetrics), params.plan.prices)
        for name, run in (("full", "train"), ("lora", "lora"))
        if paths.metrics(run).exists()
    }
    record = decision_record(policy, verdict, items, costs)
    plot_decision(record, out / "decision.png")
    record.plot = "decision.png"
    verdict.decision = record.verdict
    markdown = render_markdown(verdict) + render_decision(record)
    write(out / "decision.json", record)
    write(paths.verdict, verdict)
    write_text(out / "gate.md", markdown)
    log(markdown)
    if params.train.trackers:
        log(log_to_trackers(params, paths, verdict, chosen))
    if not verdict.passed:
        raise StageError(f"eval gate FAILED: {', '.join(verdict.failed_rules)} (see {out}/gate.md)")
    return verdict
