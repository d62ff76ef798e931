"""pr_comment: the one pull-request comment, assembled from the reports the PR workflow wrote.

Each section is a markdown file a step produced (contract, params diff, GPU plan, data statistics,
gate); a missing one is named, not silently dropped. Images are left out: their relative paths do
not resolve in a comment (the job summary and the artifacts keep them).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.github import COMMENT_MARKER
from pipeline.paths import PATHS

SECTIONS = (  # (title, file) in the order a reviewer reads them
    ("Data contract", (PATHS.validate / "contract.md").as_posix()),
    ("Params and metrics vs the base branch", "params-diff.md"),
    ("GPU plan", (PATHS.plan / "plan.md").as_posix()),
    ("Training data statistics", (PATHS.data_report / "stats.md").as_posix()),
    ("Eval gate of the CPU smoke run (the demo)", "smoke/gate.md"),  # never the committed gate/
)
MAX_CHARS = 60_000  # GitHub refuses comments over 65,536 characters
_IMAGE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


# What decides whether a model ships: a PR that changes any of it says so first, in bold (docs/ci.md:
# CODEOWNERS review for evals/, and rulesets for the release path).
GUARDED = (
    "evals/",
    ".github/release-signers",
    ".github/workflows/",
    ".github/CODEOWNERS",
    "sky/train.yaml",
    "dvc.yaml",
    "pipeline/gate.py",
    "pipeline/evaluate.py",
    "pipeline/card.py",
    "pipeline/publish.py",
    "pipeline/signing.py",
    "pipeline/github.py",
    "pipeline/cli.py",
)


def guarded_changes(
    base: str, eval_sets: list[str], root: Path = Path("."), read=None, policy: str | None = None
) -> list[str]:
    """The files of the gate's policy (`policy`, wherever params.yaml points), eval suite and release
    path this branch changes against `base` (git), and the eval sets (DVC-tracked data) whose bytes
    differ from `base`'s; an eval set that cannot be read at `base` is named as not compared."""
    import hashlib
    import subprocess

    changed = subprocess.run(
        ["git", "diff", "--name-only", f"{base}...HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    found = [name for name in changed if name.startswith(GUARDED) or name == policy]
    if read is None:
        import dvc.api

        def read(path: str, rev: str) -> bytes:
            return dvc.api.read(path, rev=rev, mode="rb", repo=str(root))

    for path in eval_sets:
        current = Path(root) / path
        try:
            before = read(path, base)
        except Exception:  # dvc raises many kinds: absent at base, no remote, no credentials
            found.append(f"{path} (not compared: not readable at {base} through DVC)")
            continue
        now = current.read_bytes() if current.is_file() else None
        if now is None or hashlib.sha256(now).digest() != hashlib.sha256(before).digest():
            found.append(path)
    return found


def build_comment(
    root: Path = Path("."), sections=SECTIONS, head: str | None = None, guarded: list[str] | None = None
) -> str:
    lines = [COMMENT_MARKER, "## SFT pipeline report" + (f" for {head[:12]}" if head else ""), ""]
    if guarded:
        lines += [
            "**This pull request changes what decides whether a model ships (the eval gate's policy, "
            "its eval sets or the release path): "
            + ", ".join(f"`{name}`" for name in guarded)
            + ". It needs the review of evals/'s code owners (docs/ci.md).**",
            "",
        ]
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
