"""Benchmark (not a test): the full raw-data contract on 1,000,000 synthetic rows.

    python benchmarks/contract_1m.py [rows]

Prints rows/s and peak memory for each phase: reading the JSONL file, the derived columns
(normalised pair keys, eval leakage) and the great-expectations suite. Goal: <= 30 s on 2 cores.
"""

import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import ValidateConfig
from pipeline.contract import add_derived_columns, load_pairs, run_suite
from pipeline.demo import ENGLISH, write_jsonl


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Task {i}: " + " ".join(rng.choices(ENGLISH, k=rng.randint(5, 30))),
             "response": " ".join(rng.choices(ENGLISH, k=rng.randint(5, 60)))} for i in range(n)]


def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        write_jsonl(path, synthetic_rows(rows))
        held_out = [r["prompt"] for r in synthetic_rows(1000, seed=1)]
        timings = {}
        start = time.perf_counter()
        frame = load_pairs(path)
        timings["read JSONL"] = time.perf_counter() - start
        start = time.perf_counter()
        frame = add_derived_columns(frame, held_out, 13)
        timings["derived columns"] = time.perf_counter() - start
        start = time.perf_counter()
        checks = run_suite(frame, ValidateConfig(min_rows=10_000))
        timings["great-expectations suite"] = time.perf_counter() - start
    total = sum(timings.values())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"| phase | seconds | rows/s |\n| --- | ---: | ---: |")
    for phase, seconds in timings.items():
        print(f"| {phase} | {seconds:.1f} | {rows / seconds:,.0f} |")
    print(f"| **total** | **{total:.1f}** | **{rows / total:,.0f}** |")
    print(f"\n{rows:,} rows, {len(checks)} expectations, all passed: {all(c['passed'] for c in checks)}; "
          f"peak memory {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
