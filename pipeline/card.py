"""card: a Hugging Face model card (model-index eval results) and the folder `sft publish` pushes."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.artifacts import Verdict

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

Full supervised fine-tune (every weight updated) of `{{ base_model }}`, produced by this
repository's DVC pipeline and shipped only because it passed the eval gate.

- Base model: `{{ base_model }}`{% if base_revision %} at revision `{{ base_revision }}`{% endif %}
- Training data sha256: `{{ data_sha256 }}`
- Chosen checkpoint: `{{ chosen }}`; weights sha256 `{{ weights_sha256 }}`
- Training: {{ training }}

## Evaluation

Every metric was measured with lm-eval on the base model and on this checkpoint, on the same items;
the eval gate's policy (`evals/gate.yaml`) decided. The forgetting table is the change against the
base with its paired-bootstrap 95% interval; the plot shows each metric, base vs this model.

{{ gate_markdown }}
"""


def build_card(
    verdict: Verdict,
    gate_markdown: str,
    repo_id: str,
    base_model: str,
    base_revision: str | None,
    metrics: dict,
    data_sha256: str,
    training: dict,
    license: str,
    language: str,
) -> ModelCard:
    """`metrics` is evaluate.metrics ({name: spec with .task and .metric}): each model-index entry
    names the lm-eval task (dataset) and its metric, valued for the chosen checkpoint."""
    chosen = verdict.chosen_scores
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=metrics[name].task,
            dataset_name=name,
            metric_type=metrics[name].metric,
            metric_name=name,
            metric_value=float(value),
            verified=False,
        )
        for name, value in chosen.items()
        if name in metrics
    ]
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=base_model,
        license=license,
        language=language,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["sft", "full-fine-tune"],
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id,
        base_model=base_model,
        base_revision=base_revision,
        data_sha256=data_sha256,
        chosen=verdict.chosen,
        weights_sha256=verdict.sha256,
        gate_markdown=gate_markdown,
        training=", ".join(f"{k}={v}" for k, v in training.items()),
    )


def assemble(checkpoint: Path, card: ModelCard, gate_files: list[Path], out_dir: Path) -> None:
    """Copy the chosen weights, tokenizer and the gate verdict next to README.md."""
    for item in sorted(Path(checkpoint).iterdir()):
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)
    for path in gate_files:
        shutil.copy2(path, out_dir / path.name)
    card.save(out_dir / "README.md")
