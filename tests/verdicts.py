"""Gate verdicts for tests that need one without running the gate: complete, in the shape
`pipeline.gate.decide` makes (each rule result with the keys Rule.check writes), checked by the
model `sft gate` writes and publish / status / card read (pipeline.artifacts.Verdict)."""

from __future__ import annotations

from pipeline.artifacts import Verdict


def hard_rule(metric: str, observed: float, minimum: float, base: float = 0.0) -> dict:
    """A `min` rule's result."""
    return {
        "metric": metric,
        "observed": observed,
        "base": base,
        "why": None,
        "rule": f">= {minimum}",
        "threshold": minimum,
        "passed": observed >= minimum,
    }


def drop_rule(
    metric: str, observed: float, base: float, limit: float = 0.05, read: float | None = None, n: int = 240
) -> dict:
    """A `max_drop` rule's result, read at `read` (default: the observed drop) of its interval."""
    drop = round(base - observed, 4)
    read = drop if read is None else read
    return {
        "metric": metric,
        "observed": observed,
        "base": base,
        "why": None,
        "rule": f"drop vs base <= {limit}",
        "threshold": limit,
        "reads": "unfavourable",
        "drop": drop,
        "drop_ci": [round(drop - 0.02, 4), read],
        "read": read,
        "detectable": 0.04,
        "n": n,
        "passed": read <= limit,
    }


def make_verdict(
    rules: list[dict],
    chosen: str = "epoch-3",
    sha256: str = "f" * 64,
    *,
    kind: str = "full",
    others: dict[str, dict] | None = None,
    files: dict[str, str] | None = None,
) -> Verdict:
    """The verdict on `chosen` with these rule results (passed when all pass); `others` adds more
    candidates ({name: {"scores": ..., "kind": ...}}), `files` the checkpoint manifest `sft gate` adds."""
    passed = all(r["passed"] for r in rules)
    scores = {r["metric"]: r["observed"] for r in rules}
    candidates = {
        name: {"scores": c["scores"], "kind": c.get("kind", "full"), "passed": False, "full_suite": False}
        for name, c in (others or {}).items()
    }
    candidates[chosen] = {"scores": scores, "kind": kind, "passed": passed, "full_suite": True}
    verdict = {
        "passed": passed,
        "chosen": chosen,
        "kind": kind,
        "sha256": sha256,
        "select_by": rules[0]["metric"],
        "rules": rules,
        "failed_rules": [r["metric"] for r in rules if not r["passed"]],
        "change_vs_base": {},
        "base": {r["metric"]: r["base"] for r in rules},
        "lora_baseline": None,
        "candidates": candidates,
    }
    if files is not None:
        verdict["files"] = files
    return Verdict.model_validate(verdict)
