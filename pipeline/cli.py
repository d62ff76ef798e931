"""`sft`: one command per DVC stage, plus `demo` (writes the embedded data set).

Each command reads params.yaml through pipeline.config, calls its stage's plain functions and
does the file IO and printing here. Stage folders are the ones dvc.yaml declares.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from pipeline.config import ConfigError, load_params
from pipeline.files import DataError, sha256_files, write_json, write_text

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Full supervised fine-tuning pipeline (each command is one dvc.yaml stage).")
PARAMS = "params.yaml"


def fail(message: str) -> None:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(1)


def params():
    try:
        return load_params(PARAMS)
    except ConfigError as err:
        fail(str(err))


@app.command()
def demo(out: Path = typer.Option(Path("data"), help="folder for the demo data set"),
         rows: int = typer.Option(12_000, help="training pairs"),
         seed: int = typer.Option(0)):
    """Write the embedded demo data set (deterministic: byte-identical on every machine)."""
    from pipeline.demo import write_demo_data

    counts = write_demo_data(out, seed=seed, train_rows=rows)
    typer.echo(" ".join(f"{name}={n}" for name, n in counts.items()) + f" -> {out}/")


@app.command()
def base(out: Path = Path("base")):
    """Resolve the base model: build the tiny demo model, or download a pinned Hub revision."""
    from pipeline.base import resolve_base

    p = params()
    info = resolve_base(p.base, out, log=typer.echo)
    typer.echo(f"base model ready in {out}/ ({info['params']:,} parameters, sha256 {info['sha256'][:12]})")


@app.command()
def validate(out: Path = Path("validate")):
    """Check the training data against the data contract (great-expectations)."""
    from pipeline.contract import add_derived_columns, eval_prompts, failure_message, load_pairs, render_markdown, run_suite

    p = params()
    try:
        frame = load_pairs(p.data.train)
        frame = add_derived_columns(frame, eval_prompts(p.validate_.eval_sets), p.validate_.leak_ngram)
    except DataError as err:
        fail(str(err))
    checks = run_suite(frame, p.validate_)
    passed = all(c["passed"] for c in checks)
    report = {"file": p.data.train, "rows": len(frame), "passed": passed, "checks": checks}
    write_json(out / "contract.json", report)
    write_text(out / "contract.md", render_markdown(p.data.train, checks))
    if not passed:
        fail(failure_message(p.data.train, checks))
    typer.echo(f"data contract passed: {len(frame):,} rows, {len(checks)} expectations ({p.data.train})")


@app.command()
def prepare(base_dir: Path = Path("base"), out: Path = Path("prepare")):
    """Mix replay, apply the chat template, tokenize, mask prompts, pack into fixed-length rows."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.contract import load_pairs
    from pipeline.prepare import prepare as prepare_rows

    p = params()
    contract = json.loads(Path("validate/contract.json").read_text())
    if not contract["passed"]:
        fail("validate/contract.json: the data contract did not pass; run `sft validate`")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = load_pairs(p.data.train).to_dict("records")
    replay = []
    if p.data.replay:
        try:
            replay = load_pairs(p.data.replay).to_dict("records")
        except DataError as err:
            fail(str(err))
        for row in replay:
            row["family"] = "replay"
    packed = prepare_rows(tokenizer, train, replay, p.prepare.max_seq_len, p.prepare.replay_share, p.prepare.seed)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "packed.tmp.npz"
    np.savez(tmp, input_ids=packed.input_ids, labels=packed.labels, position_ids=packed.position_ids)
    tmp.replace(out / "packed.npz")
    inputs = [Path(p.data.train)] + ([Path(p.data.replay)] if p.data.replay else [])
    stats = {**packed.stats, "data_sha256": sha256_files(inputs)}
    write_json(out / "stats.json", stats)
    typer.echo(f"packed {stats['examples']:,} examples into {stats['rows']:,} rows of {p.prepare.max_seq_len} "
               f"tokens (fill {stats['fill']:.1%}, replay {stats['replay_share']:.1%}, "
               f"truncated {stats['truncated']})")


@app.command()
def train(base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("train")):
    """Full fine-tuning: every weight, a checkpoint every epoch, the last N kept."""
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.checkpoint import list_checkpoints
    from pipeline.train.loop import train as run_training
    from pipeline.train.strategies import close, init_runtime

    p = params()
    try:
        runtime = init_runtime(p.train.strategy, p.train.device)
    except RuntimeError as err:
        fail(str(err))
    packed = dict(np.load(packed_dir / "packed.npz"))
    stats = json.loads((packed_dir / "stats.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    meta = {"config": p.train.model_dump(), "base": json.loads((base_dir / "meta.json").read_text()),
            "data_sha256": stats["data_sha256"]}

    bar = live = None

    def progress(record: dict, total: int):  # rank 0 only: a progress bar and DVCLive step metrics
        nonlocal bar, live
        if bar is None:
            from dvclive import Live

            bar = tqdm(total=total, initial=record["step"] - 1, desc="train", unit="step", file=sys.stdout,
                       mininterval=2)
            # the stage declares train/live in dvc.yaml; resume keeps the steps logged before a restart
            live = Live(str(out / "live"), resume=record["step"] > 1, save_dvc_exp=False, dvcyaml=None)
        bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
        bar.update(1)
        live.step = record["step"]
        for name, value in record.items():
            if name not in ("step", "epoch") and value is not None:
                live.log_metric(f"train/{name}", value)
        live.next_step()

    result = run_training(model, tokenizer, packed, p.train, out / "checkpoints", meta, progress, runtime,
                          state_dir=out / "state")
    close(runtime)
    if bar:
        bar.close()
        live.end()
    if not runtime.is_main:
        return
    write_json(out / "metrics.json", {
        "steps": result.steps, "final_loss": result.final_loss, "tokens": result.tokens,
        "tokens_per_second": round(result.tokens / result.seconds), "seconds": round(result.seconds, 1),
        "strategy": p.train.strategy, "world_size": runtime.world_size,
    })
    kept = ", ".join(c.name for c in list_checkpoints(out / "checkpoints"))
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}; kept {kept}")


@app.command()
def evaluate(model: str = typer.Option("checkpoints", help="'base' or 'checkpoints' (every kept one)"),
             base_dir: Path = Path("base"), checkpoints: Path = Path("train/checkpoints"),
             out: Path = Path("evaluate")):
    """Run the lm-eval tasks of params.yaml on the base model or on every kept checkpoint."""
    from pipeline.evaluate import evaluate_models, summary
    from pipeline.train.checkpoint import list_checkpoints

    p = params()
    if model == "base":
        paths = {"base": base_dir}
    elif model == "checkpoints":
        paths = {c.name: c for c in list_checkpoints(checkpoints)}
        if not paths:
            fail(f"{checkpoints}: no complete checkpoints to evaluate; run `sft train`")
    else:
        fail(f"--model must be 'base' or 'checkpoints', not {model!r}")
    from transformers import AutoTokenizer

    started = time.perf_counter()
    try:  # prompts must reach the model exactly as prepare rendered them with the base tokenizer
        results = evaluate_models(paths, p.evaluate, log=typer.echo,
                                  training_tokenizer=AutoTokenizer.from_pretrained(base_dir))
    except ValueError as err:
        fail(str(err))
    write_json(out / f"{model}-items.json", results)
    write_json(out / f"{model}.json", summary(results))
    typer.echo(f"evaluated {len(paths)} model(s) in {time.perf_counter() - started:.0f}s")


@app.command()
def gate(evaluations: Path = Path("evaluate"), checkpoints: Path = Path("train/checkpoints"),
         out: Path = Path("gate")):
    """Apply evals/gate.yaml; write gate.json and gate.md; exit 1 unless the gate passes."""
    from pipeline.gate import decide, load_policy, plot_change, render_markdown
    from pipeline.train.checkpoint import list_checkpoints, weights_sha256

    p = params()
    try:
        policy = load_policy(p.gate.policy)
    except ValueError as err:
        fail(str(err))
    base_scores = json.loads((evaluations / "base.json").read_text())["base"]
    candidates = json.loads((evaluations / "checkpoints.json").read_text())
    kept = {c.name: c for c in list_checkpoints(checkpoints)}
    unknown = sorted(set(candidates) - set(kept))
    if unknown:
        fail(f"{evaluations}/checkpoints.json: results for {unknown} but no such checkpoint in {checkpoints}")
    hashes = {name: weights_sha256(kept[name]) for name in candidates}
    items = {}
    for name in ("base", "checkpoints"):  # per-item scores, for the paired intervals
        for model, metrics in json.loads((evaluations / f"{name}-items.json").read_text()).items():
            items[model] = {metric: r["items"] for metric, r in metrics.items()}
    verdict = decide(policy, base_scores, candidates, hashes, items)
    verdict["weights"] = str(kept[verdict["chosen"]] / "model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    plot_change(verdict, out / "change.png")
    verdict["plot"] = "change.png"
    markdown = render_markdown(verdict)
    write_json(out / "gate.json", verdict)
    write_text(out / "gate.md", markdown)
    typer.echo(markdown)
    if not verdict["passed"]:
        failed = [r["metric"] for r in verdict["rules"] if not r["passed"]]
        fail(f"eval gate FAILED: {', '.join(failed)} (see {out}/gate.md)")


@app.command()
def card(gate_dir: Path = Path("gate"), checkpoints: Path = Path("train/checkpoints"),
         base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("card")):
    """Write the model card and the publishable folder (weights + tokenizer + card + verdict)."""
    from pipeline.card import assemble, build_card
    from pipeline.files import atomic_dir
    from pipeline.train.checkpoint import weights_sha256

    p = params()
    verdict = json.loads((gate_dir / "gate.json").read_text())
    if not verdict["passed"]:
        fail(f"{gate_dir}/gate.json: the gate did not pass; no card is written")
    chosen = checkpoints / verdict["chosen"]
    if weights_sha256(chosen) != verdict["sha256"]:
        fail(f"{chosen}: weights differ from the ones the gate passed")
    base_meta = json.loads((base_dir / "meta.json").read_text())
    stats = json.loads((packed_dir / "stats.json").read_text())
    model_card = build_card(
        verdict, (gate_dir / "gate.md").read_text(), p.card.repo_id, base_meta["model"], base_meta.get("revision"),
        stats["data_sha256"], {k: v for k, v in p.train.model_dump().items() if k in ("lr", "epochs", "warmup_ratio",
                                                                                    "weight_decay")},
        p.card.license, p.card.language)
    with atomic_dir(out) as tmp:
        assemble(chosen, model_card, [gate_dir / "gate.json", gate_dir / "gate.md", gate_dir / "change.png"], tmp)
    typer.echo(f"model card and publishable folder in {out}/ ({verdict['chosen']}, sha256 {verdict['sha256'][:12]})")


@app.command()
def plan(model: str = typer.Option(None, help="a known shape (llama-3.1-8b, ...) or a config.json path"),
         tokens: int = typer.Option(None, help="tokens per epoch (default: prepare/stats.json)"),
         out: Path = Path("plan")):
    """Estimate GPU memory per strategy, the smallest fitting node count, hours and cost."""
    from pipeline.plan import SHAPES, Shape, plan as make_plan, render_markdown

    p = params()
    name = model or p.plan.model or "base/config.json"
    if name in SHAPES:
        shape = Shape(**SHAPES[name])
    elif Path(name).is_file():
        shape = Shape.from_config(json.loads(Path(name).read_text()))
    else:
        fail(f"plan: {name!r} is neither a known shape ({', '.join(SHAPES)}) nor a config.json file")
    if tokens is None:
        stats = Path("prepare/stats.json")
        if not stats.exists():
            fail("plan: pass --tokens or run `sft prepare` first (prepare/stats.json counts the tokens)")
        tokens = json.loads(stats.read_text())["tokens"]
    tokens_per_run = tokens * p.train.epochs
    tokens_per_gpu = p.train.micro_batch_size * p.prepare.max_seq_len
    rows = make_plan(shape, tokens_per_run, tokens_per_gpu, p.plan.gpus_per_node, p.plan.mfu, p.plan.prices,
                     p.plan.activation_checkpointing)
    markdown = render_markdown(name, shape, rows, tokens_per_run, p.plan.mfu)
    write_json(out / "plan.json", {"model": name, "params": shape.params, "tokens_per_run": tokens_per_run,
                                   "tokens_per_gpu_step": tokens_per_gpu, "rows": rows})
    write_text(out / "plan.md", markdown)
    typer.echo(markdown)


data_app = typer.Typer(no_args_is_help=True, help="Training data statistics and diffs (for pull requests).")
app.add_typer(data_app, name="data")


def _data_stats(frame, base_dir: Path, p):
    from transformers import AutoTokenizer

    from pipeline.stats import data_stats

    if not (base_dir / "tokenizer_config.json").exists():
        fail(f"{base_dir}: no tokenizer; run `sft base` (token lengths use the base model's chat template)")
    return data_stats(frame, AutoTokenizer.from_pretrained(base_dir), p.prepare.max_seq_len)


def _write_report(out: Path, current: dict, other: dict | None = None, rev: str | None = None) -> None:
    from pipeline.stats import plot_lengths, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    plot_lengths(current, out / "lengths.png", other, rev)
    markdown = render_markdown(current, other, rev) + "\n![token lengths](lengths.png)\n"
    strip = lambda s: {k: v for k, v in s.items() if k != "lengths"}  # noqa: E731
    write_json(out / "stats.json", {"current": strip(current), **({"other": strip(other), "rev": rev} if other else {})})
    write_text(out / "stats.md", markdown)
    typer.echo(markdown)


@data_app.command("stats")
def data_stats_command(base_dir: Path = Path("base"), out: Path = Path("data-report")):
    """Rows, token-length histogram (table + PNG), duplicate and truncation shares."""
    from pipeline.contract import load_pairs

    p = params()
    try:
        frame = load_pairs(p.data.train)
    except DataError as err:
        fail(str(err))
    _write_report(out, _data_stats(frame, base_dir, p))


@data_app.command("diff")
def data_diff_command(rev: str = typer.Argument(..., help="git revision to compare with, e.g. origin/main"),
                      base_dir: Path = Path("base"), out: Path = Path("data-report")):
    """The same statistics for this branch and for REV's data (read through DVC), side by side."""
    import dvc.api

    from pipeline.contract import load_pairs

    p = params()
    try:
        current = load_pairs(p.data.train)
        try:
            text = dvc.api.read(p.data.train, rev=rev, encoding="utf-8")
        except Exception as err:  # dvc raises many kinds: a bad rev, no cache, no remote
            fail(f"{p.data.train}@{rev}: cannot read it through DVC ({type(err).__name__}: {err})")
        other = load_pairs(f"{p.data.train}@{rev}", text=text)
    except DataError as err:
        fail(str(err))
    _write_report(out, _data_stats(current, base_dir, p), _data_stats(other, base_dir, p), rev)


def main():
    app()


if __name__ == "__main__":
    main()
