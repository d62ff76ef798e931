"""github: the `eval-gate` commit status, set from the gate verdict and read back for releases.

Plain HTTP against the REST API (GITHUB_API_URL), so a local test server stands in for GitHub.
States: `pending` while training, `success` only when gate.json says passed, `failure` with the
failing rules in the description, `error` when the pipeline stopped before the gate.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ArtifactError, Verdict, read
from pipeline.paths import PATHS

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
        request = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={
                "Accept": "application/vnd.github+json",
                "Authorization": f"Bearer {self.token}",
                "X-GitHub-Api-Version": "2022-11-28",
                "Content-Type": "application/json",
            },
        )
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
        verdict = read(gate_path, Verdict)
    except ArtifactError as err:
        return "error", truncate(f"unreadable verdict: {err}")
    if verdict.passed:
        scores = ", ".join(f"{r.metric} {_score(r.observed)}" for r in verdict.rules)
        return "success", truncate(f"passed: {verdict.chosen} ({scores}), sha256 {verdict.sha256[:12]}")
    failing = "; ".join(f"{r.metric} {_score(r.observed)} fails {r.rule}" for r in verdict.rules if not r.passed)
    return "failure", truncate(f"failed: {failing}")


def _score(value) -> str:
    return "missing" if value is None else f"{value:.3f}"


# A managed job's SKYPILOT_TASK_ID: sky-managed-<launch time>_<job name>_<job id>-<task id>. The time
# changes when SkyPilot recovers the job; the job id does not.
MANAGED_TASK_ID = re.compile(r"sky-managed-.+_(\d+)-\d+")


def job_page(env: dict[str, str]) -> str | None:
    """The SkyPilot dashboard page of the managed job this runs in (its logs and recoveries), from
    SKYPILOT_TASK_ID and JOBS_DASHBOARD_URL (`<API server>/dashboard/jobs`); None outside such a job.
    Credentials in the URL (user:password@) never reach the public status."""
    from urllib.parse import urlsplit, urlunsplit

    match = MANAGED_TASK_ID.fullmatch(env.get("SKYPILOT_TASK_ID", ""))
    parts = urlsplit(env.get("JOBS_DASHBOARD_URL", "").rstrip("/"))
    if not (match and parts.scheme and parts.hostname):
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, f"{parts.path}/{match.group(1)}", "", ""))


def set_status(
    github: GitHub, sha: str, state: str, description: str, target_url: str | None = None, context: str = CONTEXT
) -> dict:
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    body = {"state": state, "description": truncate(description), "context": context}
    if target_url:
        body["target_url"] = target_url
    return github.request("POST", f"/statuses/{sha}", body)


def get_status(github: GitHub, sha: str, context: str = CONTEXT) -> dict | None:
    """The latest status of `context` on `sha`, with its creator, or None if never set."""
    statuses = github.request("GET", f"/commits/{sha}/statuses?per_page=100")  # newest first
    return next((s for s in statuses if s.get("context") == context), None)


def require_success(github: GitHub, sha: str, creator: str, context: str = CONTEXT) -> dict:
    """The successful status set by `creator` (the account of the training job's token), else
    ReleaseRefused saying what the commit has instead. Anyone with `statuses: write` can set a status
    named eval-gate; only the configured account's counts."""
    if not creator.strip():
        raise ReleaseRefused(
            "no eval-gate account configured: set the repository variable EVAL_GATE_ACCOUNT to the "
            "login of EVAL_GATE_TOKEN's account (docs/ci.md)"
        )
    statuses = [
        s for s in github.request("GET", f"/commits/{sha}/statuses?per_page=100") if s.get("context") == context
    ]
    if not statuses:
        raise ReleaseRefused(f"{sha}: no '{context}' status; train this commit (train.yml) before releasing it")
    status = next((s for s in statuses if (s.get("creator") or {}).get("login") == creator), None)  # newest first
    if status is None:
        latest = statuses[0]
        raise ReleaseRefused(
            f"{sha}: no '{context}' status set by {creator!r} (EVAL_GATE_ACCOUNT), the training job's "
            f"account; the latest is {latest['state']} by {(latest.get('creator') or {}).get('login')!r} "
            f"({latest.get('description') or '-'}), and a status from another account proves nothing"
        )
    if status["state"] != "success":
        raise ReleaseRefused(
            f"{sha}: '{context}' is {status['state']} ({status.get('description') or '-'}); "
            "only a passing gate is released"
        )
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
RESULT_FILES = (
    "dvc.lock",
    *(
        path.as_posix()
        for path in (
            PATHS.contract,
            PATHS.prepare_stats,
            PATHS.metrics("train"),
            PATHS.metrics("lora"),
            *(PATHS.evaluate / f"{name}.json" for name in ("base", "checkpoints", "suite", "lora")),
            PATHS.verdict,
            *(PATHS.gate / name for name in ("gate.md", "change.png", "decision.json", "decision.png")),
        )
    ),
)
# DVCLive's per-step metrics and plots: `dvc plots diff` on the results
RESULT_DIRS = tuple((getattr(PATHS, run) / "live").as_posix() for run in ("train", "lora"))
# only when the gate passed: the manifest of card/, and the job's signed attestation of it for this commit
RELEASE_FILES = tuple(
    path.as_posix()
    for path in (PATHS.manifest, PATHS.release / "attestation.json", PATHS.release / "attestation.json.sig")
)


def is_result_path(name: str) -> bool:
    return name in RESULT_FILES + RELEASE_FILES or any(name.startswith(folder + "/") for folder in RESULT_DIRS)


def result_paths(root: Path = Path(".")) -> list[str]:
    """Every result file of a finished run, relative to `root`; a missing one is an error naming it."""
    root = Path(root)
    missing = [name for name in RESULT_FILES + RESULT_DIRS if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(", ".join(missing))
    found = [
        str(f.relative_to(root)) for folder in RESULT_DIRS for f in sorted((root / folder).rglob("*")) if f.is_file()
    ]
    return list(RESULT_FILES) + [name for name in RELEASE_FILES if (root / name).is_file()] + found


def take_results(checkout: Path, sha: str, dest: Path = Path(".")) -> list[str]:
    """Copy the files of the results commit checked out at `checkout` into `dest`, after checking that
    it sits directly on the tagged commit `sha` and changes result files only (ReleaseRefused, naming
    what is wrong, before anything is copied). The copied paths."""
    import shutil
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise ReleaseRefused(f"{checkout}: git {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    parent = git("rev-parse", "HEAD^")
    if parent != sha:
        raise ReleaseRefused(
            f"{checkout}: the results commit sits on {parent[:12]}, not on the tagged commit "
            f"{sha[:12]}; these are another commit's results"
        )
    changed = git("diff", "--name-only", "HEAD^", "HEAD").split()
    extra = [name for name in changed if not is_result_path(name)]
    if extra:
        raise ReleaseRefused(f"{checkout}: the results commit changes more than results: {', '.join(extra)}")
    for name in changed:
        (Path(dest) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(checkout) / name, Path(dest) / name)
    return changed


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
    commit = github.request(
        "POST", "/git/commits", {"message": f"Training results for {sha}", "tree": tree, "parents": [sha]}
    )["sha"]
    branch = results_branch(sha)
    try:
        github.request("POST", "/git/refs", {"ref": f"refs/heads/{branch}", "sha": commit})
    except GitHubError as err:
        if err.code != 422:  # 422: the branch exists (a rerun of the same commit): move it
            raise
        github.request("PATCH", f"/git/refs/heads/{branch}", {"sha": commit, "force": True})
    return commit
