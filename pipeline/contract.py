"""validate: the data contract, as great-expectations suites over the training (and replay) data.

The suites are built from params.yaml (validate section, plus prepare.max_seq_len and
prepare.replay_share): volume, per-source minimums; no nulls or blank fields, no blank assistant
turn; character and token-length bounds; no exact or near-duplicate (prompt, response) pairs; no
training prompt that appears in an eval set (exactly, or sharing an n-gram); no PII, secrets,
control characters (bidirectional overrides included) or special-token strings of the tokenizer;
little boilerplate; a replay share within the method's band. The replay file is trained on too:
it gets the same suite less the row count, per-source minimums and fuzzy near-duplicates.

Every turn is read (pipeline/data.py builds the fields): `prompt` is the user turns, `response`
every assistant turn with its reasoning and tool-call arguments, `context` (where the data has
any) the system and tool turns. Checks that need more than one column, a tokenizer or a
regular-expression scan are derived columns computed here, vectorised (pyarrow's RE2, numpy),
that plain expectations then test: GX's own regex expectations run Python's `re` row by row, 77 s
of a million-row run (benchmarks/contract_1m.py). GX is handed only those numeric and flag
columns (character counts, pair numbers): it fingerprints every column, seconds for a million
strings. Rows are indexed by line (JSONL) or row (Parquet) number, so every failure names file,
row and field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.files import read_jsonl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
FIELDS = ("prompt", "response")
TEXT_FIELDS = (*FIELDS, "context")  # context: the system and tool turns, where the data has any
MAX_EXAMPLES = 5
# RE2 syntax (pyarrow): a look-around such as (?<!\d) is written (?:^|\D), the same for a search
PII_PATTERNS = {  # what no library covers better; phone numbers and secrets have their own (below)
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "card": r"(?:^|\D)(?:\d{4}[ -]){3}\d{1,4}(?:\D|$)|(?:^|\D)\d{15,16}(?:\D|$)",
}
# Cheap RE2 prefilters: only rows that match go to the libraries (Python, row by row)
_PHONE_CANDIDATE = r"\+?\(?\d[\d ().-]{5,}\d"
# a long key-like run, a PEM header, a keyword assigned a value (detect-secrets' KeywordDetector)
_SECRET_CANDIDATE = (
    r"[A-Za-z0-9+/=_.-]{16,}|-----BEGIN|"
    r"(?i:pass|pwd|secret|key|token|auth|credential|bearer)[\w-]*[\"']?\s*(?::=|=>|[:=])"
)
# Token formats detect-secrets 1.5 does not know (Hugging Face, current OpenAI keys), in RE2
EXTRA_SECRET_PATTERNS = [r"\bhf_[A-Za-z0-9]{30,}", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"]
# detect-secrets' detectors but the high-entropy ones, which flag ordinary prose ("hello world")
SECRET_PLUGINS = (
    "AWSKeyDetector",
    "ArtifactoryDetector",
    "AzureStorageKeyDetector",
    "BasicAuthDetector",
    "CloudantDetector",
    "DiscordBotTokenDetector",
    "GitHubTokenDetector",
    "GitLabTokenDetector",
    "IbmCloudIamDetector",
    "IbmCosHmacDetector",
    "JwtTokenDetector",
    "KeywordDetector",
    "MailchimpDetector",
    "NpmDetector",
    "OpenAIDetector",
    "PrivateKeyDetector",
    "PypiTokenDetector",
    "SendGridDetector",
    "SlackDetector",
    "SoftlayerDetector",
    "SquareOAuthDetector",
    "StripeDetector",
    "TelegramBotTokenDetector",
    "TwilioKeyDetector",
)
BOILERPLATE_PATTERNS = [  # matched case-insensitively
    r"\bas an ai(?: language)? model\b",
    r"^\s*i(?:'m| am) sorry,? but\b",
    r"\bi (?:cannot|can't|am unable to) (?:help|assist|comply) with\b",
]
TOKENS_OUTSIDE_TEXT = 8  # a tokenizer's post-processor may add BOS/EOS that no byte of the text stands for
# Python's \s (str.isspace) besides " ", and what [^\w\s] strips, in RE2 terms (pyarrow)
_OTHER_SPACE = r"\t\n\v\f\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_PUNCT = rf"[^\p{{L}}\p{{M}}\p{{N}}_ {_OTHER_SPACE}]"  # marks stay: Devanagari or Thai vowel signs are letters
_SPACE_RUN = rf"[ {_OTHER_SPACE}]{{2,}}|[{_OTHER_SPACE}]"  # a single " " is left alone: the common case, fast
_PAIR = pa.scalar("\x1f", pa.large_string())  # joins prompt and response into one key


_FORMAT = r"\p{Cf}"  # zero-width spaces and joiners, soft hyphens, byte-order marks: invisible
# C0/C1 controls but tab, newline and carriage return; bidirectional overrides and isolates, which
# reorder how text displays (a "Trojan Source" line reads differently from what the model is fed)
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\x{202a}-\x{202e}\x{2066}-\x{2069}]"
_FOLD = {"ß": "ss", "ς": "σ"}  # where case folding differs from lower case (after NFKC)


def normalize(values) -> pa.Array:
    """The text as people read it: NFKC (fullwidth and compatibility forms become plain ones), case
    folded, invisible format characters dropped, punctuation dropped, whitespace (any Unicode space)
    collapsed; a null is ""."""
    text = pa.array(values, type=pa.large_string())
    if isinstance(text, pa.ChunkedArray):  # a pandas column backed by pyarrow comes chunked
        text = text.combine_chunks()
    text = pc.fill_null(text, "")
    if pc.all(pc.string_is_ascii(text)).as_py() is not False:  # ASCII is NFKC already and folds to lower case
        text = pc.ascii_lower(text)
    else:
        text = pc.utf8_lower(pc.utf8_normalize(text, "NFKC"))
        for letter, folded in _FOLD.items():
            text = pc.replace_substring(text, letter, folded)
    text = pc.replace_substring_regex(text, f"{_PUNCT}|{_FORMAT}", "")
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
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


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
            np.add(digest, ids[k : k + count], out=digest)
    inside = owner[:count] == owner[n - 1 :]  # windows that do not cross into the next text
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
    """Whether each text shows nothing: empty, or only whitespace (any Unicode space) and invisible
    format characters (zero-width spaces, word joiners). A null is not blank: it is reported as null."""
    text = pa.array(values, type=pa.large_string())
    invisible_only = pc.match_substring_regex(text, rf"^(?:{_FORMAT}|[ {_OTHER_SPACE}])*$")  # 40x a replace
    return pc.fill_null(invisible_only, False).to_numpy(zero_copy_only=False)


def has_control_characters(values: pd.Series) -> np.ndarray:
    """Whether each text holds a control character other than tab and line ends (terminal escapes,
    NUL bytes from a bad export) or a bidirectional override or isolate (U+202A-U+202E,
    U+2066-U+2069): the tokenizer keeps them and the model learns to emit them."""
    text = pa.array(values, type=pa.large_string())
    return pc.fill_null(pc.match_substring_regex(text, _CONTROL), False).to_numpy(zero_copy_only=False)


def special_token_strings(tokenizer) -> list[str]:
    """The strings of the tokenizer's special tokens (eos, chat-template markers such as <|im_start|>)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""})


def spells_special_token(values: pd.Series, tokens: list[str]) -> np.ndarray:
    """Whether each text holds one of `tokens` literally (one RE2 scan of all of them)."""
    if not tokens:
        return np.zeros(len(values), dtype=bool)
    # \Q...\E quotes a literal in RE2; a token holding "\E" itself is spelled out by characters
    literal = [rf"\Q{t}\E" if "\\E" not in t else "".join(rf"\x{{{ord(c):x}}}" for c in t) for t in tokens]
    return matches_any(values, literal)


def blank_turns(messages: pd.Series, responses: pd.Series) -> np.ndarray:
    """Whether some trained assistant turn of each row shows nothing (blank text and no tool call),
    looked at where the response holds a line end: rows with more than one assistant turn or a turn
    with more than text (pipeline/data.py joins them so), where an empty turn would pass unseen in
    the joined response (a plain exchange is the `response` field's own blank check)."""
    flags = np.zeros(len(messages), dtype=bool)
    has_line_end = pc.match_substring(pa.array(responses, type=pa.large_string()), "\n")
    rows = np.flatnonzero(pc.fill_null(has_line_end, False).to_numpy(zero_copy_only=False))
    texts, owners = [], []
    for i in rows:
        for turn in messages.iloc[i]:
            if turn["role"] == "assistant" and turn.get("train", True) and "tool_calls" not in turn:
                texts.append(turn["content"])
                owners.append(i)
    if texts:
        flags[np.asarray(owners)[blank(pd.Series(texts))]] = True
    return flags


def matches_any(values: pd.Series, patterns: list[str], ignore_case: bool = False) -> np.ndarray:
    text = pa.array(values, type=pa.large_string())
    hit = pc.match_substring_regex(text, "|".join(f"(?:{p})" for p in patterns), ignore_case=ignore_case)
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)


def phone_numbers(values: pd.Series, regions: list[str]) -> np.ndarray:
    """Whether each text holds a valid phone number (Google's libphonenumber, `phonenumbers`): in
    international form (+ and a country code) from any region, or in the national form of `regions`."""
    import phonenumbers

    flags = np.zeros(len(values), dtype=bool)
    for i in np.flatnonzero(matches_any(values, [_PHONE_CANDIDATE])):
        text = values.iloc[i]
        flags[i] = any(
            True
            for region in ("ZZ", *regions)
            for _ in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)
        )
    return flags


def secrets(values: pd.Series) -> np.ndarray:
    """Whether each text holds a credential that detect-secrets recognises (cloud and API keys,
    tokens, private keys, quoted passwords in assignments)."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import transient_settings

    flags = matches_any(values, EXTRA_SECRET_PATTERNS)
    with transient_settings({"plugins_used": [{"name": name} for name in SECRET_PLUGINS]}):
        for i in np.flatnonzero(matches_any(values, [_SECRET_CANDIDATE])):
            flags[i] = flags[i] or any(True for line in values.iloc[i].splitlines() for _ in scan_line(line))
    return flags


def _shingles(keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(word 3-gram ids, first index of each row's 3-grams; one more than rows) of the texts: words
    numbered by a dictionary encoding, each 3-gram one number below 2^31 (a row of fewer than three
    words is one shingle of what it has)."""
    words = pc.split_pattern(pa.array(keys, type=pa.large_string()), " ")
    counts = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = pc.dictionary_encode(pc.list_flatten(words)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(ids)) - np.repeat(starts, counts)
    inner = position <= np.repeat(np.maximum(counts - 3, 0), counts)
    span = np.repeat(np.minimum(counts, 3), counts)
    shingle = ids * 1_000_003 + np.where(span > 1, np.append(ids[1:], 0), -1)
    shingle = (shingle * 1_000_003 + np.where(span > 2, np.append(ids[2:], [0, 0]), -1)) % ((1 << 61) - 1)
    owner = np.repeat(np.arange(len(counts)), counts)[inner]
    return shingle[inner] & 0x7FFFFFFF, np.searchsorted(owner, np.arange(len(counts) + 1))


def fuzzy_duplicates(
    keys: pd.Series, threshold: float, num_perm: int = 128, seed: int = 0, chunk: int = 50_000
) -> np.ndarray:
    """Whether each row has an earlier row whose word 3-gram sets (of the normalised pair) are at
    least `threshold` alike (Jaccard), with datasketch's MinHash LSH.

    datasketch picks the bands for the threshold (recall first: every candidate is confirmed on the
    exact 3-gram sets, so a false candidate costs only time) and answers the lookups. Its per-row
    Python update, insert and query cost about 150 us a row, so the MinHash values of all rows are
    computed with numpy in chunks, exactly as datasketch's "affine32" scheme computes them (its
    MurmurHash3 pre-mix and its own permutations), and only rows that share a band with some other
    row, found with numpy, go through the index."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH
    from datasketch.minhash import _fmix

    shingle, bounds = _shingles(keys)
    shingle = _fmix(shingle.astype(np.uint32), 32)
    rows = len(bounds) - 1
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    hashes = np.full((rows, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    filled = np.flatnonzero(np.diff(bounds) > 0)
    for lo in range(0, len(filled), chunk):  # bounded memory: a chunk's shingles x one permutation at a time
        part = filled[lo : lo + chunk]
        first, last = bounds[part[0]], bounds[part[-1] + 1]
        x = shingle[first:last]
        for k in range(num_perm):  # a*h + b mod 2^32: uint32 wraparound is the modulo
            hashes[part, k] = np.minimum.reduceat(a[k] * x + b[k], bounds[part] - first)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    shared = np.zeros(rows, dtype=bool)
    mix = np.random.default_rng(seed).integers(1, 1 << 62, lsh.r, dtype=np.uint64) | np.uint64(1)
    for band in range(lsh.b):  # one 64-bit key per row and band; a key seen twice makes both rows candidates
        key = (hashes[:, band * lsh.r : (band + 1) * lsh.r].astype(np.uint64) * mix).sum(axis=1, dtype=np.uint64)
        _, inverse, counts = np.unique(key[filled], return_inverse=True, return_counts=True)
        shared[filled[counts[inverse] > 1]] = True
    flags = np.zeros(rows, dtype=bool)
    for row in np.flatnonzero(shared):
        minhash = LeanMinHash(seed=seed, hashvalues=hashes[row], scheme="affine32")
        mine = shingle[bounds[row] : bounds[row + 1]]
        flags[row] = any(
            _jaccard(mine, shingle[bounds[other] : bounds[other + 1]]) >= threshold for other in lsh.query(minhash)
        )
        lsh.insert(int(row), minhash, check_duplication=False)
    return flags


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.unique(a), np.unique(b)
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


def _conversations(frame: pd.DataFrame, positions) -> list:
    """Rows at these positions as prepare renders them: their messages, with their tools."""
    from pipeline.prepare import as_conversation

    tools = frame["tools"] if "tools" in frame else None
    return [
        as_conversation({"messages": frame["messages"].iat[i], "tools": tools.iat[i] if tools is not None else None})
        for i in positions
    ]


def _tokenize(tokenizer, frame: pd.DataFrame, positions, options, lengths_only: bool = False):
    """prepare's tokenization of the rows at `positions`; a row the template cannot render raises
    TemplateError with its position in `frame` (the caller names file and line)."""
    from pipeline.prepare import TemplateError, token_lengths, tokenize_conversations

    positions = np.asarray(positions, dtype=np.int64)
    try:
        if lengths_only:
            return token_lengths(tokenizer, _conversations(frame, positions), options=options)
        return tokenize_conversations(tokenizer, _conversations(frame, positions), options=options)
    except TemplateError as err:
        raise TemplateError(int(positions[err.row]), err.reason) from None


def token_lengths_within(
    tokenizer, frame: pd.DataFrame, limit: int, sample: int = 2000, seed: int = 0, options=None
) -> np.ndarray:
    """Each example's tokens after the chat template where it could exceed `limit`; elsewhere an
    upper bound that is <= `limit`. So `result > limit` is exactly the examples training truncates.

    Tokenizing a million examples takes minutes on 2 cores, and most are far below the limit. A
    BPE or SentencePiece token covers at least one byte of the text, so the bytes of the contents,
    plus those of the template around them, plus a margin for tokens a post-processor adds, bound
    the count. Rows whose bound exceeds `limit` are tokenized (pipeline.prepare.token_lengths, the
    count training sees), and so is a sample of the rest, which must keep to its bound, or every
    row is tokenized. Rows with more than text (reasoning, tool calls, a tools list, flags: what a
    template renders its own way) have no such bound: they are tokenized."""
    shapes = frame["messages"].map(turn_shape)
    template = {
        shape: _template_bytes(tokenizer, shape, options) if all(map(str.__instancecheck__, shape)) else limit + 1
        for shape in shapes.unique()
    }  # limit + 1: above the limit, so tokenized
    # prompt and response join the user and assistant turns: their bytes, and a newline between
    contents = sum(
        pc.fill_null(pc.binary_length(pa.array(frame[f], type=pa.large_string())), 0).to_numpy() for f in FIELDS
    )
    system = (
        frame["messages"]
        .map(lambda turns: len(turns[0]["content"].encode()) if turns[0]["role"] == "system" else 0)
        .to_numpy()
    )
    bound = contents + system + shapes.map(template).to_numpy() + TOKENS_OUTSIDE_TEXT
    if "tools" in frame:
        bound[frame["tools"].notna().to_numpy()] = limit + 1
    exact = np.flatnonzero(bound > limit)
    rest = np.flatnonzero(bound <= limit)
    checked = np.random.default_rng(seed).choice(rest, min(sample, len(rest)), replace=False)
    rows = np.concatenate([exact, checked])
    lengths = _tokenize(tokenizer, frame, rows, options, lengths_only=True)
    if (lengths[len(exact) :] > bound[checked]).any():  # this tokenizer breaks the premise: count every row
        return np.asarray(_tokenize(tokenizer, frame, range(len(frame)), options, lengths_only=True))
    bound[rows] = lengths
    return bound


class LossMask(NamedTuple):
    """Per-row loss-mask facts from prepare's own tokenization (see `loss_mask_flags`)."""

    nothing_left: np.ndarray  # bool: no supervised token is left after truncation
    end_unsupervised: np.ndarray  # bool: an assistant turn's end-of-turn token carries no loss
    supervised_share: np.ndarray  # float: supervised tokens / tokens after truncation; NaN where not sampled


def loss_mask_flags(
    tokenizer, frame: pd.DataFrame, limit: int, tokens: np.ndarray, sample: int = 2000, seed: int = 0, options=None
) -> LossMask:
    """Per row, from prepare's own tokenization and masks (a row may make more than one example: a
    template that renders a trained turn differently once later turns follow). `nothing_left` is
    decided on the rows training truncates (`tokens > limit`; the others keep every token);
    `end_unsupervised` on the first row of each role sequence, since the chat template decides it the
    same way for every row of that sequence; `supervised_share` on a seeded sample of `sample` rows
    (the share is an average: a sample measures it to about a percentage point). A model trained on
    the first learns nothing from those rows; on the second, never to stop; with a tiny share, little
    per token paid."""
    from pipeline.prepare import IGNORE, TemplateOptions

    options = options or TemplateOptions()
    messages = frame["messages"]

    def per_row(positions):  # (supervised tokens, tokens) of each row's examples after truncation
        tokenized = _tokenize(tokenizer, frame, positions, options)
        cut = tokenized.select(range(len(tokenized)), limit)
        supervised, total = np.zeros(len(positions)), np.zeros(len(positions))
        np.add.at(supervised, cut.rows, _supervised_counts(cut, IGNORE))
        np.add.at(total, cut.rows, cut.lengths)
        return supervised, total

    nothing_left = np.zeros(len(frame), dtype=bool)
    truncated = np.flatnonzero(tokens > limit)
    if len(truncated):
        nothing_left[truncated] = per_row(truncated)[0] == 0
    supervised_share = np.full(len(frame), np.nan)
    sampled = np.sort(np.random.default_rng(seed).choice(len(frame), min(sample, len(frame)), replace=False))
    if len(sampled):
        supervised, total = per_row(sampled)
        supervised_share[sampled] = supervised / np.maximum(total, 1)
    rows_of: dict[tuple, list[int]] = {}
    for i, turns in enumerate(messages):
        rows_of.setdefault(turn_shape(turns), []).append(i)
    first = {shape: rows[0] for shape, rows in rows_of.items()}
    probes = _tokenize(tokenizer, frame, list(first.values()), options)
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    end_unsupervised = np.zeros(len(frame), dtype=bool)
    for k, shape in enumerate(first):
        ends, ids_at_ends = 0, []
        for example in probes.of_rows([k]):
            ids, labels = probes.example(int(example))
            mask = np.asarray(labels) != IGNORE
            last = np.flatnonzero(mask & ~np.append(mask[1:], False))  # the last token of each supervised run
            ends += len(last)
            ids_at_ends += [ids[i] for i in last]
        assistant = [turn for turn in shape if turn == "assistant" or turn[0] == "assistant"]
        trained = sum(turn == "assistant" or "train" not in turn for turn in assistant)
        # one supervised run per trained turn (prepare.history_turns: context_only leaves turns the template
        # renders otherwise in history without one), never more than the assistant turns, each ending on
        # the turn's end token
        fewest = 1 if options.history == "context_only" else trained
        ok = fewest <= ends <= len(assistant) and all(i in specials for i in ids_at_ends)
        end_unsupervised[rows_of[shape]] = not ok
    return LossMask(nothing_left, end_unsupervised, supervised_share)


def turn_shape(turns: list[dict]) -> tuple:
    """What a chat template's rendering of a conversation depends on besides the text: each turn's
    role, and for a turn with more than its content (reasoning, tool calls, a name, "train": False)
    a tuple of the role and those keys."""
    return tuple(t["role"] if len(t) == 2 else (t["role"], *sorted(t.keys() - {"role", "content"})) for t in turns)


def _supervised_counts(tokenized, ignore: int) -> np.ndarray:
    counts = np.add.reduceat((tokenized.labels != ignore).astype(np.int64), tokenized.offsets[:-1])
    return np.where(tokenized.lengths > 0, counts, 0)  # reduceat repeats the next value for an empty span


def _template_bytes(tokenizer, roles: tuple[str, ...], options=None) -> int:
    """Bytes the chat template adds around the contents of a conversation with these roles."""
    from pipeline.prepare import freeze_template_clock

    freeze_template_clock()
    kwargs = options.kwargs if options is not None else {}
    text = tokenizer.apply_chat_template([{"role": r, "content": "x"} for r in roles], tokenize=False, **kwargs)
    return len(text.encode()) - len(roles)


def replay_share(train_rows: int, replay_rows: int, share: float, seed: int) -> float:
    """The replay share of the mixed training set, computed by prepare's own mix_replay."""
    from pipeline.prepare import mix_replay

    mixed = len(mix_replay(list(range(train_rows)), list(range(replay_rows)), share, seed))
    return (mixed - train_rows) / mixed


def add_derived_columns(
    frame: pd.DataFrame,
    held_out: list[str],
    tokens: np.ndarray,
    cfg,
    loss_mask: LossMask,
    special_tokens: list[str] = (),
    fuzzy: bool = True,
) -> pd.DataFrame:
    """The columns the suite (of `cfg`, the validate section) checks besides the fields: pair keys,
    leakage, PII, secrets, control characters and `special_tokens` (`special_token_strings`) spelled
    in the text (prompt, response and, where the data has system or tool turns, context), blank
    assistant turns, boilerplate, tokens, the loss-mask flags of `loss_mask_flags`, and (`fuzzy`
    and validate.near_duplicate_jaccard set) fuzzy near-duplicates."""
    prompts = normalize(frame["prompt"])
    texts = [field for field in TEXT_FIELDS if field in frame]
    derived = {
        "no_supervised_tokens": loss_mask.nothing_left,
        "end_of_turn_unsupervised": loss_mask.end_unsupervised,
        "supervised_share": loss_mask.supervised_share,
        "blank_prompt": blank(frame["prompt"]),
        "blank_response": blank(frame["response"]),
        "blank_turn": blank_turns(frame["messages"], frame["response"]),
        **{f"control_in_{field}": has_control_characters(frame[field]) for field in texts},
        **{f"special_token_in_{field}": spells_special_token(frame[field], list(special_tokens)) for field in texts},
        "leaks_eval": leaks_eval(prompts, held_out, cfg.leak_ngram),
        **{f"pii_in_{field}": matches_any(frame[field], list(PII_PATTERNS.values())) for field in texts},
        **{f"phone_in_{field}": phone_numbers(frame[field], cfg.phone_regions) for field in texts},
        **{f"secret_in_{field}": secrets(frame[field]) for field in texts},
        "boilerplate": matches_any(frame["response"], BOILERPLATE_PATTERNS, ignore_case=True),
        "tokens": tokens,
    }
    # the suite reads numbers, not text: GX fingerprints every column it is handed, and hashing a
    # million strings costs seconds (a count of characters, a null: NaN; a number per distinct pair)
    for field in FIELDS:
        text = pa.array(frame[field], type=pa.large_string())
        derived[f"chars_{field}"] = pc.utf8_length(text).to_numpy(zero_copy_only=False)
    pairs = normalized_pairs(frame, prompts)
    derived["normalized_pair_id"], derived["pair_id"] = _pair_ids(frame, pairs)
    if fuzzy and cfg.near_duplicate_jaccard is not None:
        derived["fuzzy_duplicate"] = fuzzy_duplicates(pairs.str.replace("\x1f", " "), cfg.near_duplicate_jaccard)
    if "source" in frame:
        rows = frame.groupby("source", dropna=False)["prompt"].transform("size").to_numpy(dtype=float)
        derived["source_rows"] = np.where(frame["source"].isna().to_numpy(), np.nan, rows)  # a null fails apart
    derived = frame.assign(**derived)
    derived.attrs["special_tokens"] = list(special_tokens)  # the report names the token a row spells
    return derived


def _pair_ids(frame: pd.DataFrame, normalized: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A number per distinct normalised pair, and one per distinct exact (prompt, response) pair.
    An exact duplicate is a near-duplicate too, so only rows that share a normalised pair are
    compared exactly; every other row gets a number of its own (negative)."""
    near = pd.factorize(normalized)[0]
    exact = -1 - np.arange(len(frame))
    shared = np.flatnonzero(np.bincount(near)[near] > 1)
    if len(shared):
        subset = frame.iloc[shared][list(FIELDS)]
        exact[shared] = subset.groupby(list(FIELDS), dropna=False, sort=False).ngroup().to_numpy()
    return near, exact


def contract_columns(
    frame: pd.DataFrame, tokenizer, held_out: list[str], cfg, max_seq_len: int, replay: bool = False, options=None
) -> pd.DataFrame:
    """`frame` with every column its suite checks: token lengths, loss-mask flags and the derived
    columns, the same for the training file and the `replay` file (but fuzzy near-duplicates: see
    build_suite). `options`: prepare's TemplateOptions (template kwargs, history policy), so the
    contract tokenizes as training will. A row the template cannot render raises TemplateError with
    its position in `frame`."""
    tokens = token_lengths_within(tokenizer, frame, max_seq_len, options=options)
    loss_mask = loss_mask_flags(tokenizer, frame, max_seq_len, tokens, options=options)
    return add_derived_columns(
        frame, held_out, tokens, cfg, loss_mask, special_token_strings(tokenizer), fuzzy=not replay
    )


def add_replay_columns(replay: pd.DataFrame, train_rows: int, share: float, seed: int) -> pd.DataFrame:
    """The replay file's contract columns (`contract_columns`) plus the share the mix will have."""
    return replay.assign(mixed_share=replay_share(train_rows, len(replay), share, seed))


def _expect(kind, check: str, field: str | None, how_to_fix: str, **kwargs):
    """An expectation that carries, in its meta, what a reviewer reads in the report."""
    return kind(**kwargs, meta={"check": check, "field": field, "how_to_fix": how_to_fix}, description=check)


def build_suite(cfg, max_seq_len: int, columns, replay: bool = False):
    """The training file's suite over a frame with `columns` (add_derived_columns'); `replay`: the
    replay file's, the same checks less the row count, per-source minimums and fuzzy near-duplicates
    (general data mixed in as a share, often templated items alike in most words; exact and
    normalised duplicates are still refused), plus the share the mix will have."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="sft_replay" if replay else "sft_train")
    texts = [field for field in TEXT_FIELDS if field in columns]
    for expectation in (
        *_volume(gxe, cfg, columns, replay),
        *_rows(gxe, cfg, max_seq_len, texts),
        *_duplicates_and_leaks(gxe, cfg, replay),
        *_privacy(gxe, cfg, texts, replay),
    ):
        suite.add_expectation(expectation)
    return suite


def _volume(gxe, cfg, columns, replay: bool):
    """Row counts: the whole file, and per source."""
    if not replay:
        yield _expect(
            gxe.ExpectTableRowCountToBeBetween,
            "row count",
            None,
            "add examples (the method wants more than 10k) or change validate.min_rows",
            min_value=cfg.min_rows,
            max_value=cfg.max_rows,
        )
    if "source" in columns and not replay:
        yield _expect(
            gxe.ExpectColumnValuesToNotBeNull,
            "every row names its source",
            "source",
            "fill the missing source",
            column="source_rows",
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeBetween,
            "rows per source",
            "source",
            "add examples from the small source, drop it, or lower validate.min_rows_per_source",
            column="source_rows",
            min_value=cfg.min_rows_per_source,
        )


def _rows(gxe, cfg, max_seq_len: int, texts: list[str]):
    """Each row: nulls, blanks, lengths in characters and tokens, control characters, the loss mask."""
    max_chars = {"prompt": cfg.max_prompt_chars, "response": cfg.max_response_chars}
    for field in FIELDS:
        yield _expect(
            gxe.ExpectColumnValuesToNotBeNull,
            "no nulls",
            field,
            "fill or drop rows with a missing field",
            column=f"chars_{field}",
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "no blank strings",
            field,
            "fill or drop rows whose field is blank (zero-width and other invisible characters count as blank)",
            column=f"blank_{field}",
            value_set=[False],
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeBetween,
            "characters",
            field,
            f"shorten, fill or drop the rows, or raise validate.max_{field}_chars (or lower validate.min_chars)",
            column=f"chars_{field}",
            min_value=cfg.min_chars,
            max_value=max_chars[field],
        )
    yield _expect(
        gxe.ExpectColumnValuesToBeBetween,
        "tokens after the chat template (longer ones are truncated)",
        "messages",
        "shorten or drop long examples, or raise prepare.max_seq_len (or lower validate.min_fit_share)",
        column="tokens",
        max_value=max_seq_len,
        mostly=cfg.min_fit_share,
    )
    yield _expect(
        gxe.ExpectColumnValuesToBeInSet,
        "no blank assistant turn (each turn of multi-turn and tool rows)",
        "messages",
        'fill the empty assistant turn, drop the row, or mark the turn "train": false (a trained '
        "empty turn teaches the model to answer nothing)",
        column="blank_turn",
        value_set=[False],
    )
    for field in texts:
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "control characters (other than tab and line ends; bidirectional overrides and isolates)",
            field,
            "strip terminal escapes, NUL bytes and bidirectional overrides "
            "(U+202A-U+202E, U+2066-U+2069) from the export",
            column=f"control_in_{field}",
            value_set=[False],
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "special-token strings of the tokenizer in the text",
            field,
            "remove or rewrite the marker (e.g. a copied chat transcript): prepare tokenizes it as plain text, "
            "never as the control token, but the model still learns to write it",
            column=f"special_token_in_{field}",
            value_set=[False],
        )
    yield _expect(
        gxe.ExpectColumnValuesToBeInSet,
        "no supervised token left after truncation",
        "messages",
        "shorten the prompt (the response is cut away), drop the row, or raise prepare.max_seq_len",
        column="no_supervised_tokens",
        value_set=[False],
    )
    yield _expect(
        gxe.ExpectColumnValuesToBeInSet,
        "end-of-turn token of every assistant turn supervised",
        "messages",
        "use a chat template that ends each assistant turn with the eos or another special token "
        "(the model must learn to stop); see pipeline/prepare.py ChatRenderer",
        column="end_of_turn_unsupervised",
        value_set=[False],
    )
    yield _expect(
        gxe.ExpectColumnMeanToBeBetween,
        "share of tokens that carry loss (sampled rows)",
        "messages",
        "longer responses or shorter prompts; check the template marks every assistant turn (see "
        "pipeline/prepare.py ChatRenderer), or set validate.min_supervised_share / max_supervised_share",
        column="supervised_share",
        min_value=cfg.min_supervised_share,
        max_value=cfg.max_supervised_share,
    )


def _duplicates_and_leaks(gxe, cfg, replay: bool):
    """Exact, normalised and fuzzy duplicates; eval items in the training data."""
    yield _expect(
        gxe.ExpectCompoundColumnsToBeUnique,
        "exact duplicate pairs",
        "prompt,response",
        # equal pairs have equal normalised pairs: unique pair_id is unique (pair_id, normalized_pair_id)
        "drop the repeated (prompt, response) pairs",
        column_list=["pair_id", "normalized_pair_id"],
    )
    yield _expect(
        gxe.ExpectColumnValuesToBeUnique,
        "near-duplicate pairs (Unicode forms, case, whitespace, punctuation and invisible characters ignored)",
        "prompt,response",
        "drop near-duplicates: they over-weight one example",
        column="normalized_pair_id",
    )
    yield _expect(
        gxe.ExpectColumnValuesToBeInSet,
        "training prompt also in an eval set (exact or shared n-gram)",
        "prompt",
        "remove eval items from the training data: they inflate the golden score (a shared "
        "instruction template of validate.leak_ngram words or more also matches: raise validate.leak_ngram "
        "above its length)",
        column="leaks_eval",
        value_set=[False],
    )
    if cfg.near_duplicate_jaccard is not None and not replay:
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            f"fuzzy near-duplicates (MinHash LSH, word 3-gram Jaccard >= {cfg.near_duplicate_jaccard})",
            "prompt,response",
            "drop the rows that repeat an earlier one with small edits, or raise validate.near_duplicate_jaccard",
            column="fuzzy_duplicate",
            value_set=[False],
            mostly=1 - cfg.max_fuzzy_duplicate_share,
        )


def _privacy(gxe, cfg, texts: list[str], replay: bool):
    """PII and secrets per text field, boilerplate, and (replay) the share of the mix."""
    for field in texts:
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "PII: e-mail addresses and card numbers",
            field,
            "scrub or drop the rows, or raise validate.max_pii_share",
            column=f"pii_in_{field}",
            value_set=[False],
            mostly=1 - cfg.max_pii_share,
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "PII: phone numbers (libphonenumber: international, and "
            f"national in {', '.join(cfg.phone_regions) or 'no region'})",
            field,
            "scrub or drop the rows, or raise validate.max_pii_share (validate.phone_regions: national formats)",
            column=f"phone_in_{field}",
            value_set=[False],
            mostly=1 - cfg.max_pii_share,
        )
        yield _expect(
            gxe.ExpectColumnValuesToBeInSet,
            "secrets (detect-secrets: keys, tokens, private keys, passwords)",
            field,
            "remove the credential (and rotate it), drop the rows, or raise validate.max_secret_share",
            column=f"secret_in_{field}",
            value_set=[False],
            mostly=1 - cfg.max_secret_share,
        )
    yield _expect(
        gxe.ExpectColumnValuesToBeInSet,
        "boilerplate responses (stock refusals, 'as an AI model')",
        "response",
        "rewrite or drop the responses, or raise validate.max_boilerplate_share",
        column="boilerplate",
        value_set=[False],
        mostly=1 - cfg.max_boilerplate_share,
    )
    if replay:  # one number for the whole mix, carried as a constant column so GX reports it with the rest
        yield _expect(
            gxe.ExpectColumnMaxToBeBetween,
            "replay share of the mixed training set",
            "replay",
            "set prepare.replay_share inside validate.min_replay_share..max_replay_share (the method: 10-20%)",
            column="mixed_share",
            min_value=cfg.min_replay_share,
            max_value=cfg.max_replay_share,
        )


def run_suite(
    frame: pd.DataFrame, cfg, max_seq_len: int, replay: pd.DataFrame | None = None, docs_dir: Path | None = None
) -> list[dict]:
    """One record per expectation: what it checks, what it saw, pass/fail, first offending rows.
    `replay` (`add_replay_columns`) is validated by the same checks in its own suite; `docs_dir` gets
    Data Docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="contract",
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
    source = context.data_sources.add_pandas("data")
    batches = [("train", frame, build_suite(cfg, max_seq_len, set(frame.columns)))]
    if replay is not None:
        batches.append(("replay", replay, build_suite(cfg, max_seq_len, set(replay.columns), replay=True)))
    checks = []
    for name, data, suite in batches:
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=name,
                suite=context.suites.add(suite),
                data=source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all"),
            )
        )
        # GX fingerprints the batch with pandas' hash (7 s for the text columns of a million rows),
        # or, where a column holds lists (the turns), by pickling the whole frame: the expectations
        # read only the numeric and flag columns of add_derived_columns, so GX gets only those
        checked = data.select_dtypes(include=["number", "bool"])
        # SUMMARY: the count and the first rows; COMPLETE would list every bad row of a bad million
        result = definition.run(
            batch_parameters={"dataframe": checked},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
        )
        checks += [{"data": name, **_check(r, data)} for r in result.results]
    if docs_dir is not None:
        context.build_data_docs(site_names=["contract"])
    return checks


UNITS = {"tokens": "tokens", "source_rows": "rows"}  # per-row numbers the suite bounds, and what they count


def _measure(config, details: dict, data: pd.DataFrame) -> tuple:
    """The offending quantity a reviewer needs, as a number and as words: the longest text or the
    most tokens (and where), the smallest source, or how many rows are flagged; not a count of
    violations under a threshold's name."""
    kwargs, kind = config.kwargs, config.type
    column = kwargs.get("column")
    if kind == "expect_column_values_to_be_between" and column.startswith("chars_"):
        lengths = data[column]
        too_short = kwargs.get("min_value") is not None and lengths.min() < kwargs["min_value"]
        row = lengths.idxmin() if too_short else lengths.idxmax()
        return int(
            lengths[row]
        ), f"{'shortest' if too_short else 'longest'} {int(lengths[row]):,} characters ({_unit_of(data)} {row})"
    if kind == "expect_column_values_to_be_between" and column in UNITS:
        values = data[column]
        smallest = kwargs.get("max_value") is None  # a floor: the smallest value is the one at risk
        row = values.idxmin() if smallest else values.idxmax()
        value = int(values[row])
        what = f"source {data['source'][row]!r}: " if column == "source_rows" else ""
        return (
            value,
            f"{'smallest' if smallest else 'largest'} {what}{value:,} {UNITS[column]} ({_unit_of(data)} {row})",
        )
    if column == "supervised_share":
        shares = data[column].dropna()
        if shares.empty:
            return None, "no rows to sample"
        too_low = kwargs["min_value"] is not None and shares.mean() < kwargs["min_value"]
        row = shares.idxmin() if too_low else shares.idxmax()
        value = round(float(shares.mean()), 4)
        return (
            value,
            f"average {value:.2%} over {len(shares):,} sampled rows; "
            f"{'lowest' if too_low else 'highest'} {shares[row]:.2%} ({_unit_of(data)} {row})",
        )
    if column and column.startswith("special_token_in_") and details.get("unexpected_count"):
        field = column.removeprefix("special_token_in_")
        text = data[field][data[column]].iloc[0]
        token = next((t for t in data.attrs.get("special_tokens", ()) if t in text), None)
        count = details["unexpected_count"]
        return count, f"{count:,} row{'s' if count != 1 else ''}" + (f", first spells {token!r}" if token else "")
    if details.get("observed_value") is not None:
        value = _plain(details["observed_value"])
        return value, f"{value:,} rows" if kind == "expect_table_row_count_to_be_between" else f"{value}"
    count = details.get("unexpected_count", 0)
    share = f" ({details['unexpected_percent'] / 100:.2%})" if count and "unexpected_percent" in details else ""
    return count, f"{count:,} row{'s' if count != 1 else ''}{share}"


def _unit_of(data: pd.DataFrame) -> str:
    return "row" if data.attrs.get("parquet") else "line"


def _check(r, data: pd.DataFrame) -> dict:
    config = r.expectation_config
    kwargs = config.kwargs
    details = r.result or {}
    rows = [
        int(i["row"]) if isinstance(i, dict) else int(i)  # dicts name the index, "row"
        for i in details.get("partial_unexpected_index_list") or []
    ]
    threshold = {k: _plain(kwargs[k]) for k in ("min_value", "max_value", "mostly") if kwargs.get(k) is not None}
    if kwargs.get("value_set") is not None:  # a flag column: what share may be flagged
        threshold = {"max_share": round(1 - threshold.pop("mostly", 1.0), 6)}
    observed, observed_text = _measure(config, details, data)
    return {
        "expectation": config.type,
        "check": config.meta["check"],
        "field": config.meta["field"],
        "threshold": threshold,
        "observed": _plain(observed),
        "observed_text": observed_text,
        "failing_share": round(details.get("unexpected_percent", 0.0) / 100, 6)
        if "unexpected_percent" in details
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
    failed = dict.fromkeys(files[c["data"]] for c in checks if not c["passed"])
    lines = [f"{', '.join(failed)}: data contract failed"]
    for c in checks:
        if c["passed"]:
            continue
        path = files[c["data"]]
        where = f" at {_unit(path)} {', '.join(map(str, c['rows']))}" if c["rows"] else ""
        more = f" (+{c['failing_rows'] - len(c['rows'])} more)" if c["failing_rows"] > len(c["rows"]) else ""
        field = f" field '{c['field']}'" if c["field"] else ""
        expected = f", expected {c['threshold']}" if c["threshold"] else ""
        lines.append(
            f"  {path}: {c['check']}{field}: {c['observed_text']}{expected}{where}{more} "
            f"[{c['expectation']}]; fix: {c['how_to_fix']}"
        )
    return "\n".join(lines)


def render_markdown(files: dict[str, str], checks: list[dict]) -> str:
    passed = all(c["passed"] for c in checks)
    named = ", ".join(f"`{files[d]}`" for d in dict.fromkeys(c["data"] for c in checks))
    lines = [
        f"## Data contract: {'PASSED' if passed else 'FAILED'} ({named})",
        "",
        "| file | check | field | expected | observed | result | first lines (JSONL) or rows (Parquet) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        expected = ", ".join(f"{k}={v}" for k, v in c["threshold"].items()) or "-"
        observed = c["observed_text"]
        lines.append(
            f"| {Path(files[c['data']]).name} | {c['check']} | {c['field'] or '-'} | {expected} | "
            f"{observed} | {'pass' if c['passed'] else '**FAIL**'} | "
            f"{', '.join(map(str, c['rows'])) or '-'} |"
        )
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines += ["", "How to fix:", ""]
        lines += [
            f"- {c['check']} ({Path(files[c['data']]).name}, {c['field'] or 'table'}): {c['how_to_fix']}"
            for c in failed
        ]
    return "\n".join(lines) + "\n"
