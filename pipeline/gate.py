"""gate: apply evals/gate.yaml to the evaluation results and pick the checkpoint that ships.

A checkpoint passes when every rule holds. Among passing checkpoints the best by the policy's
`select_by` metric is chosen (not the last one, not the lowest loss). The verdict records the
sha256 of the chosen weights: publishing later refuses any other bytes.

Hard rules (`min`, `max`) bound a score; regression rules (`max_drop`, `max_rise`) compare
candidate and base on the same items (paired by item id) with a paired bootstrap. By default a
regression rule reads the unfavourable end of the 95% interval of the change (non-inferiority:
the change must be shown to be within the limit), and a rule whose items are too few to detect a
change of its limit is refused as underpowered unless the policy allows it with a reason.
Everything fails closed: a missing, NaN or infinite score fails its rule, a regression rule without
paired per-item scores fails, differing item sets are refused, and candidates run on golden only
(not on the full suite) are listed but can be neither passed nor chosen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.artifacts import Decision, RunCost, TrainingMetrics, Verdict

# Power: a paired difference of mean d over n items with standard deviation s is detected (two-sided
# 5% test, 80% power) when |d| >= (1.96 + 0.84) * s / sqrt(n). Where base and candidate agree on every
# item, the observed s is 0; the variance is then floored at 3/n (the rule of three: the upper 95%
# bound on the share of items that could still flip), so a small set never looks powerful.
POWER_Z = 1.96 + 0.84


def detectable_change(diff: np.ndarray) -> float:
    """The smallest true change of the mean that n paired item differences detect (80% power)."""
    n = diff.size
    return POWER_Z * math.sqrt(max(float(diff.var()), 3 / n) / n)


class Rule(BaseModel):
    """One line of the policy: exactly one bound on one metric.

    `min` / `max` bound the candidate's score (hard gates); `max_drop` / `max_rise` bound its
    change against the base (regression, for metrics where higher / lower is better), judged on the
    end of the paired 95% interval that `reads` names (default: the unfavourable one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str
    min: float | None = None  # absolute floor for the candidate
    max: float | None = None  # absolute ceiling for the candidate
    max_drop: float | None = None  # largest allowed fall below the base model (higher is better)
    max_rise: float | None = None  # largest allowed rise above the base model (lower is better)
    reads: Literal["unfavourable", "favourable"] = "unfavourable"  # which end of the change's interval
    allow_underpowered: bool = False  # a limit smaller than the items can detect; needs `reason`
    reason: str | None = None
    why: str | None = None  # shown to the reviewer beside the verdict

    @model_validator(mode="after")
    def _one_kind(self):
        bounds = [k for k in ("min", "max", "max_drop", "max_rise") if getattr(self, k) is not None]
        if len(bounds) != 1:
            raise ValueError(
                f"rule for {self.metric!r} needs exactly one of 'min', 'max', 'max_drop' or 'max_rise'"
                f"{f' (it has {bounds})' if bounds else ''}; write two rules for a band"
            )
        regression = self.max_drop is not None or self.max_rise is not None
        if (self.allow_underpowered or self.reads != "unfavourable") and not regression:
            raise ValueError(
                f"rule for {self.metric!r}: 'reads' and 'allow_underpowered' apply to max_drop / max_rise rules only"
            )
        if self.allow_underpowered and not (self.reason or "").strip():
            raise ValueError(
                f"rule for {self.metric!r}: allow_underpowered needs a 'reason' (why a change the "
                "eval set cannot detect is acceptable)"
            )
        return self

    def check(self, candidate: dict[str, float], base: dict[str, float], interval: dict | None = None) -> dict:
        value = candidate.get(self.metric)
        result = {"metric": self.metric, "observed": value, "base": base.get(self.metric), "why": self.why}
        if self.min is not None or self.max is not None:
            rule, threshold = (f">= {self.min}", self.min) if self.min is not None else (f"<= {self.max}", self.max)
            result.update(rule=rule, threshold=threshold)
            if not _finite(value):
                return {**result, "passed": False, "problem": f"score {value!r} is missing or not a finite number"}
            return {**result, "passed": value >= self.min if self.min is not None else value <= self.max}
        # regression: a drop is base - candidate, a rise candidate - base; the interval is of the change
        sign, name, limit = (-1, "drop", self.max_drop) if self.max_drop is not None else (1, "rise", self.max_rise)
        result.update(rule=f"{name} vs base <= {limit}", threshold=limit, reads=self.reads)
        for who, score in (("candidate", value), ("base", base.get(self.metric))):
            if not _finite(score):
                return {
                    **result,
                    "passed": False,
                    "problem": f"{who} score {score!r} is missing or not a finite number",
                }
        result[name] = round(sign * (value - base[self.metric]), 4)
        if not interval:
            return {**result, "passed": False, "problem": "no per-item scores to pair with the base"}
        ends = sorted((round(sign * interval["low"], 4) + 0.0, round(sign * interval["high"], 4) + 0.0))
        read = ends[1] if self.reads == "unfavourable" else ends[0]  # + 0.0 above: no "-0.0" in reports
        detectable = interval["detectable"]
        result.update(
            {f"{name}_ci": ends, "read": read, "detectable": detectable, "n": interval["n"], "passed": read <= limit}
        )
        if detectable > limit:
            needed = math.ceil(interval["n"] * (detectable / limit) ** 2) if limit > 0 else None
            result["underpowered"] = (
                f"{interval['n']} items detect a change of {detectable:.3f}, more than the "
                f"limit {limit}" + (f" (about {needed} items would)" if needed else "")
            )
            if not self.allow_underpowered:
                result.update(
                    passed=False,
                    problem=f"underpowered: {result['underpowered']}; grow the eval set or "
                    "set allow_underpowered: true with a reason",
                )
            else:
                result["allowed_because"] = self.reason
        return result


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rank(value) -> float:
    """A score to sort by: a missing or non-finite one ranks last (0.0 is a score like any other)."""
    return value if _finite(value) else -math.inf


def _fmt(value) -> str:
    return f"{value:.4f}" if _finite(value) else "-" if value is None else str(value)


class VersusLora(BaseModel):
    """Full SFT must earn its cost over the LoRA baseline (the method: LoRA first). Full minus LoRA on
    `metric`, paired by item, must be at least `min_gain` at the lower end of its 95% interval, and
    full may not lose more of `forgetting` than LoRA does by over `max_extra_drop` (unfavourable end).
    `ship: best` lets a LoRA model that passes every rule ship when full SFT does not earn its place."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str = "golden"
    min_gain: float = 0.02
    forgetting: str | None = "general"
    max_extra_drop: float = Field(0.05, ge=0)
    ship: Literal["full", "best"] = "full"

    def check(
        self,
        scores: dict[str, float],
        lora_name: str | None,
        lora_scores: dict[str, float],
        items: dict[str, dict],
        lora_items: dict[str, dict],
    ) -> list[dict]:
        """The candidate's results against the LoRA baseline, as rule results."""
        checks = [(self.metric, "gain", self.min_gain)]
        if self.forgetting:
            checks.append((self.forgetting, "drop", self.max_extra_drop))
        results = []
        for metric, kind, limit in checks:
            rule = f"gain vs LoRA >= {limit}" if kind == "gain" else f"drop vs LoRA <= {limit}"
            result = {
                "metric": metric,
                "rule": rule,
                "threshold": limit,
                "observed": scores.get(metric),
                "base": lora_scores.get(metric),
                "versus": "lora",
                "against": lora_name,
                "reads": "unfavourable",
                "why": "full SFT must beat the LoRA baseline to earn its cost"
                if kind == "gain"
                else "full SFT may not forget more than the LoRA baseline",
            }
            if lora_name is None:
                results.append(
                    {
                        **result,
                        "passed": False,
                        "problem": "no LoRA baseline with full-suite results (dvc.yaml stages lora and evaluate_lora)",
                    }
                )
                continue
            if metric not in items or metric not in lora_items:
                results.append({**result, "passed": False, "problem": "no per-item scores to pair with LoRA's"})
                continue
            change = paired_bootstrap(lora_items[metric], items[metric])  # full minus LoRA
            if kind == "gain":
                read, ends, passed = change["low"], [change["low"], change["high"]], change["low"] >= limit
            else:
                ends = sorted((-change["high"] + 0.0, -change["low"] + 0.0))
                read, passed = ends[1], ends[1] <= limit
            results.append(
                {
                    **result,
                    f"{kind}_ci": ends,
                    kind: round(change["delta"] if kind == "gain" else -change["delta"], 4) + 0.0,
                    "read": read,
                    "detectable": change["detectable"],
                    "n": change["n"],
                    "passed": passed,
                }
            )
        return results


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    select_by: str = "golden"
    rules: list[Rule] = Field(min_length=1)  # a policy without rules would pass anything
    versus_lora: VersusLora | None = None  # evals/gate.yaml turns it on; absent or null: no LoRA comparison


def load_policy(path: str | Path, metrics: set[str] | None = None) -> Policy:
    """The policy at `path`; with `metrics` (params.yaml evaluate.metrics), a rule or select_by naming
    any other metric is refused here, before anything is evaluated."""
    path = Path(path)
    try:
        policy = Policy.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{path}: gate policy not found") from None
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {field}: {first['msg'].removeprefix('Value error, ')}") from None
    if metrics is not None:
        for i, rule in enumerate(policy.rules):
            if rule.metric not in metrics:
                raise ValueError(
                    f"{path}: rules.{i}.metric: {rule.metric!r} is not in params.yaml evaluate.metrics "
                    f"({', '.join(sorted(metrics))}); a rule on a metric nobody measures never fails"
                )
        if policy.select_by not in metrics:
            raise ValueError(f"{path}: select_by: {policy.select_by!r} is not in params.yaml evaluate.metrics")
        versus = policy.versus_lora
        for field, metric in (("metric", versus.metric), ("forgetting", versus.forgetting)) if versus else ():
            if metric is not None and metric not in metrics:
                raise ValueError(f"{path}: versus_lora.{field}: {metric!r} is not in params.yaml evaluate.metrics")
    return policy


def paired_bootstrap(
    base: dict[str, float], candidate: dict[str, float], iterations: int = 2000, seed: int = 0
) -> dict:
    """Candidate minus base on the same items (paired by item id), with a 95% percentile interval
    over resampled items and the smallest change the items can detect. Refuses item sets that differ."""
    if set(base) != set(candidate) or not base:
        only_base, only_cand = sorted(set(base) - set(candidate)), sorted(set(candidate) - set(base))
        raise ValueError(
            f"paired items differ: {len(base)} base, {len(candidate)} candidate items "
            f"(only in base: {only_base[:3]}, only in candidate: {only_cand[:3]})"
        )
    ids = sorted(base)
    base_arr = np.array([base[i] for i in ids], dtype=float)
    cand_arr = np.array([candidate[i] for i in ids], dtype=float)
    if not (np.isfinite(base_arr).all() and np.isfinite(cand_arr).all()):
        raise ValueError("a per-item score is NaN or infinite")
    diff = cand_arr - base_arr
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(iterations, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "delta": round(float(diff.mean()), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
        "n": int(diff.size),
        "detectable": round(detectable_change(diff), 4),
    }


def check_candidate(
    policy: Policy,
    base: dict[str, float],
    scores: dict[str, float],
    base_items: dict[str, dict[str, float]] | None = None,
    items: dict[str, dict[str, float]] | None = None,
) -> tuple[list[dict], dict[str, dict]]:
    """Every rule's result for one candidate, and its change against the base per metric (paired
    bootstrap over the same items, for each metric both have per-item scores of)."""
    base_items, items = base_items or {}, items or {}
    intervals = {}
    for metric in scores:
        if metric in base_items and metric in items:
            try:
                intervals[metric] = paired_bootstrap(base_items[metric], items[metric])
            except ValueError as err:
                raise ValueError(f"{metric}: {err}") from None
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
    order = ranked(golden, policy.select_by)
    viable = [name for name in order if can_still_pass(policy, base, golden[name])]
    return viable or order[:1]


def ranked(scores: dict[str, dict[str, float]], metric: str) -> list[str]:
    """Model names best first by `metric`; ties go to the later one (names are ordered oldest first)."""
    return sorted(reversed(list(scores)), key=lambda name: -_rank(scores[name].get(metric)))


def _gateable(policy: Policy, base: dict, candidates: dict, lora: dict) -> tuple[list[str], list[str]]:
    """The full and the LoRA checkpoints with a result for every metric the policy names."""
    needed = {r.metric for r in policy.rules} | {policy.select_by}
    if not needed <= base.keys():
        raise ValueError(f"base: no result for metric(s) {sorted(needed - base.keys())} named in the policy")
    if not candidates:
        raise ValueError("no checkpoints to gate")
    complete = [name for name, scores in candidates.items() if needed <= scores.keys()]
    if not complete:
        missing = sorted(needed - next(iter(candidates.values())).keys())
        raise ValueError(
            f"no checkpoint has results for every metric the policy names (missing {missing}); "
            "run the full suite on one (`sft evaluate --model chosen`)"
        )
    overlap = sorted(set(lora) & set(candidates))
    if overlap:
        raise ValueError(f"LoRA and full checkpoints share the name(s) {overlap}")
    return complete, [name for name, scores in lora.items() if needed <= scores.keys()]


def decide(
    policy: Policy,
    base: dict[str, float],
    candidates: dict[str, dict[str, float]],
    hashes: dict[str, str],
    items: dict[str, dict[str, dict[str, float]]] | None = None,
    lora: dict[str, dict[str, float]] | None = None,
) -> Verdict:
    """The verdict: every candidate's rule results, the chosen one and its weights' hash.

    `candidates` are the full-SFT checkpoints, `lora` the LoRA baseline's (both oldest first).
    Candidates that lack a metric the policy names (golden only: not run on the full suite) are
    listed but can be neither passed nor chosen. `items` ({model: {metric: {item id: score}}},
    base included) gives the paired intervals regression rules need. With `versus_lora`, a full
    checkpoint must also beat the best LoRA checkpoint; with `ship: best`, a LoRA checkpoint that
    passes every rule ships when no full one passes.
    """
    items, lora = items or {}, lora or {}
    complete, lora_complete = _gateable(policy, base, candidates, lora)
    checks, intervals = {}, {}
    for name in lora_complete + complete:
        checks[name], intervals[name] = check_candidate(
            policy, base, {**candidates, **lora}[name], items.get("base"), items.get(name)
        )
    versus = policy.versus_lora
    baseline = ranked({name: lora[name] for name in lora_complete}, policy.select_by)[:1] if versus else []
    reference = baseline[0] if baseline else None
    if versus:
        for name in complete:
            checks[name] = checks[name] + versus.check(
                candidates[name], reference, lora.get(reference, {}), items.get(name, {}), items.get(reference, {})
            )
    passing = [name for name in lora_complete + complete if all(r["passed"] for r in checks[name])]
    full_passing = [name for name in complete if name in passing]
    lora_passing = [name for name in lora_complete if name in passing]
    shippable = full_passing or (lora_passing if versus and versus.ship == "best" else [])
    # ties go to the later checkpoint (candidates are ordered oldest first)
    chosen = ranked({name: {**candidates, **lora}[name] for name in (shippable or complete)}, policy.select_by)[0]
    kinds = {**{name: "full" for name in candidates}, **{name: "lora" for name in lora}}
    return Verdict.model_validate(
        {
            "passed": bool(shippable),
            "chosen": chosen,
            "kind": kinds[chosen],
            "sha256": hashes[chosen],
            "select_by": policy.select_by,
            "rules": checks[chosen],
            "failed_rules": [
                r["metric"] + (" vs LoRA" if r.get("versus") else "") for r in checks[chosen] if not r["passed"]
            ],
            "change_vs_base": intervals[chosen],
            "base": base,
            "lora_baseline": reference,
            "candidates": {
                name: {"scores": scores, "kind": kinds[name], "passed": name in passing, "full_suite": name in checks}
                for name, scores in {**candidates, **lora}.items()
            },
        }
    )


def render_markdown(verdict: Verdict) -> str:
    """The reviewer's table: every rule of the chosen checkpoint, failing ones named up front."""
    status = "PASSED" if verdict.passed else "FAILED"
    failed = [f"`{r.metric}` ({r.rule})" for r in verdict.rules if not r.passed]
    lines = [f"## Eval gate: {status}", ""]
    if failed:
        lines += [f"Failing rules: {', '.join(failed)}", ""]
    lines += [
        f"Chosen checkpoint: `{verdict.chosen}` (best {'passing ' if verdict.passed else ''}by "
        f"`{verdict.select_by}`), weights sha256 `{verdict.sha256[:16]}…`",
        "",
        "Regression rules read the unfavourable end of the change's 95% interval unless the policy says "
        "otherwise; *detectable* is the smallest change the items can detect (80% power).",
        "",
        "| metric | rule | base | candidate | interval end read | detectable (items) | verdict | why |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in verdict.rules:
        base = "-" if not _finite(r.base) else f"{r.base:.4f}"
        observed = f"{r.observed:.4f}" if _finite(r.observed) else str(r.observed)
        ci = f", 95% CI [{r.ci[0]:+.4f}, {r.ci[1]:+.4f}]" if r.ci is not None else ""
        if r.versus:  # a versus_lora rule: the 'base' column holds the LoRA baseline's score
            ci += f" (LoRA: `{r.against or 'none'}`)"
        read = f"{r.read:+.4f} ({r.reads})" if r.read is not None else "-"
        detectable = f"{r.detectable:.4f} ({r.n})" if r.detectable is not None else "-"
        outcome = "pass" if r.passed else "**FAIL**"
        if r.problem:
            outcome += f": {r.problem}"
        elif r.allowed_because:
            outcome += f" (underpowered, allowed: {r.allowed_because})"
        lines.append(
            f"| {r.metric} | {r.rule}{ci} | {base} | {observed} | {read} | {detectable} | {outcome} | {r.why or ''} |"
        )
    if verdict.change_vs_base:
        lines += [
            "",
            f"Change against the base (forgetting), `{verdict.chosen}` (paired bootstrap, 95% CI):",
            "",
            "| metric | base | candidate | change | 95% CI | items |",
            "| --- | ---: | ---: | ---: | --- | ---: |",
        ]
        for metric, c in verdict.change_vs_base.items():
            lines.append(
                f"| {metric} | {_fmt(verdict.base[metric])} | {_fmt(verdict.chosen_scores[metric])} | "
                f"{c.delta:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] | {c.n} |"
            )
    if verdict.plot:
        lines += ["", f"![base vs candidate]({verdict.plot})"]
    metrics = list(verdict.base)
    lines += [
        "",
        "Every checkpoint (the full suite runs on the best by golden until one passes):",
        "",
        "| model | " + " | ".join(metrics) + " | gate |",
        "| --- | " + " | ".join("---:" for _ in metrics) + " | --- |",
        "| base | " + " | ".join(_fmt(verdict.base[m]) for m in metrics) + " | - |",
    ]
    for name, c in verdict.candidates.items():
        gate = ("pass" if c.passed else "fail") if c.full_suite else "golden only"
        lines.append(f"| {name} | " + " | ".join(_fmt(c.scores.get(m)) for m in metrics) + f" | {gate} |")
    return "\n".join(lines) + "\n"


def plot_change(verdict: Verdict, path: Path) -> None:
    """Base vs chosen checkpoint per metric, the candidate with its 95% interval (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    change = verdict.change_vs_base
    metrics = list(change)
    chosen = verdict.chosen_scores
    base = [verdict.base[m] for m in metrics]
    cand = [chosen[m] for m in metrics]
    errors = [
        [chosen[m] - (verdict.base[m] + change[m].low) for m in metrics],
        [(verdict.base[m] + change[m].high) - chosen[m] for m in metrics],
    ]
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.2), dpi=110)
    ax.bar(x - 0.2, base, 0.4, label="base", color="#9aa5b1")
    ax.bar(x + 0.2, cand, 0.4, yerr=np.clip(errors, 0, None), capsize=4, label=verdict.chosen, color="#2f6fb0")
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.05)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"eval gate: {'passed' if verdict.passed else 'FAILED'}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_cost(metrics: TrainingMetrics, prices: dict[str, float]) -> RunCost:
    """A training run's measured cost from its metrics.json: device-hours (GPU-hours, or CPU-hours on
    a CPU run) and dollars where the device has a price in params.yaml plan.prices."""
    hours = metrics.seconds * metrics.world_size / 3600
    device = metrics.device
    price = next((usd for name, usd in prices.items() if name.split("-")[0].lower() in device.lower()), None)
    return RunCost(
        device=device,
        world_size=metrics.world_size,
        seconds=metrics.seconds,
        tokens=metrics.tokens,
        device_hours=round(hours, 4),
        usd=round(hours * price, 2) if price is not None and device != "cpu" else None,
    )


def _decision_text(policy: Policy, verdict: Verdict, change: dict, costs: dict, full_ref, lora_ref) -> str:
    """The decision in words: did full SFT beat LoRA by enough to earn its cost."""
    metric, candidates = policy.select_by, verdict.candidates
    if not policy.versus_lora:
        return "No LoRA comparison: the policy has no versus_lora section."
    elif lora_ref is None:
        return "No LoRA baseline with full-suite results: full SFT cannot show that it earned its cost."
    else:
        full_rules = verdict.rules if verdict.kind == "full" else []
        earned = bool(full_rules) and all(r.passed for r in full_rules if r.versus)
        gain = change.get(metric)
        gain_text = (
            f"{metric} {gain['delta']:+.4f} over LoRA, 95% CI [{gain['low']:+.4f}, {gain['high']:+.4f}]"
            if gain
            else f"no paired {metric} comparison"
        )
        ratio = (
            costs["full"].device_hours / costs["lora"].device_hours
            if costs.get("full") and costs.get("lora") and costs["lora"].device_hours
            else None
        )
        cost_text = f" at {ratio:.1f}x LoRA's training cost" if ratio else ""
        if earned:
            return f"Full SFT earned its cost: `{full_ref}` {gain_text}{cost_text}."
        elif verdict.kind == "lora":
            return (
                f"LoRA is enough: `{lora_ref}` passes every rule and full SFT does not beat it ({gain_text}); "
                f"the policy says `ship: best`, so the merged LoRA model `{verdict.chosen}` ships."
            )
        else:
            return (
                f"Full SFT did not earn its cost over LoRA (`{lora_ref}`): {gain_text}{cost_text}"
                + ("; LoRA is enough" if candidates[lora_ref].passed else "")
                + "."
            )


def decision_record(
    policy: Policy, verdict: Verdict, items: dict[str, dict[str, dict[str, float]]], costs: dict[str, RunCost]
) -> Decision:
    """Whether full SFT earned its cost: learning (select_by) against forgetting for base, every LoRA
    and full checkpoint; full minus LoRA on every metric with its paired 95% interval; each run's
    measured cost; and the verdict in words."""
    metric = policy.select_by
    forgetting = policy.versus_lora.forgetting if policy.versus_lora else None
    candidates = verdict.candidates
    # the full checkpoint the gate judged (the one that ships), else the best with full-suite results
    full = (
        [verdict.chosen]
        if verdict.kind == "full"
        else ranked({n: c.scores for n, c in candidates.items() if c.kind == "full" and c.full_suite}, metric)
    )
    full_ref, lora_ref = (full[0] if full else None), verdict.lora_baseline
    change = {}
    if full_ref and lora_ref:
        for name in candidates[full_ref].scores:
            if name in items.get(full_ref, {}) and name in items.get(lora_ref, {}):
                change[name] = paired_bootstrap(items[lora_ref][name], items[full_ref][name])
    models = [
        {
            "model": "base",
            "kind": "base",
            metric: verdict.base.get(metric),
            "forgetting": verdict.base.get(forgetting) if forgetting else None,
        }
    ]
    for name, c in candidates.items():
        models.append(
            {
                "model": name,
                "kind": c.kind,
                metric: c.scores.get(metric),
                "forgetting": c.scores.get(forgetting) if forgetting else None,
            }
        )
    text = _decision_text(policy, verdict, change, costs, full_ref, lora_ref)
    return Decision.model_validate(
        {
            "select_by": metric,
            "forgetting": forgetting,
            "full": full_ref,
            "lora": lora_ref,
            "shipped": verdict.chosen if verdict.passed else None,
            "kind": verdict.kind,
            "full_minus_lora": change,
            "models": models,
            "cost": costs,
            "verdict": text,
        }
    )


def render_decision(record: Decision) -> str:
    metric, forgetting = record.select_by, record.forgetting
    lines = ["", "## Full SFT against LoRA", "", record.verdict, ""]
    if record.full_minus_lora:
        lines += [
            f"Full (`{record.full}`) minus LoRA (`{record.lora}`), paired by item:",
            "",
            "| metric | change | 95% CI | items |",
            "| --- | ---: | --- | ---: |",
        ]
        for name, c in record.full_minus_lora.items():
            lines.append(f"| {name} | {c.delta:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] | {c.n} |")
        lines.append("")
    lines += [
        f"| model | kind | {metric} (learning) | {forgetting or '-'} (forgetting) |",
        "| --- | --- | ---: | ---: |",
    ]
    for m in record.models:  # plain dicts: one key is the select_by metric's own name
        lines.append(f"| {m['model']} | {m['kind']} | {_fmt(m[metric])} | {_fmt(m['forgetting'])} |")
    if record.cost:
        lines += [
            "",
            "Measured training cost (the whole run, every epoch):",
            "",
            "| run | device | seconds | device-hours | tokens | USD |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for run, c in record.cost.items():
            usd = f"{c.usd:.2f}" if c.usd is not None else "-"
            lines.append(
                f"| {run} | {c.world_size} x {c.device} | {c.seconds:,.0f} | {c.device_hours:.4f} "
                f"| {c.tokens:,} | {usd} |"
            )
    if record.plot:
        lines += ["", f"![learning against forgetting]({record.plot})"]
    return "\n".join(lines) + "\n"


def plot_decision(record: Decision, path: Path) -> None:
    """Learning (select_by) against forgetting for every model that has both (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record.select_by
    colours = {"base": "#9aa5b1", "lora": "#d9822b", "full": "#2f6fb0"}
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    for kind, colour in colours.items():
        points = [m for m in record.models if m["kind"] == kind and _finite(m[metric]) and _finite(m["forgetting"])]
        ax.scatter([m[metric] for m in points], [m["forgetting"] for m in points], color=colour, label=kind, s=36)
        for m in points:
            ax.annotate(m["model"], (m[metric], m["forgetting"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"{metric} (learning)")
    ax.set_ylabel(f"{record.forgetting or '-'} (higher: less forgetting)")
    ax.set_title("full SFT against LoRA")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
