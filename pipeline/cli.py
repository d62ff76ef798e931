"""`sft`: one command per DVC stage, plus `demo` (writes the embedded data set).

Each command reads params.yaml through pipeline.config, calls its stage's plain functions and
does the file IO and printing here. Stage folders are the ones dvc.yaml declares.
"""

from __future__ import annotations

import json
import os
import shlex
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


def base_tokenizer(folder: Path = Path("tokenizer")):
    """The base model's tokenizer: token counts go through its chat template, as training's do."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").exists():
        fail(f"{folder}: no tokenizer; run `sft tokenizer` (token lengths use the base model's chat template)")
    check_built_for_base(folder)
    return AutoTokenizer.from_pretrained(folder)


def check_built_for_base(folder: Path) -> None:
    """Refuse a tokenizer/ (or base/) made for another base than params.yaml names: `sft <stage>` by
    hand after switching presets would otherwise count tokens, and plan, with the old model's."""
    made = folder / "meta.json"
    if not made.is_file():
        return
    info, base = json.loads(made.read_text()), params().base
    if (info.get("source"), info.get("model"), info.get("revision")) != (base.source, base.model, base.revision):
        fail(f"{folder}: made for {info.get('model')}@{info.get('revision')}, but params.yaml base is "
             f"{base.model}@{base.revision}; rebuild it (`dvc repro`, or `sft tokenizer` / `sft base`)")


def check_family(folder: Path, max_seq_len: int) -> None:
    """Refuse a base the engine cannot train exactly (pipeline/families.py), from the config.json
    `sft tokenizer` fetches without the weights: before any download of weights or GPU hour."""
    from pipeline.families import UnsupportedModel, check_model

    config = folder / "config.json"
    if config.is_file():
        try:
            check_model(json.loads(config.read_text()), max_seq_len, where=str(config))
        except UnsupportedModel as err:
            fail(str(err))


def params():
    try:
        return load_params(PARAMS)
    except ConfigError as err:
        fail(str(err))


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


@app.command()
def tokenizer(out: Path = Path("tokenizer")):
    """The base model's small files: tokenizer, chat template, config (no weights: what a PR needs)."""
    from pipeline.base import BaseUnavailable, resolve_tokenizer

    p = params()
    try:
        resolve_tokenizer(p.base, out)
    except BaseUnavailable as err:
        fail(str(err))
    typer.echo(f"tokenizer, chat template and config of {p.base.model}@{p.base.revision or 'built locally'} in {out}/")


@app.command()
def base(out: Path = Path("base")):
    """Resolve the base model: build the tiny demo model, or download a pinned Hub revision."""
    from pipeline.base import BaseUnavailable, resolve_base
    from pipeline.families import UnsupportedModel, check_model

    p = params()
    where = f"{p.base.model}@{p.base.revision} config.json"
    try:
        info = resolve_base(p.base, out, log=typer.echo,
                            check_family=lambda config: check_model(config, p.prepare.max_seq_len, where))
    except (BaseUnavailable, UnsupportedModel) as err:
        fail(str(err))
    typer.echo(f"base model ready in {out}/ ({info['params']:,} parameters, sha256 {info['sha256'][:12]})")


@app.command()
def validate(tokenizer_dir: Path = Path("tokenizer"), out: Path = Path("validate")):
    """Check the training (and replay) data against the data contract (great-expectations)."""
    from pipeline.contract import (
        add_replay_columns,
        contract_columns,
        eval_prompts,
        failure_message,
        render_markdown,
        run_suite,
    )
    from pipeline.data import load_examples
    from pipeline.files import atomic_dir
    from pipeline.prepare import TemplateError, TemplateOptions

    p = params()
    files = {"train": p.data.train, "replay": p.data.replay}
    if (not p.data.replay or p.prepare.replay_share == 0) and p.validate_.min_replay_share > 0:
        fail(f"params.yaml: no replay mix (data.replay: {p.data.replay}, prepare.replay_share: {p.prepare.replay_share}) "
             f"but validate.min_replay_share is {p.validate_.min_replay_share}: the method mixes 10-20% general data "
             "into training to limit forgetting; set data.replay and prepare.replay_share, or validate.min_replay_share: "
             "0 to train without it")
    try:
        frame = load_examples(p.data.train)
        replay = None
        if p.data.replay and p.prepare.replay_share > 0:  # the mix prepare will make, checked here
            replay = load_examples(p.data.replay)
        held_out = eval_prompts(p.validate_.eval_sets)
    except DataError as err:  # a malformed file is named before anything else is asked for
        fail(str(err))
    tokenizer = base_tokenizer(tokenizer_dir)
    check_family(tokenizer_dir, p.prepare.max_seq_len)
    template = TemplateOptions.from_config(p.prepare)
    for name, data in (("train", frame), ("replay", replay)):
        if data is None:
            continue
        try:  # the replay file is trained on too: the same contract
            checked = contract_columns(data, tokenizer, held_out, p.validate_, p.prepare.max_seq_len,
                                       replay=name == "replay", options=template)
        except TemplateError as err:  # what the chat template cannot render, named before any report
            row = data.index[err.row]
            where = f"{files[name]} row {row}" if data.attrs.get("parquet") else f"{files[name]}:{row}"
            fail(f"{where}: field 'messages': {err.reason}")
        if name == "train":
            frame = checked
        else:
            replay = add_replay_columns(checked, len(frame), p.prepare.replay_share, p.prepare.seed)
    with atomic_dir(out / "data-docs") as docs:  # great-expectations Data Docs, for CI to upload
        checks = run_suite(frame, p.validate_, p.prepare.max_seq_len, replay, docs)
    passed = all(c["passed"] for c in checks)
    # prepare packs only the very files that passed
    report = {"file": p.data.train, "replay": p.data.replay if replay is not None else None, "rows": len(frame),
              "data_sha256": sha256_files(data_inputs(p)), "passed": passed, "checks": checks}
    write_json(out / "contract.json", report)
    write_text(out / "contract.md", render_markdown(files, checks))
    if not passed:
        fail(failure_message(files, checks))
    typer.echo(f"data contract passed: {len(frame):,} rows, {len(checks)} expectations ({p.data.train}); "
               f"Data Docs in {out}/data-docs/index.html")


@app.command()
def prepare(tokenizer_dir: Path = Path("tokenizer"), out: Path = Path("prepare")):
    """Mix replay, apply the chat template, tokenize, mask prompts, pack into fixed-length rows."""
    import numpy as np

    from pipeline.data import load_examples
    from pipeline.prepare import TemplateError, TemplateOptions, as_conversation, prepare_tokenized, tokenize_file

    p = params()
    inputs = data_inputs(p)
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:
        fail(f"{', '.join(missing)}: file not found")
    contract_file = Path("validate/contract.json")
    if not contract_file.is_file():
        fail(f"{contract_file}: missing; run `sft validate` first")
    contract = json.loads(contract_file.read_text())
    data_sha256 = sha256_files(inputs)
    if contract.get("data_sha256") != data_sha256:
        fail(f"{contract_file}: made for other data than {', '.join(map(str, inputs))} hold now; run `sft validate`")
    if not contract["passed"]:
        fail(f"{contract_file}: the data contract did not pass; fix the data (validate/contract.md says how), "
             "then run `sft validate`")
    tokenizer = base_tokenizer(tokenizer_dir)
    def load(path):  # each row's conversation, its tools included
        return [as_conversation(row) for row in load_examples(path).to_dict("records")]

    template = TemplateOptions.from_config(p.prepare)
    tokenized = []
    for path in inputs:  # an unchanged file with the same tokenizer is read from the cache, never tokenized again
        try:
            tokenized.append(tokenize_file(tokenizer, path, load, options=template))
        except DataError as err:
            fail(str(err))
        except TemplateError as err:  # named as sft validate names it: file and line (Parquet: row)
            frame = load_examples(path)
            row = frame.index[err.row]
            fail(f"{path} row {row}: {err.reason}" if frame.attrs.get("parquet") else f"{path}:{row}: {err.reason}")
    (train, train_hit), *replay = tokenized
    packed = prepare_tokenized(train, replay[0][0] if replay else None, p.prepare.max_seq_len,
                               p.prepare.replay_share, p.prepare.seed, tokenizer.pad_token_id,
                               p.prepare.pack, p.prepare.bucket_rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "packed.tmp.npz"
    arrays = {"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids}
    if packed.lengths is not None:  # unpacked rows: real tokens per row, for trimming each batch
        arrays["lengths"] = packed.lengths
    np.savez(tmp, **arrays)
    tmp.replace(out / "packed.npz")
    stats = {**packed.stats, "data_sha256": data_sha256}
    write_json(out / "stats.json", stats)
    hits = [train_hit] + [hit for _, hit in replay]
    layout = "packed" if p.prepare.pack else "bucketed by length, one example"
    typer.echo(f"{layout} {stats['examples']:,} examples into {stats['rows']:,} rows of {p.prepare.max_seq_len} "
               f"tokens (fill {stats['fill']:.1%}, replay {stats['replay_share']:.1%}, "
               f"truncated {stats['truncated']}); tokenization cache: {sum(hits)} of {len(hits)} files hit")


@app.command()
def train(base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("train")):
    """Full fine-tuning: every weight, a checkpoint every epoch, the last N kept."""
    from pipeline.paths import Paths
    from pipeline.stages import StageError
    from pipeline.stages.train import run

    try:
        summary = run(params(), Paths().with_(base=base_dir, prepare=packed_dir, train=out), "train", sys.argv[1:],
                      typer.echo)
    except StageError as err:
        fail(str(err))
    if summary:
        typer.echo(summary.message)


@app.command()
def lora(base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("lora")):
    """The LoRA baseline: adapters on every linear layer, the same data, epochs and loop as `sft train`
    at LoRA's learning rate; each epoch's checkpoint is the merged model."""
    from pipeline.paths import Paths
    from pipeline.stages import StageError
    from pipeline.stages.train import run

    try:
        summary = run(params(), Paths().with_(base=base_dir, prepare=packed_dir, lora=out), "lora", sys.argv[1:],
                      typer.echo)
    except StageError as err:
        fail(str(err))
    if summary:
        typer.echo(summary.message)


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
    from pipeline.paths import Paths
    from pipeline.stages import StageError
    from pipeline.stages.evaluate import run

    try:
        summary = run(params(), Paths().with_(base=base_dir, evaluate=out), model,
                      lora_checkpoints if model == "lora" else checkpoints, sys.argv[1:], typer.echo)
    except StageError as err:
        fail(str(err))
    if summary:
        typer.echo(summary.message)


@app.command()
def gate(evaluations: Path = Path("evaluate"), checkpoints: Path = Path("train/checkpoints"),
         lora_dir: Path = Path("lora"), trained: Path = Path("train/metrics.json"), out: Path = Path("gate")):
    """Apply evals/gate.yaml; write gate.json, gate.md and the full-vs-LoRA decision record; exit 1
    unless the gate passes."""
    from pipeline.files import file_manifest
    from pipeline.gate import (decide, decision_record, load_policy, plot_change, plot_decision, render_decision,
                               render_markdown, run_cost)
    from pipeline.lora import PREFIX
    from pipeline.train.checkpoint import list_checkpoints, weights_sha256

    p = params()
    try:
        policy = load_policy(p.gate.policy, set(p.evaluate.metrics))
    except ValueError as err:
        fail(str(err))
    base_scores = json.loads((evaluations / "base.json").read_text())["base"]
    golden = json.loads((evaluations / "checkpoints.json").read_text())
    suite = json.loads((evaluations / "suite.json").read_text())
    candidates = {name: {**scores, **suite.get(name, {})} for name, scores in golden.items()}
    lora = json.loads((evaluations / "lora.json").read_text()) if (evaluations / "lora.json").exists() else {}
    kept = {c.name: c for c in list_checkpoints(checkpoints)}
    kept.update({PREFIX + c.name: c for c in list_checkpoints(lora_dir / "checkpoints")})
    unknown = sorted(set(candidates) - set(kept)) + sorted(set(lora) - set(kept))
    if unknown:
        fail(f"{evaluations}: results for {unknown} but no such checkpoint in {checkpoints} or {lora_dir}/checkpoints")
    hashes = {name: weights_sha256(kept[name]) for name in [*candidates, *lora]}
    items: dict[str, dict] = {}
    for name in ("base", "checkpoints", "suite", "lora"):  # per-item scores, for the paired intervals
        path = evaluations / f"{name}-items.json"
        if name == "lora" and not path.exists():
            continue
        for model, metrics in json.loads(path.read_text()).items():
            items.setdefault(model, {}).update({metric: r["items"] for metric, r in metrics.items()})
    try:
        verdict = decide(policy, base_scores, candidates, hashes, items, lora)
    except ValueError as err:
        fail(str(err))
    verdict["path"] = str(kept[verdict["chosen"]])
    verdict["files"] = file_manifest(kept[verdict["chosen"]])  # weights, config, tokenizer, chat template: all of it
    out.mkdir(parents=True, exist_ok=True)
    plot_change(verdict, out / "change.png")
    verdict["plot"] = "change.png"
    costs = {run: run_cost(json.loads(path.read_text()), p.plan.prices)
             for run, path in (("full", trained), ("lora", lora_dir / "metrics.json")) if path.exists()}
    record = decision_record(policy, verdict, items, costs)
    plot_decision(record, out / "decision.png")
    record["plot"] = "decision.png"
    verdict["decision"] = record["verdict"]
    markdown = render_markdown(verdict) + render_decision(record)
    write_json(out / "decision.json", record)
    write_json(out / "gate.json", verdict)
    write_text(out / "gate.md", markdown)
    typer.echo(markdown)
    if p.train.trackers:  # the verdict, the eval table and (MLflow) the registered model, in the judged run
        from pipeline.trackers import log_gate

        run = lora_dir / "metrics.json" if verdict["kind"] == "lora" else trained
        run_ids = json.loads(run.read_text()).get("trackers", {}) if run.exists() else {}
        reports = [out / name for name in ("gate.md", "change.png", "decision.json", "decision.png")]
        logged = log_gate(p.train.trackers, run_ids, verdict, reports, kept[verdict["chosen"]],
                          p.card.repo_id.rsplit("/", 1)[-1])
        typer.echo(f"trackers: {json.dumps(logged)}")
    if not verdict["passed"]:
        fail(f"eval gate FAILED: {', '.join(verdict['failed_rules'])} (see {out}/gate.md)")


@app.command()
def card(gate_dir: Path = Path("gate"), checkpoints: Path = Path("train/checkpoints"),
         lora_checkpoints: Path = Path("lora/checkpoints"),
         base_dir: Path = Path("base"), packed_dir: Path = Path("prepare"), out: Path = Path("card"),
         manifest: Path = Path("release/manifest.json")):
    """Write the model card, the publishable folder (weights + tokenizer + card + verdict) and the
    release manifest (the sha256 of every file in it; the training job signs it with `sft sign`)."""
    from pipeline.card import assemble, build_card
    from pipeline.files import atomic_dir, file_manifest, manifest_differences, sha256_file

    p = params()
    verdict = json.loads((gate_dir / "gate.json").read_text())
    if not verdict["passed"]:
        fail(f"{gate_dir}/gate.json: the gate did not pass; no card is written")
    from pipeline.lora import checkpoint_path

    chosen = checkpoint_path(verdict["chosen"], checkpoints, lora_checkpoints)
    gated = verdict.get("files") or {}
    differing = sorted(sum(manifest_differences(gated, file_manifest(chosen)), []))
    if not gated or differing:
        fail(f"{chosen}: {', '.join(differing) or 'files'} differ from what the gate passed ({gate_dir}/gate.json files)")
    base_meta = json.loads((base_dir / "meta.json").read_text())
    stats = json.loads((packed_dir / "stats.json").read_text())
    model_card = build_card(
        verdict, (gate_dir / "gate.md").read_text(), p.card.repo_id, base_meta["model"], base_meta.get("revision"),
        p.evaluate.metrics,
        stats["data_sha256"], training_summary(p, verdict.get("kind", "full")),
        p.card.license, p.card.language)
    with atomic_dir(out) as tmp:
        assemble(chosen, model_card, [gate_dir / name for name in ("gate.json", "gate.md", "change.png", "decision.json",
                                                                   "decision.png")], tmp)
        files = file_manifest(tmp)
    write_json(manifest, {"chosen": verdict["chosen"], "sha256": verdict["sha256"],
                          "gate_sha256": sha256_file(gate_dir / "gate.json"), "files": files})
    typer.echo(f"model card and publishable folder in {out}/ ({verdict['chosen']}, sha256 {verdict['sha256'][:12]})")


def training_summary(p, kind: str) -> dict:
    """The hyperparameters of the run that made the shipped model, for the card."""
    hyper = {k: v for k, v in p.train.model_dump().items() if k in ("lr", "epochs", "warmup_ratio", "weight_decay")}
    if kind == "lora":
        return {"method": "LoRA, merged into the base", **hyper, "lr": p.lora.lr, "rank": p.lora.rank,
                "alpha": p.lora.alpha, "dora": p.lora.dora}
    return {"method": "full SFT", **hyper}


@app.command()
def plan(model: str = typer.Option(None, help="a known shape (llama-3.1-8b, ...) or a config.json path"),
         tokens: int = typer.Option(None, help="tokens per epoch (default: prepare/stats.json)"),
         out: Path = Path("plan")):
    """Estimate GPU memory per strategy, the smallest fitting node count, hours and cost."""
    from pipeline.plan import SHAPES, Shape, plan as make_plan, render_markdown

    p = params()
    # the model's shape from its config.json: `sft tokenizer` fetches it without the weights
    name = model or p.plan.model or next((f for f in ("tokenizer/config.json", "base/config.json")
                                           if Path(f).is_file()), "tokenizer/config.json")
    if name in SHAPES:  # each a supported family (tests/test_presets.py checks its positions)
        shape = Shape(**SHAPES[name])
    elif Path(name).is_file():
        check_built_for_base(Path(name).parent)
        if Path(name).name == "config.json":
            check_family(Path(name).parent, p.prepare.max_seq_len)
        shape = Shape.from_config(json.loads(Path(name).read_text()))
    else:
        fail(f"plan: {name!r} is neither a known shape ({', '.join(SHAPES)}) nor a config.json file; "
             "run `sft tokenizer` (it fetches config.json) or set plan.model")
    if tokens is None:
        tokens = planned_tokens(p)
    tokens_per_run = tokens * p.train.epochs
    tokens_per_gpu = p.train.micro_batch_size * p.prepare.max_seq_len
    # logits are computed only where a loss is taken: prepare's share for this data, else all of them
    stats = prepared_stats(p) or {}
    supervised_share = stats["supervised_tokens"] / stats["tokens"] if stats.get("supervised_tokens") else 1.0
    # the plan is for the run the config makes
    rows = make_plan(shape, tokens_per_run, tokens_per_gpu, p.plan.gpus_per_node, p.plan.mfu, p.plan.prices,
                     p.train.activation_checkpointing, p.train.compile, supervised_share)
    markdown = render_markdown(name, shape, rows, tokens_per_run, p.plan.mfu)
    write_json(out / "plan.json", {"model": name, "params": shape.params, "tokens_per_run": tokens_per_run,
                                   "tokens_per_gpu_step": tokens_per_gpu, "rows": rows})
    write_text(out / "plan.md", markdown)
    typer.echo(markdown)


def data_inputs(p) -> list[Path]:
    """The files prepare packs: train, and replay when there is one."""
    return [Path(p.data.train)] + ([Path(p.data.replay)] if p.data.replay else [])


def prepared_stats(p) -> dict | None:
    """prepare/stats.json when prepare made it from this branch's very files; never another data set's."""
    inputs = data_inputs(p)
    prepared = Path("prepare/stats.json")
    if prepared.is_file() and all(f.is_file() for f in inputs):
        stats = json.loads(prepared.read_text())
        if stats.get("data_sha256") == sha256_files(inputs):
            return stats
    return None


def planned_tokens(p) -> int:
    """Tokens an epoch of this branch's data makes: prepare's exact count when it was made from these
    very files, else `sft data stats` of them with the replay share added."""
    stats, report = prepared_stats(p), Path("data-report/stats.json")
    if stats:
        return stats["tokens"]
    if report.is_file():
        current = json.loads(report.read_text())["current"]  # the training file only: add the replay mix
        return round(current["tokens"] / (1 - p.prepare.replay_share))
    fail("plan: no token count for this data; run `sft data stats` (or `sft prepare`) first, or pass --tokens")


data_app = typer.Typer(no_args_is_help=True, help="Training data statistics and diffs (for pull requests).")
app.add_typer(data_app, name="data")


def _data_stats(frame, tokenizer, p):
    from pipeline.stats import data_stats

    return data_stats(frame, tokenizer, p.prepare.max_seq_len)


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
def data_stats_command(tokenizer_dir: Path = Path("tokenizer"), out: Path = Path("data-report")):
    """Rows, token-length histogram (table + PNG), duplicate and truncation shares."""
    from pipeline.data import load_examples

    p = params()
    try:
        frame = load_examples(p.data.train)
    except DataError as err:
        fail(str(err))
    _write_report(out, _data_stats(frame, base_tokenizer(tokenizer_dir), p))


@data_app.command("diff")
def data_diff_command(rev: str = typer.Argument(..., help="git revision to compare with, e.g. origin/main"),
                      tokenizer_dir: Path = Path("tokenizer"), out: Path = Path("data-report")):
    """The same statistics for this branch and for REV's data (read through DVC), side by side."""
    import dvc.api

    from pipeline.data import load_examples

    p = params()
    try:
        current = load_examples(p.data.train)
        try:  # bytes: a Parquet file is binary, and load_examples names a bad UTF-8 line itself
            text = dvc.api.read(p.data.train, rev=rev, mode="rb")
        except Exception as err:  # dvc raises many kinds: a bad rev, no cache, no remote
            fail(f"{p.data.train}@{rev}: cannot read it through DVC ({type(err).__name__}: {err})")
        other = load_examples(f"{p.data.train}@{rev}", text=text)
    except DataError as err:
        fail(str(err))
    tokenizer = base_tokenizer(tokenizer_dir)  # loaded once for both revisions
    _write_report(out, _data_stats(current, tokenizer, p), _data_stats(other, tokenizer, p), rev)


# ------------------------------------------------------------------ release: Hub, commit status, PR comment
@app.command()
def publish(tag: str = typer.Option(..., envvar="RELEASE_TAG", help="release tag, e.g. v1.0.0"),
            folder: Path = typer.Option(Path("card"), help="the folder `sft card` wrote"),
            gate_file: Path = typer.Option(Path("gate/gate.json"), "--gate", help="the gate verdict"),
            sha: str = typer.Option(..., envvar="GITHUB_SHA", help="the tagged commit: the signed verdict must be its own"),
            manifest: Path = typer.Option(Path("release/manifest.json"), help="the release manifest (signed through "
                                                                               "release/attestation.json)"),
            signers: Path = typer.Option(Path(".github/release-signers"), help="allowed signers (public keys)"),
            repo_id: str = typer.Option(None, help="Hub repo (default: params.yaml card.repo_id)"),
            endpoint: str = typer.Option(None, envvar="HF_ENDPOINT", help="Hub URL (default: huggingface.co)"),
            token: str = typer.Option(None, envvar="HF_TOKEN", show_default=False),
            public: bool = typer.Option(False, "--public", help="create the repo public (default: private)")):
    """Push the card folder to the Hub as one commit and tag it; only the weights the gate passed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from pipeline.publish import PublishRefused, publish as push

    repo_id = repo_id or params().card.repo_id
    try:
        result = push(folder, gate_file, repo_id, tag, manifest_path=manifest, signers=signers, commit=sha,
                      endpoint=endpoint, token=token, private=not public)
    except PublishRefused as err:
        fail(f"publish refused: {err}")
    except OfflineModeIsEnabled:
        fail("publish: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    except HfHubHTTPError as err:
        fail(f"publish: the Hub answered {err}")
    if result.created:
        typer.echo(f"published {folder}/ to {repo_id} at commit {result.commit[:12]}, tagged {tag}")
    else:
        typer.echo(f"{repo_id}@{tag} already holds these weights (commit {result.commit[:12]}); nothing pushed")


@app.command()
def sign(sha: str = typer.Option(..., envvar="GIT_SHA", help="the trained commit the verdict is for"),
         manifest: Path = typer.Option(Path("release/manifest.json"), help="the release manifest `sft card` wrote")):
    """Attest that `manifest` is the verdict of commit SHA and sign it with RELEASE_SIGNING_KEY (the
    training job, after the DAG): release/attestation.json and its .sig."""
    from pipeline.files import sha256_file
    from pipeline.signing import SignatureError, sign as sign_file, signing_key_from_env

    if not manifest.is_file():
        fail(f"{manifest}: not found; run `sft card` (a failed gate has nothing to sign)")
    attestation = manifest.with_name("attestation.json")
    write_json(attestation, {"commit": sha, "manifest_sha256": sha256_file(manifest)})
    try:
        signature = sign_file(attestation, signing_key_from_env())
    except SignatureError as err:
        fail(f"sign: {err}")
    typer.echo(f"signed {attestation} ({manifest} of {sha[:12]}) -> {signature}")


status_app = typer.Typer(no_args_is_help=True, help="The eval-gate commit status on GitHub.")
app.add_typer(status_app, name="status")


def _github():
    from pipeline.github import GitHub

    missing = [name for name in ("GITHUB_REPOSITORY", "GITHUB_TOKEN") if not os.environ.get(name)]
    if missing:
        fail(f"status: set {' and '.join(missing)} (in Actions they are set for you; pass the token via env)")
    return GitHub(os.environ.get("GITHUB_API_URL", "https://api.github.com"), os.environ["GITHUB_REPOSITORY"],
                  os.environ["GITHUB_TOKEN"])


@status_app.command("set")
def status_set(sha: str = typer.Option(..., envvar="GITHUB_SHA", help="commit to mark"),
               state: str = typer.Option(None, help="pending | success | failure | error"),
               description: str = typer.Option("", help="with --state"),
               from_gate: Path = typer.Option(None, help="a gate.json: success only if it passed"),
               signed: Path = typer.Option(None, help="with --from-gate: a pass counts only if this file's "
                                                      "signature (<file>.sig) is there (the training job)"),
               target_url: str = typer.Option(None, help="link shown beside the status (inside a SkyPilot "
                                              "managed job: the job's dashboard page when JOBS_DASHBOARD_URL is set)")):
    """Set eval-gate: `--state pending --description ...` while training, `--from-gate gate/gate.json` after."""
    from pipeline.github import GitHubError, job_page, set_status, status_from_gate

    if (state is None) == (from_gate is None):
        fail("status set: pass exactly one of --state or --from-gate")
    target_url = job_page(dict(os.environ)) or target_url  # the job's own logs, not the workflow that launched it
    if from_gate is not None:
        state, description = status_from_gate(from_gate)
        if state == "success" and signed is not None and not signed.with_name(signed.name + ".sig").is_file():
            state, description = "error", f"the gate passed but {signed} is unsigned: nothing can be released (job log)"
    try:
        set_status(_github(), sha, state, description, target_url)
    except (GitHubError, ValueError) as err:
        fail(f"status set: {err}")
    typer.echo(f"eval-gate on {sha[:12]}: {state} ({description})")


@status_app.command("require")
def status_require(sha: str = typer.Option(..., envvar="GITHUB_SHA", help="commit to check"),
                   creator: str = typer.Option("", envvar="EVAL_GATE_ACCOUNT",
                                               help="the account whose eval-gate status counts (the job's token's)")):
    """Exit 1 unless the commit's eval-gate status is success, set by the eval-gate account (the release check)."""
    from pipeline.github import GitHubError, ReleaseRefused, require_success

    try:
        status = require_success(_github(), sha, creator)
    except (GitHubError, ReleaseRefused) as err:
        fail(f"release refused: {err}")
    typer.echo(f"eval-gate on {sha[:12]}: success ({status.get('description', '')})")


@app.command()
def results(sha: str = typer.Option(..., envvar="GIT_SHA", help="the trained commit")):
    """Commit this run's dvc.lock and metrics to branch results/<sha> (the release checks it out)."""
    from pipeline.github import GitHubError, push_results, result_paths, results_branch

    try:
        names = result_paths()
    except FileNotFoundError as missing:
        fail(f"results: {missing} missing; run the whole DAG first")
    try:
        commit = push_results(_github(), sha, {name: Path(name).read_bytes() for name in names})
    except GitHubError as err:
        fail(f"results: {err}")
    typer.echo(f"results of {sha[:12]} committed as {commit[:12]} on {results_branch(sha)}")


@app.command("take-results")
def take_results_command(sha: str = typer.Option(..., envvar="GITHUB_SHA", help="the tagged commit"),
                         checkout: Path = typer.Option(Path("results"), help="where results/<sha> is checked out")):
    """Copy the training results (dvc.lock, metrics, the signed release manifest) from results/<sha>,
    refusing a results commit that is not directly on the tagged commit or that changes other files."""
    from pipeline.github import ReleaseRefused, take_results

    try:
        taken = take_results(checkout, sha)
    except ReleaseRefused as err:
        fail(f"release refused: {err}")
    typer.echo(f"took {len(taken)} result file(s) of {sha[:12]} from {checkout}/")


@app.command("pr-comment")
def pr_comment(out: Path = typer.Option(Path("pr-comment.md"), help="where to write the comment"),
               post: int = typer.Option(None, help="PR number: create or update the one comment there"),
               head: str = typer.Option(None, help="the PR head commit, named in the heading"),
               base: str = typer.Option(None, help="the base branch's revision (origin/main): changes to the "
                                                   "gate's policy, eval sets or release path are flagged")):
    """Assemble the PR comment (contract, params diff, plan, data stats, gate); optionally post it."""
    from pipeline.github import GitHubError, upsert_comment
    from pipeline.pr_comment import build_comment, guarded_changes

    if base:
        p = params()
        guarded = guarded_changes(base, p.validate_.eval_sets, policy=p.gate.policy)
    else:
        guarded = None
    body = build_comment(Path("."), head=head, guarded=guarded)
    write_text(out, body)
    typer.echo(f"PR comment written to {out} ({len(body):,} characters)")
    if post is not None:
        try:
            action, comment_id = upsert_comment(_github(), post, body)
        except GitHubError as err:
            fail(f"pr-comment: {err}")
        typer.echo(f"PR #{post}: comment {comment_id} {action}")


def main():
    app()


if __name__ == "__main__":
    main()
