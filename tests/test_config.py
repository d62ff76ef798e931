from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params
from pipeline.gate import load_policy

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_and_presets_parse():
    load_params(ROOT / "params.yaml")
    # production presets; demo.yaml is the embedded demo (it overrides the ranges, and says why)
    presets = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("demo"))
    assert presets, "configs/ must hold at least one production preset"
    for preset in presets:
        params = load_params(preset)
        assert not params.train.override_method_ranges, f"{preset.name}: production keeps the method's ranges"


def test_out_of_range_lr_is_refused_with_field_and_range():
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"lr": 1e-3}})
    message = str(err.value)
    assert "train.lr" in message and "[1e-05, 5e-05]" in message and "override_method_ranges" in message


@pytest.mark.parametrize("field,value", [("warmup_ratio", 0.2), ("weight_decay", 0.0), ("epochs", 5)])
def test_other_method_ranges(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        parse_params({"train": {field: value}})


def test_override_allows_out_of_range():
    assert parse_params({"train": {"lr": 1e-3, "override_method_ranges": True}}).train.lr == 1e-3


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        parse_params({"train": {"learning_rate": 2e-5}})


def test_hub_base_must_be_pinned():
    with pytest.raises(ConfigError, match="revision"):
        parse_params({"base": {"source": "hub", "model": "org/model"}})


def test_evaluate_needs_golden():
    with pytest.raises(ConfigError, match="golden"):
        parse_params({"evaluate": {"metrics": {"general": {"task": "t", "metric": "acc"}}}})


class TaskLoader(yaml.SafeLoader):
    """lm-eval task YAMLs name Python hooks with a `!function module.name` tag."""


TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_gate_policy_and_task_yamls_parse():
    policy = load_policy(ROOT / "evals/gate.yaml")
    assert {r.metric for r in policy.rules} <= set(load_params(ROOT / "configs/demo.yaml").evaluate.metrics)
    for task in (ROOT / "evals/tasks").glob("*.yaml"):
        spec = yaml.load(task.read_text(), Loader=TaskLoader)
        assert spec["task"] and spec["output_type"] in {"generate_until", "multiple_choice", "loglikelihood"}


def test_local_generative_tasks_take_their_length_from_evaluate_max_gen_toks():
    """A task's own max_gen_toks would override evaluate.max_gen_toks (a long golden answer cut at
    32 tokens never matches), and without `until` lm-eval stops at the first blank line: only the
    model's own end-of-turn token may end a response."""
    from lm_eval.config.task import TaskConfig
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    generative = []
    for task in sorted((ROOT / "evals/tasks").glob("*.yaml")):
        spec = yaml.load(task.read_text(), Loader=TaskLoader)
        if spec["output_type"] != "generate_until":
            continue
        generative.append(spec["task"])
        config = TaskConfig(
            task=spec["task"], output_type="generate_until", generation_kwargs=spec["generation_kwargs"]
        )
        kwargs = normalize_gen_kwargs(config.generation_kwargs, 512)
        assert kwargs["max_gen_toks"] == 512, task.name
        assert handle_stop_sequences(kwargs["until"], eos="<|eot_id|>") == ["<|eot_id|>"], task.name
    assert {"sft_golden", "sft_refusal", "sft_over_refusal", "sft_ifeval"} <= set(generative)


def test_every_dvc_stage_is_an_sft_command():
    from typer.main import get_command

    from pipeline.cli import app

    commands = set(get_command(app).commands)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        program, command, *_ = stage["cmd"].split()
        assert program == "sft" and command in commands, name
        assert any(str(d).startswith("pipeline/") for d in stage["deps"]), f"{name}: its module is a dependency"
