"""`sft`: one command per dvc.yaml stage, plus `demo`, `smoke`, `data` and the release commands.

Each stage command parses its options, runs `pipeline.stages.<stage>.run(params, paths)` and prints
what it returns; a stage's StageError is printed in red with exit code 1 (pipeline/console.py).
Stage modules are imported inside the commands: `sft status set` runs where only typer, pydantic
and PyYAML are installed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import typer

from pipeline.console import fail, folder, params, reports_errors
from pipeline.files import write_json
from pipeline.paths import PATHS
from pipeline.release import release_app
from pipeline.stages.inputs import check_family

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Full supervised fine-tuning pipeline (each command is one dvc.yaml stage).")
app.add_typer(release_app, rich_help_panel="Release")


@app.command()
def demo(out: Path = typer.Option(Path("data"), help="folder for the demo data set"),
         rows: int = typer.Option(15_000, help="training pairs"),
         seed: int = typer.Option(0)):
    """Write the embedded demo data set (deterministic: byte-identical on every machine)."""
    from pipeline.demo import write_demo_data

    counts = write_demo_data(out, seed=seed, train_rows=rows)
    typer.echo(" ".join(f"{name}={n}" for name, n in counts.items()) + f" -> {out}/")


@app.command()
def smoke(params_file: Path = typer.Option(Path("configs/demo.yaml"), "--params", help="the demo preset"),
          out: Path = typer.Option(Path("smoke"), help="where the smoke run's gate report goes"),
          work: Path = typer.Option(None, help="scratch copy of the project (default: a temporary folder)"),
          rows: int = typer.Option(15_000, help="demo training pairs")):
    """The CPU smoke run: the whole DAG on the embedded demo in a scratch copy of this project, so
    data/, params.yaml and the committed results stay as the team left them."""
    import subprocess
    import tempfile

    from pipeline.demo import smoke_run

    with tempfile.TemporaryDirectory(prefix="sft-smoke-") as scratch:
        try:
            report = smoke_run(Path("."), params_file, work or Path(scratch) / "project", out, rows)
        except subprocess.CalledProcessError as err:
            fail(f"smoke run: `{' '.join(map(str, err.cmd))}` failed (exit {err.returncode}); the output is above")
    typer.echo(f"\n{report.read_text()}\nsmoke run: the demo DAG passed end to end; report in {out}/")


TOKENIZER = folder("tokenizer", "the base's tokenizer, chat template and config.json (`sft tokenizer`)")
BASE = folder("base", "the base model (`sft base`)")
VALIDATE = folder("validate", "the data contract's report (`sft validate`)")
PREPARE = folder("prepare", "the packed rows and their statistics (`sft prepare`)")
TRAIN = folder("train", "full SFT's checkpoints and metrics (`sft train`)")
LORA = folder("lora", "the LoRA baseline's checkpoints and metrics (`sft lora`)")
EVALUATE = folder("evaluate", "the evaluations (`sft evaluate`)")
GATE = folder("gate", "the verdict and its reports (`sft gate`)")
CARD = folder("card", "the publishable folder (`sft card`)")
RELEASE = folder("release", "the release manifest (`sft card`), signed by `sft sign`")
PLAN = folder("plan", "the GPU plan (`sft plan`)")
DATA_REPORT = folder("data_report", "the data statistics (`sft data stats`)")


@app.command()
@reports_errors
def tokenizer(tokenizer: Path = TOKENIZER):
    """The base model's small files: tokenizer, chat template, config (no weights: what a PR needs)."""
    from pipeline.stages import tokenizer as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer)))


@app.command()
@reports_errors
def base(base: Path = BASE):
    """Resolve the base model: build the tiny demo model, or download a pinned Hub revision."""
    from pipeline.stages import base as stage

    typer.echo(stage.run(params(), PATHS.with_(base=base), log=typer.echo))


@app.command()
@reports_errors
def validate(tokenizer: Path = TOKENIZER, validate: Path = VALIDATE):
    """Check the training (and replay) data against the data contract (great-expectations)."""
    from pipeline.stages import validate as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer, validate=validate)))


@app.command()
@reports_errors
def prepare(tokenizer: Path = TOKENIZER, validate: Path = VALIDATE, prepare: Path = PREPARE):
    """Mix replay, apply the chat template, tokenize, mask prompts, pack into fixed-length rows."""
    from pipeline.stages import prepare as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer, validate=validate, prepare=prepare)))


@app.command()
@reports_errors
def train(base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("train")):
    """Full fine-tuning: every weight, a checkpoint every epoch, the last N kept."""
    p = params()
    _train_stage(p.train, base_dir, packed_dir, out)


@app.command()
@reports_errors
def lora(base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("lora")):
    """The LoRA baseline: adapters on every linear layer, the same data, epochs and loop as `sft train`
    at LoRA's learning rate; each epoch's checkpoint is the merged model."""
    p = params()
    cfg = p.lora.training(p.train)
    if cfg.strategy != p.train.strategy and "WORLD_SIZE" not in os.environ:  # once, before the launcher
        typer.echo(f"lora: train.strategy={p.train.strategy}; the baseline shards its frozen base with {cfg.strategy}")
    _train_stage(cfg, base_dir, packed_dir, out, adapters=p.lora)


def _train_stage(cfg, base_dir: Path, packed_dir: Path, out: Path, adapters=None) -> None:
    import numpy as np
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pipeline.train.checkpoint import list_checkpoints
    from pipeline.train.loop import train as run_training
    from pipeline.train.strategies import close, init_runtime, load_model, torchrun_command

    from pipeline.trackers import TrainingRuns, check_trackers

    check_family(base_dir, params().prepare.max_seq_len)  # before any process group or GPU hour
    try:
        check_trackers(cfg.trackers)
        command = torchrun_command(cfg.strategy, sys.argv[1:], os.environ)
        if command:  # fsdp2 / zero3 outside a launcher (`dvc repro` runs `sft train`): one process per GPU
            typer.echo(f"train.strategy={cfg.strategy}: {shlex.join(command)}")
            sys.stdout.flush()
            os.execv(command[0], command)
        runtime = init_runtime(cfg.strategy, cfg.device, cfg.collective_timeout_minutes)
    except RuntimeError as err:
        fail(str(err))
    packed = dict(np.load(packed_dir / "packed.npz"))
    stats = json.loads((packed_dir / "stats.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    meta = {"config": cfg.model_dump(), "base": json.loads((base_dir / "meta.json").read_text()),
            "data_sha256": stats["data_sha256"]}
    if adapters is None:
        model, weights = load_model(base_dir, cfg, runtime)
    else:  # the base frozen, the adapters trained; both sharded under fsdp2
        from pipeline.lora import load_with_adapters, trainable_share

        model, weights = load_with_adapters(base_dir, cfg, adapters, runtime)
        meta["adapters"] = adapters.model_dump()
        trainable, total = trainable_share(model)
        if runtime.is_main:
            typer.echo(f"LoRA rank {adapters.rank}{' (DoRA)' if adapters.dora else ''} on every linear layer: "
                       f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})")

    bar = live = runs = None
    stage = out.name

    def progress(record: dict, total: int):  # rank 0 only: a progress bar, DVCLive and tracker step metrics
        nonlocal bar, live, runs
        if bar is None:
            from dvclive import Live

            bar = tqdm(total=total, desc=stage, unit="step", file=sys.stdout, mininterval=2)
            # the stage declares <out>/live in dvc.yaml. Always a fresh record: a resumed run replays its
            # steps from the resume state, so files already there (the last demo's, committed) never mix in
            live = Live(str(out / "live"), resume=False, save_dvc_exp=False, dvcyaml=None)
            runs = TrainingRuns(cfg.trackers, stage, meta)
        bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
        bar.update(1)
        live.step = record["step"]
        metrics = {f"train/{name}": value for name, value in record.items()
                   if name not in ("step", "epoch") and value is not None}
        for name, value in metrics.items():
            live.log_metric(name, value)
        live.next_step()
        runs.log(metrics, record["step"])

    result = run_training(model, tokenizer, packed, cfg, out / "checkpoints", meta, progress, runtime,
                          state_dir=out / "state", weights=weights)
    device = device_name(runtime.device)
    close(runtime)
    tracked = {}
    if bar:
        bar.close()
        live.end()
        tracked = runs.finish()
    if not runtime.is_main:
        return
    write_json(out / "metrics.json", {
        "steps": result.steps, "final_loss": result.final_loss, "tokens": result.tokens,
        "tokens_per_second": round(result.tokens / result.seconds), "seconds": round(result.seconds, 1),
        "strategy": cfg.strategy, "world_size": runtime.world_size, "device": device,
        "resumed_from_step": result.resumed_from_step,
        **({"trackers": tracked} if tracked else {}),  # run ids: the gate adds its results to these runs
    })
    kept = ", ".join(c.name for c in list_checkpoints(out / "checkpoints"))
    resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step else ""
    typer.echo(f"trained {result.steps} steps{resumed} in {result.seconds:.0f}s, final loss {result.final_loss:.4f}; "
               f"kept {kept}")


def device_name(device) -> str:
    """What the cost of a run is priced by: the accelerator's name, or 'cpu'."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@app.command()
def evaluate(model: str = typer.Option("checkpoints", help="'base': the full suite on the base model (cached by "
                                       "its hash); 'checkpoints': evaluate.per_checkpoint on every kept one; "
                                       "'chosen': the full suite on checkpoints in the gate's order until one passes; "
                                       "'lora': evaluate.per_checkpoint on every LoRA checkpoint, the full suite on "
                                       "the best"),
             base_dir: Path = Path("base"), checkpoints: Path = Path("train/checkpoints"),
             lora_checkpoints: Path = Path("lora/checkpoints"), out: Path = Path("evaluate")):
    """Run the lm-eval tasks of params.yaml on the base model, the kept checkpoints, the chosen one or
    the LoRA baseline."""
    from transformers import AutoTokenizer

    from pipeline.evaluate import (base_cache_dir, cache_base_results, cached_base_results, evaluate_models,
                                   from_rank_zero, init_data_parallel, launcher, suite_fingerprint, summary)
    from pipeline.prepare import TemplateOptions
    from pipeline.train.checkpoint import list_checkpoints
    from pipeline.train.strategies import close

    p = params()
    if model not in ("base", "checkpoints", "chosen", "lora"):
        fail(f"--model must be 'base', 'checkpoints', 'chosen' or 'lora', not {model!r}")
    command = launcher(sys.argv[1:], os.environ)
    if command:  # one process per GPU of the node: lm-eval shards every task's requests by rank
        typer.echo(f"evaluating data-parallel: {shlex.join(command)}")
        sys.stdout.flush()
        os.execv(command[0], command)
    runtime = init_data_parallel(p.train.collective_timeout_minutes)
    say = typer.echo if runtime.is_main else (lambda *_: None)
    if model == "lora":
        from pipeline.lora import PREFIX

        checkpoints = lora_checkpoints
        kept = {PREFIX + c.name: c for c in list_checkpoints(checkpoints)}
    else:
        kept = {c.name: c for c in list_checkpoints(checkpoints)}
    if model != "base" and not kept:
        fail(f"{checkpoints}: no complete checkpoints to evaluate; run `sft {'lora' if model == 'lora' else 'train'}`")
    started = time.perf_counter()
    # prompts must reach the model exactly as prepare rendered them with the base tokenizer
    training_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = TemplateOptions.from_config(p.prepare)  # and with prepare's chat-template kwargs
    try:
        if model == "base":
            base_sha = json.loads((base_dir / "meta.json").read_text())["sha256"]
            # other template kwargs render other prompts: a cached base result is only for the same ones
            key = suite_fingerprint(p.evaluate, base_sha + (f" {json.dumps(dict(template.kwargs), sort_keys=True)}"
                                                            if template.kwargs else ""))
            # rank 0 looks: a cache entry written meanwhile by another job must not split the ranks
            results = cached_base_results(p.evaluate, key) if runtime.is_main else None
            if from_rank_zero(results is not None):
                say(f"base results from the cache ({base_cache_dir(p.evaluate)}/{key[:12]}…): same weights, tasks "
                    "and data")
            else:
                results = evaluate_models({"base": base_dir}, p.evaluate, say, training_tokenizer, template=template)
                if runtime.is_main:
                    cache_base_results(p.evaluate, key, results)
        elif model == "checkpoints":
            results = evaluate_models(kept, p.evaluate, say, training_tokenizer, p.evaluate.per_checkpoint,
                                      template=template)
        elif model == "lora":
            results = _lora_results(p, kept, training_tokenizer, say)
        else:
            results = _full_suite_in_gate_order(p, kept, out, training_tokenizer, say)
    except ValueError as err:
        fail(str(err))
    close(runtime)
    if not runtime.is_main:  # the other ranks' samples are in rank 0's results
        return
    name = "suite" if model == "chosen" else model
    write_json(out / f"{name}-items.json", results)
    write_json(out / f"{name}.json", summary(results))
    typer.echo(f"evaluated {len(results)} model(s) in {time.perf_counter() - started:.0f}s")


def _lora_results(p, kept: dict[str, Path], training_tokenizer, say=typer.echo) -> dict:
    """evaluate.per_checkpoint on every LoRA checkpoint, then the rest of the suite on the best by the
    policy's select_by: the baseline full SFT is compared with."""
    from pipeline.evaluate import evaluate_models, from_rank_zero, is_main, summary
    from pipeline.prepare import TemplateOptions
    from pipeline.gate import load_policy, ranked

    template = TemplateOptions.from_config(p.prepare)
    results = evaluate_models(kept, p.evaluate, say, training_tokenizer, p.evaluate.per_checkpoint, template=template)
    select_by = load_policy(p.gate.policy, set(p.evaluate.metrics)).select_by
    best = from_rank_zero(ranked(summary(results), select_by)[0] if is_main() else None)  # rank 0 holds the results
    rest = [m for m in p.evaluate.metrics if m not in p.evaluate.per_checkpoint]
    say(f"full suite on the best LoRA checkpoint by {select_by}: {best}")
    suite = evaluate_models({best: kept[best]}, p.evaluate, say, training_tokenizer, rest, template=template)[best]
    if is_main():
        results[best].update(suite)
    return results


def _full_suite_in_gate_order(p, kept: dict[str, Path], evaluations: Path, training_tokenizer, say=typer.echo) -> dict:
    """The full suite on the best checkpoint by golden that can still pass, then the next, until
    one passes the whole policy (usually the first): the gate stage then decides on these files."""
    from pipeline.evaluate import evaluate_in_order
    from pipeline.prepare import TemplateOptions
    from pipeline.gate import check_candidate, load_policy, suite_order

    policy = load_policy(p.gate.policy, set(p.evaluate.metrics))
    base = json.loads((evaluations / "base-items.json").read_text())["base"]
    base_scores = {metric: r["score"] for metric, r in base.items()}
    golden = json.loads((evaluations / "checkpoints.json").read_text())
    unknown = sorted(set(golden) - set(kept))
    if unknown:
        fail(f"{evaluations}/checkpoints.json: results for {unknown} but no such kept checkpoint")

    def passes(name: str, results: dict) -> bool:
        scores = {metric: r["score"] for metric, r in results.items()}
        rules, _ = check_candidate(policy, base_scores, scores, {m: r["items"] for m, r in base.items()},
                                   {m: r["items"] for m, r in results.items()})
        failed = [r["metric"] for r in rules if not r["passed"]]
        typer.echo(f"{name}: {'passes the gate' if not failed else 'fails ' + ', '.join(failed)}")
        return not failed

    order = suite_order(policy, base_scores, golden)
    say(f"full suite, in the gate's order: {', '.join(order)}")
    return evaluate_in_order({name: kept[name] for name in order}, p.evaluate, passes, say, training_tokenizer,
                             template=TemplateOptions.from_config(p.prepare))


@app.command()
@reports_errors
def gate(evaluate: Path = EVALUATE, train: Path = TRAIN, lora: Path = LORA, gate: Path = GATE):
    """Apply evals/gate.yaml; write gate.json, gate.md and the full-vs-LoRA decision record; exit 1
    unless the gate passes."""
    from pipeline.stages import gate as stage

    stage.run(params(), PATHS.with_(evaluate=evaluate, train=train, lora=lora, gate=gate), log=typer.echo)


@app.command()
@reports_errors
def card(gate: Path = GATE, train: Path = TRAIN, lora: Path = LORA, base: Path = BASE, prepare: Path = PREPARE,
         card: Path = CARD, release: Path = RELEASE):
    """Write the model card, the publishable folder (weights + tokenizer + card + verdict) and the
    release manifest (the sha256 of every file in it; the training job signs it with `sft sign`)."""
    from pipeline.stages import card as stage

    typer.echo(stage.run(params(), PATHS.with_(gate=gate, train=train, lora=lora, base=base, prepare=prepare,
                                               card=card, release=release)))


@app.command()
@reports_errors
def plan(model: str = typer.Option(None, help="a known shape (llama-3.1-8b, ...) or a config.json path"),
         tokens: int = typer.Option(None, help="tokens per epoch (default: prepare/stats.json)"),
         plan: Path = PLAN):
    """Estimate GPU memory per strategy, the smallest fitting node count, hours and cost."""
    from pipeline.stages import plan as stage

    typer.echo(stage.run(params(), PATHS.with_(plan=plan), model, tokens))


data_app = typer.Typer(no_args_is_help=True, help="Training data statistics and diffs (for pull requests).")
app.add_typer(data_app, name="data")


@data_app.command("stats")
@reports_errors
def data_stats(tokenizer: Path = TOKENIZER, data_report: Path = DATA_REPORT):
    """Rows, token-length histogram (table + PNG), duplicate and truncation shares."""
    from pipeline.stages import data_report as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer, data_report=data_report)))


@data_app.command("diff")
@reports_errors
def data_diff(rev: str = typer.Argument(..., help="git revision to compare with, e.g. origin/main"),
              tokenizer: Path = TOKENIZER, data_report: Path = DATA_REPORT):
    """The same statistics for this branch and for REV's data (read through DVC), side by side."""
    from pipeline.stages import data_report as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer, data_report=data_report), rev))


def main():
    app()


if __name__ == "__main__":
    main()
