"""Train/eval parity: lm-eval must show the model its prompts exactly as prepare trained on them."""

import copy

import pytest
import torch

from pipeline.config import EvaluateConfig, MetricSpec
from pipeline.prepare import tokenize_pair


def test_lm_eval_renders_prompts_like_training(tiny_model_dir, tokenizer):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    for prompt, response in [("Repeat after me: cat dog", "cat dog"), ("Record: name Ka, city Lo. What?", "Lo")]:
        ids, labels = tokenize_pair(tokenizer, prompt, response)
        prompt_ids = ids[: next(i for i, label in enumerate(labels) if label != -100)]
        rendered = lm.apply_chat_template([{"role": "user", "content": prompt}])
        assert lm.tok_encode(rendered) == prompt_ids


def test_every_shipped_suite_runs_offline_and_scores_every_item(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """lm-eval runs each task of params.yaml offline on the demo's local files; per-item scores
    match the aggregate, and `names` limits a run to some metrics (per checkpoint: golden)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from pipeline.config import load_params
    from pipeline.demo import write_demo_data
    from pipeline.evaluate import run_tasks

    root = Path(__file__).resolve().parents[1]
    shipped = load_params(root / "configs/demo.yaml").evaluate  # never the team-edited params.yaml
    write_demo_data(tmp_path / "data", train_rows=10)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = EvaluateConfig(
        include_path=str(root / "evals/tasks"), metrics=shipped.metrics, limit=8, batch_size=8, max_gen_toks=4
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: more threads only add synchronisation
    try:
        results = run_tasks(model, tokenizer, cfg, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert set(results) == set(shipped.metrics) >= {"golden", "general", "ifeval", "refusal", "over_refusal", "bias"}
    for r in results.values():
        assert r["n"] == 8 and r["score"] == pytest.approx(sum(r["items"].values()) / 8, abs=1e-4)
    assert results["golden"]["score"] == 0.0, "a random model cannot produce the golden answers"
    assert results["ifeval"]["score"] == 0.0 and results["refusal"]["score"] == 0.0  # nor follow or refuse
    assert set(run_tasks(model, tokenizer, cfg, lambda *_: None, names=["golden"])) == {"golden"}


def test_base_results_are_cached_by_base_hash_tasks_and_data(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from pipeline.demo import write_demo_data
    from pipeline.evaluate import cache_base_results, cached_base_results, suite_fingerprint

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "evals/tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    write_demo_data(tmp_path / "data", train_rows=10)
    monkeypatch.chdir(tmp_path)
    cfg = EvaluateConfig(include_path="tasks", base_cache=str(tmp_path / "cache"))
    key = suite_fingerprint(cfg, "a" * 64)
    assert cached_base_results(cfg, key) is None
    cache_base_results(cfg, key, {"base": {"golden": {"score": 0.0}}})
    assert cached_base_results(cfg, key) == {"base": {"golden": {"score": 0.0}}}
    assert suite_fingerprint(cfg, "a" * 64) == key, "same base, tasks and data: a hit"
    assert suite_fingerprint(cfg, "b" * 64) != key, "another base"
    assert suite_fingerprint(cfg.model_copy(update={"limit": 5}), "a" * 64) != key, "other settings"
    (tmp_path / "data/golden.jsonl").write_text((tmp_path / "data/golden.jsonl").read_text()[:-200])
    assert suite_fingerprint(cfg, "a" * 64) != key, "other eval data (read from the task YAMLs)"


def test_full_suite_stops_at_the_first_checkpoint_that_passes(monkeypatch):
    import pipeline.evaluate as evaluate

    ran = []
    monkeypatch.setattr(
        evaluate,
        "evaluate_models",
        lambda paths, *args, **kwargs: ran.extend(paths) or {name: {"ok": name != "epoch-3"} for name in paths},
    )
    order = {"epoch-3": "p3", "epoch-2": "p2", "epoch-1": "p1"}
    results = evaluate.evaluate_in_order(order, EvaluateConfig(), lambda name, r: r["ok"])
    assert ran == ["epoch-3", "epoch-2"] and set(results) == {"epoch-3", "epoch-2"}


def test_unknown_metric_name_is_reported(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from pipeline.demo import write_demo_data
    from pipeline.evaluate import run_tasks

    root = Path(__file__).resolve().parents[1]
    write_demo_data(tmp_path / "data", train_rows=10)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = EvaluateConfig(
        include_path=str(root / "evals/tasks"),
        limit=4,
        metrics={"golden": MetricSpec(task="sft_golden", metric="bleu", chat=True)},
    )
    with pytest.raises(KeyError, match="bleu"):
        run_tasks(model, tokenizer, cfg, log=lambda *_: None)


def test_a_template_mismatch_is_reported_before_evaluating(tiny_model_dir, tokenizer):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from pipeline.evaluate import check_parity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    check_parity(lm, tokenizer)  # the shipped template: no complaint
    # a checkpoint whose tokenizer renders chats differently from the one training used
    edited = copy.deepcopy(tokenizer)
    edited.chat_template = tokenizer.chat_template.replace("{{ bos_token }}", "")
    with pytest.raises(ValueError, match="train/eval mismatch"):
        check_parity(HFLM(pretrained=model, tokenizer=edited, batch_size=1), tokenizer)


def test_a_registry_style_group_is_scored_over_all_its_subtasks(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """The preset's general-knowledge task, mmlu_pro, is an lm-eval group of 14 subtasks with a named
    answer filter ("custom-extract"): its items live under each subtask's samples, not the group's.
    A group of the same shape: every item of every subtask is scored, in a fixed order."""
    import json

    from transformers import AutoModelForCausalLM

    from pipeline.evaluate import run_tasks

    rows = [
        {"question": f"Pick {letter}.", "answer": letter, "category": category}
        for category in ("bio", "math")
        for letter in "ABC"
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for category in ("bio", "math"):
        (tmp_path / f"pro_{category}.yaml").write_text(f"""
task: pro_{category}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {tmp_path / "mc.jsonl"}}}}}
test_split: test
process_docs: !function utils.only_{category}
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
filter_list:
  - name: custom-extract
    filter: [{{function: regex, regex_pattern: "answer is \\\\(?([A-J])\\\\)?"}}, {{function: take_first}}]
generation_kwargs: {{until: ["<|end|>"], max_gen_toks: 4, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    (tmp_path / "utils.py").write_text(
        "def only_bio(d):\n    return d.filter(lambda r: r['category'] == 'bio')\n\n\n"
        "def only_math(d):\n    return d.filter(lambda r: r['category'] == 'math')\n"
    )
    (tmp_path / "pro.yaml").write_text(
        "group: pro\ntask: [pro_math, pro_bio]\naggregate_metric_list:\n"
        "  - {metric: exact_match, aggregation: mean, weight_by_size: true, "
        "filter_list: custom-extract}\nmetadata: {version: 1}\n"
    )
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = EvaluateConfig(
        include_path=str(tmp_path),
        batch_size=8,
        max_gen_toks=4,
        metrics={"golden": MetricSpec(task="pro", metric="exact_match", chat=True)},
    )
    result = run_tasks(model, tokenizer, cfg, log=lambda *_: None)["golden"]
    assert result["n"] == 6 and result["score"] == pytest.approx(sum(result["items"].values()) / 6)
    assert sorted(result["items"]) == [f"pro_{c}/{i}" for c in ("bio", "math") for i in range(3)], "ids pair items"


@pytest.mark.e2e  # sft evaluate under torchrun
def test_two_processes_give_the_same_per_item_results_as_one(tiny_model_dir, tmp_path):
    """Issue 15: `sft evaluate` on every GPU of a node (torchrun, one process per device; lm-eval
    shards each task's requests by rank and gathers on rank 0) scores the same items the same way
    as one process: base, every checkpoint, and the full suite in the gate's order, which all ranks
    walk together. Two CPU processes (gloo) stand in for the GPUs."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from pipeline.demo import write_demo_data
    from pipeline.train.checkpoint import MANIFEST
    from tests.conftest import ROOT

    shutil.copytree(ROOT / "evals", tmp_path / "evals")
    params = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    params["evaluate"].update(limit=8, batch_size=4, max_gen_toks=4, base_cache=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # both checkpoints stay viable on golden and fail on ifeval: the ranks must walk the whole order together
    (tmp_path / params["gate"]["policy"]).write_text(
        "select_by: golden\nrules:\n  - metric: golden\n    min: 0.0\n  - metric: ifeval\n    min: 0.5\n"
    )
    write_demo_data(tmp_path / "data", train_rows=10)
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    for epoch in (1, 2):
        shutil.copytree(tiny_model_dir, tmp_path / f"train/checkpoints/epoch-{epoch}")
        (tmp_path / f"train/checkpoints/epoch-{epoch}" / MANIFEST).write_text("{}")
    sft = [str(Path(sys.executable).parent / "sft")]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pipeline.cli",
    ]
    for launch, out in ((sft, "one"), (torchrun, "two")):
        for model in ("base", "checkpoints", "chosen"):
            done = subprocess.run(
                [*launch, "evaluate", "--model", model, "--evaluate", out],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in ("base", "checkpoints", "suite"):
        one = json.loads((tmp_path / f"one/{name}-items.json").read_text())
        two = json.loads((tmp_path / f"two/{name}-items.json").read_text())
        assert set(one) == set(two) and one
        for model in one:
            assert set(one[model]) == set(two[model])
            for metric, result in one[model].items():
                assert two[model][metric]["items"] == result["items"], f"{name}/{model}/{metric}"
                assert two[model][metric]["score"] == pytest.approx(result["score"], abs=1e-4)
    assert set(json.loads((tmp_path / "two/suite.json").read_text())) == {"epoch-1", "epoch-2"}


def test_evaluate_runs_once_per_gpu_of_the_node(monkeypatch):
    from pipeline.dist import data_parallel_command as launcher

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    command = launcher(["evaluate", "--model", "base"], {"SKYPILOT_NUM_NODES": "2"})
    assert "--standalone" in command and command[command.index("--nproc-per-node") + 1] == "8"
    assert command[-5:] == ["-m", "pipeline.cli", "evaluate", "--model", "base"], "node 0 alone: no --nnodes"
    assert launcher(["evaluate"], {"WORLD_SIZE": "8"}) is None, "already under torchrun"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launcher(["evaluate"], {}) is None, "one device: no launcher"
