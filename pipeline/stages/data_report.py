"""`sft data stats` / `sft data diff REV`: rows, token-length histogram (table and PNG), duplicate and
truncation shares of the training file, and against another revision's (read through DVC): for PRs."""

from __future__ import annotations

from pipeline.data import load_examples
from pipeline.files import DataError, write_json, write_text
from pipeline.paths import Paths
from pipeline.stages import StageError
from pipeline.stages.inputs import base_tokenizer
from pipeline.stats import data_stats, plot_lengths, render_markdown


def write_report(out, current: dict, other: dict | None = None, rev: str | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    plot_lengths(current, out / "lengths.png", other, rev)
    markdown = render_markdown(current, other, rev) + "\n![token lengths](lengths.png)\n"

    def strip(stats):  # the lengths themselves are in the plot
        return {k: v for k, v in stats.items() if k != "lengths"}

    write_json(
        out / "stats.json", {"current": strip(current), **({"other": strip(other), "rev": rev} if other else {})}
    )
    write_text(out / "stats.md", markdown)
    return markdown


def other_revision(params, rev: str):
    """The training file as revision `rev` has it."""
    import dvc.api

    try:  # bytes: a Parquet file is binary, and load_examples names a bad UTF-8 line itself
        text = dvc.api.read(params.data.train, rev=rev, mode="rb")
    except Exception as err:  # dvc raises many kinds: a bad rev, no cache, no remote
        raise StageError(
            f"{params.data.train}@{rev}: cannot read it through DVC ({type(err).__name__}: {err})"
        ) from None
    return load_examples(f"{params.data.train}@{rev}", text=text)


def run(params, paths: Paths, rev: str | None = None) -> str:
    """The report's markdown: this branch's statistics, beside `rev`'s when given."""
    try:
        current = load_examples(params.data.train)
        other = other_revision(params, rev) if rev else None
    except DataError as err:
        raise StageError(str(err)) from None
    tokenizer = base_tokenizer(paths.tokenizer, params.base)  # loaded once for both revisions
    max_seq_len = params.prepare.max_seq_len
    if other is None:
        return write_report(paths.data_report, data_stats(current, tokenizer, max_seq_len))
    return write_report(
        paths.data_report, data_stats(current, tokenizer, max_seq_len), data_stats(other, tokenizer, max_seq_len), rev
    )
