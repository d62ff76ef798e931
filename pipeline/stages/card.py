"""`sft card`: the model card, the publishable folder (weights, tokenizer, card, verdict) and the
release manifest (the sha256 of every file in it; the training job signs it with `sft sign`)."""

from __future__ import annotations

import json

from pipeline.artifacts import PrepareStats, Verdict, read
from pipeline.card import assemble, build_card
from pipeline.files import atomic_dir, file_manifest, manifest_differences, sha256_file, write_json
from pipeline.lora import checkpoint_path
from pipeline.paths import Paths
from pipeline.stages import StageError

REPORTS = ("gate.json", "gate.md", "change.png", "decision.json", "decision.png")  # shipped beside the weights


def training_summary(params, kind: str) -> dict:
    """The hyperparameters of the run that made the shipped model, for the card."""
    hyper = {
        k: v for k, v in params.train.model_dump().items() if k in ("lr", "epochs", "warmup_ratio", "weight_decay")
    }
    if kind == "lora":
        lora = params.lora
        return {
            "method": "LoRA, merged into the base",
            **hyper,
            "lr": lora.lr,
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dora": lora.dora,
        }
    return {"method": "full SFT", **hyper}


def gated_checkpoint(verdict: Verdict, paths: Paths):
    """The checkpoint the gate passed, refused if any of its files changed since."""
    chosen = checkpoint_path(verdict.chosen, paths.checkpoints("train"), paths.checkpoints("lora"))
    gated = verdict.files or {}
    differing = sorted(sum(manifest_differences(gated, file_manifest(chosen)), []))
    if not gated or differing:
        raise StageError(
            f"{chosen}: {', '.join(differing) or 'files'} differ from what the gate passed ({paths.verdict} files)"
        )
    return chosen


def run(params, paths: Paths) -> str:
    verdict = read(paths.verdict, Verdict)
    if not verdict.passed:
        raise StageError(f"{paths.verdict}: the gate did not pass; no card is written")
    chosen = gated_checkpoint(verdict, paths)
    base_meta = json.loads((paths.base / "meta.json").read_text())
    stats = read(paths.prepare_stats, PrepareStats)
    model_card = build_card(
        verdict,
        (paths.gate / "gate.md").read_text(),
        params.card.repo_id,
        base_meta["model"],
        base_meta.get("revision"),
        params.evaluate.metrics,
        stats.data_sha256,
        training_summary(params, verdict.kind),
        params.card.license,
        params.card.language,
    )
    with atomic_dir(paths.card) as tmp:
        assemble(chosen, model_card, [paths.gate / name for name in REPORTS], tmp)
        files = file_manifest(tmp)
    write_json(
        paths.manifest,
        {"chosen": verdict.chosen, "sha256": verdict.sha256, "gate_sha256": sha256_file(paths.verdict), "files": files},
    )
    return f"model card and publishable folder in {paths.card}/ ({verdict.chosen}, sha256 {verdict.sha256[:12]})"
