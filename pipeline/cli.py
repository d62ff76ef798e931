"""`sft`: one command per dvc.yaml stage, plus `demo`, `smoke`, `data` and the release commands.

Each stage command parses its options, runs `pipeline.stages.<stage>.run(params, paths)` and prints
what it returns; a stage's StageError is printed in red with exit code 1 (pipeline/console.py).
Stage modules are imported inside the commands: `sft status set` runs where only typer, pydantic
and PyYAML are installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline.console import fail, folder, params, reports_errors
from pipeline.paths import PATHS
from pipeline.release import release_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Full supervised fine-tuning pipeline (each command is one dvc.yaml stage).",
)
app.add_typer(release_app, rich_help_panel="Release")


@app.command()
def demo(
    out: Path = typer.Option(Path("data"), help="folder for the demo data set"),
    rows: int = typer.Option(15_000, help="training pairs"),
    seed: int = typer.Option(0),
):
    """Write the embedded demo data set (deterministic: byte-identical on every machine)."""
    from pipeline.demo import write_demo_data

    counts = write_demo_data(out, seed=seed, train_rows=rows)
    typer.echo(" ".join(f"{name}={n}" for name, n in counts.items()) + f" -> {out}/")


@app.command()
def smoke(
    params_file: Path = typer.Option(Path("configs/demo.yaml"), "--params", help="the demo preset"),
    out: Path = typer.Option(Path("smoke"), help="where the smoke run's gate report goes"),
    work: Path = typer.Option(None, help="scratch copy of the project (default: a temporary folder)"),
    rows: int = typer.Option(15_000, help="demo training pairs"),
):
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
def train(base: Path = BASE, prepare: Path = PREPARE, train: Path = TRAIN):
    """Full fine-tuning: every weight, a checkpoint every epoch, the last N kept."""
    from pipeline.stages.train import run

    # sys.argv: fsdp2 / zero3 outside a launcher re-run this very command under torchrun
    summary = run(params(), PATHS.with_(base=base, prepare=prepare, train=train), "train", sys.argv[1:], typer.echo)
    if summary:  # rank 0
        typer.echo(summary.message)


@app.command()
@reports_errors
def lora(base: Path = BASE, prepare: Path = PREPARE, lora: Path = LORA):
    """The LoRA baseline: adapters on every linear layer, the same data, epochs and loop as `sft train`
    at LoRA's learning rate; each epoch's checkpoint is the merged model."""
    from pipeline.stages.train import run

    summary = run(params(), PATHS.with_(base=base, prepare=prepare, lora=lora), "lora", sys.argv[1:], typer.echo)
    if summary:
        typer.echo(summary.message)


@app.command()
@reports_errors
def evaluate(
    model: str = typer.Option(
        "checkpoints",
        help="'base': the full suite on the base model (cached by "
        "its hash); 'checkpoints': evaluate.per_checkpoint on every kept one; "
        "'chosen': the full suite on checkpoints in the gate's order until one passes; "
        "'lora': evaluate.per_checkpoint on every LoRA checkpoint, the full suite on "
        "the best",
    ),
    base: Path = BASE,
    train: Path = TRAIN,
    lora: Path = LORA,
    evaluate: Path = EVALUATE,
):
    """Run the lm-eval tasks of params.yaml on the base model, the kept checkpoints, the chosen one or
    the LoRA baseline."""
    from pipeline.stages.evaluate import run

    summary = run(
        params(),
        PATHS.with_(base=base, train=train, lora=lora, evaluate=evaluate),
        model,
        argv=sys.argv[1:],
        say=typer.echo,
    )
    if summary:
        typer.echo(summary.message)


@app.command()
@reports_errors
def gate(evaluate: Path = EVALUATE, train: Path = TRAIN, lora: Path = LORA, gate: Path = GATE):
    """Apply evals/gate.yaml; write gate.json, gate.md and the full-vs-LoRA decision record; exit 1
    unless the gate passes."""
    from pipeline.stages import gate as stage

    stage.run(params(), PATHS.with_(evaluate=evaluate, train=train, lora=lora, gate=gate), log=typer.echo)


@app.command()
@reports_errors
def card(
    gate: Path = GATE,
    train: Path = TRAIN,
    lora: Path = LORA,
    base: Path = BASE,
    prepare: Path = PREPARE,
    card: Path = CARD,
    release: Path = RELEASE,
):
    """Write the model card, the publishable folder (weights + tokenizer + card + verdict) and the
    release manifest (the sha256 of every file in it; the training job signs it with `sft sign`)."""
    from pipeline.stages import card as stage

    typer.echo(
        stage.run(
            params(),
            PATHS.with_(gate=gate, train=train, lora=lora, base=base, prepare=prepare, card=card, release=release),
        )
    )


@app.command()
@reports_errors
def plan(
    model: str = typer.Option(None, help="a known shape (llama-3.1-8b, ...) or a config.json path"),
    tokens: int = typer.Option(None, help="tokens per epoch (default: prepare/stats.json)"),
    plan: Path = PLAN,
):
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
def data_diff(
    rev: str = typer.Argument(..., help="git revision to compare with, e.g. origin/main"),
    tokenizer: Path = TOKENIZER,
    data_report: Path = DATA_REPORT,
):
    """The same statistics for this branch and for REV's data (read through DVC), side by side."""
    from pipeline.stages import data_report as stage

    typer.echo(stage.run(params(), PATHS.with_(tokenizer=tokenizer, data_report=data_report), rev))


def main():
    app()


if __name__ == "__main__":
    main()
