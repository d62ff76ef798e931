"""The typed files between stages (pipeline/artifacts.py): what the demo committed reads and writes
back byte for byte, the gate's own output keeps its key order, and a wrong file is named by field."""

import json
from pathlib import Path

import pytest

from pipeline.artifacts import (
    ArtifactError,
    ContractReport,
    Decision,
    PrepareStats,
    TrainingMetrics,
    Verdict,
    read,
    write,
)
from pipeline.config import PlanConfig
from pipeline.files import write_json
from pipeline.gate import (
    Policy,
    Rule,
    VersusLora,
    check_candidate,
    decide,
    paired_bootstrap,
    render_decision,
    render_markdown,
    run_cost,
)
from pipeline.paths import PATHS

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [
    (PATHS.contract, ContractReport),
    (PATHS.prepare_stats, PrepareStats),
    (PATHS.metrics("train"), TrainingMetrics),
    (PATHS.metrics("lora"), TrainingMetrics),
    (PATHS.verdict, Verdict),
    (PATHS.gate / "decision.json", Decision),
]


@pytest.mark.parametrize("path, model", COMMITTED, ids=[str(path) for path, _ in COMMITTED])
def test_the_demos_files_read_and_write_back_byte_for_byte(path, model, tmp_path):
    """Each committed output (the last demo run's) read as its model and written again is the same
    bytes, and the same bytes write_json makes of its plain JSON: key order, int/float, indent, newline."""
    original = (ROOT / path).read_bytes()
    artifact = read(ROOT / path, model)
    write(tmp_path / "typed.json", artifact)
    write_json(tmp_path / "plain.json", json.loads(original))
    assert (tmp_path / "typed.json").read_bytes() == original
    assert (tmp_path / "plain.json").read_bytes() == original


def test_the_committed_gate_report_renders_from_the_models_as_committed():
    """gate.md is render_markdown(verdict) + render_decision(record): from the typed files, the same text."""
    verdict, record = read(ROOT / PATHS.verdict, Verdict), read(ROOT / PATHS.gate / "decision.json", Decision)
    assert render_markdown(verdict) + render_decision(record) == (ROOT / PATHS.gate / "gate.md").read_text()


def _items(right: int, n: int = 100, prefix: str = "t") -> dict[str, float]:
    return {f"{prefix}/{i}": 1.0 if i < right else 0.0 for i in range(n)}


def test_the_verdict_keeps_each_rule_results_keys_in_the_order_the_rule_made_them():
    """Every kind of rule result (hard, hard without a score, regression read, underpowered refused and
    allowed, without per-item scores, versus LoRA gain and drop, no LoRA baseline) is written with the
    keys Rule.check / VersusLora.check made, in their order, null where they were None, none added."""
    rules = [
        Rule(metric="golden", min=0.5),
        Rule(metric="refusal", min=0.9),
        Rule(metric="general", max_drop=0.05),
        Rule(metric="bias", max_rise=0.05),
        Rule(metric="ifeval", max_drop=0.1, allow_underpowered=True, reason="a small set"),
        Rule(metric="safety", max_drop=0.05),
    ]
    base = {"golden": 0.0, "refusal": 0.0, "general": 0.9, "bias": 0.5, "ifeval": 0.5, "safety": 0.9}
    scores = {"golden": 0.8, "refusal": None, "general": 0.9, "bias": 0.5, "ifeval": 0.5, "safety": 0.9}
    items = {
        "base": {"golden": _items(0), "general": _items(90, 400), "bias": _items(50, 40), "ifeval": _items(5, 10)},
        "epoch-1": {"golden": _items(80), "general": _items(90, 400), "bias": _items(50, 40), "ifeval": _items(5, 10)},
        "lora-epoch-1": {"golden": _items(40), "general": _items(90, 400)},
    }
    policy = Policy(rules=rules, versus_lora=VersusLora())
    verdict = decide(
        policy,
        base,
        {"epoch-1": scores},
        {"epoch-1": "a" * 64, "lora-epoch-1": "b" * 64},
        items,
        {"lora-epoch-1": {**scores, "golden": 0.4}},
    )
    made, _ = check_candidate(policy, base, scores, items["base"], items["epoch-1"])
    made += policy.versus_lora.check(
        scores, "lora-epoch-1", {**scores, "golden": 0.4}, items["epoch-1"], items["lora-epoch-1"]
    )
    written = json.loads(verdict.dumps())["rules"]
    assert [list(rule.items()) for rule in written] == [list(rule.items()) for rule in made]
    kinds = {type(rule).__name__ for rule in verdict.rules}
    assert kinds == {"HardRuleResult", "RegressionRuleResult", "VersusLoraRuleResult"}
    assert {"problem", "underpowered", "allowed_because"} <= {key for rule in written for key in rule}
    no_baseline = decide(policy, base, {"epoch-1": scores}, {"epoch-1": "a" * 64}, items)
    made = policy.versus_lora.check(scores, None, {}, items["epoch-1"], {})
    assert [list(r.items()) for r in json.loads(no_baseline.dumps())["rules"][-2:]] == [list(r.items()) for r in made]


def test_what_the_gate_stage_adds_is_written_after_the_verdict_and_only_once_set():
    verdict = decide(
        Policy(rules=[Rule(metric="golden", min=0.5)]),
        {"golden": 0.0},
        {"epoch-1": {"golden": 0.7}},
        {"epoch-1": "a" * 64},
    )
    assert list(json.loads(verdict.dumps()))[-1] == "candidates"  # no path, files, plot or decision: not null
    verdict.path, verdict.files = "train/checkpoints/epoch-1", {"model.safetensors": "c" * 64}
    verdict.plot, verdict.decision = "change.png", "No LoRA comparison."
    assert list(json.loads(verdict.dumps()))[-5:] == ["candidates", "path", "files", "plot", "decision"]
    with pytest.raises(ValueError, match="files"):
        verdict.files = ["model.safetensors"]  # assignment is checked too


def test_the_decision_record_and_run_cost_write_what_the_gate_wrote(tmp_path):
    """The committed decision record's costs are run_cost of the committed metrics, as the gate wrote them."""
    prices = PlanConfig().prices
    record = json.loads((ROOT / PATHS.gate / "decision.json").read_text())
    costs = {
        run: json.loads(
            run_cost(read(ROOT / PATHS.metrics(run if run == "lora" else "train"), TrainingMetrics), prices).dumps()
        )
        for run in ("full", "lora")
    }
    assert [list(c.items()) for c in costs.values()] == [list(c.items()) for c in record["cost"].values()]
    metrics = read(ROOT / PATHS.metrics("train"), TrainingMetrics)
    gpu = run_cost(
        metrics.model_copy(update={"device": "NVIDIA H100 80GB HBM3", "world_size": 8, "seconds": 139.6}),
        {"H100-80GB": 3.0},
    )
    assert (gpu.device_hours, gpu.usd) == (0.3102, 0.93)
    change = paired_bootstrap(_items(40), _items(80))
    assert (
        Decision.parse(
            {**json.loads((ROOT / PATHS.gate / "decision.json").read_text()), "full_minus_lora": {"golden": change}},
            "record",
        )
        .full_minus_lora["golden"]
        .delta
        == 0.4
    )


@pytest.mark.parametrize("path, model", COMMITTED, ids=[str(path) for path, _ in COMMITTED])
def test_another_stages_file_is_refused_naming_file_and_field(path, model, tmp_path):
    other = next(p for p, m in COMMITTED if m is not model)
    with pytest.raises(ArtifactError) as refused:
        read(ROOT / other, model)
    assert str(refused.value).startswith(f"{ROOT / other}: ") and "more problem" in str(refused.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda v: v.pop("sha256"), "gate.json: sha256: Field required"),
        (lambda v: v.update(passed="true"), "gate.json: passed: Input should be a valid boolean"),
        (
            lambda v: v["rules"][1].update(drop_ci="-0.08..-0.03"),
            "gate.json: rules.1.drop_ci: Input should be a valid list",
        ),
        (
            lambda v: v["rules"][0].update(verified=True),
            "gate.json: rules.0.verified: unknown field (not part of Verdict",
        ),
        (
            lambda v: v["candidates"]["epoch-3"].update(kind="qlora"),
            "gate.json: candidates.epoch-3.kind: Input should be 'full' or 'lora'",
        ),
        (
            lambda v: v["change_vs_base"]["golden"].update(n=400.0),
            "gate.json: change_vs_base.golden.n: Input should be a valid integer",
        ),
        (lambda v: v.update(chosen="epoch-9"), "gate.json: chosen 'epoch-9' is not one of the candidates"),
    ],
)
def test_a_damaged_verdict_is_refused_naming_the_field(edit, message, tmp_path):
    verdict = json.loads((ROOT / PATHS.verdict).read_text())
    edit(verdict)
    (tmp_path / "gate.json").write_text(json.dumps(verdict))
    with pytest.raises(ArtifactError) as refused:
        read(tmp_path / "gate.json", Verdict)
    assert str(refused.value).startswith(f"{tmp_path / message}")


def test_a_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ArtifactError, match=r"stats.json: not found$"):
        read(tmp_path / "stats.json", PrepareStats)
    (tmp_path / "metrics.json").write_text('{"steps": 3,')
    with pytest.raises(ArtifactError, match=r"metrics.json: not valid JSON \(Expecting property name"):
        read(tmp_path / "metrics.json", TrainingMetrics)
    (tmp_path / "metrics.json").write_text("[]")
    with pytest.raises(ArtifactError, match=r"metrics.json: Input should be a valid dictionary or instance"):
        read(tmp_path / "metrics.json", TrainingMetrics)


def test_numbers_keep_their_json_type_and_a_bool_is_no_number(tmp_path):
    metrics = json.loads((ROOT / PATHS.metrics("train")).read_text())
    for field, value, problem in (
        ("tokens_per_second", 13740.0, "a valid integer$"),
        ("seconds", True, "a valid integer, or a valid number$"),
        ("final_loss", "0.12", "a valid integer, or a valid number$"),
    ):
        with pytest.raises(ArtifactError, match=f"^metrics.json: {field}: Input should be {problem}"):
            TrainingMetrics.parse({**metrics, field: value}, "metrics.json")
    whole = TrainingMetrics.parse({**metrics, "seconds": 140}, "metrics.json")  # an int where a float may be
    assert '"seconds": 140,' in whole.dumps()
    assert '"final_loss": NaN' in TrainingMetrics.parse({**metrics, "final_loss": float("nan")}, "m").dumps()


def test_files_of_earlier_versions_still_read_and_keep_their_keys(tmp_path):
    """Keys later versions added are optional where the code that reads them has a default: a run
    recorded before the device was priced, stats before bucketing, a contract before replay data."""
    metrics = json.loads((ROOT / PATHS.metrics("train")).read_text())
    old = {k: v for k, v in metrics.items() if k not in ("device", "resumed_from_step")}
    (tmp_path / "metrics.json").write_text(json.dumps(old, indent=2) + "\n")
    run = read(tmp_path / "metrics.json", TrainingMetrics)
    assert (run.device, run.resumed_from_step, run.trackers) == ("cpu", 0, None)
    assert run.dumps() == (tmp_path / "metrics.json").read_text()
    assert run_cost(run, {}).device == "cpu"
    tracked = TrainingMetrics.parse({**metrics, "trackers": {"mlflow": "0" * 32}}, "m")
    assert list(json.loads(tracked.dumps()))[-1] == "trackers"
    stats = json.loads((ROOT / PATHS.prepare_stats).read_text())
    assert PrepareStats.parse({k: v for k, v in stats.items() if k != "packed"}, "s").packed is True
    contract = json.loads((ROOT / PATHS.contract).read_text())
    old_contract = {k: v for k, v in contract.items() if k not in ("replay", "data_sha256")}
    assert json.loads(ContractReport.parse(old_contract, "c").dumps()) == old_contract
