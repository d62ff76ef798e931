"""pr_comment: the one pull-request comment, assembled from the reports the PR workflow wrote.

Each section is a markdown file a step produced (contract, params diff, GPU plan, data statistics,
gate); a missing one is named, not silently dropped. Images are left out: their relative paths do
not resolve in a comment (the job summary and the artifacts keep them).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.github import COMMENT_MARKER

SECTIONS = (  # (title, file) in the order a reviewer reads them
    ("Data contract", "validate/contract.md"),
    ("Params and metrics vs the base branch", "params-diff.md"),
    ("GPU plan", "plan/plan.md"),
    ("Training data statistics", "data-report/stats.md"),
    ("Eval gate of the CPU smoke run (the demo)", "smoke/gate.md"),  # never the committed gate/
)
MAX_CHARS = 60_000  # GitHub refuses comments over 65,536 characters
_IMAGE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


def build_comment(root: Path = Path("."), sections=SECTIONS, head: str | None = None) -> str:
    lines = [COMMENT_MARKER, "## SFT pipeline report" + (f" for {head[:12]}" if head else ""), ""]
    for title, name in sections:
        path = Path(root) / name
        lines += ["<details open>" if "gate" in name else "<details>", f"<summary>{title}</summary>", ""]
        if path.is_file():
            lines += [line for line in path.read_text().splitlines() if not _IMAGE.match(line)]
        else:
            lines.append(f"_`{name}` was not produced (the step failed or was skipped; see the job log)._")
        lines += ["", "</details>", ""]
    text = "\n".join(lines)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + "\n\n_(truncated; the job summary has the full report)_\n"
    return text
