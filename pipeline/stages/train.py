"""train and lora: fine-tune the base on prepare's rows, a checkpoint every epoch.

`train` trains every weight; `lora` (the baseline full SFT must beat) trains adapters on every
linear layer with the same data, epochs and loop at LoRA's learning rate, and each epoch's
checkpoint is the merged model. Under a sharded strategy a plain `sft train` (what `dvc repro`
runs) re-runs itself under torchrun, one process per GPU (pipeline/dist.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import PrepareStats, TrainingMetrics, read, write
from pipeline.paths import Paths
from pipeline.stages import StageError
from pipeline.stages.inputs import check_family

STAGES = ("train", "lora")


@dataclass(frozen=True)
class TrainSummary:
    metrics: TrainingMetrics  # what <stage>/metrics.json holds
    seconds: float  # unrounded, as the message prints it
    final_loss: float
    kept: list[str]  # the checkpoints kept, oldest first

    @property
    def message(self) -> str:
        resumed = self.metrics.resumed_from_step
        note = f" (resumed from step {resumed})" if resumed else ""
        return (
            f"trained {self.metrics.steps} steps{note} in {self.seconds:.0f}s, "
            f"final loss {self.final_loss:.4f}; kept {', '.join(self.kept)}"
        )


def run(
    params, paths: Paths, stage: str = "train", argv: list[str] | None = None, say: Callable[[str], None] = print
) -> TrainSummary | None:
    """Run `stage` ('train' or 'lora') into `paths.<stage>` (checkpoints/, state/, live/, metrics.json);
    None on every rank but 0.
    `argv`: this command's own arguments, re-run under torchrun when the strategy needs one process
    per GPU (None: never relaunch)."""
    from pipeline.dist import Strategy, close, init_runtime, relaunch_under_torchrun, training_command
    from pipeline.trackers import check_trackers

    if stage not in STAGES:
        raise StageError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    out = getattr(paths, stage)
    cfg, adapters = (params.train, None) if stage == "train" else (params.lora.training(params.train), params.lora)
    if adapters is not None and cfg.strategy != params.train.strategy and "WORLD_SIZE" not in os.environ:
        say(f"lora: train.strategy={params.train.strategy}; the baseline shards its frozen base with {cfg.strategy}")
    check_family(paths.base, params.prepare.max_seq_len)  # before any process group or GPU hour
    strategy = Strategy.of(cfg.strategy)
    try:
        check_trackers(cfg.trackers)
        if argv is not None:  # fsdp2 / zero3 outside a launcher (`dvc repro` runs `sft train`): one process per GPU
            relaunch_under_torchrun(training_command(strategy, argv, os.environ), f"train.strategy={cfg.strategy}", say)
        runtime = init_runtime(strategy, cfg.device, cfg.collective_timeout_minutes)
    except RuntimeError as err:
        raise StageError(str(err)) from err
    meta = {
        "config": cfg.model_dump(),
        "base": json.loads((paths.base / "meta.json").read_text()),
        "data_sha256": read(paths.prepare_stats, PrepareStats).data_sha256,
    }
    model, weights, hooks = load(paths.base, cfg, adapters, runtime, meta, say)
    report = ProgressReport(out, cfg.trackers, meta) if runtime.is_main else None
    result = train_model(model, weights, hooks, cfg, paths, out, meta, runtime, report)
    device = device_name(runtime.device)
    close(runtime)
    tracked = report.close() if report else {}
    if not runtime.is_main:
        return None
    metrics = TrainingMetrics(
        steps=result.steps,
        final_loss=result.final_loss,
        tokens=result.tokens,
        tokens_per_second=round(result.tokens / result.seconds),
        seconds=round(result.seconds, 1),
        strategy=cfg.strategy,
        world_size=runtime.world_size,
        device=device,
        resumed_from_step=result.resumed_from_step,
        **({"trackers": tracked} if tracked else {}),  # run ids: the gate adds its results to these runs
    )
    write(paths.metrics(stage), metrics)
    from pipeline.train.checkpoint import list_checkpoints

    kept = [c.name for c in list_checkpoints(out / "checkpoints")]
    return TrainSummary(metrics, result.seconds, result.final_loss, kept)


def load(base_dir: Path, cfg, adapters, runtime, meta: dict, say) -> tuple:
    """(model, weights, train()'s keyword arguments): the base, or the base with fresh adapters (the
    base frozen, the adapters trained; both sharded under fsdp2)."""
    from pipeline.train.strategies import load_model

    if adapters is None:
        model, weights = load_model(base_dir, cfg, runtime)
        return model, weights, {}
    from pipeline.lora import load_with_adapters, trainable_share, training_hooks

    model, weights = load_with_adapters(base_dir, cfg, adapters, runtime)
    meta["adapters"] = adapters.model_dump()
    trainable, total = trainable_share(model)
    if runtime.is_main:
        say(
            f"LoRA rank {adapters.rank}{' (DoRA)' if adapters.dora else ''} on every linear layer: "
            f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})"
        )
    return model, weights, training_hooks(model)


def train_model(model, weights, hooks: dict, cfg, paths: Paths, out: Path, meta: dict, runtime, report):
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.train.loop import train

    packed = dict(np.load(paths.packed))
    tokenizer = AutoTokenizer.from_pretrained(paths.base)
    return train(
        model,
        tokenizer,
        packed,
        cfg,
        out / "checkpoints",
        meta,
        report,
        runtime,
        state_dir=out / "state",
        weights=weights,
        **hooks,
    )


def device_name(device) -> str:
    """What the cost of a run is priced by: the accelerator's name, or 'cpu'."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class ProgressReport:
    """Rank 0's view of training, opened at its first step: a progress bar, DVCLive's record under
    <out>/live (declared in dvc.yaml) and the trackers' step metrics."""

    def __init__(self, out: Path, trackers: list[str], meta: dict):
        self.out, self.stage, self.trackers, self.meta = out, out.name, trackers, meta
        self.bar = self.live = self.runs = None

    def open(self, total: int) -> None:
        from dvclive import Live
        from tqdm import tqdm

        from pipeline.trackers import TrainingRuns

        self.bar = tqdm(total=total, desc=self.stage, unit="step", file=sys.stdout, mininterval=2)
        # always a fresh record: a resumed run replays its steps from the resume state, so files
        # already there (the last demo's, committed) never mix in
        self.live = Live(str(self.out / "live"), resume=False, save_dvc_exp=False, dvcyaml=None)
        self.runs = TrainingRuns(self.trackers, self.stage, self.meta)

    def __call__(self, record: dict, total: int) -> None:
        if self.bar is None:
            self.open(total)
        self.bar.set_postfix(
            epoch=record["epoch"], loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False
        )
        self.bar.update(1)
        self.live.step = record["step"]
        metrics = {
            f"train/{name}": value
            for name, value in record.items()
            if name not in ("step", "epoch") and value is not None
        }
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()
        self.runs.log(metrics, record["step"])

    def close(self) -> dict:
        """The trackers' run ids ({} when no step was reported)."""
        if self.bar is None:
            return {}
        self.bar.close()
        self.live.end()
        return self.runs.finish()
