import pytest

from pipeline.config import ValidateConfig
from pipeline.contract import add_derived_columns, failure_message, load_pairs, render_markdown
from pipeline.contract import run_suite as run_raw_suite
from pipeline.files import DataError

from .conftest import write_jsonl

CFG = ValidateConfig(min_rows=20, max_prompt_chars=200, max_response_chars=200)


def run_suite(frame, cfg, held_out=()):
    return run_raw_suite(add_derived_columns(frame, list(held_out), cfg.leak_ngram), cfg)


def good_rows(n=30):
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def failed(checks):
    return {c["expectation"]: c for c in checks if not c["passed"]}


def test_good_data_passes(tmp_path):
    frame = load_pairs(write_jsonl(tmp_path / "t.jsonl", good_rows()))
    checks = run_suite(frame, CFG)
    assert all(c["passed"] for c in checks) and len(checks) >= 8


def test_duplicate_pair_named_by_line(tmp_path):
    rows = good_rows()
    rows.append(dict(rows[4]))
    checks = run_suite(load_pairs(write_jsonl(tmp_path / "t.jsonl", rows)), CFG)
    dup = failed(checks)["expect_compound_columns_to_be_unique"]
    assert dup["rows"] == [5, 31] and dup["field"] == "prompt,response"
    message = failure_message("t.jsonl", checks)
    assert "t.jsonl" in message and "5, 31" in message


def test_too_few_rows(tmp_path):
    checks = run_suite(load_pairs(write_jsonl(tmp_path / "t.jsonl", good_rows(10))), CFG)
    assert failed(checks)["expect_table_row_count_to_be_between"]["observed"] == 10


def test_blank_null_and_too_long_fields(tmp_path):
    rows = good_rows()
    rows[2]["response"] = "   "
    rows[6]["prompt"] = None
    rows[9]["response"] = "x" * 500
    checks = run_suite(load_pairs(write_jsonl(tmp_path / "t.jsonl", rows)), CFG)
    bad = {(c["expectation"], c["field"]): c["rows"] for c in checks if not c["passed"]}
    assert bad[("expect_column_values_to_not_match_regex", "response")] == [3]
    assert bad[("expect_column_values_to_not_be_null", "prompt")] == [7]
    assert bad[("expect_column_value_lengths_to_be_between", "response")] == [10]
    assert "**FAIL**" in render_markdown("t.jsonl", checks)


@pytest.mark.parametrize("content,expected", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response"\n', r"t.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "answer": "b"}\n', r"t.jsonl:1: missing field\(s\) \['response'\]"),
    ('{"prompt": 3, "response": "b"}\n', r"t.jsonl:1: field 'prompt' must be a string"),
    ("", r"t.jsonl: empty file"),
    ('["prompt", "response"]\n', r"t.jsonl:1: expected a JSON object"),
])
def test_malformed_files_are_refused_before_any_expectation(tmp_path, content, expected):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_pairs(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid UTF-8"):
        load_pairs(path)


def test_leakage_and_near_duplicates(tmp_path):
    rows = good_rows()
    rows.append({"prompt": "QUESTION 3!", "response": "answer   3"})  # near-duplicate of line 4
    rows[10]["prompt"] = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    held_out = ["zero one two three four five six seven eight nine ten eleven twelve thirteen", "question 20"]
    checks = run_suite(load_pairs(write_jsonl(tmp_path / "t.jsonl", rows)), CFG, held_out)
    bad = {c["check"]: c["rows"] for c in checks if not c["passed"]}
    assert bad["near-duplicate pairs (case, whitespace and punctuation ignored)"] == [4, 31]
    assert bad["training prompt also in an eval set (exact or shared n-gram)"] == [11, 21]


def test_pii_share_threshold(tmp_path):
    rows = good_rows(40)
    rows[0]["response"] = "mail me: a.b@example.org"
    frame = load_pairs(write_jsonl(tmp_path / "t.jsonl", rows))
    pii = [c for c in run_suite(frame, CFG) if c["check"] == "PII or secrets" and c["field"] == "response"][0]
    assert not pii["passed"] and pii["rows"] == [1]
    loose = ValidateConfig(min_rows=20, max_pii_share=0.05)
    pii = [c for c in run_suite(frame, loose) if c["check"] == "PII or secrets" and c["field"] == "response"][0]
    assert pii["passed"]
