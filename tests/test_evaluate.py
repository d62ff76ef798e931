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
        prompt_ids = [i for i, label in zip(ids, labels) if label == -100]
        rendered = lm.apply_chat_template([{"role": "user", "content": prompt}])
        assert lm.tok_encode(rendered) == prompt_ids


def test_run_tasks_scores_every_item(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """lm-eval runs offline on the shipped task YAMLs; per-item scores match the aggregate."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from pipeline.demo import write_demo_data
    from pipeline.evaluate import run_tasks

    root = Path(__file__).resolve().parents[1]
    write_demo_data(tmp_path / "data", train_rows=10)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = EvaluateConfig(include_path=str(root / "evals/tasks"), limit=12, batch_size=12, max_gen_toks=4)
    results = run_tasks(model, tokenizer, cfg, log=lambda *_: None)
    assert set(results) == {"golden", "general"}
    for r in results.values():
        assert r["n"] == 12 and r["score"] == pytest.approx(sum(r["items"]) / 12, abs=1e-4)
    assert results["golden"]["score"] == 0.0, "a random model cannot produce the golden answers"


def test_unknown_metric_name_is_reported(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from pipeline.demo import write_demo_data
    from pipeline.evaluate import run_tasks

    root = Path(__file__).resolve().parents[1]
    write_demo_data(tmp_path / "data", train_rows=10)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = EvaluateConfig(include_path=str(root / "evals/tasks"), limit=4,
                         metrics={"golden": MetricSpec(task="sft_golden", metric="bleu", chat=True)})
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
