"""evaluate: lm-eval on the base model, on every kept checkpoint, and on the chosen one.

Each named metric in params.yaml (evaluate.metrics) is one lm-eval task and one of its metrics;
chat tasks render prompts through the model's chat template, exactly as prepare did for
training. Per-item scores are kept so the gate can compare the same items across models.

When each runs: the full suite on the base model (cached by the base weights' hash), the
`per_checkpoint` metrics (golden) on every kept checkpoint, and the full suite on checkpoints in
the gate's order of preference until one passes (`evaluate_in_order`): usually exactly one.

On every GPU of the node: `sft evaluate` re-runs itself under torchrun, one process per GPU
(pipeline/dist.py's `data_parallel_command`), and lm-eval's HF backend shards each task's requests by
rank and gathers the samples on rank 0 (`data_parallel_lm`), with the same tasks, chat template and
generation settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

# Offline is the caller's choice (the Makefile sets it for the demo and the tests): on the cluster
# the registry tasks (mmlu_pro, ifeval, crows_pairs) download their data sets.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_parity(lm, training_tokenizer, prompt: str = "Say hello.", template=None) -> None:
    """Refuse to evaluate when lm-eval would show the model a prompt other than training did
    (`training_tokenizer` is the one prepare used: the base model's; `template` the TemplateOptions
    prepare used, whose kwargs lm-eval passes to the chat template as `chat_template_args`)."""
    from pipeline.prepare import IGNORE, tokenize_pair

    ids, labels = tokenize_pair(training_tokenizer, prompt, "hello", template)
    trained = ids[: next(i for i, label in enumerate(labels) if label != IGNORE)]  # up to the first supervised token
    evaluated = lm.tok_encode(lm.apply_chat_template([{"role": "user", "content": prompt}]))
    if evaluated != trained:
        raise ValueError(
            "train/eval mismatch: lm-eval renders the chat prompt differently from prepare "
            f"(training ids {trained[:12]}..., evaluation ids {evaluated[:12]}...); "
            "check the tokenizer's chat template and BOS handling"
        )


@functools.cache
def data_parallel_lm():
    """lm-eval's HF backend over the process group: lm-eval shards every task's requests by rank and
    gathers samples and metrics on rank 0 (its integration point for a model object it did not load)."""
    import torch
    import torch.distributed as dist
    from lm_eval.models.huggingface import HFLM

    class DataParallelHFLM(HFLM):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

        def all_gather(self, tensor):  # per-rank request counts: one value each, concatenated
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self):
            dist.barrier()

    return DataParallelHFLM


@functools.cache
def task_manager(include_path: str, registry: bool):
    """lm-eval's task index, built once per process. The registry (thousands of YAMLs, seconds to
    index) is included only when a task needs it: the demo's tasks all live in include_path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=registry)


def tasks_index(include_path: str, tasks: set[str]):
    local = task_manager(include_path, registry=False)
    return local if tasks <= set(local.all_tasks) else task_manager(include_path, registry=True)


def run_tasks(
    model, tokenizer, cfg, log=print, training_tokenizer=None, names: list[str] | None = None, template=None
) -> dict[str, dict]:
    """{metric name: {"task", "metric", "score", "n", "items": {item id: score}}} for one model,
    on the metrics `names` (default: all of evaluate.metrics). Under torchrun every rank evaluates
    its share and rank 0 alone gets the results (None elsewhere)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from pipeline.dist import is_main, world
    from pipeline.prepare import TemplateOptions, freeze_template_clock

    freeze_template_clock()  # lm-eval renders chat prompts on the same day as prepare did
    template = template or TemplateOptions()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that we pass a model object: we mean to
    backend = data_parallel_lm() if world()[1] > 1 else HFLM
    # chat prompts take prepare's template kwargs (prepare.chat_template_kwargs), as training did
    lm = backend(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=cfg.batch_size,
        max_gen_toks=cfg.max_gen_toks,
        device=str(model.device),
        chat_template_args=dict(template.kwargs),
    )
    wanted = {name: spec for name, spec in cfg.metrics.items() if names is None or name in names}
    manager = tasks_index(str(Path(cfg.include_path).resolve()), {spec.task for spec in wanted.values()})
    if any(spec.chat for spec in wanted.values()):
        check_parity(lm, training_tokenizer or tokenizer, template=template)
    out: dict[str, dict] = {}
    for chat in (True, False):
        group = {name: spec for name, spec in wanted.items() if spec.chat == chat}
        if not group:
            continue
        tasks = sorted({spec.task for spec in group.values()})
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            apply_chat_template=chat,
            limit=cfg.limit,
            bootstrap_iters=0,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
            verbosity="WARNING",
        )
        if results is None:  # a rank other than 0: its samples went to rank 0
            continue
        for name, spec in group.items():
            out[name] = metric_result(results, name, spec)
            log(f"  {name:<10} {spec.task}/{spec.metric} = {out[name]['score']:.4f} (n={out[name]['n']})")
    return out if is_main() else None


def metric_result(results: dict, name: str, spec) -> dict:
    """One metric of lm-eval's results: its score, and the per-item scores keyed by item id."""
    if spec.task not in results["results"]:
        raise KeyError(f"lm-eval returned no results for task {spec.task!r} (metric {name!r})")
    reported = [k for k in results["results"][spec.task] if k.startswith(f"{spec.metric},")]
    if not reported:
        available = sorted({k.split(",")[0] for k in results["results"][spec.task] if "," in k})
        raise KeyError(
            f"evaluate.metrics.{name}: task {spec.task!r} has no metric {spec.metric!r}; "
            f"it reports {[m for m in available if not m.endswith('_stderr')]}"
        )
    # registry tasks name their answer-extraction filter (mmlu_pro: "custom-extract"); local ones "none"
    key = f"{spec.metric},none" if f"{spec.metric},none" in reported else sorted(reported)[0]
    filter_name = key.split(",", 1)[1]
    # per-item scores keyed by item id (task and document), so the gate pairs models item by item
    items = {
        f"{task}/{sample['doc_id']}": float(sample[spec.metric])
        for task in leaf_tasks(results, spec.task)
        for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
        if sample.get("filter", filter_name) == filter_name
    }
    if not items:
        raise ValueError(f"evaluate.metrics.{name}: task {spec.task!r} scored no items")
    score = results["results"][spec.task][key]
    return {"task": spec.task, "metric": spec.metric, "score": round(float(score), 4), "n": len(items), "items": items}


def leaf_tasks(results: dict, task: str) -> list[str]:
    """The tasks whose samples make up `task`: itself, or for a group (mmlu_pro: 14 subjects) every
    subtask, nested groups expanded, in name order so that every model's items line up."""
    subtasks = results.get("group_subtasks", {}).get(task)
    if not subtasks:
        return [task]
    return [leaf for sub in sorted(subtasks) for leaf in leaf_tasks(results, sub)]


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_models(
    paths: dict[str, Path], cfg, log=print, training_tokenizer=None, names: list[str] | None = None, template=None
) -> dict[str, dict]:
    """{model name: run_tasks(...)} for each named model folder."""
    results = {}
    for name, path in paths.items():
        log(f"evaluating {name} ({path})")
        model, tokenizer = load_model(path)
        results[name] = run_tasks(model, tokenizer, cfg, log, training_tokenizer, names, template)
    return results


def evaluate_in_order(
    paths: dict[str, Path], cfg, accept: Callable[[str, dict], bool], log=print, training_tokenizer=None, template=None
) -> dict[str, dict]:
    """The full suite on each model in the given order (the gate's preference), stopping after
    the first one `accept(name, results)` takes: a passing checkpoint is evaluated once."""
    from pipeline.dist import from_rank_zero, is_main

    results = {}
    for name, path in paths.items():
        results.update(evaluate_models({name: path}, cfg, log, training_tokenizer, template=template))
        if from_rank_zero(accept(name, results[name]) if is_main() else None):  # rank 0 holds the results
            break
    return results


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose `!function module.name` tags plain YAML does not know."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def suite_fingerprint(cfg, base_sha256: str) -> str:
    """What the base model's results depend on: its weights, the task files, the local data they
    read, the evaluate settings, lm-eval's version and this module (the scoring code and the format
    of the per-item results)."""
    import lm_eval

    digest = hashlib.sha256(
        json.dumps(
            {"base": base_sha256, "evaluate": cfg.model_dump(exclude={"base_cache"}), "lm_eval": lm_eval.__version__},
            sort_keys=True,
        ).encode()
    )
    digest.update(Path(__file__).read_bytes())
    tasks = sorted(p for p in Path(cfg.include_path).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    data: set[Path] = set()
    for path in tasks:
        digest.update(f"{path.relative_to(cfg.include_path)}\0".encode() + path.read_bytes())
        if path.suffix == ".yaml":
            task = yaml.load(path.read_text(), Loader=_TaskLoader) or {}
            files = (task.get("dataset_kwargs") or {}).get("data_files")
            values = files.values() if isinstance(files, dict) else [files] if files else []
            data |= {Path(f) for v in values for f in ([v] if isinstance(v, str) else v)}
    for path in sorted(data):  # registry tasks read hub datasets pinned by lm-eval's version instead
        if path.is_file():
            digest.update(f"{path}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def base_cache_dir(cfg) -> Path | None:
    """Where base results are kept: $SFT_BASE_CACHE (the training job points it into the bucket, which
    outlives the cluster), else evaluate.base_cache; None: no cache."""
    folder = os.environ.get("SFT_BASE_CACHE") or cfg.base_cache
    return Path(folder).expanduser() if folder else None


def cached_base_results(cfg, key: str) -> dict | None:
    folder = base_cache_dir(cfg)
    path = folder / f"{key}.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def cache_base_results(cfg, key: str, results: dict) -> None:
    folder = base_cache_dir(cfg)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{key}.json.tmp"
    tmp.write_text(json.dumps(results))
    tmp.replace(folder / f"{key}.json")  # atomic: a concurrent reader sees all or nothing


def summary(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The small metrics file DVC tracks: {model: {metric: score}}."""
    return {model: {name: r["score"] for name, r in metrics.items()} for model, metrics in results.items()}
