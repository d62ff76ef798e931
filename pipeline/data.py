"""The one loader of training data, and its normalised in-memory form.

Accepted files (data.train, data.replay, the eval sets): JSONL (one object a line; `.jsonl` or
`.json`, gzip-compressed as `.gz`; a UTF-8 byte-order mark and CRLF line ends are fine) or Parquet,
each row in one of these shapes:
  - `prompt` and `response`, optional `system`: one exchange;
  - OpenAI-style `messages`: [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...];
  - ShareGPT-style `conversations`: [{"from": ..., "value": str}, ...], `from` one of "system",
    "human"/"user", "gpt"/"assistant", "function_call" (an assistant tool call: `value` holds
    {"name", "arguments"} as JSON, or a list of them) and "observation"/"tool" (a tool's result);
any shape with an optional `source` and an optional `tools` list (OpenAI function specs, or a
JSON string holding them, as LLaMA-Factory exports write it). Other row fields are ignored. Any
other format (CSV, a JSON array, ...) is refused naming the format.

What a message (or ShareGPT turn) may carry, and what becomes of it; nothing a user wrote on a
message is dropped without a word: a key outside this list is refused, naming it.
  - `content`: a string, or a list of text parts [{"type": "text", "text": ...}] (joined); any
    other part (an image) is refused. null (or no `content`) only on an assistant turn with
    `tool_calls`: it becomes "".
  - `reasoning_content` or `thinking` (assistant only): the reasoning trace, kept as
    "reasoning_content" (both given and different: refused).
  - `tool_calls` (assistant only): OpenAI [{"type": "function", "function": {"name",
    "arguments"}}] (or bare {"name", "arguments"}); `arguments` a JSON object or a string holding
    one, always a dict after loading; an optional `id` is kept. In Parquet an object is a struct
    holding every key of every row, null where absent: a null in arguments or tools is refused
    there (store them as JSON strings).
  - `name` (any role) and `tool_call_id` (tool only): kept.
  - `train` (true/false) or `weight` (1/0): per-turn training. On an assistant turn, false/0
    becomes "train": False (the turn is context, not trained); true/1 is the default. On other
    turns false/0 is what happens anyway (only assistant turns are trained) and is ignored;
    true/1 there is refused (user, system and tool text is never trained). Any other weight is
    refused: training has no partial weights.
Duplicate keys in one JSON object are refused (the last value would win without a word).

Every file becomes one DataFrame indexed by `row` (the 1-based line number of a JSONL file, the
1-based row number of a Parquet file) with columns
  - `messages`: [{"role", "content", ...}] as above: an optional system turn, then user and
    assistant turns alternating (tool turns only right after an assistant turn with tool_calls,
    and followed by an assistant turn), ending with an assistant turn (what prepare renders
    through the chat template);
  - `prompt`: the user turns joined with "\\n"; `response`: every assistant turn's text joined
    with "\\n", each turn its reasoning, its content and its tool calls (as JSON) (what the
    contract checks for blanks, lengths, duplicates, leakage, PII and secrets);
  - `context`: only when some row has a system or tool turn: their text, joined ("" elsewhere),
    which the contract scans for PII, secrets and control characters too;
  - `tools`: only when some row has a `tools` list: that list, None elsewhere;
  - `source`: only when the file has that field.
A file that cannot be read this way is refused here, before any expectation runs, with a
DataError naming the file, the line (or row) and the field. Nulls and blank strings in
`prompt`/`response` pass through (a null is "" in `messages`): the contract reports them with
every offending line at once.
"""

from __future__ import annotations

import gc
import gzip
import io
import json
from pathlib import Path

import pandas as pd

from pipeline.files import DataError

PAIR_FIELDS = ("prompt", "response")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` -> role; exports also write the chat roles themselves; LLaMA-Factory's tool turns
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}
MESSAGE_FIELDS = (
    "role",
    "content",
    "name",
    "reasoning_content",
    "thinking",
    "tool_calls",
    "tool_call_id",
    "train",
    "weight",
)
SHAREGPT_FIELDS = ("from", "value", "name", "train", "weight")
SHAPES = (
    "'prompt' and 'response' (optional 'system', 'source'), 'messages' or ShareGPT 'conversations' "
    "(optional 'source', 'tools')"
)
OTHER_SHAPE_FIELDS = {"messages", "conversations", "system", "tools"}  # a row with one is not a plain pair
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
FORMATS = "JSONL (.jsonl or .json, one object a line; .gz compressed) or Parquet (.parquet)"
ROLE_ORDER = (
    "an optional system turn, then user and assistant turns alternating (tool turns only right after an "
    "assistant turn with tool_calls, then an assistant turn), ending with an assistant turn"
)


def load_examples(path: str | Path, text: str | bytes | None = None) -> pd.DataFrame:
    """The examples of a JSONL or Parquet file (by suffix), normalised as the module says.
    With `text`, parse that content (another revision's file) and use `path` only to name it."""
    name = str(path)
    file_name = name.split("@", 1)[0]  # "file@rev": another revision's content
    parquet = file_name.endswith(".parquet") or (isinstance(text, bytes) and text[:4] == b"PAR1")
    if not parquet and not file_name.endswith(JSONL_SUFFIXES):
        suffix = "".join(Path(file_name).suffixes) or "no suffix"
        raise DataError(f"{name}: unsupported format ({suffix}); expected {FORMATS}")
    if not parquet:
        text = _jsonl_text(name, text)
        table = _plain_pairs(text) if isinstance(text, bytes) else None
        if table is not None:
            return _pairs_frame(table)
    rows = _parquet_rows(name, text) if parquet else _jsonl_rows(name, text)
    columns, numbers = _columns(rows, name, parquet)
    if not numbers:
        raise DataError(f"{name}: empty file (no rows)")
    frame = pd.DataFrame(columns, index=pd.Index(numbers, name="row"))
    frame.attrs["parquet"] = parquet  # reports say "row N" of a Parquet file, "line N" of JSONL
    return frame


def _columns(rows, name: str, parquet: bool) -> tuple[dict, list[int]]:
    """The frame's columns (context, tools and source only where some row has them) and line numbers."""
    numbers, messages, prompts, responses, sources, contexts, tools = [], [], [], [], [], [], []
    gc.disable()  # millions of small dicts: the cyclic collector would rescan them over and over
    try:
        for number, row in rows:
            prompt, response = row.get("prompt"), row.get("response")
            if (
                type(prompt) is str
                and type(response) is str
                and "messages" not in row
                and "system" not in row
                and "tools" not in row
            ):
                # the common case, a plain pair of strings: nothing to check (a million rows a few seconds)
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                context = row_tools = None
            else:
                turns, prompt, response, context, row_tools = _structured(row, _where(name, number, parquet), parquet)
            source = row.get("source")
            if source is not None and type(source) is not str:
                raise DataError(
                    f"{_where(name, number, parquet)}: field 'source' must be a string, got {type(source).__name__}"
                )
            numbers.append(number)
            messages.append(turns)
            prompts.append(prompt)  # a null stays null, for the contract's not-null expectation
            responses.append(response)
            sources.append(source if "source" in row else _NO_SOURCE)
            contexts.append(context)
            tools.append(row_tools)
    finally:
        gc.enable()
    columns = {"messages": messages, "prompt": prompts, "response": responses}
    if any(c is not None for c in contexts):
        columns["context"] = [c or "" for c in contexts]
    if any(t is not None for t in tools):
        columns["tools"] = tools
    if any(s is not _NO_SOURCE for s in sources):
        columns["source"] = [None if s is _NO_SOURCE else s for s in sources]
    return columns, numbers


_NO_SOURCE = object()  # a row without the key, told apart from `"source": null`


def _structured(row: dict, where: str, parquet: bool) -> tuple:
    """A row with messages, ShareGPT turns, a system prompt or tools: (turns, prompt, response, context,
    tools), the prompt and response the joined user and assistant text the contract reads."""
    prompt, response = row.get("prompt"), row.get("response")
    context = row_tools = None
    turns = _turns(row, where)
    if "messages" in row or "conversations" in row:
        prompt = "\n".join(t["content"] for t in turns if t["role"] == "user")
        response = "\n".join(_assistant_text(t) for t in turns if t["role"] == "assistant")
    if turns[0]["role"] == "system" or len(turns) > 3:
        context = "\n".join(t["content"] for t in turns if t["role"] in ("system", "tool")) or None
    if row.get("tools") is not None:
        row_tools = _tools(row["tools"], where)
    if parquet:
        _refuse_struct_nulls(
            turns, row_tools, where, "conversations" if "conversations" in row and "messages" not in row else "messages"
        )
    return turns, prompt, response, context, row_tools


def _assistant_text(turn: dict) -> str:
    """All the text of an assistant turn, as the contract reads it: reasoning, content, tool calls
    (as JSON), one a line. A turn with more than its content always holds a line end, so the
    contract knows which rows to look at turn by turn."""
    if len(turn) == 2:  # role and content only: the common case
        return turn["content"]
    calls = [json.dumps(c["function"], ensure_ascii=False) for c in turn.get("tool_calls", ())]
    reasoning = turn.get("reasoning_content")
    return "\n".join([*([reasoning] if reasoning is not None else []), turn["content"], *calls]) + (
        "\n" if reasoning is None and not calls else ""
    )


def _refuse_struct_nulls(turns: list[dict], tools: list[dict] | None, where: str, field: str) -> None:
    """Parquet stores objects as structs that hold every key of every row, null where a row has
    none: tool-call arguments or tool specs read back so gain keys nobody wrote. A null inside
    them is refused; JSON strings keep them as written."""

    def holds_null(value) -> bool:
        if isinstance(value, dict):
            return any(holds_null(v) for v in value.values())
        if isinstance(value, list):
            return any(holds_null(v) for v in value)
        return value is None

    why = (
        "holds a null: in Parquet an object becomes a struct with every key of every row (null where absent); "
        "store it as a JSON string"
    )
    for i, turn in enumerate(turns):
        for k, call in enumerate(turn.get("tool_calls", ())):
            if holds_null(call["function"]["arguments"]):
                raise DataError(f"{where}: field '{field}[{i}].tool_calls[{k}].function.arguments' {why}")
    for k, tool in enumerate(tools or ()):
        if holds_null(tool):
            raise DataError(f"{where}: field 'tools[{k}]' {why}")


def _where(name: str, number: int, parquet: bool) -> str:
    return f"{name} row {number}" if parquet else f"{name}:{number}"


def _refuse_duplicate_keys(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: a key given twice is an error, not the last value silently."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(key)
    return row


class _DuplicateKey(ValueError):
    pass


def _jsonl_text(name: str, text: str | bytes | None) -> str | bytes:
    """The file's content, decompressed, less a byte-order mark."""
    if text is None:
        path = Path(name)
        if not path.exists():
            raise DataError(f"{name}: file not found")
        text = path.read_bytes()
    if isinstance(text, bytes):
        if text[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the name says
            try:
                text = gzip.decompress(text)
            except (OSError, EOFError) as err:
                raise DataError(f"{name}: not a readable gzip file ({err})") from None
        return text.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (Windows editors) is not part of line 1
    return text.removeprefix("\ufeff")


def _plain_pairs(data: bytes):
    """The file as a pyarrow table when it is the common case: on every line one plain object of
    non-null strings "prompt", "response" (and "source"; flat fields are ignored, as below), else
    None (the line-by-line path then reads it, and names whatever is wrong). pyarrow's reader
    parses on every core in C++; it refuses a key given twice in a row itself, and a line holding
    two objects or none is ruled out by requiring every line to start with "{" and as many rows
    as lines."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.json as pj

    if not data or data[:1] != b"{":
        return None
    try:  # the first line tells a file of messages at once, before pyarrow parses all of it
        first = json.loads(data[: data.find(b"\n")] if b"\n" in data else data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(first, dict) or not set(PAIR_FIELDS) <= first.keys() or first.keys() & OTHER_SHAPE_FIELDS:
        return None
    data = data.rstrip(b" \t\r\n")  # blank lines at the end number no row
    raw = np.frombuffer(data, dtype=np.uint8)
    starts = np.flatnonzero(raw == 10) + 1
    if not (raw[starts] == ord("{")).all():  # a blank or indented line: the careful path numbers lines
        return None
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=16 << 20))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    names = set(table.column_names)
    texts = [table.column(n) for n in (*PAIR_FIELDS, "source") if n in names]
    # other fields are ignored, as below; nested ones could hide a repeated key, so they go below
    if (
        table.num_rows != len(starts) + 1
        or not set(PAIR_FIELDS) <= names
        or names & OTHER_SHAPE_FIELDS
        or any(not pa.types.is_string(c.type) or c.null_count for c in texts)
        or any(pa.types.is_nested(c.type) for c in table.columns)
    ):
        return None
    try:
        table.validate(full=True)  # the reader does not check that strings are UTF-8
    except pa.ArrowInvalid:
        return None
    return table


def _pairs_frame(table) -> pd.DataFrame:
    """The normalised frame of a `_plain_pairs` table (lines 1..n)."""
    import numpy as np

    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    gc.disable()  # a million small dicts: the cyclic collector would rescan them over and over
    try:
        messages = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            for prompt, response in zip(prompts, responses, strict=True)
        ]
    finally:
        gc.enable()
    columns = {"messages": messages, "prompt": prompts, "response": responses}
    if "source" in table.column_names:
        columns["source"] = table.column("source").to_pylist()
    frame = pd.DataFrame(columns, index=pd.Index(np.arange(1, table.num_rows + 1), name="row"))
    frame.attrs["parquet"] = False
    return frame


def _jsonl_rows(name: str, text: str | bytes):
    """(line number, object) for each non-blank line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            line = text[: err.start].count(b"\n") + 1
            raise DataError(f"{name}:{line}: not valid UTF-8 ({err.reason})") from None
    if text.lstrip()[:1] == "[":  # one JSON document holding a list of rows, not JSONL
        try:
            is_array = isinstance(json.loads(text), list)
        except json.JSONDecodeError:
            is_array = False
        if is_array:
            raise DataError(f"{name}: a JSON array (one document); expected {FORMATS}")
    # json.loads less its per-call checks (40% faster); each object's keys pass through the hook,
    # which refuses one given twice (json keeps the last value without a word)
    decode = json.JSONDecoder(object_pairs_hook=_refuse_duplicate_keys).raw_decode
    # "\n" ends a line (a "\r" before it is whitespace to json); str.splitlines would also split at
    # U+2028 and other separators, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        try:
            try:
                row, end = decode(line)
                if end < len(line) and not line[end:].isspace():
                    raise json.JSONDecodeError("Extra data", line, end)
            except json.JSONDecodeError:
                try:  # json.loads also takes leading whitespace, and words the error
                    row = json.loads(line, object_pairs_hook=_refuse_duplicate_keys)
                except json.JSONDecodeError as err:
                    raise DataError(f"{name}:{number}: malformed JSON ({err.msg})") from None
        except _DuplicateKey as err:
            raise DataError(
                f"{name}:{number}: duplicate key {err.args[0]!r} in one JSON object (only the last "
                "value would be read); keep one"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _parquet_rows(name: str, content: bytes | None):
    """(row number, record) for each row; the columns are checked once, up front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if content is None and not Path(name).exists():
        raise DataError(f"{name}: file not found")
    try:
        table = pq.read_table(io.BytesIO(content) if content is not None else name)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{name}: not a readable Parquet file ({err})") from None
    columns = table.column_names
    if "messages" not in columns and "conversations" not in columns and not set(PAIR_FIELDS) <= set(columns):
        raise DataError(f"{name}: columns {columns}; expected {SHAPES}")
    yield from enumerate(table.to_pylist(), start=1)


def _turns(row: dict, where: str) -> list[dict]:
    """The row's turns, normalised and checked; a pair becomes [system?, user, assistant]."""
    if "conversations" in row and "messages" not in row:
        return _checked_order(_sharegpt(row["conversations"], where), where, "conversations")
    if "messages" not in row:
        missing = [f for f in PAIR_FIELDS if f not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; each row needs {SHAPES}")
        for name in ("system", *PAIR_FIELDS):
            value = row.get(name)
            if value is not None and type(value) is not str:
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        # a null becomes "" in the turns (always strings, for the tokenizer) and stays null in the
        # prompt/response columns, where the contract reports every null row at once
        turns = [
            {"role": "user", "content": row["prompt"] or ""},
            {"role": "assistant", "content": row["response"] or ""},
        ]
        return [{"role": "system", "content": row["system"]}, *turns] if row.get("system") is not None else turns
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field 'messages' must be a list of {{role, content}} turns, got {type(messages).__name__}"
        )
    return _checked_order(
        [_message(turn, where, f"messages[{i}]") for i, turn in enumerate(messages)], where, "messages"
    )


def _checked_order(turns: list[dict], where: str, field: str) -> list[dict]:
    if len(turns) == 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant" and len(turns[1]) == 2:
        return turns  # one plain exchange, the common case
    if not turns:
        raise DataError(f"{where}: field '{field}' is empty; expected {ROLE_ORDER}")
    roles = [t["role"] for t in turns]
    expected = {"user"}  # what may come next
    for turn in turns[1:] if roles[0] == "system" else turns:
        if turn["role"] not in expected:
            break
        role = turn["role"]
        expected = (
            {"assistant"}
            if role == "user"
            else {"tool"}
            if "tool_calls" in turn
            else {"user"}
            if role == "assistant"
            else {"tool", "assistant"}
        )
    else:
        if roles[-1] == "assistant":
            if all(t.get("train", True) is False for t in turns if t["role"] == "assistant"):
                raise DataError(
                    f"{where}: field '{field}': every assistant turn is marked not trained (train false "
                    "or weight 0): the row teaches nothing; drop it or train a turn"
                )
            return turns
    raise DataError(f"{where}: field '{field}': role order {roles}; expected {ROLE_ORDER}")


def _message(turn, where: str, at: str) -> dict:
    """One message normalised (see the module docstring), or a DataError naming the field."""
    if type(turn) is dict and len(turn) == 2:  # the common case: {"role", "content"}, nothing else to check
        role, content = turn.get("role"), turn.get("content")
        if role in ROLES and type(content) is str:
            return {"role": role, "content": content}
    if not isinstance(turn, dict) or "role" not in turn:
        raise DataError(f"{where}: field '{at}' must be an object with 'role' and 'content'")
    role = turn["role"]
    if role not in ROLES:
        raise DataError(f"{where}: field '{at}.role': unknown role {role!r}; expected one of {list(ROLES)}")
    unknown = [k for k in turn if k not in MESSAGE_FIELDS]
    if unknown:
        raise DataError(
            f"{where}: field '{at}.{unknown[0]}': not a field a message may carry "
            f"({', '.join(MESSAGE_FIELDS)}); rename or remove it (an unknown field is never dropped silently)"
        )
    message = {"role": role}
    calls = turn.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise DataError(
                f"{where}: field '{at}.tool_calls': only an assistant turn calls tools, this is a {role} turn"
            )
        if not isinstance(calls, list):
            raise DataError(f"{where}: field '{at}.tool_calls' must be a list of calls, got {type(calls).__name__}")
    if "content" not in turn and not calls:
        raise DataError(f"{where}: field '{at}' must be an object with 'role' and 'content'")
    content = turn.get("content")
    if isinstance(content, list):
        content = _text_parts(content, where, f"{at}.content")
    elif content is None and calls:
        content = ""  # an assistant turn that only calls tools
    elif type(content) is not str:
        raise DataError(
            f"{where}: field '{at}.content' must be a string, got {type(content).__name__}"
            + (" (null only on an assistant turn with tool_calls)" if content is None else "")
        )
    message["content"] = content
    reasoning = {k: turn[k] for k in ("reasoning_content", "thinking") if turn.get(k) is not None}
    if reasoning:
        key, value = next(iter(reasoning.items()))
        if role != "assistant":
            raise DataError(f"{where}: field '{at}.{key}': reasoning on a {role} turn; only assistant turns carry it")
        if len(set(map(str, reasoning.values()))) > 1:
            raise DataError(f"{where}: fields '{at}.reasoning_content' and '{at}.thinking' differ; keep one")
        if type(value) is not str:
            raise DataError(f"{where}: field '{at}.{key}' must be a string, got {type(value).__name__}")
        message["reasoning_content"] = value
    if calls:
        message["tool_calls"] = [_tool_call(call, where, f"{at}.tool_calls[{k}]") for k, call in enumerate(calls)]
    for key in ("name", "tool_call_id"):
        value = turn.get(key)
        if value is None:
            continue
        if key == "tool_call_id" and role != "tool":
            raise DataError(
                f"{where}: field '{at}.tool_call_id': only a tool turn answers a call, this is a {role} turn"
            )
        if type(value) is not str:
            raise DataError(f"{where}: field '{at}.{key}' must be a string, got {type(value).__name__}")
        message[key] = value
    if _trained(turn, where, at) is False and role == "assistant":
        message["train"] = False
    return message


def _trained(turn: dict, where: str, at: str) -> bool | None:
    """The turn's training flag: `train` (true/false) or `weight` (1/0); None when it has neither."""
    flags = []
    train, weight = turn.get("train"), turn.get("weight")
    if train is not None:
        if type(train) is not bool:
            raise DataError(f"{where}: field '{at}.train' must be true or false, got {train!r}")
        flags.append(("train", train))
    if weight is not None:
        if type(weight) not in (int, float) or weight not in (0, 1):
            raise DataError(
                f"{where}: field '{at}.weight' must be 0 (not trained) or 1 (trained), got {weight!r}: "
                "training has no partial weights; drop the turn's flag or the row"
            )
        flags.append(("weight", weight == 1))
    if len({v for _, v in flags}) > 1:
        raise DataError(f"{where}: fields '{at}.train' and '{at}.weight' disagree; keep one")
    if not flags:
        return None
    key, value = flags[0]
    if value and turn.get("role", "assistant") != "assistant":
        raise DataError(
            f"{where}: field '{at}.{key}': only assistant turns are trained, this is a {turn['role']} "
            "turn; remove the flag (its text is context the model reads)"
        )
    return value


def _text_parts(parts: list, where: str, at: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or type(part.get("text")) is not str:
            what = f"a {kind!r} part" if kind else 'not a {"type": "text", "text": ...} part'
            raise DataError(
                f"{where}: field '{at}[{j}]': {what}; only text parts are trained (drop the part, or the row)"
            )
        texts.append(part["text"])
    return "".join(texts)


def _tool_call(call, where: str, at: str) -> dict:
    """An OpenAI tool call {"type": "function", "function": {"name", "arguments": dict}} (+ its id)."""
    if not isinstance(call, dict):
        raise DataError(f"{where}: field '{at}' must be an object, got {type(call).__name__}")
    outer = ("id", "type", "function") if "function" in call else ("id", "type", "name", "arguments")
    unknown = [k for k in call if k not in outer]
    if unknown:
        raise DataError(f"{where}: field '{at}.{unknown[0]}': not a field of a tool call ({', '.join(outer)})")
    if call.get("type") not in (None, "function"):
        raise DataError(f"{where}: field '{at}.type': {call['type']!r}; only function calls are supported")
    function, fat = (call["function"], f"{at}.function") if "function" in call else (call, at)
    if not isinstance(function, dict):
        raise DataError(f"{where}: field '{fat}' must be an object with 'name' and 'arguments'")
    unknown = [k for k in function if k not in ("name", "arguments") and function is not call]
    if unknown:
        raise DataError(f"{where}: field '{fat}.{unknown[0]}': not a field of a function call (name, arguments)")
    name = function.get("name")
    if type(name) is not str or not name:
        raise DataError(f"{where}: field '{fat}.name' must be the function's name, got {name!r}")
    arguments = function.get("arguments")
    if type(arguments) is str:
        try:
            arguments = json.loads(arguments, object_pairs_hook=_refuse_duplicate_keys) if arguments.strip() else {}
        except (json.JSONDecodeError, _DuplicateKey) as err:
            why = f"duplicate key {err.args[0]!r}" if isinstance(err, _DuplicateKey) else f"malformed JSON ({err.msg})"
            raise DataError(f"{where}: field '{fat}.arguments': {why}; write the arguments as a JSON object") from None
    if not isinstance(arguments, dict):
        raise DataError(
            f"{where}: field '{fat}.arguments' must be a JSON object (or a string holding one), "
            f"got {type(arguments).__name__}"
        )
    normalised = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        if type(call["id"]) is not str:
            raise DataError(f"{where}: field '{at}.id' must be a string, got {type(call['id']).__name__}")
        normalised["id"] = call["id"]
    return normalised


def _tools(tools, where: str) -> list[dict] | None:
    """The row's tool specs in OpenAI form [{"type": "function", "function": {"name", ...}}]."""
    if isinstance(tools, str):  # LLaMA-Factory writes the list as a JSON string
        try:
            tools = json.loads(tools, object_pairs_hook=_refuse_duplicate_keys) if tools.strip() else []
        except (json.JSONDecodeError, _DuplicateKey):
            raise DataError(f"{where}: field 'tools': a string that is not a JSON list of function specs") from None
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of function specs, got {type(tools).__name__}")
    specs = []
    for k, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        named = isinstance(spec, dict) and type(spec.get("name")) is str
        if not named or tool.get("type") not in (None, "function"):
            raise DataError(
                f"{where}: field 'tools[{k}]' must be a function spec "
                '{"type": "function", "function": {"name", "description", "parameters"}}'
            )
        specs.append({"type": "function", "function": spec})
    return specs or None


def _sharegpt(conversations, where: str) -> list[dict]:
    """ShareGPT's [{"from", "value"}] as normalised messages, each `from` mapped to a role."""
    if not isinstance(conversations, list):
        raise DataError(
            f"{where}: field 'conversations' must be a list of {{from, value}} turns, "
            f"got {type(conversations).__name__}"
        )
    messages = []
    for i, turn in enumerate(conversations):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: field '{at}' must be an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: field '{at}.from': unknown speaker {turn['from']!r}; expected one of {list(SHAREGPT_ROLES)}"
            )
        unknown = [k for k in turn if k not in SHAREGPT_FIELDS]
        if unknown:
            raise DataError(
                f"{where}: field '{at}.{unknown[0]}': not a field a ShareGPT turn may carry "
                f"({', '.join(SHAREGPT_FIELDS)}); rename or remove it (an unknown field is never dropped "
                "silently)"
            )
        value = turn["value"]
        if turn["from"] == "function_call":
            message = {"role": "assistant", "content": "", "tool_calls": _function_call_value(value, where, at)}
        elif type(value) is not str:
            raise DataError(f"{where}: field '{at}.value' must be a string, got {type(value).__name__}")
        else:
            message = {"role": SHAREGPT_ROLES[turn["from"]], "content": value}
        message.update({k: turn[k] for k in ("name", "train", "weight") if turn.get(k) is not None})
        messages.append(_message(message, where, at))
    return messages


def _function_call_value(value, where: str, at: str) -> list[dict]:
    """A ShareGPT function_call turn's value: {"name", "arguments"} or a list of them, as JSON text."""
    if type(value) is str:
        try:
            value = json.loads(value, object_pairs_hook=_refuse_duplicate_keys)
        except (json.JSONDecodeError, _DuplicateKey):
            value = None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise DataError(
            f'{where}: field \'{at}.value\': a function_call turn holds {{"name", "arguments"}} as '
            "JSON (or a list of them)"
        )
    return [
        _tool_call(call, where, f"{at}.value[{k}]" if isinstance(value, list) else f"{at}.value")
        for k, call in enumerate(calls)
    ]
