"""`sft data stats` / `sft data diff REV`: what a pull request does to the training data.

Rows, token lengths after the chat template (a histogram), duplicate and truncation shares; the
diff compares with the data of another git revision, read through DVC (`dvc.api.read`), so the
PR base's data comes from the DVC cache or remote without checking it out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.contract import normalized_pairs
from pipeline.prepare import token_lengths

BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]


def data_stats(frame: pd.DataFrame, tokenizer, max_seq_len: int) -> dict:
    lengths = token_lengths(tokenizer, frame["messages"].tolist())  # the count training and the contract see
    pairs = normalized_pairs(frame)
    counts, _ = np.histogram(lengths, bins=BINS)
    return {
        "rows": len(frame),
        "tokens": int(lengths.sum()),
        "tokens_p50": int(np.percentile(lengths, 50)),
        "tokens_p95": int(np.percentile(lengths, 95)),
        "tokens_max": int(lengths.max()),
        "duplicate_share": round(float(pairs.duplicated().mean()), 4),
        "truncated_share": round(float((lengths > max_seq_len).mean()), 4),
        "histogram": {label(i): int(c) for i, c in enumerate(counts) if c},
        "lengths": lengths.tolist(),
    }


def label(i: int) -> str:
    high = BINS[i + 1]
    return f"{BINS[i]}-{high - 1}" if high < 1 << 30 else f">={BINS[i]}"


def render_markdown(current: dict, other: dict | None = None, rev: str | None = None) -> str:
    keys = ["rows", "tokens", "tokens_p50", "tokens_p95", "tokens_max", "duplicate_share", "truncated_share"]
    if other is None:
        lines = ["## Training data", "", "| statistic | value |", "| --- | ---: |"]
        lines += [f"| {k} | {current[k]:,} |" for k in keys]
    else:
        lines = [
            f"## Training data: this branch vs `{rev}`",
            "",
            f"| statistic | `{rev}` | this branch | change |",
            "| --- | ---: | ---: | ---: |",
        ]
        for k in keys:
            change = current[k] - other[k]
            lines.append(f"| {k} | {other[k]:,} | {current[k]:,} | {change:+,.4g} |")
    lines += [
        "",
        "Token lengths (prompt + response, chat template applied):",
        "",
        "| tokens | rows |" + (f" `{rev}` |" if other else ""),
        "| --- | ---: |" + (" ---: |" if other else ""),
    ]
    labels = [label(i) for i in range(len(BINS) - 1)]
    for name in labels:
        if name in current["histogram"] or (other and name in other["histogram"]):
            row = f"| {name} | {current['histogram'].get(name, 0):,} |"
            lines.append(row + (f" {other['histogram'].get(name, 0):,} |" if other else ""))
    return "\n".join(lines) + "\n"


def plot_lengths(current: dict, path, other: dict | None = None, rev: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    top = max(current["lengths"] + (other["lengths"] if other else []))
    bins = np.linspace(0, top + 1, 40)
    if other:
        ax.hist(other["lengths"], bins=bins, alpha=0.5, label=rev, color="#9aa5b1")
    ax.hist(current["lengths"], bins=bins, alpha=0.6, label="this branch", color="#2f6fb0")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
