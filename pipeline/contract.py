"""validate: the data contract, as great-expectations suites over the training (and replay) data.

The suites are built from params.yaml (validate section, plus prepare.max_seq_len and
prepare.replay_share): volume, per-source minimums; no nulls or blank fields; character and
token-length bounds; no exact or near-duplicate (prompt, response) pairs; no training prompt that
appears in an eval set (exactly, or sharing an n-gram); no PII or secrets; little boilerplate; a
replay share within the method's band. Checks that need more than one column, a tokenizer or a
regular-expression scan are derived columns computed here, vectorised (pyarrow's RE2, numpy),
that plain expectations then test: GX's own regex expectations run Python's `re` row by row, 77 s
of a million-row run (benchmarks/contract_1m.py). Rows are indexed by line (JSONL) or row
(Parquet) number, so every failure names file, row and field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.files import read_jsonl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
FIELDS = ("prompt", "response")
MAX_EXAMPLES = 5
# RE2 syntax (pyarrow): a look-around such as (?<!\d) is written (?:^|\D), the same for a search
PII_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "phone": r"(?:^|\D)(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?:\D|$)",
    "card": r"(?:^|\D)(?:\d{4}[ -]){3}\d{1,4}(?:\D|$)|(?:^|\D)\d{15,16}(?:\D|$)",
    "api_key": r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}|"
               r"xox[baprs]-[A-Za-z0-9-]{10,})",
}
BOILERPLATE_PATTERNS = [  # matched case-insensitively
    r"\bas an ai(?: language)? model\b",
    r"^\s*i(?:'m| am) sorry,? but\b",
    r"\bi (?:cannot|can't|am unable to) (?:help|assist|comply) with\b",
]
TOKENS_OUTSIDE_TEXT = 8  # a tokenizer's post-processor may add BOS/EOS that no byte of the text stands for
# Python's \s (str.isspace) besides " ", and what [^\w\s] strips, in RE2 terms (pyarrow)
_OTHER_SPACE = r"\t\n\v\f\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_PUNCT = rf"[^\p{{L}}\p{{N}}_ {_OTHER_SPACE}]"
_SPACE_RUN = rf"[ {_OTHER_SPACE}]{{2,}}|[{_OTHER_SPACE}]"  # a single " " is left alone: the common case, fast
_PAIR = pa.scalar("\x1f", pa.large_string())  # joins prompt and response into one key


def normalize(values) -> pa.Array:
    """Lower case, punctuation dropped, whitespace collapsed (Python's `[^\\w\\s]` and `\\s+`); a null is ""."""
    text = pa.array(values, type=pa.large_string())
    if isinstance(text, pa.ChunkedArray):  # a pandas column backed by pyarrow comes chunked
        text = text.combine_chunks()
    text = pc.replace_substring_regex(pc.utf8_lower(pc.fill_null(text, "")), _PUNCT, "")
    return pc.utf8_trim(pc.replace_substring_regex(text, _SPACE_RUN, " "), " ")


def normalized_pairs(frame: pd.DataFrame, prompts: pa.Array | None = None) -> pd.Series:
    """One key per (prompt, response) that ignores case, whitespace and punctuation."""
    prompts = normalize(frame["prompt"]) if prompts is None else prompts
    key = pc.binary_join_element_wise(prompts, normalize(frame["response"]), _PAIR)
    return key.to_pandas().set_axis(frame.index)  # stays in Arrow memory: no million Python strings


def eval_prompts(paths: list[str]) -> list[str]:
    """The prompts of the eval sets: JSONL rows with a `prompt` (references, if any, are named by
    each lm-eval task, so no other field is required)."""
    return [row["prompt"] for path in paths for row in read_jsonl(path, required=("prompt",))]


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _ngram_hashes(texts: pa.ListArray, vocabulary: pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of every word n-gram inside one text, and the text it comes from."""
    unknown = len(vocabulary)  # words outside the vocabulary share one id: they cannot match anyway
    ids = pc.fill_null(pc.index_in(texts.flatten(), value_set=vocabulary), unknown).to_numpy()
    owner = np.repeat(np.arange(len(texts)), np.diff(texts.offsets.to_numpy()))
    count = len(ids) - n + 1
    if count <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    ids = ids.astype(np.uint64) + np.uint64(1)
    digest = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the hash
        for k in range(n):  # in place: a million prompts make tens of millions of n-grams
            np.multiply(digest, np.uint64(1_000_003), out=digest)
            np.add(digest, ids[k:k + count], out=digest)
    inside = owner[:count] == owner[n - 1:]  # windows that do not cross into the next text
    return digest[inside], owner[:count][inside]


def leaks_eval(prompts: pa.Array, held_out: list[str], n: int) -> np.ndarray:
    """Whether each (normalised) prompt equals a held-out prompt or shares an n-word sequence with one.
    N-grams are compared by hash, then every hit is confirmed on the words (no false alarm)."""
    exact = normalize(held_out)
    leaks = pc.is_in(prompts, value_set=exact).to_numpy(zero_copy_only=False)
    if not held_out:
        return leaks
    held = pc.split_pattern(exact, " ")
    prompts = pc.split_pattern(prompts, " ")
    vocabulary = pc.unique(held.flatten())
    held_hashes = np.unique(_ngram_hashes(held, vocabulary, n)[0])
    if len(held_hashes) == 0:  # no eval prompt is n words long
        return leaks
    hashes, owner = _ngram_hashes(prompts, vocabulary, n)
    candidates = np.unique(owner[pd.Series(hashes).isin(held_hashes).to_numpy()])  # a hash table: O(n)
    if len(candidates):
        grams = set().union(*(ngrams(h, n) for h in held.to_pylist()))
        for i in candidates:
            leaks[i] = leaks[i] or not grams.isdisjoint(ngrams(prompts[int(i)].as_py(), n))
    return leaks


def blank(values: pd.Series) -> np.ndarray:
    """Whether each text is empty or only whitespace (a null is not blank: it is reported as null)."""
    text = pa.array(values, type=pa.large_string())
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False).to_numpy(zero_copy_only=False)


def matches_any(values: pd.Series, patterns: list[str], ignore_case: bool = False) -> np.ndarray:
    text = pa.array(values, type=pa.large_string())
    hit = pc.match_substring_regex(text, "|".join(f"(?:{p})" for p in patterns), ignore_case=ignore_case)
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)


def token_lengths_within(tokenizer, frame: pd.DataFrame, limit: int, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Each example's tokens after the chat template where it could exceed `limit`; elsewhere an
    upper bound that is <= `limit`. So `result > limit` is exactly the examples training truncates.

    Tokenizing a million examples takes minutes on 2 cores, and most are far below the limit. A
    BPE or SentencePiece token covers at least one byte of the text, so the bytes of the contents,
    plus those of the template around them, plus a margin for tokens a post-processor adds, bound
    the count. Rows whose bound exceeds `limit` are tokenized (pipeline.prepare.token_lengths, the
    count training sees), and so is a sample of the rest, which must keep to its bound, or every
    row is tokenized."""
    from pipeline.prepare import token_lengths

    shapes = frame["messages"].map(lambda turns: tuple(t["role"] for t in turns))
    template = {shape: _template_bytes(tokenizer, shape) for shape in shapes.unique()}
    # prompt and response join the user and assistant turns: their bytes, and a newline between
    contents = sum(pc.fill_null(pc.binary_length(pa.array(frame[f], type=pa.large_string())), 0).to_numpy()
                   for f in FIELDS)
    system = frame["messages"].map(lambda turns: len(turns[0]["content"].encode()) if turns[0]["role"] == "system"
                                   else 0).to_numpy()
    bound = contents + system + shapes.map(template).to_numpy() + TOKENS_OUTSIDE_TEXT
    exact = np.flatnonzero(bound > limit)
    rest = np.flatnonzero(bound <= limit)
    checked = np.random.default_rng(seed).choice(rest, min(sample, len(rest)), replace=False)
    rows = np.concatenate([exact, checked])
    lengths = token_lengths(tokenizer, frame["messages"].iloc[rows].tolist())
    if (lengths[len(exact):] > bound[checked]).any():  # this tokenizer breaks the premise: count every row
        return np.asarray(token_lengths(tokenizer, frame["messages"].tolist()))
    bound[rows] = lengths
    return bound


def _template_bytes(tokenizer, roles: tuple[str, ...]) -> int:
    """Bytes the chat template adds around the contents of a conversation with these roles."""
    from pipeline.prepare import TEMPLATE_VARIABLES

    text = tokenizer.apply_chat_template([{"role": r, "content": "x"} for r in roles], tokenize=False,
                                         **TEMPLATE_VARIABLES)
    return len(text.encode()) - len(roles)


def replay_share(train_rows: int, replay_rows: int, share: float, seed: int) -> float:
    """The replay share of the mixed training set, computed by prepare's own mix_replay."""
    from pipeline.prepare import mix_replay

    mixed = len(mix_replay(list(range(train_rows)), list(range(replay_rows)), share, seed))
    return (mixed - train_rows) / mixed


def add_derived_columns(frame: pd.DataFrame, held_out: list[str], ngram: int, tokens: np.ndarray) -> pd.DataFrame:
    """The columns the suite checks besides the fields: pair keys, leakage, PII, boilerplate, tokens."""
    prompts = normalize(frame["prompt"])
    derived = {
        "blank_prompt": blank(frame["prompt"]),
        "blank_response": blank(frame["response"]),
        "normalized_pair": normalized_pairs(frame, prompts),
        "leaks_eval": leaks_eval(prompts, held_out, ngram),
        "pii_in_prompt": matches_any(frame["prompt"], list(PII_PATTERNS.values())),
        "pii_in_response": matches_any(frame["response"], list(PII_PATTERNS.values())),
        "boilerplate": matches_any(frame["response"], BOILERPLATE_PATTERNS, ignore_case=True),
        "tokens": tokens,
    }
    if "source" in frame:
        derived["source_rows"] = frame.groupby("source", dropna=False)["prompt"].transform("size").to_numpy()
    return frame.assign(**derived)


def add_replay_columns(replay: pd.DataFrame, train_rows: int, share: float, seed: int) -> pd.DataFrame:
    """The columns the replay suite checks: blank fields, and the share the mix will have."""
    return replay.assign(blank_prompt=blank(replay["prompt"]), blank_response=blank(replay["response"]),
                         mixed_share=replay_share(train_rows, len(replay), share, seed))


def _expect(kind, check: str, field: str | None, how_to_fix: str, **kwargs):
    """An expectation that carries, in its meta, what a reviewer reads in the report."""
    return kind(**kwargs, meta={"check": check, "field": field, "how_to_fix": how_to_fix}, description=check)


def build_suite(cfg, max_seq_len: int, has_source: bool):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="sft_train")
    add = suite.add_expectation
    add(_expect(gxe.ExpectTableRowCountToBeBetween, "row count", None,
                "add examples (the method wants more than 10k) or change validate.min_rows",
                min_value=cfg.min_rows, max_value=cfg.max_rows))
    if has_source:
        add(_expect(gxe.ExpectColumnValuesToNotBeNull, "every row names its source", "source",
                    "fill the missing source", column="source"))
        add(_expect(gxe.ExpectColumnValuesToBeBetween, "rows per source", "source",
                    "add examples from the small source, drop it, or lower validate.min_rows_per_source",
                    column="source_rows", min_value=cfg.min_rows_per_source))
    max_chars = {"prompt": cfg.max_prompt_chars, "response": cfg.max_response_chars}
    for field in FIELDS:
        add(_expect(gxe.ExpectColumnValuesToNotBeNull, "no nulls", field, "fill or drop rows with a missing field",
                    column=field))
        add(_expect(gxe.ExpectColumnValuesToBeInSet, "no blank strings", field,
                    "fill or drop rows whose field is blank", column=f"blank_{field}", value_set=[False]))
        add(_expect(gxe.ExpectColumnValueLengthsToBeBetween, "characters", field,
                    f"shorten or drop the rows, or raise validate.max_{field}_chars",
                    column=field, min_value=cfg.min_chars, max_value=max_chars[field]))
    add(_expect(gxe.ExpectColumnValuesToBeBetween, "tokens after the chat template (longer ones are truncated)",
                "messages", "shorten or drop long examples, or raise prepare.max_seq_len (or lower validate.min_fit_share)",
                column="tokens", max_value=max_seq_len, mostly=cfg.min_fit_share))
    add(_expect(gxe.ExpectCompoundColumnsToBeUnique, "exact duplicate pairs", "prompt,response",
                "drop the repeated (prompt, response) pairs", column_list=list(FIELDS)))
    add(_expect(gxe.ExpectColumnValuesToBeUnique, "near-duplicate pairs (case, whitespace and punctuation ignored)",
                "prompt,response", "drop near-duplicates: they over-weight one example", column="normalized_pair"))
    add(_expect(gxe.ExpectColumnValuesToBeInSet, "training prompt also in an eval set (exact or shared n-gram)",
                "prompt", "remove eval items from the training data: they inflate the golden score",
                column="leaks_eval", value_set=[False]))
    for field in FIELDS:
        add(_expect(gxe.ExpectColumnValuesToBeInSet, "PII or secrets (e-mail, phone, card number, API key)", field,
                    "scrub or drop the rows, or raise validate.max_pii_share",
                    column=f"pii_in_{field}", value_set=[False], mostly=1 - cfg.max_pii_share))
    add(_expect(gxe.ExpectColumnValuesToBeInSet, "boilerplate responses (stock refusals, 'as an AI model')",
                "response", "rewrite or drop the responses, or raise validate.max_boilerplate_share",
                column="boilerplate", value_set=[False], mostly=1 - cfg.max_boilerplate_share))
    return suite


def build_replay_suite(cfg):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="sft_replay")
    for field in FIELDS:
        suite.add_expectation(_expect(gxe.ExpectColumnValuesToNotBeNull, "replay: no nulls", field,
                                      "fill or drop the replay rows with a missing field", column=field))
        suite.add_expectation(_expect(gxe.ExpectColumnValuesToBeInSet, "replay: no blank strings", field,
                                      "fill or drop the replay rows whose field is blank",
                                      column=f"blank_{field}", value_set=[False]))
    # one number for the whole mix, carried as a constant column so GX reports it with the rest
    suite.add_expectation(_expect(
        gxe.ExpectColumnMaxToBeBetween, "replay share of the mixed training set", "replay",
        "set prepare.replay_share inside validate.min_replay_share..max_replay_share (the method: 10-20%)",
        column="mixed_share", min_value=cfg.min_replay_share, max_value=cfg.max_replay_share))
    return suite


def run_suite(frame: pd.DataFrame, cfg, max_seq_len: int, replay: pd.DataFrame | None = None,
              docs_dir: Path | None = None) -> list[dict]:
    """One record per expectation: what it checks, what it saw, pass/fail, first offending rows.
    `replay` (with its `mixed_share` column) is validated by its own suite; `docs_dir` gets Data Docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="contract", site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
        })
    source = context.data_sources.add_pandas("data")
    batches = [("train", frame, build_suite(cfg, max_seq_len, "source" in frame))]
    if replay is not None:
        batches.append(("replay", replay, build_replay_suite(cfg)))
    checks = []
    for name, data, suite in batches:
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=name, suite=context.suites.add(suite),
            data=source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")))
        # SUMMARY: the count and the first rows; COMPLETE would list every bad row of a bad million
        result = definition.run(batch_parameters={"dataframe": data},
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
        checks += [{"data": name, **_check(r)} for r in result.results]
    if docs_dir is not None:
        context.build_data_docs(site_names=["contract"])
    return checks


def _check(r) -> dict:
    config = r.expectation_config
    kwargs = config.kwargs
    details = r.result or {}
    rows = [int(i["row"]) if isinstance(i, dict) else int(i)  # dicts name the index, "row"
            for i in details.get("partial_unexpected_index_list") or []]
    threshold = {k: _plain(kwargs[k]) for k in ("min_value", "max_value", "mostly") if kwargs.get(k) is not None}
    if kwargs.get("value_set") is not None:  # a flag column: what share may be flagged
        threshold = {"max_share": round(1 - threshold.pop("mostly", 1.0), 6)}
    observed = details.get("observed_value")
    if observed is None:
        observed = details.get("unexpected_count", 0)
    return {
        "expectation": config.type,
        "check": config.meta["check"],
        "field": config.meta["field"],
        "threshold": threshold,
        "observed": _plain(observed),
        "failing_share": round(details.get("unexpected_percent", 0.0) / 100, 6) if "unexpected_percent" in details
        else None,
        "passed": bool(r.success),
        "rows": rows,
        "failing_rows": details.get("unexpected_count", 0),
        "how_to_fix": config.meta["how_to_fix"],
    }


def _plain(value):
    """4.0 -> 4, 0.150021249 -> 0.15: numbers as a reader writes them."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 4)
    return value


def _unit(path: str) -> str:
    return "row(s)" if str(path).endswith(".parquet") else "line(s)"


def failure_message(files: dict[str, str], checks: list[dict]) -> str:
    """`files` names the file behind each batch ("train", "replay")."""
    lines = [f"{files['train']}: data contract failed"]
    for c in checks:
        if c["passed"]:
            continue
        path = files[c["data"]]
        where = f" at {_unit(path)} {', '.join(map(str, c['rows']))}" if c["rows"] else ""
        more = f" (+{c['failing_rows'] - len(c['rows'])} more)" if c["failing_rows"] > len(c["rows"]) else ""
        field = f" field '{c['field']}'" if c["field"] else ""
        expected = f", expected {c['threshold']}" if c["threshold"] else ""
        lines.append(f"  {path}: {c['expectation']} ({c['check']}){field}: observed {c['observed']}{expected}"
                     f"{where}{more}")
    return "\n".join(lines)


def render_markdown(files: dict[str, str], checks: list[dict]) -> str:
    passed = all(c["passed"] for c in checks)
    named = ", ".join(f"`{files[d]}`" for d in dict.fromkeys(c["data"] for c in checks))
    lines = [f"## Data contract: {'PASSED' if passed else 'FAILED'} ({named})", "",
             "| file | check | field | expected | observed | result | first lines (JSONL) or rows (Parquet) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        expected = ", ".join(f"{k}={v}" for k, v in c["threshold"].items()) or "-"
        observed = f"{c['observed']} ({c['failing_share']:.2%})" if c["failing_share"] else c["observed"]
        lines.append(f"| {Path(files[c['data']]).name} | {c['check']} | {c['field'] or '-'} | {expected} | "
                     f"{observed} | {'pass' if c['passed'] else '**FAIL**'} | "
                     f"{', '.join(map(str, c['rows'])) or '-'} |")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines += ["", "How to fix:", ""]
        lines += [f"- {c['check']} ({Path(files[c['data']]).name}, {c['field'] or 'table'}): {c['how_to_fix']}"
                  for c in failed]
    return "\n".join(lines) + "\n"
