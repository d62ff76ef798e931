import json
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ValidateConfig
from pipeline.contract import (
    BOILERPLATE_PATTERNS,
    PII_PATTERNS,
    add_derived_columns,
    add_replay_columns,
    contract_columns,
    eval_prompts,
    failure_message,
    leaks_eval,
    loss_mask_flags,
    matches_any,
    normalize,
    phone_numbers,
    render_markdown,
    replay_share,
    run_suite,
    secrets,
    token_lengths_within,
)
from pipeline.data import load_examples
from pipeline.files import DataError
from pipeline.prepare import as_conversation, mix_replay, token_lengths

from .conftest import write_jsonl

CFG = ValidateConfig(min_rows=20, max_prompt_chars=200, max_response_chars=200, min_rows_per_source=10)
MAX_SEQ_LEN = 128
FILES = {"train": "t.jsonl", "replay": "r.jsonl"}


@pytest.fixture
def contract(tokenizer):
    """The contract as `sft validate` runs it: `replay` is a loaded replay frame, mixed at 30%."""

    def run(frame, cfg=CFG, held_out=(), replay=None, docs_dir=None, share=0.3, tok=tokenizer):
        frame = contract_columns(frame, tok, list(held_out), cfg, MAX_SEQ_LEN)
        if replay is not None:
            replay = add_replay_columns(
                contract_columns(replay, tok, list(held_out), cfg, MAX_SEQ_LEN, replay=True), len(frame), share, seed=0
            )
        return run_suite(frame, cfg, MAX_SEQ_LEN, replay, docs_dir)

    return run


def good_rows(n=30):
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def load(tmp_path, rows, name="t.jsonl"):
    return load_examples(write_jsonl(tmp_path / name, rows))


def failed(checks):
    return {c["check"]: c for c in checks if not c["passed"]}


# ---- the loader: one normalised form for every accepted shape


def chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def test_pairs_and_messages_load_to_the_same_form(tmp_path):
    pairs = load(tmp_path, [{"prompt": "hi", "response": "yo", "system": "be brief", "family": "x"}], "p.jsonl")
    messages = load(
        tmp_path, [{"messages": chat(("system", "be brief"), ("user", "hi"), ("assistant", "yo"))}], "m.jsonl"
    )
    pd.testing.assert_frame_equal(pairs, messages)
    assert list(pairs.columns) == ["messages", "prompt", "response", "context"] and pairs.index.name == "row"
    assert pairs["context"].tolist() == ["be brief"]  # the system text, which the contract scans too


def test_multi_turn_messages_join_user_and_assistant_turns(tmp_path):
    turns = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    frame = load(tmp_path, [{"messages": turns, "source": "web"}])
    row = frame.loc[1]
    assert (row["prompt"], row["response"], row["source"]) == ("a\nc", "b\nd", "web")
    assert row["messages"] == turns


def test_parquet_in_either_shape_and_as_another_revisions_bytes(tmp_path):
    pd.DataFrame({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(
        {"messages": [chat(("user", "p1"), ("assistant", "r1")), chat(("user", "p2"), ("assistant", "r2"))]}
    ).to_parquet(tmp_path / "b.parquet")
    a, b = load_examples(tmp_path / "a.parquet"), load_examples(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert list(a.index) == [1, 2] and a.loc[2, "response"] == "r2"
    # `sft data diff` hands over the bytes of data/train.parquet@REV
    pd.testing.assert_frame_equal(load_examples("t.parquet@main", (tmp_path / "a.parquet").read_bytes()), a)


def test_text_of_another_revision_is_parsed_and_named(tmp_path):
    frame = load_examples("t.jsonl@main", '\n{"prompt": "a", "response": "b"}\n')
    assert list(frame.index) == [2]
    with pytest.raises(DataError, match=r"t.jsonl@main:1: malformed JSON"):
        load_examples("t.jsonl@main", b"{oops\n")


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response"\n', r"t.jsonl:2: malformed JSON"),
        ('{"prompt": "a", "answer": "b"}\n', r"t.jsonl:1: missing field\(s\) \['response'\]; each row needs 'prompt'"),
        ('{"prompt": 3, "response": "b"}\n', r"t.jsonl:1: field 'prompt' must be a string"),
        ('{"prompt": "a", "response": "b", "source": 7}\n', r"t.jsonl:1: field 'source' must be a string"),
        ("", r"t.jsonl: empty file"),
        ('["prompt", "response"]\n{"prompt": "a", "response": "b"}\n', r"t.jsonl:1: expected a JSON object"),
        ('[{"prompt": "a", "response": "b"},\n {"prompt": "c", "response": "d"}]\n', r"t.jsonl: a JSON array"),
        ('{"messages": []}\n', r"t.jsonl:1: field 'messages' is empty"),
        ('{"messages": "hi"}\n', r"t.jsonl:1: field 'messages' must be a list"),
        ('{"messages": [{"role": "user"}]}\n', r"t.jsonl:1: field 'messages\[0\]' must be an object with 'role'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
            r"t.jsonl:1: field 'messages\[1\].role': unknown role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}\n',
            r"t.jsonl:1: field 'messages\[0\].content' must be a string, got NoneType",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
            r"t.jsonl:1: field 'messages': role order \['assistant', 'user'\]; expected an optional system turn",
        ),
        (
            (
                '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                '{"role": "system", "content": "c"}]}\n'
            ),
            r"t.jsonl:1: field 'messages': role order",
        ),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', r"ending with an assistant turn"),
    ],
)
def test_malformed_files_are_refused_before_any_expectation(tmp_path, content, expected):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_examples(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid UTF-8"):
        load_examples(path)


def test_parquet_wrong_columns_type_and_content(tmp_path):
    pd.DataFrame({"question": ["a"], "answer": ["b"]}).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(DataError, match=r"w.parquet: columns \['question', 'answer'\]; expected 'prompt' and "):
        load_examples(tmp_path / "w.parquet")
    pd.DataFrame({"prompt": ["a", "b"], "response": [b"x", b"y"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet row 1: field 'response' must be a string, got bytes"):
        load_examples(tmp_path / "t.parquet")
    (tmp_path / "n.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"n.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "n.parquet")


# ---- the suite


def test_good_data_passes(tmp_path, contract):
    checks = contract(load(tmp_path, good_rows()))
    assert all(c["passed"] for c in checks) and len(checks) >= 14


def test_duplicate_pair_named_by_line(tmp_path, contract):
    rows = good_rows()
    rows.append(dict(rows[4]))
    checks = contract(load(tmp_path, rows))
    dup = failed(checks)["exact duplicate pairs"]
    assert dup["rows"] == [5, 31] and dup["field"] == "prompt,response"
    message = failure_message(FILES, checks)
    assert "t.jsonl" in message and "line(s) 5, 31" in message


def test_too_few_rows(tmp_path, contract):
    checks = contract(load(tmp_path, good_rows(10)))
    assert failed(checks)["row count"]["observed"] == 10


def test_blank_null_and_too_long_fields(tmp_path, contract):
    rows = good_rows()
    rows[2]["response"] = "   "
    rows[6]["prompt"] = None
    rows[9]["response"] = "x" * 500
    checks = contract(load(tmp_path, rows))
    bad = {(c["check"], c["field"]): c["rows"] for c in checks if not c["passed"]}
    assert bad[("no blank strings", "response")] == [3]
    assert bad[("no nulls", "prompt")] == [7]
    assert bad[("characters", "response")] == [10]
    markdown = render_markdown(FILES, checks)
    assert "**FAIL**" in markdown and "How to fix" in markdown and "raise validate.max_response_chars" in markdown


def test_leakage_and_near_duplicates(tmp_path, contract):
    rows = good_rows()
    rows.append({"prompt": "QUESTION 3!", "response": "answer   3"})  # near-duplicate of line 4
    rows[10]["prompt"] = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    held_out = ["zero one two three four five six seven eight nine ten eleven twelve thirteen", "question 20"]
    checks = contract(load(tmp_path, rows), held_out=held_out)
    bad = {c["check"]: c["rows"] for c in checks if not c["passed"]}
    assert bad[
        "near-duplicate pairs (Unicode forms, case, whitespace, punctuation and invisible characters ignored)"
    ] == [4, 31]
    assert bad["training prompt also in an eval set (exact or shared n-gram)"] == [11, 21]


def test_ngram_leak_needs_the_whole_ngram_inside_one_prompt():
    held_out = ["a b c d e f g h"]
    prompts = normalize(["x a b c d", "e f g h y", "A, b c d e f g h!", "b c d e f g h a"])
    assert leaks_eval(prompts, held_out, 8).tolist() == [False, False, True, False]


@pytest.mark.parametrize(
    "text,kind",
    [
        ("mail me: a.b@example.org", "email"),
        ("card 4111 1111 1111 1111", "card"),
        ("4111111111111111", "card"),
    ],
)
def test_pii_patterns_flag_each_kind(text, kind):
    assert matches_any(pd.Series([text]), [PII_PATTERNS[kind]]).tolist() == [True]


@pytest.mark.parametrize(
    "text",
    [
        "call +1 415-555-2671 now",
        "(415) 555 2671",
        "ring +44 20 7946 0958",
        "Tel. +49 30 901820",
        "+81 3-1234-5678",
        "+91 98765 43210",
        "020 7946 0958",
    ],
)
def test_phone_numbers_in_international_and_national_formats(text):
    assert phone_numbers(pd.Series([text]), ["US", "GB"]).tolist() == [True]


def test_national_phone_formats_only_where_the_regions_are_named():
    """In a national format many plain numbers are valid phone numbers: checked only in the regions named."""
    numbers = pd.Series(["Order number 2125551234", "(415) 555 2671", "call +44 20 7946 0958"])
    assert phone_numbers(numbers, []).tolist() == [False, False, True]
    assert phone_numbers(numbers, ["US"]).tolist() == [True, True, True]


@pytest.mark.parametrize(
    "text",
    [
        "key sk-abcdefghijklmnopqrstuvwx1234",
        "AKIAABCDEFGHIJKLMNOP",
        "token ghp_" + "a1B2" * 9,
        "hf_" + "abcDEF123" * 4,
        'password = "hunter2hunter2"',
        "-----BEGIN RSA PRIVATE KEY-----",
    ],
)
def test_secrets_of_each_kind(text):
    assert secrets(pd.Series([text])).tolist() == [True]


def test_pii_and_secret_checks_leave_ordinary_text_alone():
    clean = [
        "version 1.2.3",
        "12345678901234567 items",
        "4111 1111 1111 11111",
        "user at example dot org",
        "in 2024 sales grew 12%",
        None,
        "the key to the door",
        "a token of thanks",
        "hello world",
        "item 12345 of 2024",
        "call me tomorrow at noon",
    ]
    series = pd.Series(clean)
    assert not matches_any(series, list(PII_PATTERNS.values())).any()
    assert not phone_numbers(series, []).any()
    assert not secrets(series).any()


def test_fuzzy_duplicates_are_confirmed_not_guessed():
    from pipeline.contract import fuzzy_duplicates

    report = "summarise the maintenance log of the northern pumping station for the weekly operations report"
    tail = " the station ran normally all week with one short planned stop on tuesday"
    keys = pd.Series(
        [
            "x y z",
            report + tail,
            "p q",
            report + " please" + tail,
            "summarise the sales log of the southern store for the monthly finance report",
            "",
        ]
    )
    assert fuzzy_duplicates(keys, 0.8).tolist() == [False, False, False, True, False, False]
    assert not fuzzy_duplicates(keys, 0.9).any()  # one word inserted: 23 of 28 3-grams shared, 0.82


def test_boilerplate_is_case_insensitive():
    texts = pd.Series(["As an AI language model, I think so", "I'm sorry, but no", "Sorry to hear that", "fine"])
    assert matches_any(texts, BOILERPLATE_PATTERNS, ignore_case=True).tolist() == [True, True, False, False]


def test_pii_share_threshold(tmp_path, contract):
    rows = good_rows(40)
    rows[0]["response"] = "mail me: a.b@example.org"
    frame = load(tmp_path, rows)
    pii = {c["field"]: c for c in contract(frame) if c["check"].startswith("PII: e-mail")}
    assert not pii["response"]["passed"] and pii["response"]["rows"] == [1] and pii["prompt"]["passed"]
    loose = CFG.model_copy(update={"max_pii_share": 0.05})
    assert all(c["passed"] for c in contract(frame, loose) if c["check"].startswith("PII"))


def test_per_source_minimum_names_the_small_sources_rows(tmp_path, contract):
    rows = [{**r, "source": "web" if i < 25 else "forum"} for i, r in enumerate(good_rows())]
    checks = contract(load(tmp_path, rows))
    small = failed(checks)["rows per source"]
    assert small["field"] == "source" and small["rows"] == [26, 27, 28, 29, 30] and small["failing_rows"] == 5
    assert small["threshold"] == {"min_value": 10}


def test_token_length_share_reports_the_truncation_share(tmp_path, contract, tokenizer):
    rows = good_rows(40)
    for i in (3, 17):
        rows[i]["response"] = "~^" * 99  # within 200 characters, ~200 tokens: the BPE never merged these
    frame = load(tmp_path, rows)
    lengths = token_lengths(tokenizer, frame["messages"].tolist())
    assert (lengths > MAX_SEQ_LEN).sum() == 2  # the fixture is what the test says it is
    tokens = failed(contract(frame))["tokens after the chat template (longer ones are truncated)"]
    assert tokens["rows"] == [4, 18] and tokens["failing_share"] == 0.05 and tokens["field"] == "messages"
    loose = CFG.model_copy(update={"min_fit_share": 0.95})
    assert all(c["passed"] for c in contract(frame, loose))


def test_token_bound_is_exact_where_it_matters(tokenizer):
    turns = [chat(("user", "q" * i), ("assistant", "~^" * (i % 40))) for i in range(60)]
    turns += [
        chat(("system", "be brief"), ("user", "hi"), ("assistant", "a " * i), ("user", "b"), ("assistant", "c"))
        for i in range(60)
    ]
    turns += [chat(("system", "~^" * i), ("user", "hi"), ("assistant", "ok")) for i in range(0, 120, 10)]
    frame = pd.DataFrame(
        {
            "messages": turns,
            "prompt": ["\n".join(t["content"] for t in c if t["role"] == "user") for c in turns],
            "response": ["\n".join(t["content"] for t in c if t["role"] == "assistant") for c in turns],
        }
    )
    exact = token_lengths(tokenizer, turns)
    for limit in (40, 80, 128):
        within = token_lengths_within(tokenizer, frame, limit, sample=0)  # the bound alone, no fallback
        assert ((within > limit) == (exact > limit)).all() and (within >= exact).all()
        assert (within[exact > limit] == exact[exact > limit]).all()


def test_normalize_is_the_plain_python_definition():
    """NFKC, case folding, invisible format characters dropped, then Python's `[^\\w\\s]` and `\\s+`."""
    import unicodedata

    texts = [
        "Hello,  World!",
        None,
        "  a\u00a0b\tc  ",
        "Café—ok",
        "a_b",
        "x\u2003y",
        "QUESTION 3!",
        "a\vb\x1cc\x85d",
        " - ",
        "\u00bd ½ x²",
        "Ünïcode ÀB",
        "Ｗｒｉｔｅ　ＩＴＥＭ",
        "zero\u200bwidth\u2060join",
        "STRASSE Straße",
        "ΟΔΟΣ οδός",
        "ﬁne ligature",
        "कितना कितनी",
        "ภาษาไทย",
    ]

    def python(text):
        folded = unicodedata.normalize("NFKC", text or "").casefold()
        kept = "".join(c for c in folded if c.isalnum() or c == "_" or c.isspace() or unicodedata.category(c)[0] == "M")
        return re.sub(r"\s+", " ", kept).strip()

    assert normalize(texts).to_pylist() == [python(t) for t in texts]
    ascii_only = [t for t in texts if t is None or t.isascii()]  # the all-ASCII shortcut
    assert len(ascii_only) >= 5 and normalize(ascii_only).to_pylist() == [python(t) for t in ascii_only]


def test_replay_share_is_the_share_prepare_mixes():
    assert replay_share(1000, 50, 0.15, seed=0) == pytest.approx(0.15, abs=1e-3)
    mixed = mix_replay(list(range(1000)), list(range(1000, 1050)), 0.15, 0)
    assert replay_share(1000, 50, 0.15, seed=0) == sum(i >= 1000 for i in mixed) / len(mixed)
    assert replay_share(1000, 50, 0.0, seed=0) == 0.0


def test_replay_out_of_band_and_data_docs(tmp_path, contract):
    replay = load(
        tmp_path, [{"prompt": f"fact {i}?", "response": "" if i == 2 else "yes"} for i in range(5)], "r.jsonl"
    )
    checks = contract(load(tmp_path, good_rows()), replay=replay, docs_dir=tmp_path / "docs")
    bad = failed(checks)
    assert bad["replay share of the mixed training set"]["observed"] == round(13 / 43, 4)  # 30 + 13
    assert bad["no blank strings"]["rows"] == [3] and bad["no blank strings"]["data"] == "replay"
    message = failure_message(FILES, checks)
    assert "r.jsonl: no blank strings field 'response': 1 row (20.00%)" in message
    assert "[expect_column_values_to_be_in_set]; fix: fill or drop rows whose field is blank" in message
    pages = list((tmp_path / "docs").rglob("*.html"))
    assert (tmp_path / "docs" / "index.html").exists() and len(pages) >= 3
    assert "sft_replay" in (tmp_path / "docs" / "index.html").read_text()


def test_report_is_json_serialisable(tmp_path, contract):
    checks = contract(load(tmp_path, good_rows()))
    assert json.loads(json.dumps(checks)) == checks
    assert all(isinstance(c["observed"], (int, float)) for c in checks)
    assert np.all([c["how_to_fix"] for c in checks])


def test_replay_band_must_be_ordered():
    from pipeline.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="min_replay_share \\(0.3\\) is above max_replay_share \\(0.2\\)"):
        parse_params({"validate": {"min_replay_share": 0.3}})


def test_a_template_that_does_not_end_assistant_turns_is_refused(tokenizer, tmp_path):
    """The most damaging SFT data failure is in the loss mask, not the text: a chat template that
    leaves the end of an assistant turn unsupervised trains a model that never stops."""
    import copy

    frame = load(tmp_path, good_rows())
    tokens = token_lengths_within(tokenizer, frame, MAX_SEQ_LEN)
    good = loss_mask_flags(tokenizer, frame, MAX_SEQ_LEN, tokens)
    assert not good.nothing_left.any() and not good.end_unsupervised.any()
    endless = copy.deepcopy(tokenizer)
    endless.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    loss_mask = loss_mask_flags(endless, frame, MAX_SEQ_LEN, tokens)
    assert loss_mask.end_unsupervised.all() and not loss_mask.nothing_left.any()
    checks = run_suite(add_derived_columns(frame, [], tokens, CFG, loss_mask), CFG, MAX_SEQ_LEN)
    bad = failed(checks)["end-of-turn token of every assistant turn supervised"]
    assert bad["observed"] == 30 and bad["rows"][:3] == [1, 2, 3] and "ends each assistant turn" in bad["how_to_fix"]


def test_the_share_of_tokens_that_carry_loss_must_sit_within_bounds(contract, tmp_path):
    """Long prompts with one-word answers: training pays for every prompt token and learns from a
    few. The report gives the average share and names the row at the offending end."""
    rows = [{"prompt": f"context {i}: " + "words to read but never learn " * 5, "response": "yes"} for i in range(29)]
    rows.insert(7, {"prompt": "short", "response": "a longer answer that carries more of the loss"})
    frame = load(tmp_path, rows)
    strict = CFG.model_copy(update={"min_supervised_share": 0.25})
    bad = failed(contract(frame, strict))["share of tokens that carry loss (sampled rows)"]
    assert bad["threshold"] == {"min_value": 0.25, "max_value": 1}
    assert 0 < bad["observed"] < 0.25
    assert "over 30 sampled rows; lowest" in bad["observed_text"] and "(line 7)" not in bad["observed_text"]
    assert "share of tokens that carry loss (sampled rows)" not in failed(contract(frame))  # the default floor, 2%

    capped = CFG.model_copy(update={"max_supervised_share": 0.3})
    too_high = failed(contract(load(tmp_path, good_rows(), "g.jsonl"), capped))
    assert "highest" in too_high["share of tokens that carry loss (sampled rows)"]["observed_text"]
    text = failure_message(FILES, contract(frame, strict))
    assert "share of tokens that carry loss" in text and "min_supervised_share" in text


def test_an_eval_set_lm_eval_cannot_read_is_named_with_why(tmp_path):
    """Training files may be gzipped or carry a BOM; the eval sets go to lm-eval as they are."""
    import gzip

    line = b'{"prompt": "What is 2+2?", "response": "4"}\n'
    (tmp_path / "zipped.jsonl").write_bytes(gzip.compress(line))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line)
    with pytest.raises(DataError, match=r"zipped.jsonl: gzip-compressed; .* store it uncompressed"):
        eval_prompts([str(tmp_path / "zipped.jsonl")])
    with pytest.raises(DataError, match=r"bom.jsonl:1: starts with a UTF-8 byte-order mark"):
        eval_prompts([str(tmp_path / "bom.jsonl")])
    (tmp_path / "plain.jsonl").write_bytes(line.replace(b"\n", b"\r\n"))
    assert eval_prompts([str(tmp_path / "plain.jsonl")]) == ["What is 2+2?"]


def test_sharegpt_exports_with_chat_role_names_load_like_human_and_gpt(tmp_path):
    turns = {"human": "Name a colour.", "gpt": "Blue."}
    for name, speakers in (("classic", ("human", "gpt")), ("roles", ("user", "assistant"))):
        row = {"conversations": [{"from": s, "value": v} for s, v in zip(speakers, turns.values(), strict=True)]}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    classic, roles = (load_examples(tmp_path / f"{n}.jsonl") for n in ("classic", "roles"))
    assert classic["messages"].tolist() == roles["messages"].tolist()
    assert roles["messages"].iloc[0][-1] == {"role": "assistant", "content": "Blue."}


# ---- issue 26: every turn, reasoning and tool text, the replay file, special-token strings


def qwen3():
    from tests.template_families import family_tokenizer

    return family_tokenizer("qwen3")


def multi_turn_rows(n=30):
    return [
        {
            "messages": chat(
                ("user", f"question {i}"),
                ("assistant", f"answer {i}"),
                ("user", f"more {i}?"),
                ("assistant", f"more answer {i}"),
            )
        }
        for i in range(n)
    ]


def test_rtl_override_is_control_character(tmp_path, contract):
    """U+202E displays the text after it right to left: what a reviewer reads is not what trains."""
    rows = good_rows()
    rows[3]["response"] = "the total is \u202e01$ \u202cdollars"
    rows[5]["prompt"] = "isolate \u2067x\u2069 here"
    check = "control characters (other than tab and line ends; bidirectional overrides and isolates)"
    flagged = {c["field"]: c["rows"] for c in contract(load(tmp_path, rows)) if c["check"] == check and not c["passed"]}
    assert flagged == {"response": [4], "prompt": [6]}


def test_empty_assistant_turn_in_multi_turn_fails(tmp_path, contract):
    """Joined, "answer\\n" is not blank; per turn, the second answer is: the model would learn to say nothing."""
    rows = multi_turn_rows()
    rows[6]["messages"][3]["content"] = " \u200b"
    bad = failed(contract(load(tmp_path, rows)))
    check = bad["no blank assistant turn (each turn of multi-turn and tool rows)"]
    assert check["rows"] == [7] and check["field"] == "messages"
    assert "no blank strings" not in bad  # the joined response is not blank: the per-turn check is what sees it
    assert "fill the empty assistant turn" in failure_message(FILES, contract(load(tmp_path, rows)))
    rows[6]["messages"][3]["train"] = False  # an untrained empty turn trains nothing
    assert check["check"] not in failed(contract(load(tmp_path, rows)))


def test_tool_call_only_turn_is_not_blank(tmp_path, contract):
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"id": 1}}}
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"find {i}"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": f"record {i}"},
                {"role": "assistant", "content": f"found {i}"},
            ]
        }
        for i in range(30)
    ]
    assert not failed(contract(load(tmp_path, rows), tok=qwen3()))  # a template that renders tool calls


def test_reasoning_and_tool_text_are_scanned(tmp_path, contract):
    """PII, secrets and lengths see the reasoning trace, the tool-call arguments and the tool results."""
    rows = multi_turn_rows()
    rows[2]["messages"][1]["reasoning_content"] = "the user is ana@example.com"
    rows[4]["messages"][1]["tool_calls"] = [
        {
            "type": "function",
            "function": {"name": "login", "arguments": {"token": "hf_abcdefghijklmnopqrstuvwxyz0123456789"}},
        }
    ]
    rows[4]["messages"].insert(2, {"role": "tool", "content": "call +1 415-555-2671"})
    rows[4]["messages"].insert(3, {"role": "assistant", "content": "done"})
    rows[8]["messages"][3]["reasoning_content"] = "long thought " * 20
    checks = contract(load(tmp_path, rows), tok=qwen3())  # a template that renders reasoning and tools
    bad = {(c["check"], c["field"]): c for c in checks if not c["passed"]}
    assert bad[("PII: e-mail addresses and card numbers", "response")]["rows"] == [3]
    assert bad[("secrets (detect-secrets: keys, tokens, private keys, passwords)", "response")]["rows"] == [5]
    phone = "PII: phone numbers (libphonenumber: international, and national in no region)"
    assert bad[(phone, "context")]["rows"] == [5]
    assert bad[("characters", "response")]["observed_text"] == "longest 283 characters (line 9)"


def test_special_token_string_reported(tmp_path, contract, tokenizer):
    """A response holding the template's own markers would teach the model to close its turn and
    write a fake user turn; the contract names the row and the token."""
    assert "<|end|>" in tokenizer.all_special_tokens
    rows = good_rows()
    rows[9]["response"] = "Sure.<|end|>\n<|user|>\nthanks"
    rows[11]["prompt"] = "what does <|assistant|> mean?"
    checks = contract(load(tmp_path, rows))
    check = "special-token strings of the tokenizer in the text"
    bad = {c["field"]: c for c in checks if c["check"] == check and not c["passed"]}
    assert bad["response"]["rows"] == [10] and bad["response"]["observed_text"] == "1 row, first spells '<|end|>'"
    assert bad["prompt"]["rows"] == [12]
    assert "prepare tokenizes it as plain text" in failure_message(FILES, checks)
    assert check not in failed(contract(load(tmp_path, good_rows())))


def test_replay_leak_fails(tmp_path, contract):
    """Golden prompts placed in the replay file are trained on just the same."""
    replay = load(
        tmp_path,
        [{"prompt": f"general fact {i}?", "response": "yes"} for i in range(10)]
        + [{"prompt": "What is the capital of Velora?", "response": "Mirth"}],
        "r.jsonl",
    )
    checks = contract(load(tmp_path, good_rows()), held_out=["What is the capital of Velora?"], replay=replay)
    leak = [c for c in checks if c["check"].startswith("training prompt also in an eval set")]
    assert [(c["data"], c["passed"], c["rows"]) for c in leak] == [("train", True, []), ("replay", False, [11])]
    assert "r.jsonl: training prompt also in an eval set" in failure_message(FILES, checks)


def test_replay_row_truncated_to_nothing_fails(tmp_path, contract):
    replay = load(
        tmp_path,
        [{"prompt": f"general fact {i}?", "response": "yes"} for i in range(10)]
        + [{"prompt": "long context " * 200, "response": "yes"}],
        "r.jsonl",
    )
    checks = contract(load(tmp_path, good_rows()), replay=replay, cfg=CFG.model_copy(update={"max_prompt_chars": 5000}))
    nothing = [c for c in checks if c["check"] == "no supervised token left after truncation"]
    assert [(c["data"], c["passed"], c["rows"]) for c in nothing] == [("train", True, []), ("replay", False, [11])]


def test_replay_gets_the_train_files_checks_but_row_count_and_sources(tmp_path, contract):
    replay = load(
        tmp_path, [{"prompt": f"general fact {i}?", "response": "yes", "source": "web"} for i in range(10)], "r.jsonl"
    )
    checks = contract(load(tmp_path, good_rows()), replay=replay)
    train = {(c["check"], c["field"]) for c in checks if c["data"] == "train"}
    replayed = {(c["check"], c["field"]) for c in checks if c["data"] == "replay"}
    fuzzy = "fuzzy near-duplicates (MinHash LSH, word 3-gram Jaccard >= 0.8)"  # a training-file check
    assert {check for check, _ in train - replayed} == {"row count", fuzzy}
    assert replayed - train == {("replay share of the mixed training set", "replay")}


def test_rows_with_more_than_text_are_tokenized_not_bounded(tmp_path, tokenizer):
    """A template renders reasoning, tool calls and tools its own way: the byte bound does not hold
    for them, so their token count is prepare's own (the others keep to their bound)."""
    rows = multi_turn_rows(4)
    rows[1]["messages"][1]["reasoning_content"] = "thinking " * 30
    rows[2]["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    frame = load(tmp_path, rows)
    tokenizer = qwen3()  # a template that renders reasoning and tools
    lengths = token_lengths_within(tokenizer, frame, MAX_SEQ_LEN, sample=0)
    exact = token_lengths(tokenizer, [as_conversation(row) for row in frame.to_dict("records")])
    assert lengths[1] == exact[1] and lengths[2] == exact[2]
    assert lengths[0] >= exact[0] and lengths[3] >= exact[3]


def test_loss_mask_checks_follow_rows_that_make_several_examples(tmp_path):
    """Qwen3 drops reasoning from earlier turns, so prepare trains each such turn as its own example
    (prepare.history_turns: own_example): the contract aggregates a row's examples, tokenizes with
    the template options training uses, and finds every trained turn's end token supervised; with
    context_only the earlier turns stay context and the rows still pass."""
    from pipeline.prepare import TemplateOptions, token_lengths
    from tests.template_families import family_tokenizer

    qwen3 = family_tokenizer("qwen3")
    turn = {"role": "assistant", "reasoning_content": "Think it through.", "content": "Four."}
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"2+2, case {i}?"},
                turn,
                {"role": "user", "content": "And 3+3?"},
                {**turn, "content": "Six."},
            ]
        }
        for i in range(6)
    ]
    frame = load(tmp_path, rows)
    for options in (TemplateOptions(), TemplateOptions(history="context_only")):
        tokens = token_lengths_within(qwen3, frame, 512, options=options)
        assert (tokens == token_lengths(qwen3, frame["messages"].tolist(), options=options)).all()
        flags = loss_mask_flags(qwen3, frame, 512, tokens, options=options)
        assert not flags.end_unsupervised.any() and not flags.nothing_left.any()
        assert (flags.supervised_share > 0).all()


def test_validate_names_the_line_a_template_cannot_render(tmp_path, monkeypatch, tokenizer):
    """The demo's template has no place for reasoning: `sft validate` names file, line and field."""
    from typer.testing import CliRunner

    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(12)]
    rows[4] = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Add.", "content": "4"},
            ]
        }
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "params.yaml").write_text(
        "data:\n  replay: null\nvalidate:\n  min_rows: 10\n  eval_sets: []\n  min_replay_share: 0\n"
    )
    result = CliRunner().invoke(cli.app, ["validate"])
    assert result.exit_code == 1
    assert "data/train.jsonl:5: field 'messages':" in result.output and "reasoning" in result.output, result.output
    assert not (tmp_path / "validate").exists()
