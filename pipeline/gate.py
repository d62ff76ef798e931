"""gate: apply evals/gate.yaml to the evaluation results and pick the checkpoint that ships.

A checkpoint passes when every rule holds. Among passing checkpoints the best by the policy's
`select_by` metric is chosen (not the last one, not the lowest loss). The verdict records the
sha256 of the chosen weights: publishing later refuses any other bytes.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str
    min: float | None = None  # absolute floor for the candidate
    max_drop: float | None = None  # largest allowed fall below the base model

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.min is None) == (self.max_drop is None):
            raise ValueError(f"rule for {self.metric!r} needs exactly one of 'min' or 'max_drop'")
        return self

    def check(self, candidate: dict[str, float], base: dict[str, float]) -> dict:
        value = candidate[self.metric]
        if self.min is not None:
            return {"metric": self.metric, "rule": f">= {self.min}", "observed": value, "base": base.get(self.metric),
                    "passed": value >= self.min}
        drop = round(base[self.metric] - value, 4)
        return {"metric": self.metric, "rule": f"drop vs base <= {self.max_drop}", "observed": value,
                "base": base[self.metric], "drop": drop, "passed": drop <= self.max_drop}


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    select_by: str = "golden"
    rules: list[Rule]


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        return Policy.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{path}: gate policy not found") from None
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {field}: {first['msg'].removeprefix('Value error, ')}") from None


def decide(policy: Policy, base: dict[str, float], candidates: dict[str, dict[str, float]],
           hashes: dict[str, str]) -> dict:
    """The verdict: every candidate's rule results, the chosen one and its weights' hash."""
    missing = {r.metric for r in policy.rules} | {policy.select_by}
    for name, scores in {"base": base, **candidates}.items():
        if not missing <= scores.keys():
            raise ValueError(f"{name}: no result for metric(s) {sorted(missing - scores.keys())} named in the policy")
    if not candidates:
        raise ValueError("no checkpoints to gate")

    checks = {name: [rule.check(scores, base) for rule in policy.rules] for name, scores in candidates.items()}
    passing = [name for name, results in checks.items() if all(r["passed"] for r in results)]
    pool = passing or list(candidates)
    # ties go to the later checkpoint (candidates are ordered oldest first)
    chosen = max(reversed(pool), key=lambda name: candidates[name][policy.select_by])
    return {
        "passed": bool(passing),
        "chosen": chosen,
        "sha256": hashes[chosen],
        "select_by": policy.select_by,
        "rules": checks[chosen],
        "base": base,
        "candidates": {name: {"scores": candidates[name], "passed": name in passing} for name in candidates},
    }


def render_markdown(verdict: dict) -> str:
    status = "PASSED" if verdict["passed"] else "FAILED"
    lines = [
        f"## Eval gate: {status}",
        "",
        f"Chosen checkpoint: `{verdict['chosen']}` (best passing by `{verdict['select_by']}`), "
        f"weights sha256 `{verdict['sha256'][:16]}…`",
        "",
        "| metric | rule | base | candidate | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in verdict["rules"]:
        base = "-" if r["base"] is None else f"{r['base']:.4f}"
        lines.append(f"| {r['metric']} | {r['rule']} | {base} | {r['observed']:.4f} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} |")
    metrics = list(verdict["base"])
    lines += ["", "Every checkpoint:", "", "| model | " + " | ".join(metrics) + " | gate |",
              "| --- | " + " | ".join("---:" for _ in metrics) + " | --- |",
              "| base | " + " | ".join(f"{verdict['base'][m]:.4f}" for m in metrics) + " | - |"]
    for name, c in verdict["candidates"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['scores'][m]:.4f}" for m in metrics)
                     + f" | {'pass' if c['passed'] else 'fail'} |")
    return "\n".join(lines) + "\n"
