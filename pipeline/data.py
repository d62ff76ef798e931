"""The one loader of training data, and its normalised in-memory form.

Accepted files (data.train, data.replay, the eval sets): JSONL (one object a line; `.jsonl` or
`.json`, gzip-compressed as `.gz`; a UTF-8 byte-order mark and CRLF line ends are fine) or Parquet,
each row in one of these shapes:
  - `prompt` and `response`, optional `system`: one exchange;
  - OpenAI-style `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...];
  - ShareGPT-style `conversations`: [{"from": "system"|"human"|"gpt" (or "user"|"assistant"), "value": str}, ...];
any shape with an optional `source`; other fields are ignored. Any other format (CSV, a JSON array,
...) is refused naming the format.

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
import gzip
import io
import json
from pathlib import Path

import pandas as pd

from pipeline.files import DataError

PAIR_FIELDS = ("prompt", "response")
ROLES = ("system", "user", "assistant")
# ShareGPT's `from` -> role; exports also write the chat roles themselves
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
SHAPES = ("'prompt' and 'response' (optional 'system', 'source'), 'messages' or ShareGPT 'conversations' "
          "(optional 'source')")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
FORMATS = "JSONL (.jsonl or .json, one object a line; .gz compressed) or Parquet (.parquet)"
ROLE_ORDER = "an optional system turn, then user and assistant turns alternating, ending with an assistant turn"


def load_examples(path: str | Path, text: str | bytes | None = None) -> pd.DataFrame:
    """The examples of a JSONL or Parquet file (by suffix), normalised as the module says.
    With `text`, parse that content (another revision's file) and use `path` only to name it."""
    name = str(path)
    file_name = name.split("@", 1)[0]  # "file@rev": another revision's content
    parquet = file_name.endswith(".parquet") or (isinstance(text, bytes) and text[:4] == b"PAR1")
    if not parquet and not file_name.endswith(JSONL_SUFFIXES):
        suffix = "".join(Path(file_name).suffixes) or "no suffix"
        raise DataError(f"{name}: unsupported format ({suffix}); expected {FORMATS}")
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
                if "messages" in row or "conversations" in row:
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
    frame = pd.DataFrame(columns, index=pd.Index(numbers, name="row"))
    frame.attrs["parquet"] = parquet  # reports say "row N" of a Parquet file, "line N" of JSONL
    return frame


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
        if text[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the name says
            try:
                text = gzip.decompress(text)
            except (OSError, EOFError) as err:
                raise DataError(f"{name}: not a readable gzip file ({err})") from None
        try:
            text = text.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
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
    if "messages" not in columns and "conversations" not in columns and not set(PAIR_FIELDS) <= set(columns):
        raise DataError(f"{name}: columns {columns}; expected {SHAPES}")
    yield from enumerate(table.to_pylist(), start=1)


def _turns(row: dict, where: str, field: str = "messages") -> list[dict]:
    """The row's turns as [{"role", "content"}], checked; a pair becomes [system?, user, assistant]."""
    if "conversations" in row and "messages" not in row:
        return _turns({"messages": _sharegpt(row["conversations"], where)}, where, field="conversations")
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
        turns = [{"role": "user", "content": row["prompt"] or ""}, {"role": "assistant", "content": row["response"] or ""}]
        return [{"role": "system", "content": row["system"]}, *turns] if row.get("system") is not None else turns
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field '{field}' must be a list of {{role, content}} turns, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field '{field}' is empty; expected {ROLE_ORDER}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{i}].role': unknown role {turn['role']!r}; "
                            f"expected one of {list(ROLES)}")
        if type(turn["content"]) is not str:
            raise DataError(f"{where}: field '{field}[{i}].content' must be a string, "
                            f"got {type(turn['content']).__name__}")
        turns.append({"role": turn["role"], "content": turn["content"]})  # extra keys (name, ...) dropped
    roles = [t["role"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2):  # odd lengths differ too
        raise DataError(f"{where}: field '{field}': role order {roles}; expected {ROLE_ORDER}")
    return turns


def _sharegpt(conversations, where: str) -> list[dict]:
    """ShareGPT's [{"from", "value"}] as messages, each `from` mapped to a role."""
    if not isinstance(conversations, list):
        raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}} turns, "
                        f"got {type(conversations).__name__}")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: field 'conversations[{i}]' must be an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: field 'conversations[{i}].from': unknown speaker {turn['from']!r}; expected "
                            f"one of {list(SHAREGPT_ROLES)} (tool turns are not supported)")
        if type(turn["value"]) is not str:
            raise DataError(f"{where}: field 'conversations[{i}].value' must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages
