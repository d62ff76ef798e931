"""gate: apply evals/gate.yaml to the evaluation results and pick the checkpoint that ships.

A checkpoint passes when every rule holds. Among passing checkpoints the best by the policy's
`select_by` metric is chosen (not the last one, not the lowest loss). The verdict records the
sha256 of the chosen weights: publishing later refuses any other bytes.

Hard rules (`min`, `max`) bound a score; regression rules (`max_drop`, `max_rise`) compare
candidate and base on the same items with a paired bootstrap: a rule fails only when even the
favourable end of the 95% interval of the change is beyond the limit, so noise does not fail a
good model while a real regression does. Candidates run on golden only (not on the full suite)
are listed but can be neither passed nor chosen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class Rule(BaseModel):
    """One line of the policy: exactly one bound on one metric.

    `min` / `max` bound the candidate's score (hard gates); `max_drop` / `max_rise` bound its
    change against the base (regression, for metrics where higher / lower is better), judged on
    the favourable end of the paired 95% interval when per-item scores are given.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str
    min: float | None = None  # absolute floor for the candidate
    max: float | None = None  # absolute ceiling for the candidate
    max_drop: float | None = None  # largest allowed fall below the base model (higher is better)
    max_rise: float | None = None  # largest allowed rise above the base model (lower is better)
    why: str | None = None  # shown to the reviewer beside the verdict

    @model_validator(mode="after")
    def _one_kind(self):
        bounds = [k for k in ("min", "max", "max_drop", "max_rise") if getattr(self, k) is not None]
        if len(bounds) != 1:
            raise ValueError(f"rule for {self.metric!r} needs exactly one of 'min', 'max', 'max_drop' or 'max_rise'"
                             f"{f' (it has {bounds})' if bounds else ''}; write two rules for a band")
        return self

    def check(self, candidate: dict[str, float], base: dict[str, float], interval: dict | None = None) -> dict:
        value = candidate[self.metric]
        result = {"metric": self.metric, "observed": value, "base": base.get(self.metric), "why": self.why}
        if self.min is not None:
            return {**result, "rule": f">= {self.min}", "threshold": self.min, "passed": value >= self.min}
        if self.max is not None:
            return {**result, "rule": f"<= {self.max}", "threshold": self.max, "passed": value <= self.max}
        # regression: a drop is base - candidate, a rise candidate - base; the interval is of the change
        sign, name, limit = (-1, "drop", self.max_drop) if self.max_drop is not None else (1, "rise", self.max_rise)
        amount = round(sign * (value - base[self.metric]), 4)
        result.update(rule=f"{name} vs base <= {limit}", threshold=limit, passed=amount <= limit, **{name: amount})
        if interval:  # + 0.0: no "-0.0" in reports
            ends = sorted((round(sign * interval["low"], 4) + 0.0, round(sign * interval["high"], 4) + 0.0))
            result.update(passed=ends[0] <= limit, **{f"{name}_ci": ends})
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


def check_candidate(policy: Policy, base: dict[str, float], scores: dict[str, float],
                    base_items: dict[str, list[float]] | None = None,
                    items: dict[str, list[float]] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Every rule's result for one candidate, and its change against the base per metric (paired
    bootstrap over the same items, for each metric both have per-item scores of)."""
    base_items, items = base_items or {}, items or {}
    intervals = {metric: paired_bootstrap(base_items[metric], items[metric])
                 for metric in scores if metric in base_items and metric in items}
    return [rule.check(scores, base, intervals.get(rule.metric)) for rule in policy.rules], intervals


def can_still_pass(policy: Policy, base: dict[str, float], scores: dict[str, float]) -> bool:
    """Whether the hard rules (min, max) on the metrics a candidate already has (golden) leave it a
    chance. Regression rules wait for the full suite: they need the per-item interval."""
    hard = [rule for rule in policy.rules if rule.metric in scores and (rule.min is not None or rule.max is not None)]
    return all(rule.check(scores, base)["passed"] for rule in hard)


def suite_order(policy: Policy, base: dict[str, float], golden: dict[str, dict[str, float]]) -> list[str]:
    """Checkpoints in the order the full suite should try them: best by `select_by` first (ties to
    the later one), those that already fail a hard rule left out; if every one does, the best alone
    (so the report shows a complete failing candidate)."""
    ranked = sorted(reversed(list(golden)), key=lambda name: -golden[name][policy.select_by])
    viable = [name for name in ranked if can_still_pass(policy, base, golden[name])]
    return viable or ranked[:1]


def decide(policy: Policy, base: dict[str, float], candidates: dict[str, dict[str, float]],
           hashes: dict[str, str], items: dict[str, dict[str, list[float]]] | None = None) -> dict:
    """The verdict: every candidate's rule results, the chosen one and its weights' hash.

    Candidates that lack a metric the policy names (golden only: not run on the full suite) are
    listed but can be neither passed nor chosen. `items` ({model: {metric: per-item scores}},
    base included) turns on the paired intervals.
    """
    needed = {r.metric for r in policy.rules} | {policy.select_by}
    if not needed <= base.keys():
        raise ValueError(f"base: no result for metric(s) {sorted(needed - base.keys())} named in the policy")
    if not candidates:
        raise ValueError("no checkpoints to gate")
    complete = [name for name, scores in candidates.items() if needed <= scores.keys()]
    if not complete:
        missing = sorted(needed - next(iter(candidates.values())).keys())
        raise ValueError(f"no checkpoint has results for every metric the policy names (missing {missing}); "
                         "run the full suite on one (`sft evaluate --model chosen`)")
    items = items or {}
    checks, intervals = {}, {}
    for name in complete:
        checks[name], intervals[name] = check_candidate(policy, base, candidates[name], items.get("base"),
                                                        items.get(name))
    passing = [name for name in complete if all(r["passed"] for r in checks[name])]
    pool = passing or complete
    # ties go to the later checkpoint (candidates are ordered oldest first)
    chosen = max(reversed(pool), key=lambda name: candidates[name][policy.select_by])
    return {
        "passed": bool(passing),
        "chosen": chosen,
        "sha256": hashes[chosen],
        "select_by": policy.select_by,
        "rules": checks[chosen],
        "failed_rules": [r["metric"] for r in checks[chosen] if not r["passed"]],
        "change_vs_base": intervals[chosen],
        "base": base,
        "candidates": {name: {"scores": candidates[name], "passed": name in passing, "full_suite": name in complete}
                       for name in candidates},
    }


def render_markdown(verdict: dict) -> str:
    """The reviewer's table: every rule of the chosen checkpoint, failing ones named up front."""
    status = "PASSED" if verdict["passed"] else "FAILED"
    failed = [f"`{r['metric']}` ({r['rule']})" for r in verdict["rules"] if not r["passed"]]
    lines = [f"## Eval gate: {status}", ""]
    if failed:
        lines += [f"Failing rules: {', '.join(failed)}", ""]
    lines += [
        f"Chosen checkpoint: `{verdict['chosen']}` (best {'passing ' if verdict['passed'] else ''}by "
        f"`{verdict['select_by']}`), weights sha256 `{verdict['sha256'][:16]}…`",
        "",
        "| metric | rule | base | candidate | verdict | why |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for r in verdict["rules"]:
        base = "-" if r["base"] is None else f"{r['base']:.4f}"
        ci = next((f", 95% CI [{lo:+.4f}, {hi:+.4f}]" for key in ("drop_ci", "rise_ci") if key in r
                   for lo, hi in [r[key]]), "")
        lines.append(f"| {r['metric']} | {r['rule']}{ci} | {base} | {r['observed']:.4f} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} | {r.get('why') or ''} |")
    if verdict.get("change_vs_base"):
        lines += ["", f"Change against the base (forgetting), `{verdict['chosen']}` "
                  "(paired bootstrap, 95% CI):", "",
                  "| metric | base | candidate | change | 95% CI | items |", "| --- | ---: | ---: | ---: | --- | ---: |"]
        for metric, c in verdict["change_vs_base"].items():
            cand = verdict["candidates"][verdict["chosen"]]["scores"][metric]
            lines.append(f"| {metric} | {verdict['base'][metric]:.4f} | {cand:.4f} | {c['delta']:+.4f} | "
                         f"[{c['low']:+.4f}, {c['high']:+.4f}] | {c['n']} |")
    if verdict.get("plot"):
        lines += ["", f"![base vs candidate]({verdict['plot']})"]
    metrics = list(verdict["base"])
    lines += ["", "Every checkpoint (the full suite runs on the best by golden until one passes):", "",
              "| model | " + " | ".join(metrics) + " | gate |",
              "| --- | " + " | ".join("---:" for _ in metrics) + " | --- |",
              "| base | " + " | ".join(f"{verdict['base'][m]:.4f}" for m in metrics) + " | - |"]
    for name, c in verdict["candidates"].items():
        gate = ("pass" if c["passed"] else "fail") if c.get("full_suite", True) else "golden only"
        lines.append(f"| {name} | " + " | ".join(f"{c['scores'][m]:.4f}" if m in c["scores"] else "-" for m in metrics)
                     + f" | {gate} |")
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
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"eval gate: {'passed' if verdict['passed'] else 'FAILED'}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
