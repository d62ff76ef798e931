"""Benchmark (not a test): the full raw-data contract on 1,000,000 synthetic rows.

    python benchmarks/contract_1m.py [rows]

Prints wall and CPU seconds, rows/s and peak memory for each phase: importing
great-expectations (once per run, not per row), loading the JSONL file into the normalised frame
(pipeline/data.py: plain pairs go through pyarrow's JSON reader), the token-length check
(contract.token_lengths_within with the demo tokenizer and max_seq_len 2048: a byte bound settles
most rows, the rest and a sample are tokenized), the loss-mask checks (prepare's tokenization of
the truncated rows and of one example per role sequence), the other derived columns (pair keys,
eval leakage, PII, phone numbers and secrets, control characters, special-token strings, blank
assistant turns, boilerplate, character counts, rows per source; phone numbers and secrets also
timed alone), fuzzy near-duplicates (MinHash LSH), the great-expectations suite, and the suite
again with its Data Docs. Goals (issues 14 and 26, idle 2 cores): the suite without fuzzy dedup <= 10 s, with it
<= 40 s. CPU seconds are printed too: on a shared machine they, not wall time, compare runs.
"""

import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import ValidateConfig
from pipeline.contract import (
    add_derived_columns,
    fuzzy_duplicates,
    loss_mask_flags,
    normalized_pairs,
    phone_numbers,
    run_suite,
    secrets,
    special_token_strings,
    token_lengths_within,
)
from pipeline.data import load_examples
from pipeline.demo import ENGLISH, build_tokenizer, pretraining_corpus, write_jsonl

SOURCES = ["web", "forum", "books", "support"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Task {i}: " + " ".join(rng.choices(ENGLISH, k=rng.randint(5, 30))),
            "response": " ".join(rng.choices(ENGLISH, k=rng.randint(5, 60))),
            "source": SOURCES[i % len(SOURCES)],
        }
        for i in range(n)
    ]


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main(rows: int) -> None:
    tokenizer = build_tokenizer(pretraining_corpus(0), 1024)
    held_out = [r["prompt"] for r in synthetic_rows(1000, seed=1)]
    timings = {}

    def timed(phase, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn(*args)
        timings[phase] = (time.perf_counter() - wall, time.process_time() - cpu, peak_gib())
        return value

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        write_jsonl(path, synthetic_rows(rows))
        baseline = peak_gib()
        timed("import great-expectations", __import__, "great_expectations")
        frame = timed("load JSONL (pipeline/data.py)", load_examples, path)
        tokens = timed("token lengths <= 2048 (bound + exact)", token_lengths_within, tokenizer, frame, 2048)
        loss_mask = timed("loss-mask checks (prepare's tokenization)", loss_mask_flags, tokenizer, frame, 2048, tokens)
        cfg = ValidateConfig(min_rows=10_000, near_duplicate_jaccard=None)
        derived = timed(
            "other derived columns (no fuzzy dedup)",
            add_derived_columns,
            frame,
            held_out,
            tokens,
            cfg,
            loss_mask,
            special_token_strings(tokenizer),
        )
        timed(
            "  of which: phone numbers (libphonenumber)",
            lambda: [phone_numbers(frame[f], cfg.phone_regions) for f in ("prompt", "response")],
        )
        timed("  of which: secrets (detect-secrets)", lambda: [secrets(frame[f]) for f in ("prompt", "response")])
        fuzzy = timed(
            "fuzzy near-duplicates (MinHash LSH, 0.8)",
            fuzzy_duplicates,
            normalized_pairs(frame).str.replace("\x1f", " "),
            0.8,
        )
        checks = timed("great-expectations suite", run_suite, derived, cfg, 2048)
        timed("suite + Data Docs", run_suite, derived, cfg, 2048, None, Path(tmp) / "docs")
        print(f"fuzzy near-duplicate rows: {int(fuzzy.sum())}")
    informational = (
        "suite + Data Docs",
        "  of which: phone numbers (libphonenumber)",
        "  of which: secrets (detect-secrets)",
        "fuzzy near-duplicates (MinHash LSH, 0.8)",
    )
    core = {phase: t for phase, t in timings.items() if phase not in informational}
    wall, cpu = sum(t[0] for t in core.values()), sum(t[1] for t in core.values())
    fuzzy_wall, fuzzy_cpu = timings["fuzzy near-duplicates (MinHash LSH, 0.8)"][:2]
    print("| phase | wall s | CPU s | rows/s (wall) | peak memory GiB |\n| --- | ---: | ---: | ---: | ---: |")
    for phase, (seconds, cpu_s, peak) in timings.items():
        print(f"| {phase} | {seconds:.1f} | {cpu_s:.1f} | {rows / seconds:,.0f} | {peak:.2f} |")
    print(
        f"| **suite without fuzzy dedup (no Data Docs)** | **{wall:.1f}** | **{cpu:.1f}** | **{rows / wall:,.0f}** | |"
    )
    print(
        f"| **with fuzzy dedup** | **{wall + fuzzy_wall:.1f}** | **{cpu + fuzzy_cpu:.1f}** | "
        f"**{rows / (wall + fuzzy_wall):,.0f}** | |"
    )
    print(
        f"\n{rows:,} rows, {len(checks)} expectations, all passed: {all(c['passed'] for c in checks)}; "
        f"peak memory {peak_gib():.2f} GiB (synthetic rows held before loading: {baseline:.2f} GiB)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
