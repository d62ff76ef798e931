"""gate: apply evals/gate.yaml to the evaluation results and pick the checkpoint that ships.

A checkpoint passes when every rule holds. Among passing checkpoints the best by the policy's
`select_by` metric is chosen (not the last one, not the lowest loss). The verdict records the
sha256 of the chosen weights: publishing later refuses any other bytes.

Regression rules (`max_drop`) compare candidate and base on the same items with a paired
bootstrap: a rule fails only when even the favourable end of the 95% interval of the drop is
beyond the limit, so noise does not fail a good model while a real drop does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

    def check(self, candidate: dict[str, float], base: dict[str, float], interval: dict | None = None) -> dict:
        value = candidate[self.metric]
        if self.min is not None:
            return {"metric": self.metric, "rule": f">= {self.min}", "observed": value, "base": base.get(self.metric),
                    "passed": value >= self.min}
        drop = round(base[self.metric] - value, 4)
        result = {"metric": self.metric, "rule": f"drop vs base <= {self.max_drop}", "observed": value,
                  "base": base[self.metric], "drop": drop, "passed": drop <= self.max_drop}
        if interval:  # drop = -(candidate - base): its interval is the negated change interval
            low, high = round(-interval["high"], 4), round(-interval["low"], 4)
            result.update(rule=f"drop vs base <= {self.max_drop} (95% CI)", drop_ci=[low, high],
                          passed=low <= self.max_drop)
        return result


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


def paired_bootstrap(base: list[float], candidate: list[float], iterations: int = 2000, seed: int = 0) -> dict:
    """Candidate minus base on the same items, with a 95% percentile interval over resampled items."""
    base_arr, cand_arr = np.asarray(base, dtype=float), np.asarray(candidate, dtype=float)
    if base_arr.shape != cand_arr.shape or base_arr.size == 0:
        raise ValueError(f"paired items differ in number: base {base_arr.size}, candidate {cand_arr.size}")
    diff = cand_arr - base_arr
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(iterations, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"delta": round(float(diff.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4),
            "n": int(diff.size)}


def decide(policy: Policy, base: dict[str, float], candidates: dict[str, dict[str, float]],
           hashes: dict[str, str], items: dict[str, dict[str, list[float]]] | None = None) -> dict:
    """The verdict: every candidate's rule results, the chosen one and its weights' hash.

    `items` ({model: {metric: per-item scores}}, base included) turns on the paired intervals.
    """
    missing = {r.metric for r in policy.rules} | {policy.select_by}
    for name, scores in {"base": base, **candidates}.items():
        if not missing <= scores.keys():
            raise ValueError(f"{name}: no result for metric(s) {sorted(missing - scores.keys())} named in the policy")
    if not candidates:
        raise ValueError("no checkpoints to gate")

    intervals = {name: {metric: paired_bootstrap(items["base"][metric], items[name][metric])
                        for metric in scores if metric in items.get("base", {}) and metric in items.get(name, {})}
                 for name, scores in candidates.items()} if items else {name: {} for name in candidates}
    checks = {name: [rule.check(scores, base, intervals[name].get(rule.metric)) for rule in policy.rules]
              for name, scores in candidates.items()}
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
        "change_vs_base": intervals[chosen],
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
    if verdict.get("change_vs_base"):
        lines += ["", f"Change against the base, `{verdict['chosen']}` (paired bootstrap, 95% CI):", "",
                  "| metric | base | candidate | change | 95% CI | items |", "| --- | ---: | ---: | ---: | --- | ---: |"]
        for metric, c in verdict["change_vs_base"].items():
            cand = verdict["candidates"][verdict["chosen"]]["scores"][metric]
            lines.append(f"| {metric} | {verdict['base'][metric]:.4f} | {cand:.4f} | {c['delta']:+.4f} | "
                         f"[{c['low']:+.4f}, {c['high']:+.4f}] | {c['n']} |")
    if verdict.get("plot"):
        lines += ["", f"![base vs candidate]({verdict['plot']})"]
    metrics = list(verdict["base"])
    lines += ["", "Every checkpoint:", "", "| model | " + " | ".join(metrics) + " | gate |",
              "| --- | " + " | ".join("---:" for _ in metrics) + " | --- |",
              "| base | " + " | ".join(f"{verdict['base'][m]:.4f}" for m in metrics) + " | - |"]
    for name, c in verdict["candidates"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['scores'][m]:.4f}" for m in metrics)
                     + f" | {'pass' if c['passed'] else 'fail'} |")
    return "\n".join(lines) + "\n"


def plot_change(verdict: dict, path: Path) -> None:
    """Base vs chosen checkpoint per metric, the candidate with its 95% interval (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(verdict["change_vs_base"])
    chosen = verdict["candidates"][verdict["chosen"]]["scores"]
    base = [verdict["base"][m] for m in metrics]
    cand = [chosen[m] for m in metrics]
    change = verdict["change_vs_base"]
    errors = [[chosen[m] - (verdict["base"][m] + change[m]["low"]) for m in metrics],
              [(verdict["base"][m] + change[m]["high"]) - chosen[m] for m in metrics]]
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.2), dpi=110)
    ax.bar(x - 0.2, base, 0.4, label="base", color="#9aa5b1")
    ax.bar(x + 0.2, cand, 0.4, yerr=np.clip(errors, 0, None), capsize=4, label=verdict["chosen"], color="#2f6fb0")
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"eval gate: {'passed' if verdict['passed'] else 'FAILED'}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
