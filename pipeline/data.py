"""The one loader of training data, and its normalised in-memory form.

Accepted files (data.train, data.replay, the eval sets), JSONL (one object a line) or Parquet:
  - `prompt` and `response`, optional `system`: one exchange;
  - OpenAI-style `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...];
either shape with an optional `source`; other fields are ignored.

Every file becomes one DataFrame indexed by `row` (the 1-based line number of a JSONL file, the
1-based row number of a Parquet file) with columns
  - `messages`: an optional system turn, then user and assistant turns alternating, ending with
    an assistant turn (what prepare renders through the chat template);
  - `prompt`, `response`: the user turns and the assistant turns, each joined with "\\n" (what the
    contract checks for blanks, lengths, duplicates, leakage and PII);
  - `source`: only when the file has that field.
A file that cannot be read this way is refused here, before any expectation runs, with a
DataError naming the file, the line (or row) and the field. Nulls and blank strings in
`prompt`/`response` pass through (a null is "" in `messages`): the contract reports them with
every offending line at once.
"""

from __future__ import annotations

import gc
import io
import json
from pathlib import Path

import pandas as pd

from pipeline.files import DataError

PAIR_FIELDS = ("prompt", "response")
ROLES = ("system", "user", "assistant")
SHAPES = "'prompt' and 'response' (optional 'system', 'source'), or 'messages' (optional 'source')"
ROLE_ORDER = "an optional system turn, then user and assistant turns alternating, ending with an assistant turn"


def load_examples(path: str | Path, text: str | bytes | None = None) -> pd.DataFrame:
    """The examples of a JSONL or Parquet file (by suffix), normalised as the module says.
    With `text`, parse that content (another revision's file) and use `path` only to name it."""
    name = str(path)
    # by suffix, or by Parquet's magic number for another revision's content named "file@rev"
    parquet = name.endswith(".parquet") or (isinstance(text, bytes) and text[:4] == b"PAR1")
    rows = _parquet_rows(name, text) if parquet else _jsonl_rows(name, text)
    numbers, messages, prompts, responses, sources = [], [], [], [], []
    has_source = False
    gc.disable()  # millions of small dicts: the cyclic collector would rescan them over and over
    try:
        for number, row in rows:
            prompt, response = row.get("prompt"), row.get("response")
            if type(prompt) is str and type(response) is str and "messages" not in row and "system" not in row:
                # the common case, a plain pair of strings: nothing to check (a million rows a few seconds)
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            else:
                turns = _turns(row, _where(name, number, parquet))
                if "messages" in row:
                    prompt = "\n".join(t["content"] for t in turns if t["role"] == "user")
                    response = "\n".join(t["content"] for t in turns if t["role"] == "assistant")
            source = row.get("source")
            if source is not None and type(source) is not str:
                raise DataError(f"{_where(name, number, parquet)}: field 'source' must be a string, "
                                f"got {type(source).__name__}")
            has_source = has_source or "source" in row
            numbers.append(number)
            messages.append(turns)
            prompts.append(prompt)  # a null stays null, for the contract's not-null expectation
            responses.append(response)
            sources.append(source)
    finally:
        gc.enable()
    if not numbers:
        raise DataError(f"{name}: empty file (no rows)")
    columns = {"messages": messages, "prompt": prompts, "response": responses}
    if has_source:
        columns["source"] = sources
    return pd.DataFrame(columns, index=pd.Index(numbers, name="row"))


def _where(name: str, number: int, parquet: bool) -> str:
    return f"{name} row {number}" if parquet else f"{name}:{number}"


def _jsonl_rows(name: str, text: str | bytes | None):
    """(line number, object) for each non-blank line."""
    if text is None:
        path = Path(name)
        if not path.exists():
            raise DataError(f"{name}: file not found")
        text = path.read_bytes()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            line = text[: err.start].count(b"\n") + 1
            raise DataError(f"{name}:{line}: not valid UTF-8 ({err.reason})") from None
    decode = json.JSONDecoder().raw_decode  # json.loads less its per-call checks: 40% faster
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line.isspace():
            continue
        try:
            row, end = decode(line)
            if end < len(line) and not line[end:].isspace():
                raise json.JSONDecodeError("Extra data", line, end)
        except json.JSONDecodeError:
            try:  # json.loads also takes leading whitespace, and words the error
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}:{number}: malformed JSON ({err.msg})") from None
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
    if "messages" not in columns and not set(PAIR_FIELDS) <= set(columns):
        raise DataError(f"{name}: columns {columns}; expected {SHAPES}")
    yield from enumerate(table.to_pylist(), start=1)


def _turns(row: dict, where: str) -> list[dict]:
    """The row's turns as [{"role", "content"}], checked; a pair becomes [system?, user, assistant]."""
    if "messages" not in row:
        missing = [f for f in PAIR_FIELDS if f not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; each row needs {SHAPES}")
        for field in ("system", *PAIR_FIELDS):
            value = row.get(field)
            if value is not None and type(value) is not str:
                raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        # a null becomes "" in the turns (always strings, for the tokenizer) and stays null in the
        # prompt/response columns, where the contract reports every null row at once
        turns = [{"role": "user", "content": row["prompt"] or ""}, {"role": "assistant", "content": row["response"] or ""}]
        return [{"role": "system", "content": row["system"]}, *turns] if row.get("system") is not None else turns
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} turns, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field 'messages' is empty; expected {ROLE_ORDER}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: field 'messages[{i}].role': unknown role {turn['role']!r}; "
                            f"expected one of {list(ROLES)}")
        if type(turn["content"]) is not str:
            raise DataError(f"{where}: field 'messages[{i}].content' must be a string, "
                            f"got {type(turn['content']).__name__}")
        turns.append({"role": turn["role"], "content": turn["content"]})  # extra keys (name, ...) dropped
    roles = [t["role"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2):  # odd lengths differ too
        raise DataError(f"{where}: field 'messages': role order {roles}; expected {ROLE_ORDER}")
    return turns
