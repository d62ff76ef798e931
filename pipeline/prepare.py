"""prepare: replay mix, chat template, tokenization, loss masks, packing or length buckets.

Every conversation becomes exactly the token ids `tokenizer.apply_chat_template` gives for it
(tests/test_prepare.py checks the parity); each assistant turn (its content and the end-of-turn
token after it) carries loss, everything else is IGNORE.

Packed rows hold whole examples, each row filled as full as a subset-sum allows (`pack_bins`).
Position ids restart at 0 for every
example; the model turns those restarts into a block-diagonal causal mask, so no example ever
attends to another one packed beside it (see tests/test_prepare.py for the parity check).
Unpacked rows (`prepare.pack: false`) hold one example each, ordered into length buckets.

Speed (benchmarks/prepare_200k.py): the chat template is rendered once per role sequence and
reused as text segments, the Rust tokenizer encodes in batches on every core, and ids travel as
flat numpy arrays with offsets, never as one Python list per example.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

IGNORE = -100
ENCODE_CHUNK = 4096  # conversations per encode_batch call: bounded memory, enough work for every thread
DEFAULT_CACHE_DIR = ".cache/sft-prepare"


# Templates that print today's date (Llama 3.x "Today Date: ..." through `strftime_now`, guarded by
# `date_string` or not, as in Mistral's and Granite's) would bake the day of the run into every
# example: a rerun on another day would tokenize differently, and lm-eval, which passes no
# `date_string`, would render prompts unlike the training ones. transformers' `strftime_now` reads
# the clock through its module's `datetime` when called, so every render in this package (prepare,
# the contract, lm-eval in evaluate) sees TEMPLATE_DATE. The tokenization cache key hashes this source.
TEMPLATE_DATE = datetime.datetime(2026, 1, 1)


class _TemplateClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return TEMPLATE_DATE.replace(tzinfo=tz)


def freeze_template_clock() -> None:
    """Chat templates render TEMPLATE_DATE as today, in this process (idempotent)."""
    from transformers.utils import chat_template_utils

    if not hasattr(chat_template_utils, "datetime"):
        raise RuntimeError("transformers no longer reads the clock through chat_template_utils.datetime: "
                           "chat templates would print the day of the run; update freeze_template_clock")
    chat_template_utils.datetime = _TemplateClock


def render_prompt(tokenizer, prompt: str) -> str:
    """The exact text the model sees before its answer, in training and in evaluation."""
    freeze_template_clock()
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def as_conversation(row: dict) -> list[dict]:
    """A row's turns: its `messages` (pipeline/data.py), or [user, assistant] from prompt/response."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


# ---------------------------------------------------------------------------------------------
# Chat template: text and the character spans that carry loss


class ChatRenderer:
    """Renders conversations exactly as the tokenizer's chat template does, with the character
    span of each assistant turn's supervised text (its content and the end-of-turn token).

    Templates insert each content verbatim (Qwen, ChatML) or trimmed (Llama 3, Gemma), so one role
    sequence ("shape") always renders to the same literal segments around the contents. Those are
    rendered once per shape with probe contents and checked against jinja with other probes and
    with the first real conversations of the shape; then every conversation is a string join,
    about 20x faster than jinja. A shape whose check fails is rendered by jinja, one at a time.
    """

    SAMPLES_CHECKED = 4  # real conversations per shape compared with jinja before trusting the joins

    def __init__(self, tokenizer):
        freeze_template_clock()
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token
        self.specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
                               key=len, reverse=True)
        self._shapes: dict[tuple[str, ...], tuple[list[str], bool] | None] = {}
        self._checked: dict[tuple[str, ...], int] = {}

    def jinja(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def _learn(self, roles: tuple[str, ...]) -> tuple[list[str], bool] | None:
        """The literal segments between contents for this role sequence, and whether the template
        trims contents; None when the template does anything else with them."""
        # private-use markers with whitespace at both ends, so a trimming template shows itself
        probes = [f" \n\ue000{i}\ue001\n " for i in range(len(roles))]
        text = self.jinja([{"role": r, "content": p} for r, p in zip(roles, probes)])
        for trim in (False, True):
            inserted = [p.strip() if trim else p for p in probes]
            if all(text.count(s) == 1 for s in inserted):
                segments, cursor = [], 0
                for s in inserted:
                    at = text.find(s, cursor)
                    if at < 0:
                        break
                    segments.append(text[cursor:at])
                    cursor = at + len(s)
                else:
                    segments.append(text[cursor:])
                    other = [{"role": r, "content": f"x{i}\n\n y {i}"} for i, r in enumerate(roles)]
                    if self._join(segments, trim, other)[0] == self.jinja(other):
                        return segments, trim
        return None

    def _turn_end(self, after: str) -> int:
        """How much of `after` (the template text after an assistant content) carries loss: up to
        and including the end-of-turn token, the eos token or else a special token it starts with."""
        at = after.find(self.eos) if self.eos else -1
        if at >= 0:
            return at + len(self.eos)
        return next((len(t) for t in self.specials if after.startswith(t)), 0)

    def _join(self, segments: list[str], trim: bool, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        parts, spans, cursor = [segments[0]], [], len(segments[0])
        for message, after in zip(conversation, segments[1:]):
            content = message["content"].strip() if trim else message["content"]
            if message["role"] == "assistant":
                spans.append((cursor, cursor + len(content) + self._turn_end(after)))
            parts += (content, after)
            cursor += len(content) + len(after)
        return "".join(parts), spans

    def _by_jinja(self, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Jinja's text, each content found after the previous one (templates the joins cannot
        reproduce)."""
        text = self.jinja(conversation)
        found, cursor = [], 0
        for i, message in enumerate(conversation):
            content = message["content"]
            at = text.find(content, cursor)
            if at < 0:
                content = content.strip()
                at = text.find(content, cursor)
            if at < 0:
                raise ValueError(f"the chat template changed the content of turn {i} ({message['role']}) "
                                 "beyond recognition; cannot tell which tokens carry loss")
            found.append((at, at + len(content)))
            cursor = at + len(content)
        starts = [start for start, _ in found[1:]] + [len(text)]
        spans = [(start, end + self._turn_end(text[end:after]))
                 for message, (start, end), after in zip(conversation, found, starts) if message["role"] == "assistant"]
        return text, spans

    def render(self, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        roles = tuple(m["role"] for m in conversation)
        if roles not in self._shapes:
            self._shapes[roles] = self._learn(roles)
            self._checked[roles] = 0
        shape = self._shapes[roles]
        if shape is None:
            return self._by_jinja(conversation)
        text, spans = self._join(*shape, conversation)
        if self._checked[roles] < self.SAMPLES_CHECKED:
            self._checked[roles] += 1
            if text != self.jinja(conversation):  # the template looks at contents: trust jinja only
                self._shapes[roles] = None
                return self._by_jinja(conversation)
        return text, spans


# ---------------------------------------------------------------------------------------------
# Tokenization into flat arrays


@dataclass
class Tokenized:
    """Examples as flat arrays: example i is ids[offsets[i]:offsets[i + 1]], labels alike."""
    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where there is no loss
    offsets: np.ndarray  # int64, one more than there are examples

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[list[int], list[int]]:
        span = slice(self.offsets[i], self.offsets[i + 1])
        return self.ids[span].tolist(), self.labels[span].tolist()

    def select(self, order, max_len: int | None = None) -> Tokenized:
        """The examples in `order`, each cut to its first `max_len` tokens when given."""
        order = np.asarray(order, dtype=np.int64)
        lengths = self.lengths[order]
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        source = np.repeat(self.offsets[order] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Tokenized(self.ids[source], self.labels[source], offsets)

    @staticmethod
    def concat(parts: list[Tokenized]) -> Tokenized:
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)]).astype(np.int64)
        return Tokenized(np.concatenate([p.ids for p in parts]).astype(np.int32),
                         np.concatenate([p.labels for p in parts]).astype(np.int32), offsets)


@contextmanager
def rust_threads():
    """Let the Rust tokenizer use every core for this block (the project default is off, for forks)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _token_at(encoding, char: int, step: int) -> int:
    """The token holding character `char`, looking further by `step` past characters no token
    covers (offsets a post-processor trimmed)."""
    while True:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
        char += step


def _encode_chunk(backend, renderer: ChatRenderer, conversations: list[list[dict]]) -> Tokenized:
    rendered = [renderer.render(c) for c in conversations]
    encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    id_lists = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(offsets[-1]))
    # loss on [start, end) token spans, marked +1/-1 and summed along the flat array
    marks = np.zeros(len(ids) + 1, dtype=np.int32)
    for i, ((_, spans), encoding) in enumerate(zip(rendered, encodings)):
        for start, end in spans:
            if end > start:
                marks[offsets[i] + _token_at(encoding, start, 1)] += 1
                marks[offsets[i] + _token_at(encoding, end - 1, -1) + 1] -= 1
    labels = np.where(np.cumsum(marks[:-1]) > 0, ids, IGNORE).astype(np.int32)
    return Tokenized(ids, labels, offsets)


# What forked workers tokenize: set by the parent just before forking, inherited, never pickled.
_FORKED: tuple | None = None


def _encode_forked(span: tuple[int, int]) -> Tokenized:
    tokenizer, conversations = _FORKED
    return _encode_chunk(tokenizer.backend_tokenizer, ChatRenderer(tokenizer), conversations[span[0]:span[1]])


def tokenize_conversations(tokenizer, conversations: list[list[dict]], workers: int | None = None) -> Tokenized:
    """Token ids exactly as `apply_chat_template` gives them; loss on every assistant turn.

    With more than one worker (default: one per core this process may use), forked processes
    tokenize chunks in parallel and send back numpy arrays, so the Python work (rendering, id
    lists) runs in parallel too; one worker encodes on the Rust tokenizer's threads instead.
    On 2 cores both give ~1M tokens/s: Rust BPE is ~90% of the time (benchmarks/prepare_200k.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"prepare needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
    spans = [(i, min(i + ENCODE_CHUNK, len(conversations))) for i in range(0, len(conversations), ENCODE_CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(spans))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        global _FORKED
        _FORKED = (tokenizer, conversations)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_encode_forked, spans, chunksize=1)
        finally:
            _FORKED = None
    else:
        renderer = ChatRenderer(tokenizer)
        with rust_threads():
            parts = [_encode_chunk(backend, renderer, conversations[a:b]) for a, b in spans]
    if not parts:
        return Tokenized(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))
    return parts[0] if len(parts) == 1 else Tokenized.concat(parts)


def token_lengths(tokenizer, conversations: list[list[dict]]) -> np.ndarray:
    """Tokens of each conversation after the chat template, exactly as training sees it."""
    return tokenize_conversations(tokenizer, conversations).lengths


def tokenize_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """One exchange's token ids and labels; only the response and its end-of-turn token carry loss.
    The ids are the chat template's for the whole exchange, so text after the end-of-turn
    token (a newline in many templates) ends the ids, masked."""
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenize_conversations(tokenizer, [conversation]).example(0)


# ---------------------------------------------------------------------------------------------
# Cache: an unchanged data file is never tokenized twice


def cache_key(path: str | Path, tokenizer) -> str:
    """sha256 of what decides the tokenized examples: the file's bytes, the tokenizer (its
    serialised Rust model, special tokens, chat template) and the code (this module's source and
    the tokenizers and transformers versions), so no edit can be served a stale entry. The row
    length (max_seq_len) is applied later, at packing: changing it reuses the cache."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for part in (Path(path).read_bytes(), tokenizer.backend_tokenizer.to_str().encode(),
                 str(tokenizer.chat_template).encode(), repr(sorted(tokenizer.special_tokens_map.items())).encode(),
                 Path(__file__).read_bytes(), f"{tokenizers.__version__} {transformers.__version__}".encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR", DEFAULT_CACHE_DIR))


def tokenize_file(tokenizer, path: str | Path, load, cache: Path | None = None) -> tuple[Tokenized, bool]:
    """The file's examples tokenized, from the cache when the same file and tokenizer were seen
    before (returns True then); `load(path)` gives the conversations on a miss."""
    cache = cache_dir() if cache is None else cache
    stored = cache / f"{cache_key(path, tokenizer)}.npz"
    if stored.exists():
        with np.load(stored) as saved:
            return Tokenized(saved["ids"], np.where(saved["supervised"], saved["ids"], IGNORE).astype(np.int32),
                             saved["offsets"]), True
    tokenized = tokenize_conversations(tokenizer, load(path))
    stored.parent.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp.npz")  # a crash mid-write never leaves a truncated entry behind
    np.savez(tmp, ids=tokenized.ids, supervised=tokenized.labels != IGNORE, offsets=tokenized.offsets)
    tmp.replace(stored)
    return tokenized, False


# ---------------------------------------------------------------------------------------------
# Replay mix, packing, length buckets


def mix_replay(train: list, replay: list, share: float, seed: int) -> list:
    """Add general replay rows so they make up `share` of the mixed set (seeded, deterministic)."""
    if share == 0 or not replay:
        return list(train)
    wanted = round(share * len(train) / (1 - share))
    rng = random.Random(seed)
    picked = rng.sample(replay, min(wanted, len(replay)))
    while len(picked) < wanted:  # a small replay set is repeated rather than silently under-mixed
        picked += rng.sample(replay, min(wanted - len(picked), len(replay)))
    mixed = list(train) + picked
    rng.shuffle(mixed)
    return mixed


def _best_fill(counts: dict[int, int], room: int) -> Counter:
    """The lengths (with repeats, at most counts[l] of each) whose sum comes closest to `room`
    without passing it: a subset-sum over Python-int bitsets, bit s set when s is reachable.
    Repeats are split in binary (1, 2, 4, ... copies) so each bitset step is a 0/1 choice."""
    items = []  # (length, copies), longest first: long examples are the hard ones to place later
    for length in sorted(counts, reverse=True):
        left = min(counts[length], room // length) if length else 0
        copies = 1
        while left > 0:
            items.append((length, min(copies, left)))
            left -= copies
            copies *= 2
    mask = (1 << (room + 1)) - 1
    reach = [1]
    for length, copies in items:
        reach.append((reach[-1] | reach[-1] << (length * copies)) & mask)
        if reach[-1] >> room & 1:  # an exact fill: nothing can beat it
            break
    chosen, total = Counter(), reach[-1].bit_length() - 1
    for step in range(len(reach) - 1, 0, -1):  # walk back: an item was taken iff total was unreachable before it
        if not reach[step - 1] >> total & 1:
            length, copies = items[step - 1]
            chosen[length] += copies
            total -= length * copies
    return chosen


def pack_bins(lengths, capacity: int) -> list[list[int]]:
    """Bins of example indices, filled one at a time as full as possible: the longest example left
    opens a bin and `_best_fill` picks the companions that best fill the rest; the same
    combination is reused while the examples it needs last (examples share few distinct lengths).
    Where a bin holds only a few examples, best-fit decreasing strands gaps shorter than the
    shortest example in most bins: on the demo mix at 128 tokens it filled 95.5%, this 98.9%."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        i = int(np.argmax(lengths))
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than the bin capacity {capacity}")
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    ends = list(starts[1:]) + [len(order)]
    # each length's indices, highest first, so pop() hands out the lowest index first
    groups = {int(v): order[a:b][::-1].tolist() for v, a, b in zip(values, starts, ends)}
    bins: list[list[int]] = []
    while groups:
        longest = max(groups)
        counts = {length: len(members) for length, members in groups.items()}
        counts[longest] -= 1
        need = _best_fill(counts, capacity - longest)
        need[longest] += 1
        for _ in range(min(len(groups[length]) // copies for length, copies in need.items())):
            bins.append([groups[length].pop() for length, copies in need.items() for _ in range(copies)])
        groups = {length: members for length, members in groups.items() if members}
    return bins


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, max_len] int32, pad id after the last example
    labels: np.ndarray  # [rows, max_len] int32, IGNORE on prompts and padding
    position_ids: np.ndarray  # [rows, max_len] int32, restarting at 0 for each example
    stats: dict
    lengths: np.ndarray | None = None  # [rows] int32 real tokens per row; only unpacked (one example a row)


def _rows(examples: Tokenized, row_of: np.ndarray, rows: int, max_len: int, pad_id: int):
    """[rows, max_len] arrays with the examples laid out left to right in their rows, in order."""
    lengths = examples.lengths
    fill = np.bincount(row_of, weights=lengths, minlength=rows).astype(np.int64)
    row_start = np.concatenate([[0], np.cumsum(fill)[:-1]])
    # an example's column: where its row starts in the flat array, subtracted from its own start
    column0 = examples.offsets[:-1] - row_start[row_of]
    token_row = np.repeat(row_of, lengths)
    token_col = np.arange(len(examples.ids)) - np.repeat(row_start[row_of], lengths)
    input_ids = np.full((rows, max_len), pad_id, dtype=np.int32)
    labels = np.full((rows, max_len), IGNORE, dtype=np.int32)
    # padding is its own segment, counting from 0 after the row's last example
    positions = (np.arange(max_len)[None, :] - fill[:, None]).astype(np.int32)
    input_ids[token_row, token_col] = examples.ids
    labels[token_row, token_col] = examples.labels
    positions[token_row, token_col] = token_col - np.repeat(column0, lengths)
    return input_ids, labels, positions, fill


def _stats(examples: int, kept: Tokenized, input_ids: np.ndarray, truncated: int) -> dict:
    real = int(kept.offsets[-1])
    return {
        "examples": examples,
        "rows": int(input_ids.shape[0]),
        "tokens": real,
        "supervised_tokens": int((kept.labels != IGNORE).sum()),
        "fill": round(real / max(input_ids.size, 1), 4),
        "truncated": truncated,
    }


def _as_tokenized(examples) -> Tokenized:
    if isinstance(examples, Tokenized):
        return examples
    lengths = [len(ids) for ids, _ in examples]
    return Tokenized(np.fromiter(chain.from_iterable(i for i, _ in examples), np.int32, sum(lengths)),
                     np.fromiter(chain.from_iterable(l for _, l in examples), np.int32, sum(lengths)),
                     np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def pack_examples(examples, max_len: int, pad_id: int) -> Packed:
    """Whole examples (cut to max_len) packed into as few rows of max_len tokens as `pack_bins` finds.
    `examples`: a Tokenized, or (ids, labels) pairs."""
    examples = _as_tokenized(examples)
    truncated = int((examples.lengths > max_len).sum())
    bins = pack_bins(np.minimum(examples.lengths, max_len), max_len)
    order = np.fromiter(chain.from_iterable(sorted(b) for b in bins), np.int64, len(examples))  # stable inside a row
    row_of = np.repeat(np.arange(len(bins)), [len(b) for b in bins])
    kept = examples.select(order, max_len)
    input_ids, labels, positions, _ = _rows(kept, row_of, len(bins), max_len, pad_id)
    return Packed(input_ids, labels, positions, _stats(len(examples), kept, input_ids, truncated))


def bucket_order(lengths, bucket_rows: int, seed: int) -> np.ndarray:
    """A seeded shuffle, then each chunk of `bucket_rows` consecutive rows sorted by length
    (longest first): consecutive micro-batches inside a chunk have similar lengths, so trimming
    a batch to its longest row leaves little padding, while chunks keep the epoch shuffled."""
    lengths = np.asarray(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    chunks = [order[i:i + bucket_rows] for i in range(0, len(order), bucket_rows)]
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order


def bucket_examples(examples, max_len: int, pad_id: int, bucket_rows: int, seed: int) -> Packed:
    """One example a row (cut to max_len), rows ordered into length buckets; `lengths` says how
    many tokens of each row are real, for the loop to trim each batch to its longest row."""
    examples = _as_tokenized(examples)
    truncated = int((examples.lengths > max_len).sum())
    kept = examples.select(bucket_order(np.minimum(examples.lengths, max_len), bucket_rows, seed), max_len)
    rows = len(kept)
    input_ids, labels, positions, fill = _rows(kept, np.arange(rows), rows, max_len, pad_id)
    return Packed(input_ids, labels, positions, _stats(len(examples), kept, input_ids, truncated),
                  lengths=fill.astype(np.int32))


def prepare_tokenized(train: Tokenized, replay: Tokenized | None, max_len: int, replay_share: float, seed: int,
                      pad_id: int, pack: bool = True, bucket_rows: int = 256) -> Packed:
    """Mix replay into the training examples, then pack them (or bucket them, one a row)."""
    replay_count = len(replay) if replay is not None else 0
    mixed = mix_replay(list(range(len(train))), list(range(len(train), len(train) + replay_count)),
                       replay_share, seed)
    examples = Tokenized.concat([train, replay]) if replay_count else train
    examples = examples.select(mixed)
    packed = (pack_examples(examples, max_len, pad_id) if pack
              else bucket_examples(examples, max_len, pad_id, bucket_rows, seed))
    packed.stats["packed"] = pack
    packed.stats["replay_rows"] = len(mixed) - len(train)
    packed.stats["replay_share"] = round((len(mixed) - len(train)) / max(len(mixed), 1), 4)
    return packed


def prepare(tokenizer, train: list[dict], replay: list[dict], max_len: int, replay_share: float, seed: int,
            pack: bool = True, bucket_rows: int = 256) -> Packed:
    """Rows (prompt/response or messages) -> packed (or length-bucketed) training rows."""
    tokenized = tokenize_conversations(tokenizer, [as_conversation(r) for r in train + replay])
    train_part = tokenized.select(np.arange(len(train)))
    replay_part = tokenized.select(np.arange(len(train), len(train) + len(replay))) if replay else None
    return prepare_tokenized(train_part, replay_part, max_len, replay_share, seed, tokenizer.pad_token_id,
                             pack, bucket_rows)
