"""evaluate: lm-eval on the base model and on every kept checkpoint.

Each named metric in params.yaml (evaluate.metrics) is one lm-eval task and one of its metrics;
chat tasks render prompts through the model's chat template, exactly as prepare did for
training. Per-item scores are kept so the gate can compare the same items across models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_parity(lm, training_tokenizer, prompt: str = "Say hello.") -> None:
    """Refuse to evaluate when lm-eval would show the model a prompt other than training did
    (`training_tokenizer` is the one prepare used: the base model's)."""
    from pipeline.prepare import IGNORE, tokenize_pair

    ids, labels = tokenize_pair(training_tokenizer, prompt, "hello")
    trained = [i for i, label in zip(ids, labels) if label == IGNORE]
    evaluated = lm.tok_encode(lm.apply_chat_template([{"role": "user", "content": prompt}]))
    if evaluated != trained:
        raise ValueError("train/eval mismatch: lm-eval renders the chat prompt differently from prepare "
                         f"(training ids {trained[:12]}..., evaluation ids {evaluated[:12]}...); "
                         "check the tokenizer's chat template and BOS handling")


def run_tasks(model, tokenizer, cfg, log=print, training_tokenizer=None) -> dict[str, dict]:
    """{metric name: {"task", "metric", "score", "n", "items": [per-item score]}} for one model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that we pass a model object: we mean to
    manager = TaskManager(include_path=str(Path(cfg.include_path).resolve()))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
              max_gen_toks=cfg.max_gen_toks, device=str(model.device))
    if any(spec.chat for spec in cfg.metrics.values()):
        check_parity(lm, training_tokenizer or tokenizer)
    out: dict[str, dict] = {}
    for chat in (True, False):
        names = {name: spec for name, spec in cfg.metrics.items() if spec.chat == chat}
        if not names:
            continue
        tasks = sorted({spec.task for spec in names.values()})
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, apply_chat_template=chat, limit=cfg.limit,
            bootstrap_iters=0, log_samples=True, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0, verbosity="WARNING",
        )
        for name, spec in names.items():
            if spec.task not in results["results"]:
                raise KeyError(f"lm-eval returned no results for task {spec.task!r} (metric {name!r})")
            reported = [k for k in results["results"][spec.task] if k.startswith(f"{spec.metric},")]
            if not reported:
                available = sorted({k.split(",")[0] for k in results["results"][spec.task] if "," in k})
                raise KeyError(f"evaluate.metrics.{name}: task {spec.task!r} has no metric {spec.metric!r}; "
                               f"it reports {[m for m in available if not m.endswith('_stderr')]}")
            # registry tasks name their answer-extraction filter (mmlu_pro: "custom-extract"); local ones "none"
            key = f"{spec.metric},none" if f"{spec.metric},none" in reported else sorted(reported)[0]
            filter_name = key.split(",", 1)[1]
            samples = sorted((s for s in results["samples"][spec.task] if s.get("filter", filter_name) == filter_name),
                             key=lambda s: s["doc_id"])
            items = [float(s[spec.metric]) for s in samples]
            score = results["results"][spec.task][key]
            out[name] = {"task": spec.task, "metric": spec.metric, "score": round(float(score), 4),
                         "n": len(items), "items": items}
            log(f"  {name:<10} {spec.task}/{spec.metric} = {score:.4f} (n={len(items)})")
    return out


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_models(paths: dict[str, Path], cfg, log=print, training_tokenizer=None) -> dict[str, dict]:
    """{model name: run_tasks(...)} for each named model folder."""
    results = {}
    for name, path in paths.items():
        log(f"evaluating {name} ({path})")
        model, tokenizer = load_model(path)
        results[name] = run_tasks(model, tokenizer, cfg, log, training_tokenizer)
    return results


def summary(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The small metrics file DVC tracks: {model: {metric: score}}."""
    return {model: {name: r["score"] for name, r in metrics.items()} for model, metrics in results.items()}
