"""prepare: replay mix, chat template, tokenization, loss masks, best-fit-decreasing packing.

Output rows are fixed-length sequences of whole examples. Position ids restart at 0 for every
example; the model turns those restarts into a block-diagonal causal mask, so no example ever
attends to another one packed beside it (see tests/test_prepare.py for the parity check).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np

IGNORE = -100


def render_prompt(tokenizer, prompt: str) -> str:
    """The exact text the model sees before its answer, in training and in evaluation."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


def tokenize_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the response and its end-of-turn token carry loss."""
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def mix_replay(train: list[dict], replay: list[dict], share: float, seed: int) -> list[dict]:
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


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices; longest examples first, each into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the bin capacity {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - size, len(bins) - 1))
        else:
            space, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (space - size, b))
    return bins


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, max_len] int32, pad id after the last example
    labels: np.ndarray  # [rows, max_len] int32, IGNORE on prompts and padding
    position_ids: np.ndarray  # [rows, max_len] int32, restarting at 0 for each example
    stats: dict


def pack_examples(examples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> Packed:
    truncated = 0
    clipped = []
    for ids, labels in examples:
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        clipped.append((ids, labels))
    bins = pack_best_fit_decreasing([len(ids) for ids, _ in clipped], max_len)
    input_ids = np.full((len(bins), max_len), pad_id, dtype=np.int32)
    labels = np.full((len(bins), max_len), IGNORE, dtype=np.int32)
    positions = np.zeros((len(bins), max_len), dtype=np.int32)
    for row, members in enumerate(bins):
        cursor = 0
        for i in sorted(members):  # stable order inside a row
            ids, lab = clipped[i]
            n = len(ids)
            input_ids[row, cursor:cursor + n] = ids
            labels[row, cursor:cursor + n] = lab
            positions[row, cursor:cursor + n] = np.arange(n)
            cursor += n
        positions[row, cursor:] = np.arange(max_len - cursor)  # padding is its own segment
    real = int(sum(len(ids) for ids, _ in clipped))
    stats = {
        "examples": len(examples),
        "rows": len(bins),
        "tokens": real,
        "supervised_tokens": int((labels != IGNORE).sum()),
        "fill": round(real / max(input_ids.size, 1), 4),
        "truncated": truncated,
    }
    return Packed(input_ids, labels, positions, stats)


def prepare(tokenizer, train: list[dict], replay: list[dict], max_len: int, replay_share: float,
            seed: int) -> Packed:
    mixed = mix_replay(train, replay, replay_share, seed)
    examples = [tokenize_pair(tokenizer, r["prompt"], r["response"]) for r in mixed]
    packed = pack_examples(examples, max_len, tokenizer.pad_token_id)
    packed.stats["replay_rows"] = len(mixed) - len(train)
    packed.stats["replay_share"] = round((len(mixed) - len(train)) / len(mixed), 4)
    return packed
