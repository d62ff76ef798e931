"""github: the `eval-gate` commit status, set from the gate verdict and read back for releases.

Plain HTTP against the REST API (GITHUB_API_URL), so a local test server stands in for GitHub.
States: `pending` while training, `success` only when gate.json says passed, `failure` with the
failing rules in the description, `error` when the pipeline stopped before the gate.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CONTEXT = "eval-gate"
MAX_DESCRIPTION = 140  # GitHub rejects longer status descriptions
STATES = ("pending", "success", "failure", "error")


class GitHubError(RuntimeError):
    """A GitHub API call failed; the message names the request."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class ReleaseRefused(RuntimeError):
    """The commit has no successful eval-gate status."""


@dataclass(frozen=True)
class GitHub:
    api_url: str  # GITHUB_API_URL, e.g. https://api.github.com
    repository: str  # owner/name
    token: str

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.api_url.rstrip('/')}/repos/{self.repository}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Accept": "application/vnd.github+json", "Authorization": f"Bearer {self.token}",
            "X-GitHub-Api-Version": "2022-11-28", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise GitHubError(f"{method} {url}: HTTP {err.code} {detail}", err.code) from None
        except urllib.error.URLError as err:
            raise GitHubError(f"{method} {url}: {err.reason}") from None


def truncate(text: str, limit: int = MAX_DESCRIPTION) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_from_gate(gate_path: Path) -> tuple[str, str]:
    """(state, description) for the eval-gate status, from gate.json; `error` if there is none."""
    gate_path = Path(gate_path)
    if not gate_path.is_file():
        return "error", f"no verdict: the pipeline stopped before the gate ({gate_path} missing; see the job log)"
    try:
        verdict = json.loads(gate_path.read_text())
        rules, chosen = verdict["rules"], verdict["chosen"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return "error", truncate(f"{gate_path}: unreadable verdict ({type(err).__name__}: {err})")
    if verdict.get("passed") is True:
        scores = ", ".join(f"{r['metric']} {r['observed']:.3f}" for r in rules)
        return "success", truncate(f"passed: {chosen} ({scores}), sha256 {verdict['sha256'][:12]}")
    failing = "; ".join(f"{r['metric']} {r['observed']:.3f} fails {r['rule']}" for r in rules if not r["passed"])
    return "failure", truncate(f"failed: {failing}")


def set_status(github: GitHub, sha: str, state: str, description: str, target_url: str | None = None,
               context: str = CONTEXT) -> dict:
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    body = {"state": state, "description": truncate(description), "context": context}
    if target_url:
        body["target_url"] = target_url
    return github.request("POST", f"/statuses/{sha}", body)


def get_status(github: GitHub, sha: str, context: str = CONTEXT) -> dict | None:
    """The latest status of `context` on `sha` (from the combined status), or None if never set."""
    combined = github.request("GET", f"/commits/{sha}/status?per_page=100")
    # the combined status lists only the latest status of each context
    return next((s for s in combined.get("statuses", []) if s.get("context") == context), None)


def require_success(github: GitHub, sha: str, context: str = CONTEXT) -> dict:
    """The successful status, else ReleaseRefused saying what the commit has instead."""
    status = get_status(github, sha, context)
    if status is None:
        raise ReleaseRefused(f"{sha}: no '{context}' status; train this commit (train.yml) before releasing it")
    if status["state"] != "success":
        raise ReleaseRefused(f"{sha}: '{context}' is {status['state']} ({status.get('description') or '-'}); "
                             "only a passing gate is released")
    return status


# ------------------------------------------------------------------ the one pull-request comment
COMMENT_MARKER = "<!-- sft-pr-comment -->"  # hidden; finds our comment again to update it in place


def upsert_comment(github: GitHub, number: int, body: str, marker: str = COMMENT_MARKER) -> tuple[str, int]:
    """Update the comment that starts with `marker` on issue/PR `number`, or create it: ("updated"|"created", id)."""
    body = body if body.startswith(marker) else f"{marker}\n{body}"
    page = 1
    while True:  # 100 a page; a busy PR can have more
        comments = github.request("GET", f"/issues/{number}/comments?per_page=100&page={page}")
        mine = next((c for c in comments if c.get("body", "").startswith(marker)), None)
        if mine:
            github.request("PATCH", f"/issues/comments/{mine['id']}", {"body": body})
            return "updated", mine["id"]
        if len(comments) < 100:
            break
        page += 1
    created = github.request("POST", f"/issues/{number}/comments", {"body": body})
    return "created", created["id"]


# ------------------------------------------------------------------ training results on a branch
# The training job runs from a synced workdir without .git, so its dvc.lock and metrics reach git
# through the Git Data API: one commit on top of the trained commit, on branch results/<sha>.
# The release checks that branch out: its dvc.lock names the exact checkpoint and card to pull.
RESULT_FILES = ("dvc.lock", "validate/contract.json", "prepare/stats.json", "train/metrics.json",
                "evaluate/base.json", "evaluate/checkpoints.json", "evaluate/suite.json", "gate/gate.json",
                "gate/gate.md", "gate/change.png")
RESULT_DIRS = ("train/live",)  # DVCLive's per-step metrics and plots: `dvc plots diff` on the results


def is_result_path(name: str) -> bool:
    return name in RESULT_FILES or any(name.startswith(folder + "/") for folder in RESULT_DIRS)


def result_paths(root: Path = Path(".")) -> list[str]:
    """Every result file of a finished run, relative to `root`; a missing one is an error naming it."""
    root = Path(root)
    missing = [name for name in RESULT_FILES + RESULT_DIRS if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(", ".join(missing))
    found = [str(f.relative_to(root)) for folder in RESULT_DIRS for f in sorted((root / folder).rglob("*"))
             if f.is_file()]
    return list(RESULT_FILES) + found


def results_branch(sha: str) -> str:
    return f"results/{sha}"


def push_results(github: GitHub, sha: str, files: dict[str, bytes]) -> str:
    """Commit `files` ({path: bytes}) on top of `sha` to results/<sha> (replaced on a rerun); the new commit.
    Each file is a blob of its own, base64-encoded, so plots travel as well as text."""
    base_tree = github.request("GET", f"/git/commits/{sha}")["tree"]["sha"]
    entries = []
    for path, data in files.items():
        blob = github.request("POST", "/git/blobs", {"content": base64.b64encode(data).decode(), "encoding": "base64"})
        entries.append({"path": path, "mode": "100644", "type": "blob", "sha": blob["sha"]})
    tree = github.request("POST", "/git/trees", {"base_tree": base_tree, "tree": entries})["sha"]
    commit = github.request("POST", "/git/commits", {"message": f"Training results for {sha}", "tree": tree,
                                                     "parents": [sha]})["sha"]
    branch = results_branch(sha)
    try:
        github.request("POST", "/git/refs", {"ref": f"refs/heads/{branch}", "sha": commit})
    except GitHubError as err:
        if err.code != 422:  # 422: the branch exists (a rerun of the same commit): move it
            raise
        github.request("PATCH", f"/git/refs/heads/{branch}", {"sha": commit, "force": True})
    return commit
