"""evaluate: lm-eval on the base model, the kept checkpoints, the chosen one or the LoRA baseline
(pipeline/evaluate.py does the evaluating; this stage picks the models and writes the files).

On a node with several GPUs a plain `sft evaluate` re-runs itself under torchrun, one process per
GPU (pipeline/dist.py); rank 0 writes `<out>/<name>.json` and `<name>-items.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import write_json
from pipeline.paths import Paths
from pipeline.stages import StageError

MODELS = ("base", "checkpoints", "chosen", "lora")


@dataclass(frozen=True)
class EvaluateSummary:
    models: int
    seconds: float
    files: tuple[Path, Path]  # the summary and the per-item results

    @property
    def message(self) -> str:
        return f"evaluated {self.models} model(s) in {self.seconds:.0f}s"


def run(
    params, paths: Paths, model: str = "checkpoints", argv: list[str] | None = None, say: Callable[[str], None] = print
) -> EvaluateSummary | None:
    """Evaluate `model` ('base', 'checkpoints', 'chosen' or 'lora'; see MODELS) into `paths.evaluate`;
    the kept checkpoints are train's (lora's for 'lora'); `argv`: this command's arguments, re-run
    under torchrun on a node with several GPUs (None: never).
    None on every rank but 0."""
    from transformers import AutoTokenizer

    from pipeline.dist import close, data_parallel_command, init_data_parallel, relaunch_under_torchrun
    from pipeline.evaluate import summary
    from pipeline.prepare import TemplateOptions
    from pipeline.train.checkpoint import list_checkpoints

    if model not in MODELS:
        raise StageError(f"--model must be 'base', 'checkpoints', 'chosen' or 'lora', not {model!r}")
    if argv is not None:  # one process per GPU of the node: lm-eval shards every task's requests by rank
        relaunch_under_torchrun(data_parallel_command(argv, os.environ), "evaluating data-parallel", say)
    runtime = init_data_parallel(params.train.collective_timeout_minutes)
    say = say if runtime.is_main else (lambda *_: None)
    checkpoints = paths.checkpoints("lora" if model == "lora" else "train")
    if model == "lora":
        from pipeline.lora import PREFIX

        kept = {PREFIX + c.name: c for c in list_checkpoints(checkpoints)}
    else:
        kept = {c.name: c for c in list_checkpoints(checkpoints)}
    if model != "base" and not kept:
        raise StageError(
            f"{checkpoints}: no complete checkpoints to evaluate; run `sft {'lora' if model == 'lora' else 'train'}`"
        )
    started = time.perf_counter()
    # prompts must reach the model exactly as prepare rendered them with the base tokenizer
    training_tokenizer = AutoTokenizer.from_pretrained(paths.base)
    template = TemplateOptions.from_config(params.prepare)  # and with prepare's chat-template kwargs
    try:
        if model == "base":
            results = base_results(params, paths.base, runtime, training_tokenizer, template, say)
        elif model == "checkpoints":
            from pipeline.evaluate import evaluate_models

            results = evaluate_models(
                kept, params.evaluate, say, training_tokenizer, params.evaluate.per_checkpoint, template=template
            )
        elif model == "lora":
            results = lora_results(params, kept, training_tokenizer, say)
        else:
            results = full_suite_in_gate_order(params, kept, paths.evaluate, training_tokenizer, say)
    except ValueError as err:
        raise StageError(str(err)) from err
    close(runtime)
    if not runtime.is_main:  # the other ranks' samples are in rank 0's results
        return None
    name = "suite" if model == "chosen" else model
    files = (paths.evaluate / f"{name}.json", paths.evaluate / f"{name}-items.json")
    write_json(files[1], results)
    write_json(files[0], summary(results))
    return EvaluateSummary(len(results), time.perf_counter() - started, files)


def base_results(params, base_dir: Path, runtime, training_tokenizer, template, say) -> dict:
    """The full suite on the base model, from the cache when the same weights, tasks, data and
    template kwargs were evaluated before."""
    from pipeline.dist import from_rank_zero
    from pipeline.evaluate import (
        base_cache_dir,
        cache_base_results,
        cached_base_results,
        evaluate_models,
        suite_fingerprint,
    )

    base_sha = json.loads((base_dir / "meta.json").read_text())["sha256"]
    # other template kwargs render other prompts: a cached base result is only for the same ones
    key = suite_fingerprint(
        params.evaluate, base_sha + (f" {json.dumps(dict(template.kwargs), sort_keys=True)}" if template.kwargs else "")
    )
    # rank 0 looks: a cache entry written meanwhile by another job must not split the ranks
    results = cached_base_results(params.evaluate, key) if runtime.is_main else None
    if from_rank_zero(results is not None):
        say(
            f"base results from the cache ({base_cache_dir(params.evaluate)}/{key[:12]}…): same weights, tasks and data"
        )
        return results
    results = evaluate_models({"base": base_dir}, params.evaluate, say, training_tokenizer, template=template)
    if runtime.is_main:
        cache_base_results(params.evaluate, key, results)
    return results


def lora_results(params, kept: dict[str, Path], training_tokenizer, say=print) -> dict:
    """evaluate.per_checkpoint on every LoRA checkpoint, then the rest of the suite on the best by the
    policy's select_by: the baseline full SFT is compared with."""
    from pipeline.dist import from_rank_zero, is_main
    from pipeline.evaluate import evaluate_models, summary
    from pipeline.gate import load_policy, ranked
    from pipeline.prepare import TemplateOptions

    template = TemplateOptions.from_config(params.prepare)
    results = evaluate_models(
        kept, params.evaluate, say, training_tokenizer, params.evaluate.per_checkpoint, template=template
    )
    select_by = load_policy(params.gate.policy, set(params.evaluate.metrics)).select_by
    best = from_rank_zero(ranked(summary(results), select_by)[0] if is_main() else None)  # rank 0 holds the results
    rest = [m for m in params.evaluate.metrics if m not in params.evaluate.per_checkpoint]
    say(f"full suite on the best LoRA checkpoint by {select_by}: {best}")
    suite = evaluate_models({best: kept[best]}, params.evaluate, say, training_tokenizer, rest, template=template)[best]
    if is_main():
        results[best].update(suite)
    return results


def full_suite_in_gate_order(params, kept: dict[str, Path], evaluations: Path, training_tokenizer, say=print) -> dict:
    """The full suite on the best checkpoint by golden that can still pass, then the next, until
    one passes the whole policy (usually the first): the gate stage then decides on these files."""
    from pipeline.evaluate import evaluate_in_order
    from pipeline.gate import check_candidate, load_policy, suite_order
    from pipeline.prepare import TemplateOptions

    policy = load_policy(params.gate.policy, set(params.evaluate.metrics))
    base = json.loads((evaluations / "base-items.json").read_text())["base"]
    base_scores = {metric: r["score"] for metric, r in base.items()}
    golden = json.loads((evaluations / "checkpoints.json").read_text())
    unknown = sorted(set(golden) - set(kept))
    if unknown:
        raise StageError(f"{evaluations}/checkpoints.json: results for {unknown} but no such kept checkpoint")

    def passes(name: str, results: dict) -> bool:  # on rank 0 only, which holds the results
        scores = {metric: r["score"] for metric, r in results.items()}
        rules, _ = check_candidate(
            policy,
            base_scores,
            scores,
            {m: r["items"] for m, r in base.items()},
            {m: r["items"] for m, r in results.items()},
        )
        failed = [r["metric"] for r in rules if not r["passed"]]
        say(f"{name}: {'passes the gate' if not failed else 'fails ' + ', '.join(failed)}")
        return not failed

    order = suite_order(policy, base_scores, golden)
    say(f"full suite, in the gate's order: {', '.join(order)}")
    return evaluate_in_order(
        {name: kept[name] for name in order},
        params.evaluate,
        passes,
        say,
        training_tokenizer,
        template=TemplateOptions.from_config(params.prepare),
    )
