import yaml

from pipeline.card import build_card

VERDICT = {"passed": True, "chosen": "epoch-2", "sha256": "f" * 64, "select_by": "golden", "rules": [],
           "base": {"golden": 0.0, "general": 0.97},
           "candidates": {"epoch-2": {"scores": {"golden": 0.8, "general": 0.96}, "passed": True}}}


def test_card_has_model_index_with_chosen_scores():
    card = build_card(VERDICT, "| gate table |", "org/model", "demo/tiny-llama", None, "d" * 64,
                      {"lr": 3e-3}, "apache-2.0", "en")
    text = str(card)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "demo/tiny-llama"
    results = front["model-index"][0]["results"]
    scores = {r["metrics"][0]["type"]: r["metrics"][0]["value"] for r in results}
    assert scores == {"golden": 0.8, "general": 0.96}
    assert "d" * 64 in text and "f" * 64 in text and "| gate table |" in text
