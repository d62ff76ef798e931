"""The LoRA baseline: only adapters train, checkpoints are the merged model, and the gate makes full
SFT beat LoRA before it ships (or ships LoRA when the policy says `ship: best`)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.artifacts import RunCost
from pipeline.config import ConfigError, LoraConfig, TrainConfig, parse_params
from pipeline.gate import Policy, Rule, VersusLora, decide, decision_record, render_decision
from pipeline.lora import add_adapters, checkpoint_path, merged, training_hooks
from pipeline.train.checkpoint import list_checkpoints
from pipeline.train.loop import train
from tests.test_train import tiny_packed


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_lora_trains_only_the_adapters_and_exports_the_merged_model(tiny_model_dir, tokenizer, tmp_path):
    model = add_adapters(load(tiny_model_dir), LoraConfig(rank=4, alpha=8, lr=1e-2, override_method_ranges=True))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert any("mlp.down_proj.lora_A" in k for k in adapters), "adapters on the MLP too (all linear layers)"
    assert any(".lora_magnitude_vector" in k for k in adapters), "DoRA by default"
    cfg = TrainConfig(lr=1e-2, epochs=2, micro_batch_size=4, override_method_ranges=True, device="cpu")
    result = train(
        model, tokenizer, tiny_packed(tokenizer), cfg, tmp_path, {"data_sha256": "abc"}, **training_hooks(model)
    )

    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base), "the base weights are bit-identical"
    assert any(not torch.equal(adapters[k], after[k]) for k in adapters if "lora_B" in k)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    exported = load_file(list_checkpoints(tmp_path)[-1] / "model.safetensors")
    assert not any("lora" in k or "base_model" in k for k in exported), "a checkpoint is a plain (merged) model"
    original = load_file(tiny_model_dir / "model.safetensors")
    assert exported.keys() == original.keys()
    assert not torch.equal(
        exported["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"]
    ), "the merge moved the weights"


@pytest.mark.parametrize("dora", [True, False])
def test_merged_and_unmerged_adapters_give_the_same_logits(tiny_model_dir, dora):
    torch.manual_seed(0)
    model = add_adapters(load(tiny_model_dir), LoraConfig(rank=4, alpha=8, dora=dora))
    with torch.no_grad():  # trained-looking adapters: B is zero at init, which would make this trivial
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        plain, state = merged(model)
        plain.eval()
        folded = plain(input_ids=ids).logits
        base = load(tiny_model_dir)(input_ids=ids).logits
    assert not any("lora" in k for k in state)
    assert torch.allclose(adapted, folded, atol=1e-5), (adapted - folded).abs().max()
    assert not torch.allclose(adapted, base, atol=1e-3), "the adapters change the model"
    assert any("lora_" in n for n, _ in model.named_parameters()), "the training model keeps its adapters"


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match=r"lora.lr = 2e-05 is outside LoRA's range \[0.0001, 0.0005\]"):
        parse_params({"lora": {"lr": 2e-5}})
    cfg = LoraConfig().training(TrainConfig(strategy="fsdp2"))
    assert cfg.lr == 2e-4 and cfg.strategy == "fsdp2"
    for zero3 in ("zero3", "zero3_offload"):  # the baseline of a ZeRO-3 run shards its frozen base with fsdp2
        cfg = LoraConfig().training(TrainConfig(strategy=zero3, micro_batch_size=2))
        assert cfg.strategy == "fsdp2" and cfg.micro_batch_size == 2 and cfg.lr == 2e-4


def items(scores: list[float]) -> dict[str, float]:
    return {f"item-{i}": s for i, s in enumerate(scores)}


def results(golden: list[float], general: list[float]) -> tuple[dict, dict]:
    return (
        {"golden": sum(golden) / len(golden), "general": sum(general) / len(general)},
        {"golden": items(golden), "general": items(general)},
    )


RULES = [Rule(metric="golden", min=0.5), Rule(metric="general", max_drop=0.1)]


def gate(versus: VersusLora, full_golden: list[float], lora_golden: list[float]):
    n = len(full_golden)
    general = [1.0] * n
    base_scores, base_items = results([0.0] * n, general)
    full_scores, full_items = results(full_golden, general)
    lora_scores, lora_items = results(lora_golden, general)
    policy = Policy(rules=RULES, versus_lora=versus)
    verdict = decide(
        policy,
        base_scores,
        {"epoch-1": full_scores},
        {"epoch-1": "f" * 64, "lora-epoch-1": "l" * 64},
        {"base": base_items, "epoch-1": full_items, "lora-epoch-1": lora_items},
        {"lora-epoch-1": lora_scores},
    )
    return policy, verdict, {"base": base_items, "epoch-1": full_items, "lora-epoch-1": lora_items}


def test_full_sft_that_only_matches_lora_fails_the_rule():
    same = [1.0] * 150 + [0.0] * 50  # golden 0.75 for both, item for item
    policy, verdict, paired = gate(VersusLora(min_gain=0.02), same, same)
    assert not verdict.passed and verdict.chosen == "epoch-1"
    assert verdict.failed_rules == ["golden vs LoRA"]
    gain = next(r for r in verdict.rules if r.versus and r.metric == "golden")
    assert gain.gain_ci == [0.0, 0.0] and gain.read == 0.0 and gain.base == 0.75
    record = decision_record(policy, verdict, paired, {})
    assert "did not earn its cost" in record.verdict and "LoRA is enough" in record.verdict
    assert record.full_minus_lora["golden"].delta == 0.0


def test_with_ship_best_the_lora_model_ships_when_full_sft_does_not_earn_its_place():
    same = [1.0] * 150 + [0.0] * 50
    policy, verdict, paired = gate(VersusLora(min_gain=0.02, ship="best"), same, same)
    assert verdict.passed and verdict.chosen == "lora-epoch-1" and verdict.kind == "lora"
    assert verdict.sha256 == "l" * 64 and verdict.candidates["lora-epoch-1"].full_suite
    record = decision_record(policy, verdict, paired, {})
    assert "LoRA is enough" in record.verdict and "`lora-epoch-1` ships" in record.verdict
    assert checkpoint_path(verdict.chosen, Path("train/checkpoints"), Path("lora/checkpoints")) == Path(
        "lora/checkpoints/epoch-1"
    )


def test_full_sft_that_clearly_beats_lora_ships_and_says_so():
    full = [1.0] * 180 + [0.0] * 20  # 0.90
    lora = [1.0] * 120 + [0.0] * 80  # 0.60, on the same items
    costs = {
        "full": RunCost(device="cpu", world_size=1, seconds=200, device_hours=0.0556, tokens=10, usd=None),
        "lora": RunCost(device="cpu", world_size=1, seconds=100, device_hours=0.0278, tokens=10, usd=None),
    }
    policy, verdict, paired = gate(VersusLora(min_gain=0.02, ship="best"), full, lora)
    assert verdict.passed and verdict.chosen == "epoch-1"
    record = decision_record(policy, verdict, paired, costs)
    assert record.verdict.startswith("Full SFT earned its cost: `epoch-1` golden +0.3000")
    assert "at 2.0x LoRA's training cost" in record.verdict
    assert "| lora-epoch-1 | lora | 0.6000 | 1.0000 |" in render_decision(record)


def test_the_decision_compares_the_checkpoint_that_ships_not_a_better_one_that_failed():
    """The demo's case: epoch-2 learns most but fails a regression rule, epoch-1 passes and ships; the
    record's full-vs-LoRA comparison and its verdict are about epoch-1."""
    n = 200
    base_scores, base_items = results([0.0] * n, [1.0] * n)
    passing, passing_items = results([1.0] * 160 + [0.0] * 40, [1.0] * n)
    forgetful, forgetful_items = results([1.0] * 190 + [0.0] * 10, [1.0] * 100 + [0.0] * 100)
    lora, lora_items = results([1.0] * 100 + [0.0] * 100, [1.0] * n)
    paired = {"base": base_items, "epoch-1": passing_items, "epoch-2": forgetful_items, "lora-epoch-1": lora_items}
    policy = Policy(rules=RULES, versus_lora=VersusLora(min_gain=0.02))
    verdict = decide(
        policy,
        base_scores,
        {"epoch-1": passing, "epoch-2": forgetful},
        {"epoch-1": "a" * 64, "epoch-2": "b" * 64, "lora-epoch-1": "l" * 64},
        paired,
        {"lora-epoch-1": lora},
    )
    assert verdict.passed and verdict.chosen == "epoch-1"
    record = decision_record(policy, verdict, paired, {})
    assert record.full == "epoch-1" and record.full_minus_lora["golden"].delta == 0.3
    assert record.verdict.startswith("Full SFT earned its cost: `epoch-1` golden +0.3000")


def test_a_missing_lora_baseline_fails_closed():
    full = [1.0] * 200
    base_scores, base_items = results([0.0] * 200, [1.0] * 200)
    full_scores, full_items = results(full, [1.0] * 200)
    verdict = decide(
        Policy(rules=RULES, versus_lora=VersusLora()),
        base_scores,
        {"epoch-1": full_scores},
        {"epoch-1": "f" * 64},
        {"base": base_items, "epoch-1": full_items},
    )
    assert not verdict.passed
    problem = next(r.problem for r in verdict.rules if r.versus)
    assert "no LoRA baseline" in problem


def test_the_shipped_policies_compare_with_lora(tmp_path):
    from pipeline.gate import load_policy

    root = Path(__file__).resolve().parents[1]
    for name in ("evals/gate.yaml", "evals/gate-demo.yaml"):
        policy = load_policy(root / name, {"golden", "general", "ifeval", "refusal", "over_refusal", "bias"})
        assert policy.versus_lora is not None and policy.versus_lora.min_gain > 0
    bad = tmp_path / "gate.yaml"
    bad.write_text("rules:\n  - metric: golden\n    min: 0.5\nversus_lora:\n  forgetting: genral\n")
    with pytest.raises(ValueError, match="versus_lora.forgetting: 'genral' is not in params.yaml"):
        load_policy(bad, {"golden", "general"})
    assert json.loads(json.dumps(VersusLora().model_dump()))["ship"] == "full"
