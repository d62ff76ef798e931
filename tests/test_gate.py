import math

import pytest

from pipeline.gate import Policy, Rule, decide, load_policy, render_markdown

POLICY = Policy(select_by="golden", rules=[Rule(metric="golden", min=0.5), Rule(metric="general", max_drop=0.05)])
BASE = {"golden": 0.0, "general": 0.9}
HASHES = {"epoch-1": "a" * 64, "epoch-2": "b" * 64, "epoch-3": "c" * 64}


def as_items(scores: list[float]) -> dict[str, float]:
    return {f"task/{i}": score for i, score in enumerate(scores)}


def paired(base: dict[str, float], candidates: dict[str, dict[str, float]], n: int = 400) -> dict:
    """Per-item scores with the given means: each model gets the first round(score * n) items right."""

    def items(score: float) -> dict[str, float]:
        return as_items([1.0] * round(score * n) + [0.0] * (n - round(score * n)))

    return {
        model: {metric: items(score) for metric, score in scores.items()}
        for model, scores in {"base": base, **candidates}.items()
    }


def gate(policy, base, candidates):
    return decide(policy, base, candidates, HASHES, paired(base, candidates))


def test_best_passing_checkpoint_is_chosen_not_the_last():
    candidates = {
        "epoch-1": {"golden": 0.55, "general": 0.9},
        "epoch-2": {"golden": 0.7, "general": 0.88},
        "epoch-3": {"golden": 0.8, "general": 0.7},
    }  # best golden, but forgot too much
    verdict = gate(POLICY, BASE, candidates)
    assert verdict.passed and verdict.chosen == "epoch-2" and verdict.sha256 == "b" * 64
    assert not verdict.candidates["epoch-3"].passed


def test_failed_gate_names_the_rule():
    candidates = {"epoch-1": {"golden": 0.3, "general": 0.9}}
    verdict = gate(POLICY, BASE, candidates)
    assert not verdict.passed
    failing = [r for r in verdict.rules if not r.passed]
    assert [r.metric for r in failing] == ["golden"]
    assert "**FAIL**" in render_markdown(verdict) and "FAILED" in render_markdown(verdict)


def test_drop_rule_uses_base():
    candidates = {"epoch-1": {"golden": 0.9, "general": 0.84}}
    verdict = gate(POLICY, BASE, candidates)
    general = next(r for r in verdict.rules if r.metric == "general")
    assert general.drop == pytest.approx(0.06) and not general.passed


def test_missing_metric_is_an_error():
    with pytest.raises(ValueError, match="general"):
        decide(POLICY, {"golden": 0.1}, {"epoch-1": {"golden": 0.9, "general": 0.9}}, HASHES)


def test_policy_file_errors_name_file_and_field(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("rules:\n  - metric: golden\n    min: 0.5\n    max_drop: 0.1\n")
    with pytest.raises(ValueError, match=r"gate.yaml: rules.0: .*exactly one"):
        load_policy(path)
    path.write_text("rules:\n  - metric: golden\n    minimum: 0.5\n")
    with pytest.raises(ValueError, match=r"gate.yaml: rules.0.minimum"):
        load_policy(path)


def test_paired_bootstrap_interval():
    from pipeline.gate import paired_bootstrap

    base = as_items([1.0] * 100)
    same = paired_bootstrap(base, base)
    assert {k: same[k] for k in ("delta", "low", "high", "n")} == {"delta": 0.0, "low": 0.0, "high": 0.0, "n": 100}
    worse = paired_bootstrap(base, as_items([0.0] * 30 + [1.0] * 70))
    assert worse["delta"] == -0.3 and worse["low"] < -0.3 < worse["high"] < 0
    with pytest.raises(ValueError, match="paired items differ"):
        paired_bootstrap(as_items([1.0, 0.0]), as_items([1.0]))


def test_items_are_paired_by_id_not_by_position():
    """Finding 3 of the red team: base and candidate items were paired by position. The same scores
    in another order are the same change; other items are refused, naming them."""
    from pipeline.gate import paired_bootstrap

    base = as_items([1.0] * 50 + [0.0] * 50)
    candidate = as_items([1.0] * 45 + [0.0] * 55)
    reordered = dict(reversed(list(candidate.items())))
    assert paired_bootstrap(base, reordered) == paired_bootstrap(base, candidate)
    swapped = {("other/" + k if k == "task/7" else k): v for k, v in candidate.items()}
    with pytest.raises(ValueError, match=r"only in base: \['task/7'\].*only in candidate: \['other/task/7'\]"):
        paired_bootstrap(base, swapped)


def test_a_real_drop_fails_even_where_the_favourable_end_would_clear_it():
    """With 100 items a true 10-point loss of general knowledge has a favourable interval end below a
    5-point max_drop; read at its unfavourable end (the default) it fails, and the rule says the eval set
    is too small for that limit anyway."""
    base = as_items([1.0] * 60 + [0.0] * 40)
    lost = as_items([0.0] * 10 + [1.0] * 50 + [0.0] * 40)  # 10 of the 60 known items forgotten
    items = {"base": {"general": base}, "epoch-1": {"general": lost}}
    scores = {"golden": 0.5, "general": 0.5}
    lenient = Policy(
        rules=[
            Rule(metric="golden", min=0.1),
            Rule(metric="general", max_drop=0.05, reads="favourable", allow_underpowered=True, reason="old behaviour"),
        ]
    )
    assert decide(lenient, {"golden": 0.0, "general": 0.6}, {"epoch-1": scores}, HASHES, items).passed
    strict = Policy(rules=[Rule(metric="golden", min=0.1), Rule(metric="general", max_drop=0.05)])
    verdict = decide(strict, {"golden": 0.0, "general": 0.6}, {"epoch-1": scores}, HASHES, items)
    general = verdict.rules[1]
    assert not verdict.passed and general.read == general.drop_ci[1] > 0.1
    assert general.detectable > 0.05 and "underpowered: 100 items detect a change of" in general.problem


def test_an_underpowered_rule_passes_only_when_the_policy_says_why():
    base = as_items([1.0] * 30 + [0.0] * 30)
    items = {"base": {"bias": base}, "epoch-1": {"bias": dict(base)}}  # unchanged, on 60 pairs only
    scores, base_scores = {"golden": 0.5, "bias": 0.5}, {"golden": 0.0, "bias": 0.5}
    strict = Policy(rules=[Rule(metric="golden", min=0.0), Rule(metric="bias", max_rise=0.05)])
    bias = decide(strict, base_scores, {"epoch-1": scores}, HASHES, items).rules[1]
    assert not bias.passed and bias.problem.startswith("underpowered: 60 items detect a change of 0.")
    assert "about" in bias.problem and "items would" in bias.problem
    with pytest.raises(ValueError, match="allow_underpowered needs a 'reason'"):
        Rule(metric="bias", max_rise=0.05, allow_underpowered=True)
    allowed = Policy(
        rules=[
            Rule(metric="golden", min=0.0),
            Rule(metric="bias", max_rise=0.05, allow_underpowered=True, reason="64 pairs in the demo"),
        ]
    )
    verdict = decide(allowed, base_scores, {"epoch-1": scores}, HASHES, items)
    assert verdict.passed and verdict.rules[1].allowed_because == "64 pairs in the demo"
    assert "underpowered, allowed: 64 pairs in the demo" in render_markdown(verdict)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_missing_or_non_finite_score_fails_its_rule_naming_the_metric(bad):
    candidates = {"epoch-1": {"golden": 0.9, "general": 0.9}}
    items = paired(BASE, candidates)
    hard = decide(POLICY, BASE, {"epoch-1": {"golden": bad, "general": 0.9}}, HASHES, items)
    golden = hard.rules[0]
    assert not hard.passed and golden.metric == "golden" and "missing or not a finite number" in golden.problem
    regression = decide(POLICY, BASE, {"epoch-1": {"golden": 0.9, "general": bad}}, HASHES, items)
    assert regression.failed_rules == ["general"] and "candidate score" in regression.rules[1].problem
    assert "**FAIL**: candidate score" in render_markdown(regression)
    if bad is not None:
        items["epoch-1"]["general"]["task/3"] = bad
        with pytest.raises(ValueError, match="general: a per-item score is NaN or infinite"):
            decide(POLICY, BASE, candidates, HASHES, items)


def test_a_regression_rule_without_per_item_scores_fails():
    verdict = decide(POLICY, BASE, {"epoch-1": {"golden": 0.9, "general": 0.9}}, HASHES)
    assert (
        verdict.failed_rules == ["general"] and verdict.rules[1].problem == "no per-item scores to pair with the base"
    )


def test_a_rule_on_a_metric_nobody_measures_is_refused_when_the_policy_loads(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("rules:\n  - metric: golden\n    min: 0.5\n  - metric: genral\n    max_drop: 0.05\n")
    with pytest.raises(ValueError, match=r"gate.yaml: rules.1.metric: 'genral' is not in params.yaml evaluate.metrics"):
        load_policy(path, {"golden", "general"})
    assert len(load_policy(path).rules) == 2  # without the metric list (a policy read on its own)


def test_change_plot_is_written(tmp_path):
    from pipeline.gate import plot_change

    items = {
        "base": {"golden": as_items([0.0] * 10), "general": as_items([1.0] * 10)},
        "epoch-1": {"golden": as_items([1.0] * 6 + [0.0] * 4), "general": as_items([1.0] * 9 + [0.0])},
    }
    verdict = decide(
        POLICY, {"golden": 0.0, "general": 1.0}, {"epoch-1": {"golden": 0.6, "general": 0.9}}, HASHES, items
    )
    plot_change(verdict, tmp_path / "change.png")
    assert (tmp_path / "change.png").read_bytes()[:4] == b"\x89PNG"


def test_hard_ceilings_and_rises():
    policy = Policy(
        rules=[Rule(metric="golden", min=0.5), Rule(metric="over_refusal", max=0.1), Rule(metric="bias", max_rise=0.05)]
    )
    base = {"golden": 0.0, "over_refusal": 0.0, "bias": 0.6}
    candidates = {
        "epoch-1": {"golden": 0.9, "over_refusal": 0.3, "bias": 0.6},
        "epoch-2": {"golden": 0.8, "over_refusal": 0.05, "bias": 0.7},
    }
    verdict = gate(policy, base, candidates)
    assert not verdict.passed and verdict.chosen == "epoch-1"  # no passing one: best by golden, for the report
    assert verdict.failed_rules == ["over_refusal"]
    epoch2 = gate(policy, base, {"epoch-2": candidates["epoch-2"]})
    bias = next(r for r in epoch2.rules if r.metric == "bias")
    assert bias.rise == pytest.approx(0.1) and not bias.passed and epoch2.failed_rules == ["bias"]
    assert "Failing rules: `bias` (rise vs base <= 0.05)" in render_markdown(epoch2)


def test_a_band_is_two_rules():
    with pytest.raises(ValueError, match="exactly one of"):
        Rule(metric="bias", min=0.3, max=0.7)
    Policy(rules=[Rule(metric="bias", min=0.3), Rule(metric="bias", max=0.7)])


def test_checkpoints_with_golden_only_are_listed_but_never_chosen():
    golden_only = {"golden": 0.9}
    candidates = {"epoch-1": {"golden": 0.6, "general": 0.9}, "epoch-2": golden_only}
    verdict = decide(POLICY, BASE, candidates, HASHES, paired(BASE, {"epoch-1": candidates["epoch-1"]}))
    assert verdict.chosen == "epoch-1" and verdict.passed
    assert not verdict.candidates["epoch-2"].full_suite
    assert "| epoch-2 | 0.9000 | - | golden only |" in render_markdown(verdict)
    with pytest.raises(ValueError, match="full suite"):
        decide(POLICY, BASE, {"epoch-2": golden_only}, HASHES)


def test_suite_order_tries_the_best_checkpoint_that_can_still_pass_first():
    from pipeline.gate import suite_order

    golden = {"epoch-1": {"golden": 0.6}, "epoch-2": {"golden": 0.4}, "epoch-3": {"golden": 0.6}}
    assert suite_order(POLICY, BASE, golden) == ["epoch-3", "epoch-1"]  # tie: the later first; 0.4 < min: never
    failing = {"epoch-1": {"golden": 0.2}, "epoch-2": {"golden": 0.3}}
    assert suite_order(POLICY, BASE, failing) == ["epoch-2"]  # none can pass: the best alone, for the report


def test_shipped_policy_names_only_metrics_the_params_define():
    from pipeline.config import load_params
    from tests.conftest import ROOT

    params = load_params(ROOT / "configs/demo.yaml")
    policy = load_policy(ROOT / params.gate.policy)
    assert {r.metric for r in policy.rules} <= set(params.evaluate.metrics)
    assert policy.select_by in params.evaluate.per_checkpoint


def test_a_policy_without_rules_is_refused_and_a_zero_score_still_ranks(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("rules: []\n")
    with pytest.raises(ValueError, match="gate.yaml: rules"):
        load_policy(path)
    policy = Policy(rules=[Rule(metric="golden", min=0.0)])
    verdict = decide(policy, {"golden": 0.0}, {"epoch-1": {"golden": math.nan}, "epoch-2": {"golden": 0.0}}, HASHES)
    assert verdict.chosen == "epoch-2" and verdict.passed  # 0.0 is a score; NaN ranks last and fails
