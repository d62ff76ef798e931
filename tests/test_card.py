import yaml

from pipeline.card import build_card
from pipeline.config import MetricSpec
from tests.verdicts import drop_rule, hard_rule, make_verdict

VERDICT = make_verdict(
    [hard_rule("golden", 0.8, 0.5), drop_rule("general", 0.96, 0.97), hard_rule("refusal", 1.0, 0.9)],
    "epoch-2",
    "f" * 64,
    others={"epoch-1": {"scores": {"golden": 0.4}}},
)
METRICS = {
    "golden": MetricSpec(task="sft_golden", metric="exact_match", chat=True),
    "general": MetricSpec(task="sft_general", metric="acc"),
    "refusal": MetricSpec(task="sft_refusal", metric="refused", chat=True),
}


def test_card_has_model_index_with_chosen_scores():
    card = build_card(
        VERDICT,
        "| gate table |\n\n![base vs candidate](change.png)",
        "org/model",
        "demo/tiny-llama",
        None,
        METRICS,
        "d" * 64,
        {"lr": 3e-3},
        "apache-2.0",
        "en",
    )
    text = str(card)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "demo/tiny-llama"
    results = front["model-index"][0]["results"]
    found = {(r["dataset"]["type"], r["metrics"][0]["type"]): r["metrics"][0]["value"] for r in results}
    assert found == {("sft_golden", "exact_match"): 0.8, ("sft_general", "acc"): 0.96, ("sft_refusal", "refused"): 1.0}
    assert "d" * 64 in text and "f" * 64 in text and "| gate table |" in text
    assert "![base vs candidate](change.png)" in text and "forgetting" in text
