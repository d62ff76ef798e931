"""The data shapes teams bring (issue 26): per-turn training flags, reasoning traces, tool calls,
content parts, duplicate JSON keys. Each is either kept in the normalised form prepare renders, or
refused naming file, line and field; none is dropped without a word."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data import load_examples
from pipeline.files import DataError

from .conftest import write_jsonl


def load_rows(tmp_path, *rows, name="t.jsonl"):
    return load_examples(write_jsonl(tmp_path / name, rows))


def refused(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        load_rows(tmp_path, {"prompt": "fine", "response": "row"}, row)


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
NORMAL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}]


# ---- per-turn training flags


def test_turn_weight_zero_not_trained_flag_kept(tmp_path):
    """A team excluded a turn from training: the flag reaches prepare as "train": False."""
    for flag in ({"weight": 0}, {"train": False}, {"weight": 0.0}):
        turns = [user("a"), assistant("skip me", **flag), user("b"), assistant("learn")]
        frame = load_rows(tmp_path, {"messages": turns})
        turns = frame["messages"].iloc[0]
        assert turns[1] == {"role": "assistant", "content": "skip me", "train": False}, flag
        assert turns[3] == {"role": "assistant", "content": "learn"}  # absent: trained
    turns = [user("a"), assistant("b", weight=1), user("c"), assistant("d", train=True)]
    trained = load_rows(tmp_path, {"messages": turns})
    assert all("train" not in t for t in trained["messages"].iloc[0])


def test_sharegpt_turn_weight_zero_not_trained_flag_kept(tmp_path):
    """axolotl-style ShareGPT: weight on every turn (0 on the human turns, where it changes nothing)."""
    row = {
        "conversations": [
            {"from": "human", "value": "a", "weight": 0},
            {"from": "gpt", "value": "old", "weight": 0},
            {"from": "human", "value": "b", "train": False},
            {"from": "gpt", "value": "new", "weight": 1},
        ]
    }
    turns = load_rows(tmp_path, row)["messages"].iloc[0]
    assert turns == [user("a"), assistant("old", train=False), user("b"), assistant("new")]


@pytest.mark.parametrize(
    "flag,match",
    [
        (
            {"weight": 0.5},
            r"t.jsonl:2: field 'messages\[1\].weight' must be 0 \(not trained\) or 1 \(trained\), got 0.5",
        ),
        ({"weight": True}, r"field 'messages\[1\].weight' must be 0"),
        ({"train": "no"}, r"t.jsonl:2: field 'messages\[1\].train' must be true or false, got 'no'"),
        ({"train": False, "weight": 1}, r"fields 'messages\[1\].train' and 'messages\[1\].weight' disagree"),
    ],
)
def test_turn_weight_other_than_zero_or_one_refused(tmp_path, flag, match):
    refused(tmp_path, {"messages": [user("a"), assistant("b", **flag)]}, match)


def test_training_flag_on_a_user_turn_refused(tmp_path):
    refused(
        tmp_path,
        {"messages": [{"role": "user", "content": "a", "train": True}, assistant("b")]},
        r"t.jsonl:2: field 'messages\[0\].train': only assistant turns are trained, this is a user turn",
    )
    refused(
        tmp_path,
        {"conversations": [{"from": "human", "value": "a", "weight": 1}, {"from": "gpt", "value": "b"}]},
        r"field 'conversations\[0\].weight': only assistant turns are trained",
    )


def test_row_with_every_turn_untrained_refused(tmp_path):
    refused(
        tmp_path,
        {"messages": [user("a"), assistant("b", weight=0)]},
        r"t.jsonl:2: field 'messages': every assistant turn is marked not trained",
    )


# ---- reasoning traces


def test_reasoning_content_kept(tmp_path):
    """A reasoning data set must not train as plain answers: the trace reaches prepare, and the
    contract reads it (the response column holds it)."""
    frame = load_rows(
        tmp_path,
        {"messages": [user("2+2?"), assistant("4", reasoning_content="two and two")]},
        {"messages": [user("3+3?"), assistant("6", thinking="three and three")]},
    )
    first, second = (turns[-1] for turns in frame["messages"])
    assert first == {"role": "assistant", "content": "4", "reasoning_content": "two and two"}
    assert second == {"role": "assistant", "content": "6", "reasoning_content": "three and three"}
    assert frame["response"].tolist() == ["two and two\n4", "three and three\n6"]


def test_reasoning_on_a_user_turn_or_twice_refused(tmp_path):
    refused(
        tmp_path,
        {"messages": [{"role": "user", "content": "a", "thinking": "x"}, assistant("b")]},
        r"field 'messages\[0\].thinking': reasoning on a user turn",
    )
    refused(
        tmp_path,
        {"messages": [user("a"), assistant("b", thinking="x", reasoning_content="y")]},
        r"fields 'messages\[1\].reasoning_content' and 'messages\[1\].thinking' differ",
    )


# ---- tool use


def test_tool_calls_with_text_kept(tmp_path):
    """An assistant turn that announces a call and makes it: both reach prepare (arguments as a dict
    whether written as a JSON string or an object), and the contract reads the arguments."""
    as_object = {**CALL, "function": {**CALL["function"], "arguments": {"city": "Paris"}}}
    frame = load_rows(
        tmp_path,
        *(
            {"messages": [user("Weather?"), assistant("Let me check.", tool_calls=[call])]}
            for call in (CALL, as_object)
        ),
    )
    for turns in frame["messages"]:
        assert turns[-1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [NORMAL_CALL]}
    assert frame["response"].iloc[0] == 'Let me check.\n{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_tool_messages_and_tools_list_kept(tmp_path):
    row = {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": "Use tools."},
            user("Weather in Paris?"),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "18 C", "tool_call_id": "call_1", "name": "get_weather"},
            assistant("It is 18 C."),
        ],
    }
    frame = load_rows(tmp_path, row, {"prompt": "plain", "response": "pair"})
    turns = frame["messages"].iloc[0]
    assert turns[2] == {"role": "assistant", "content": "", "tool_calls": [NORMAL_CALL]}
    assert turns[3] == {"role": "tool", "content": "18 C", "name": "get_weather", "tool_call_id": "call_1"}
    assert frame["tools"].tolist() == [TOOLS, None]
    assert frame["context"].tolist() == ["Use tools.\n18 C", ""]  # system and tool text, for the contract
    plain = load_rows(tmp_path, {"prompt": "plain", "response": "pair"}, name="p.jsonl")
    assert list(plain.columns) == ["messages", "prompt", "response"]  # no tools, no context: the same frame as before


def test_tools_as_a_json_string_and_bare_specs_become_openai_specs(tmp_path):
    spec = TOOLS[0]["function"]
    frame = load_rows(tmp_path, {"tools": json.dumps([spec]), "messages": [user("a"), assistant("b")]})
    assert frame["tools"].iloc[0] == TOOLS
    refused(
        tmp_path,
        {"tools": [{"description": "no name"}], "messages": [user("a"), assistant("b")]},
        r"t.jsonl:2: field 'tools\[0\]' must be a function spec",
    )


def test_sharegpt_function_call_and_observation_turns(tmp_path):
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "18 C"},
            {"from": "gpt", "value": "18 C."},
        ],
        "tools": json.dumps(TOOLS),
    }
    turns = load_rows(tmp_path, row)["messages"].iloc[0]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert turns == [
        user("Weather?"),
        assistant("", tool_calls=[call]),
        {"role": "tool", "content": "18 C"},
        assistant("18 C."),
    ]


@pytest.mark.parametrize(
    "bad_call,match",
    [
        (
            {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}},
            r"t.jsonl:2: field 'messages\[1\].tool_calls\[0\].function.arguments': malformed JSON",
        ),
        (
            {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}},
            r"field 'messages\[1\].tool_calls\[0\].function.arguments' must be a JSON object",
        ),
        (
            {"type": "function", "function": {"name": "f", "arguments": '{"a": 1, "a": 2}'}},
            r"function.arguments': duplicate key 'a'",
        ),
        ({"type": "function", "function": {"arguments": "{}"}}, r"function.name' must be the function's name"),
        ({"type": "retrieval", "function": {"name": "f", "arguments": "{}"}}, r"only function calls are supported"),
    ],
)
def test_unparsable_tool_call_refused(tmp_path, bad_call, match):
    refused(tmp_path, {"messages": [user("a"), assistant("b", tool_calls=[bad_call])]}, match)


NULL_CONTENT = (
    r"'messages\[0\].content' must be a string, got NoneType \(null only on an assistant turn with tool_calls\)"
)


@pytest.mark.parametrize(
    "turns,match",
    [
        ([user("a"), {"role": "tool", "content": "r"}, assistant("b")], r"role order \['user', 'tool', 'assistant'\]"),
        ([user("a"), assistant("b"), {"role": "tool", "content": "r"}, assistant("c")], r"role order"),
        (
            [user("a"), assistant("", tool_calls=[CALL]), {"role": "tool", "content": "r"}],
            r"role order .* \(tool turns only right after an assistant turn with tool_calls",
        ),
        ([user("a"), assistant("", tool_calls=[CALL]), user("b"), assistant("c")], r"role order"),
        ([user(None), assistant("b")], NULL_CONTENT),
        ([user("a"), {"role": "assistant", "content": None}], r"field 'messages\[1\].content' must be a string"),
        (
            [user("a"), {"role": "user", "content": "b", "tool_call_id": "x"}, assistant("c")],
            r"'messages\[1\].tool_call_id': only a tool turn answers a call",
        ),
    ],
)
def test_tool_turns_out_of_place_refused(tmp_path, turns, match):
    refused(tmp_path, {"messages": turns}, match)


def test_an_assistant_turn_that_only_calls_a_tool_may_end_the_row(tmp_path):
    """Teaching when to call: the row ends at the call (the tool's answer is not part of it)."""
    frame = load_rows(tmp_path, {"messages": [user("a"), {"role": "assistant", "tool_calls": [CALL]}]})
    turns = frame["messages"].iloc[0]
    assert turns[-1] == {"role": "assistant", "content": "", "tool_calls": [NORMAL_CALL]}


# ---- content parts, unknown fields


def test_content_parts_joined_and_other_parts_refused(tmp_path):
    parts = [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]
    frame = load_rows(tmp_path, {"messages": [{"role": "user", "content": parts}, assistant("Done.")]})
    assert frame["messages"].iloc[0][0] == user("Describe this.") and frame["prompt"].iloc[0] == "Describe this."
    image = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    refused(
        tmp_path,
        {"messages": [{"role": "user", "content": image}, assistant("b")]},
        r"t.jsonl:2: field 'messages\[0\].content\[1\]': a 'image_url' part; only text parts are trained",
    )


def test_unknown_message_field_refused_not_dropped(tmp_path):
    refused(
        tmp_path,
        {"messages": [user("a"), assistant("b", loss=0)]},
        r"t.jsonl:2: field 'messages\[1\].loss': not a field a message may carry \(role, content, name, "
        r"reasoning_content, thinking, tool_calls, tool_call_id, train, weight\)",
    )
    refused(
        tmp_path,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "mask": 1}]},
        r"field 'conversations\[1\].mask': not a field a ShareGPT turn may carry",
    )
    named = load_rows(tmp_path, {"messages": [{"role": "user", "content": "a", "name": "ana"}, assistant("b")]})
    assert named["messages"].iloc[0][0] == {"role": "user", "content": "a", "name": "ana"}


# ---- JSON itself


def test_duplicate_json_key_refused(tmp_path):
    """json keeps the last value of a repeated key without a word; the loader names it."""
    path = tmp_path / "t.jsonl"
    nested = '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}'
    for line, key in (
        ('{"prompt": "a", "response": "first", "response": "second"}', "response"),
        ('{"prompt": "a" , "response": "b", "prompt" : "c"}', "prompt"),
        (nested, "content"),
    ):
        path.write_text('{"prompt": "x: y", "response": "z"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"t.jsonl:2: duplicate key '{key}' in one JSON object"):
            load_examples(path)


def test_colons_and_quotes_in_text_are_not_duplicate_keys(tmp_path):
    rows = [
        {"prompt": 'Say "a": 1 and "b": 2', "response": "time: 10:30"},
        {"messages": [user('{"k": 1, "k": 2} is JSON with a repeated key'), assistant("yes: it is")]},
    ]
    frame = load_rows(tmp_path, *rows)
    assert frame["prompt"].tolist() == [rows[0]["prompt"], rows[1]["messages"][0]["content"]]


def test_parquet_messages_with_optional_fields(tmp_path):
    """Parquet stores a list of messages as structs: every key on every message, null where absent."""
    rows = [
        [
            user("Weather?"),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
            assistant("18 C.", reasoning_content="ok"),
        ],
        [user("a"), assistant("b", train=False), user("c"), assistant("d")],
    ]
    pd.DataFrame({"messages": rows}).to_parquet(tmp_path / "t.parquet")
    first, second = load_examples(tmp_path / "t.parquet")["messages"]
    assert first == [
        user("Weather?"),
        assistant("", tool_calls=[NORMAL_CALL]),
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
        assistant("18 C.", reasoning_content="ok"),
    ]
    assert second == [user("a"), assistant("b", train=False), user("c"), assistant("d")]


def test_every_shape_the_readme_shows_loads(tmp_path):
    """README's "Your own model and data" step 1 gives one line of each accepted shape: each loads."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = re.findall(r"^   - .*?: `(\{.*\})`$", readme, re.MULTILINE)
    assert len(examples) >= 7
    frame = load_rows(tmp_path, *map(json.loads, examples))
    assert len(frame) == len(examples) and "tools" in frame


def test_plain_pairs_read_by_pyarrow_equal_the_line_by_line_reading(tmp_path):
    """A file of plain pairs is parsed by pyarrow's reader; any line that is not one (here a blank
    line, or a nested field) sends the file through the line-by-line path: the same frame."""
    from pipeline import data

    rows = [{"prompt": f"q{i} \u2028 “é”", "response": f"a{i}", "source": "web", "id": i} for i in range(5)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    assert data._plain_pairs(text) is not None  # the fast path takes it, raw U+2028 and all
    fast = load_examples("t.jsonl", text)
    careful = load_examples("t.jsonl", text.replace(b"\n", b"\n\n", 1))  # a blank line after line 1
    assert data._plain_pairs(text.replace(b"\n", b"\n\n", 1)) is None
    assert list(careful.index) == [1, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(fast.reset_index(drop=True), careful.reset_index(drop=True))
    assert data._plain_pairs(text + b"\r\n\n") is not None  # blank lines at the end number no row
    pd.testing.assert_frame_equal(load_examples("t.jsonl", text + b"\n \n"), fast)
    nested = text.replace(b'"id": 0', b'"id": {"a": 1}')
    assert data._plain_pairs(nested) is None
    pd.testing.assert_frame_equal(load_examples("t.jsonl", nested), fast)


def test_parquet_struct_arguments_with_nulls_refused(tmp_path):
    """Two calls with different arguments, stored as objects: Parquet gives each the other's keys as
    nulls. Refused, where a JSON string would have kept them as written."""
    calls = [
        {"type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "g", "arguments": {"day": 3}}},
    ]
    rows = [
        [user("a"), assistant("", tool_calls=[call]), {"role": "tool", "content": "r"}, assistant("b")]
        for call in calls
    ]
    pd.DataFrame({"messages": rows}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(
        DataError,
        match=r"t.parquet row 1: field 'messages\[1\].tool_calls\[0\].function.arguments' "
        r"holds a null: in Parquet an object becomes a struct",
    ):
        load_examples(tmp_path / "t.parquet")
