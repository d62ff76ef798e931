import pytest

from pipeline.gate import Policy, Rule, decide, load_policy, render_markdown

POLICY = Policy(select_by="golden", rules=[Rule(metric="golden", min=0.5), Rule(metric="general", max_drop=0.05)])
BASE = {"golden": 0.0, "general": 0.9}
HASHES = {"epoch-1": "a" * 64, "epoch-2": "b" * 64, "epoch-3": "c" * 64}


def test_best_passing_checkpoint_is_chosen_not_the_last():
    candidates = {"epoch-1": {"golden": 0.55, "general": 0.9}, "epoch-2": {"golden": 0.7, "general": 0.88},
                  "epoch-3": {"golden": 0.8, "general": 0.7}}  # best golden, but forgot too much
    verdict = decide(POLICY, BASE, candidates, HASHES)
    assert verdict["passed"] and verdict["chosen"] == "epoch-2" and verdict["sha256"] == "b" * 64
    assert not verdict["candidates"]["epoch-3"]["passed"]


def test_failed_gate_names_the_rule():
    candidates = {"epoch-1": {"golden": 0.3, "general": 0.9}}
    verdict = decide(POLICY, BASE, candidates, HASHES)
    assert not verdict["passed"]
    failing = [r for r in verdict["rules"] if not r["passed"]]
    assert [r["metric"] for r in failing] == ["golden"]
    assert "**FAIL**" in render_markdown(verdict) and "FAILED" in render_markdown(verdict)


def test_drop_rule_uses_base():
    candidates = {"epoch-1": {"golden": 0.9, "general": 0.84}}
    verdict = decide(POLICY, BASE, candidates, HASHES)
    general = next(r for r in verdict["rules"] if r["metric"] == "general")
    assert general["drop"] == pytest.approx(0.06) and not general["passed"]


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

    base = [1.0] * 100
    same = paired_bootstrap(base, base)
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0, "n": 100}
    worse = paired_bootstrap(base, [0.0] * 30 + [1.0] * 70)
    assert worse["delta"] == -0.3 and worse["low"] < -0.3 < worse["high"] < 0
    with pytest.raises(ValueError, match="differ in number"):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_noise_does_not_fail_but_a_real_drop_does():
    policy = Policy(rules=[Rule(metric="golden", min=0.1), Rule(metric="general", max_drop=0.02)])
    base_items = [1.0] * 50 + [0.0] * 50
    noisy = [0.0, 0.0, 0.0] + [1.0] * 47 + [0.0] * 50  # 3 of 100 items flip: 0.03 drop, within noise
    real = [0.0] * 40 + [1.0] * 10 + [0.0] * 50  # 40 of 100 items lost
    items = {"base": {"general": base_items}, "epoch-1": {"general": noisy}, "epoch-2": {"general": real}}
    candidates = {"epoch-1": {"golden": 0.5, "general": 0.47}, "epoch-2": {"golden": 0.9, "general": 0.10}}
    verdict = decide(policy, {"golden": 0.0, "general": 0.5}, candidates, HASHES, items)
    assert verdict["candidates"]["epoch-1"]["passed"] and not verdict["candidates"]["epoch-2"]["passed"]
    assert verdict["chosen"] == "epoch-1"
    general = next(r for r in verdict["rules"] if r["metric"] == "general")
    assert general["drop"] == 0.03 and general["drop_ci"][0] <= 0.02 <= general["drop_ci"][1]
    assert "Change against the base" in render_markdown(verdict)


def test_change_plot_is_written(tmp_path):
    from pipeline.gate import plot_change

    items = {"base": {"golden": [0.0] * 10, "general": [1.0] * 10},
             "epoch-1": {"golden": [1.0] * 6 + [0.0] * 4, "general": [1.0] * 9 + [0.0]}}
    verdict = decide(POLICY, {"golden": 0.0, "general": 1.0}, {"epoch-1": {"golden": 0.6, "general": 0.9}},
                     HASHES, items)
    plot_change(verdict, tmp_path / "change.png")
    assert (tmp_path / "change.png").read_bytes()[:4] == b"\x89PNG"


def test_hard_ceilings_and_rises():
    policy = Policy(rules=[Rule(metric="golden", min=0.5), Rule(metric="over_refusal", max=0.1),
                           Rule(metric="bias", max_rise=0.05)])
    base = {"golden": 0.0, "over_refusal": 0.0, "bias": 0.6}
    candidates = {"epoch-1": {"golden": 0.9, "over_refusal": 0.3, "bias": 0.6},
                  "epoch-2": {"golden": 0.8, "over_refusal": 0.05, "bias": 0.7}}
    verdict = decide(policy, base, candidates, HASHES)
    assert not verdict["passed"] and verdict["chosen"] == "epoch-1"  # no passing one: best by golden, for the report
    assert verdict["failed_rules"] == ["over_refusal"]
    epoch2 = decide(policy, base, {"epoch-2": candidates["epoch-2"]}, HASHES)
    bias = next(r for r in epoch2["rules"] if r["metric"] == "bias")
    assert bias["rise"] == pytest.approx(0.1) and not bias["passed"] and epoch2["failed_rules"] == ["bias"]
    assert "Failing rules: `bias` (rise vs base <= 0.05)" in render_markdown(epoch2)


def test_rise_rule_reads_the_favourable_end_of_the_interval():
    policy = Policy(rules=[Rule(metric="golden", min=0.0), Rule(metric="bias", max_rise=0.05)])
    base_items = [1.0] * 30 + [0.0] * 30
    slightly = [1.0] * 33 + [0.0] * 27  # +0.05 on 60 pairs: within noise
    items = {"base": {"bias": base_items}, "epoch-1": {"bias": slightly}}
    verdict = decide(policy, {"golden": 0.0, "bias": 0.5}, {"epoch-1": {"golden": 0.5, "bias": 0.55}}, HASHES, items)
    bias = verdict["rules"][1]
    assert bias["rise_ci"][0] < 0.05 < bias["rise_ci"][1] and bias["passed"]


def test_a_band_is_two_rules():
    with pytest.raises(ValueError, match="exactly one of"):
        Rule(metric="bias", min=0.3, max=0.7)
    Policy(rules=[Rule(metric="bias", min=0.3), Rule(metric="bias", max=0.7)])


def test_checkpoints_with_golden_only_are_listed_but_never_chosen():
    golden_only = {"golden": 0.9}
    candidates = {"epoch-1": {"golden": 0.6, "general": 0.9}, "epoch-2": golden_only}
    verdict = decide(POLICY, BASE, candidates, HASHES)
    assert verdict["chosen"] == "epoch-1" and verdict["passed"]
    assert not verdict["candidates"]["epoch-2"]["full_suite"]
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
