import pytest

from pipeline.config import ValidateConfig
from pipeline.contract import failure_message, load_pairs, render_markdown, run_suite
from pipeline.files import DataError

from .conftest import write_jsonl

CFG = ValidateConfig(min_rows=20, max_prompt_chars=200, max_response_chars=200)


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
