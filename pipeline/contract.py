"""validate: the data contract, as a great-expectations suite over the training file.

The suite is built from params.yaml (validate section): volume, no nulls or blank fields,
length bounds, no duplicate (prompt, response) pairs. Rows are indexed by their line number in
the file, so every failure names file, line and field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.files import DataError, read_jsonl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
FIELDS = ("prompt", "response")
MAX_EXAMPLES = 5


class ContractError(ValueError):
    """The data breaks the contract; the message lists each failed expectation with rows."""


def load_pairs(path: str | Path) -> pd.DataFrame:
    """(prompt, response) rows indexed by line number; a wrongly typed field is refused here."""
    rows = read_jsonl(path, required=FIELDS)
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
        field = kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or None
        checks.append({
            "expectation": config.type,
            "field": field,
            "threshold": {k: v for k, v in kwargs.items() if k not in ("column", "column_list")},
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
        lines.append(f"  {c['expectation']}{field}: observed {c['observed']}{expected}{where}{more}")
    return "\n".join(lines)


def render_markdown(path: str, checks: list[dict]) -> str:
    passed = all(c["passed"] for c in checks)
    lines = [f"## Data contract: {'PASSED' if passed else 'FAILED'} (`{path}`)", "",
             "| expectation | field | expected | observed | result | first lines |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        expected = ", ".join(f"{k}={v}" for k, v in c["threshold"].items()) or "-"
        lines.append(f"| {c['expectation']} | {c['field'] or '-'} | {expected} | {c['observed']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {', '.join(map(str, c['rows'])) or '-'} |")
    return "\n".join(lines) + "\n"
