"""validate: the data contract, as a great-expectations suite over the training file.

The suite is built from params.yaml (validate section): volume; no nulls or blank fields;
length bounds; no exact or near-duplicate (prompt, response) pairs; no training prompt that
appears in an eval set (exactly, or sharing an n-gram); no PII or secrets; little boilerplate.
Checks that need more than one column are expressed as derived columns (added here, in pandas)
that plain expectations then test. Rows are indexed by their line number in the file, so every
failure names file, line and field.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from pipeline.files import DataError, read_jsonl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
FIELDS = ("prompt", "response")
MAX_EXAMPLES = 5
PII_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "phone": r"(?<!\d)(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)",
    "card": r"(?<!\d)(?:\d{4}[ -]){3}\d{1,4}(?!\d)|(?<!\d)\d{15,16}(?!\d)",
    "api_key": r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}|"
               r"xox[baprs]-[A-Za-z0-9-]{10,})",
}
BOILERPLATE_PATTERNS = [
    r"(?i)\bas an ai(?: language)? model\b",
    r"(?i)^\s*i(?:'m| am) sorry,? but\b",
    r"(?i)\bi (?:cannot|can't|am unable to) (?:help|assist|comply) with\b",
]
HOW_TO_FIX = {
    "expect_table_row_count_to_be_between": "add examples (the method wants more than 10k) or lower validate.min_rows",
    "expect_compound_columns_to_be_unique": "drop the repeated (prompt, response) pairs",
    "expect_column_values_to_not_be_null": "fill or drop rows with a missing field",
    "expect_column_values_to_not_match_regex": "fill or drop rows whose field is blank",
    "expect_column_values_to_not_match_regex_list": "scrub PII/secrets or rewrite boilerplate responses",
    "expect_column_value_lengths_to_be_between": "shorten or drop the rows, or raise validate.max_*_chars",
    "expect_column_values_to_be_unique": "drop near-duplicates: they over-weight one example",
    "expect_column_values_to_be_in_set": "remove eval items from the training data: they inflate the golden score",
}
# derived columns -> the field a person should look at, and what the check means
DERIVED = {
    "normalized_pair": ("prompt,response", "near-duplicate pairs (case, whitespace and punctuation ignored)"),
    "leaks_eval": ("prompt", "training prompt also in an eval set (exact or shared n-gram)"),
}
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


class ContractError(ValueError):
    """The data breaks the contract; the message lists each failed expectation with rows."""


def load_pairs(path: str | Path, text: str | None = None) -> pd.DataFrame:
    """(prompt, response) rows indexed by line number; a wrongly typed field is refused here.
    With `text`, parse that content (another revision's file) and use `path` only to name it."""
    rows = read_jsonl(path, required=FIELDS, text=text)
    lines, records = [], []
    number = 0
    for number, row in enumerate(rows, start=1):
        for field in FIELDS:
            if row[field] is not None and not isinstance(row[field], str):
                raise DataError(f"{path}:{number}: field '{field}' must be a string, "
                                f"got {type(row[field]).__name__}")
        lines.append(number)
        records.append({f: row[f] for f in FIELDS})
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"), columns=list(FIELDS))


def normalize(text) -> str:
    text = text if isinstance(text, str) else ""  # nulls are reported by their own expectation
    return _SPACE.sub(" ", _PUNCT.sub("", text.lower())).strip()


def eval_prompts(paths: list[str]) -> list[str]:
    prompts = []
    for path in paths:
        prompts += [row["prompt"] for row in read_jsonl(path, required=("prompt",))]
    return prompts


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def normalized_pairs(frame: pd.DataFrame, prompts: pd.Series | None = None) -> pd.Series:
    """One key per (prompt, response) that ignores case, whitespace and punctuation."""
    prompts = frame["prompt"].map(normalize) if prompts is None else prompts
    return prompts + "\x1f" + frame["response"].map(normalize)


def add_derived_columns(frame: pd.DataFrame, held_out: list[str], ngram: int) -> pd.DataFrame:
    """Columns the suite checks: a normalised pair key, and whether a prompt leaks an eval item."""
    prompts = frame["prompt"].map(normalize)
    frame = frame.assign(normalized_pair=normalized_pairs(frame, prompts))
    exact = {normalize(p) for p in held_out}
    grams = set().union(*(ngrams(p.split(), ngram) for p in exact)) if exact else set()
    leaks = prompts.isin(exact).to_numpy().copy()
    if grams:  # only prompts long enough to hold an n-gram need the slow check
        first_words = {g[0] for g in grams}
        long = prompts[prompts.str.count(" ") >= ngram - 1]
        for position, text in zip(long.index, long):
            words = text.split()
            if not first_words.isdisjoint(words) and not grams.isdisjoint(ngrams(words, ngram)):
                leaks[frame.index.get_loc(position)] = True
    return frame.assign(leaks_eval=leaks)


def build_suite(cfg):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="sft_pairs")
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, max_value=cfg.max_rows))
    max_chars = {"prompt": cfg.max_prompt_chars, "response": cfg.max_response_chars}
    for field in FIELDS:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=field))
        suite.add_expectation(gxe.ExpectColumnValuesToNotMatchRegex(column=field, regex=r"^\s*$"))
        suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(
            column=field, min_value=cfg.min_chars, max_value=max_chars[field]))
    suite.add_expectation(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(FIELDS)))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="normalized_pair"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="leaks_eval", value_set=[False]))
    for field in FIELDS:
        suite.add_expectation(gxe.ExpectColumnValuesToNotMatchRegexList(
            column=field, regex_list=list(PII_PATTERNS.values()), mostly=1 - cfg.max_pii_share))
    suite.add_expectation(gxe.ExpectColumnValuesToNotMatchRegexList(
        column="response", regex_list=BOILERPLATE_PATTERNS, mostly=1 - cfg.max_boilerplate_share))
    return suite


def run_suite(frame: pd.DataFrame, cfg) -> list[dict]:
    """One record per expectation: what it checks, what it saw, pass/fail, first offending rows."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("data").add_dataframe_asset("pairs")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame}))
    result = batch.validate(build_suite(cfg), result_format="COMPLETE")
    checks = []
    for r in result.results:
        config = r.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format")}
        details = r.result or {}
        unexpected = details.get("unexpected_index_list") or []
        rows = sorted({int(i["line"]) if isinstance(i, dict) else int(i) for i in unexpected})
        column = kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or None
        field, meaning = DERIVED.get(column, (column, None))
        if config.type == "expect_column_values_to_not_match_regex_list":
            meaning = "boilerplate responses" if kwargs["regex_list"] == BOILERPLATE_PATTERNS else "PII or secrets"
            kwargs = {"max_share": round(1 - kwargs.get("mostly", 1.0), 6)}
        checks.append({
            "expectation": config.type,
            "check": meaning,
            "field": field,
            "threshold": {k: v for k, v in kwargs.items() if k not in ("column", "column_list", "value_set")},
            "observed": details.get("observed_value", details.get("unexpected_count", 0)),
            "passed": bool(r.success),
            "rows": rows[:MAX_EXAMPLES],
            "failing_rows": len(rows),
        })
    return checks


def failure_message(path: str, checks: list[dict]) -> str:
    lines = [f"{path}: data contract failed"]
    for c in checks:
        if c["passed"]:
            continue
        where = f" at line(s) {', '.join(map(str, c['rows']))}" if c["rows"] else ""
        more = f" (+{c['failing_rows'] - len(c['rows'])} more)" if c["failing_rows"] > len(c["rows"]) else ""
        field = f" field '{c['field']}'" if c["field"] else ""
        expected = f", expected {c['threshold']}" if c["threshold"] else ""
        meaning = f" ({c['check']})" if c["check"] else ""
        lines.append(f"  {c['expectation']}{meaning}{field}: observed {c['observed']}{expected}{where}{more}")
    return "\n".join(lines)


def render_markdown(path: str, checks: list[dict]) -> str:
    passed = all(c["passed"] for c in checks)
    lines = [f"## Data contract: {'PASSED' if passed else 'FAILED'} (`{path}`)", "",
             "| expectation | field | expected | observed | result | first lines |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        expected = ", ".join(f"{k}={v}" for k, v in c["threshold"].items()) or "-"
        name = f"{c['expectation']}<br>{c['check']}" if c["check"] else c["expectation"]
        lines.append(f"| {name} | {c['field'] or '-'} | {expected} | {c['observed']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {', '.join(map(str, c['rows'])) or '-'} |")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines += ["", "How to fix:", ""]
        lines += [f"- {c['check'] or c['expectation']} ({c['field'] or 'table'}): {HOW_TO_FIX[c['expectation']]}"
                  for c in failed]
    return "\n".join(lines) + "\n"
