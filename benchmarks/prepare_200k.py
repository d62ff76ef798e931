"""Benchmark (not a test): the full prepare path on 200,000 synthetic conversations.

    python benchmarks/prepare_200k.py [conversations]

About 390 tokens a conversation (a user turn and an assistant turn of Zipf-distributed words,
a quarter with a system turn, one in ten with two exchanges), a 32,000-token byte-level BPE
trained here with `tokenizers`, a ChatML-style template. Times the chat template, tokenization
and loss masks (`tokenize_conversations`), then best-fit-decreasing packing into rows of 2048,
and prints tokens/s, conversations/s and fill. Goal on 2 cores: >= 1.36M tokens/s, 1.5x the
TRL-style baseline of ../shared/FACTS.md (datasets.map + trl.pack_dataset bfd: 906,000 tokens/s),
which runs here too on the same data when trl is importable (it is not a project dependency:
`pip install --no-deps --target /tmp/trl trl==1.16.0` and PYTHONPATH=/tmp/trl).
Last, a second `tokenize_file` of the same JSONL file shows the cache hit.
"""

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.prepare import ChatRenderer, pack_examples, tokenize_conversations, tokenize_file

BASELINE_TOKENS_PER_S = 906_000
MAX_LEN = 2048
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary(n: int, rng: np.random.Generator) -> np.ndarray:
    """n pseudo-words of 1-4 syllables, so the BPE sees a long tail, as in real text."""
    syllables = np.array([c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
    counts = rng.integers(1, 5, size=n)
    return np.array(["".join(rng.choice(syllables, size=k)) for k in counts])


def synthetic_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    words = vocabulary(60_000, rng)

    def text(k: int) -> str:  # word ranks follow a Zipf law, like word counts in real text
        return " ".join(words[np.minimum(rng.zipf(1.2, size=k), len(words)) - 1])

    conversations = []
    for i in range(n):
        turns = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
        for _ in range(2 if i % 10 == 0 else 1):
            answer_words = int(rng.integers(180, 360)) if i % 10 else 120
            turns += [
                {"role": "user", "content": text(90) + "?"},
                {"role": "assistant", "content": text(answer_words) + "."},
            ]
        conversations.append(turns)
    return conversations


def build_tokenizer(conversations: list[list[dict]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32_000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((m["content"] for c in conversations for m in c), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
    )


def trl_style_baseline(tokenizer, conversations: list[list[dict]]) -> tuple[float, float, float]:
    """FACTS.md's baseline on the same data: datasets.map(batched, num_proc=2) with a prompt mask
    (the prompt rendered with a generation prompt), then trl.pack_dataset bfd. Seconds for
    tokenizing and for packing, and the fill."""
    from datasets import Dataset
    from trl import pack_dataset

    def tokenize(batch):
        ids, masks = [], []
        for messages in batch["messages"]:
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
            full = tokenizer.apply_chat_template(messages, return_dict=False)
            ids.append(full)
            masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
        return {"input_ids": ids, "completion_mask": masks}

    dataset = Dataset.from_dict({"messages": conversations})
    start = time.perf_counter()
    tokenized = dataset.map(tokenize, batched=True, num_proc=2, remove_columns=["messages"])
    tokenizing = time.perf_counter() - start
    start = time.perf_counter()
    packed = pack_dataset(tokenized, seq_length=MAX_LEN, strategy="bfd")
    packing = time.perf_counter() - start
    fill = sum(map(len, tokenized["input_ids"])) / (len(packed) * MAX_LEN)
    return tokenizing, packing, fill


def main(n: int) -> None:
    conversations = synthetic_conversations(n)
    tokenizer = build_tokenizer(conversations[:20_000])
    start = time.perf_counter()
    renderer = ChatRenderer(tokenizer)
    for c in conversations:
        renderer.examples(c)
    render_only = time.perf_counter() - start

    results = {}
    for name, workers in (("2 forked processes", 2), ("1 process, Rust threads", 1)):
        start = time.perf_counter()
        tokenized = tokenize_conversations(tokenizer, conversations, workers=workers)
        tokenizing = time.perf_counter() - start
        start = time.perf_counter()
        packed = pack_examples(tokenized, MAX_LEN, tokenizer.pad_token_id)
        results[f"prepare: {name}"] = (tokenizing, time.perf_counter() - start, packed.stats["fill"])
    try:
        results["TRL-style baseline (datasets.map num_proc=2 + trl bfd)"] = trl_style_baseline(tokenizer, conversations)
    except ImportError as err:
        print(f"(no TRL-style baseline run here: {err}; FACTS.md measured {BASELINE_TOKENS_PER_S:,} tokens/s)")

    tokens = int(tokenized.offsets[-1])
    cores = len(os.sched_getaffinity(0))
    print(
        f"\n{n:,} conversations, {tokens:,} tokens ({tokens / n:.0f} a conversation), {cores} cores, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| path | tokenize s | pack s | total s | tokens/s | conversations/s | fill |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (tokenizing, packing, fill) in results.items():
        total = tokenizing + packing
        print(
            f"| {name} | {tokenizing:.1f} | {packing:.1f} | {total:.1f} | {tokens / total:,.0f} | "
            f"{n / total:,.0f} | {fill:.2%} |"
        )
    print(f"\nrendering the chat template alone (in the figures above): {render_only:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))

        def load(p):
            return [json.loads(line)["messages"] for line in Path(p).read_text().splitlines()]

        for attempt in ("first run (miss)", "second run (hit)"):
            start = time.perf_counter()
            again, hit = tokenize_file(tokenizer, path, load, Path(tmp) / "cache")
            print(f"tokenize_file, {attempt}: {time.perf_counter() - start:.1f} s, cache hit: {hit}")
        assert np.array_equal(again.ids, tokenized.ids) and np.array_equal(again.labels, tokenized.labels)
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
