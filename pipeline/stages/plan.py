"""`sft plan`: GPU memory per strategy, the smallest node count that fits, hours and cost, for the
model's shape (a known name, or config.json as `sft tokenizer` fetched it) and this data's tokens."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.files import write_json, write_text
from pipeline.paths import Paths
from pipeline.plan import SHAPES, Shape, plan, render_markdown
from pipeline.stages import StageError
from pipeline.stages.inputs import check_built_for_base, check_family, prepared_stats


def model_shape(params, paths: Paths, model: str | None) -> tuple[str, Shape]:
    name = (
        model
        or params.plan.model
        or next(
            (str(f) for f in (paths.tokenizer / "config.json", paths.base / "config.json") if f.is_file()),
            str(paths.tokenizer / "config.json"),
        )
    )
    if name in SHAPES:  # each a supported family (tests/test_presets.py checks its positions)
        return name, Shape(**SHAPES[name])
    if not Path(name).is_file():
        raise StageError(
            f"plan: {name!r} is neither a known shape ({', '.join(SHAPES)}) nor a config.json file; "
            "run `sft tokenizer` (it fetches config.json) or set plan.model"
        )
    check_built_for_base(Path(name).parent, params.base)
    if Path(name).name == "config.json":
        check_family(Path(name).parent, params.prepare.max_seq_len)
    return name, Shape.from_config(json.loads(Path(name).read_text()))


def planned_tokens(params, paths: Paths, stats) -> int:
    """Tokens an epoch of this branch's data makes: prepare's exact count (`stats`, when it was made from
    these very files), else `sft data stats` of them with the replay share added."""
    report = paths.data_report / "stats.json"
    if stats:
        return stats.tokens
    if report.is_file():
        current = json.loads(report.read_text())["current"]  # the training file only: add the replay mix
        return round(current["tokens"] / (1 - params.prepare.replay_share))
    raise StageError(
        "plan: no token count for this data; run `sft data stats` (or `sft prepare`) first, or pass --tokens"
    )


def run(params, paths: Paths, model: str | None = None, tokens: int | None = None) -> str:
    """The plan's markdown (also in plan/plan.md, with plan.json)."""
    name, shape = model_shape(params, paths, model)
    stats = prepared_stats(params, paths)  # hashes the data files: once
    tokens_per_run = (planned_tokens(params, paths, stats) if tokens is None else tokens) * params.train.epochs
    tokens_per_gpu = params.train.micro_batch_size * params.prepare.max_seq_len
    # logits are computed only where a loss is taken: prepare's share for this data, else all of them
    supervised_share = stats.supervised_tokens / stats.tokens if stats and stats.supervised_tokens else 1.0
    cfg, train = params.plan, params.train  # the plan is for the run the config makes
    rows = plan(
        shape,
        tokens_per_run,
        tokens_per_gpu,
        cfg.gpus_per_node,
        cfg.mfu,
        cfg.prices,
        train.activation_checkpointing,
        train.compile,
        supervised_share,
    )
    markdown = render_markdown(name, shape, rows, tokens_per_run, cfg.mfu)
    write_json(
        paths.plan / "plan.json",
        {
            "model": name,
            "params": shape.params,
            "tokens_per_run": tokens_per_run,
            "tokens_per_gpu_step": tokens_per_gpu,
            "rows": rows,
        },
    )
    write_text(paths.plan / "plan.md", markdown)
    return markdown
