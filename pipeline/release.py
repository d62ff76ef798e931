"""The release commands of `sft`: the PR comment, the eval-gate commit status, the signed results of
a training run and the push of the gated weights to the Hub. They sit beside the modules that do
the work (pipeline/publish.py, signing.py, github.py, pr_comment.py) and import them lazily: the
training workflow runs `sft status set` with typer, pydantic and PyYAML installed, nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.console import fail, params
from pipeline.files import write_json, write_text
from pipeline.paths import PATHS

release_app = typer.Typer(no_args_is_help=True)


@release_app.command()
def publish(
    tag: str = typer.Option(..., envvar="RELEASE_TAG", help="release tag, e.g. v1.0.0"),
    folder: Path = typer.Option(PATHS.card, help="the folder `sft card` wrote"),
    gate_file: Path = typer.Option(PATHS.verdict, "--gate", help="the gate verdict"),
    sha: str = typer.Option(..., envvar="GITHUB_SHA", help="the tagged commit: the signed verdict must be its own"),
    manifest: Path = typer.Option(
        PATHS.manifest, help="the release manifest (signed through release/attestation.json)"
    ),
    signers: Path = typer.Option(Path(".github/release-signers"), help="allowed signers (public keys)"),
    repo_id: str = typer.Option(None, help="Hub repo (default: params.yaml card.repo_id)"),
    endpoint: str = typer.Option(None, envvar="HF_ENDPOINT", help="Hub URL (default: huggingface.co)"),
    token: str = typer.Option(None, envvar="HF_TOKEN", show_default=False),
    public: bool = typer.Option(False, "--public", help="create the repo public (default: private)"),
):
    """Push the card folder to the Hub as one commit and tag it; only the weights the gate passed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from pipeline.publish import PublishRefused
    from pipeline.publish import publish as push

    repo_id = repo_id or params().card.repo_id
    try:
        result = push(
            folder,
            gate_file,
            repo_id,
            tag,
            manifest_path=manifest,
            signers=signers,
            commit=sha,
            endpoint=endpoint,
            token=token,
            private=not public,
        )
    except PublishRefused as err:
        fail(f"publish refused: {err}")
    except OfflineModeIsEnabled:
        fail("publish: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    except HfHubHTTPError as err:
        fail(f"publish: the Hub answered {err}")
    if result.created:
        typer.echo(f"published {folder}/ to {repo_id} at commit {result.commit[:12]}, tagged {tag}")
    else:
        typer.echo(f"{repo_id}@{tag} already holds these weights (commit {result.commit[:12]}); nothing pushed")


@release_app.command()
def sign(
    sha: str = typer.Option(..., envvar="GIT_SHA", help="the trained commit the verdict is for"),
    manifest: Path = typer.Option(PATHS.manifest, help="the release manifest `sft card` wrote"),
):
    """Attest that `manifest` is the verdict of commit SHA and sign it with RELEASE_SIGNING_KEY (the
    training job, after the DAG): release/attestation.json and its .sig."""
    from pipeline.files import sha256_file
    from pipeline.signing import SignatureError, signing_key_from_env
    from pipeline.signing import sign as sign_file

    if not manifest.is_file():
        fail(f"{manifest}: not found; run `sft card` (a failed gate has nothing to sign)")
    attestation = manifest.with_name("attestation.json")
    write_json(attestation, {"commit": sha, "manifest_sha256": sha256_file(manifest)})
    try:
        signature = sign_file(attestation, signing_key_from_env())
    except SignatureError as err:
        fail(f"sign: {err}")
    typer.echo(f"signed {attestation} ({manifest} of {sha[:12]}) -> {signature}")


status_app = typer.Typer(no_args_is_help=True, help="The eval-gate commit status on GitHub.")
release_app.add_typer(status_app, name="status")


def _github():
    from pipeline.github import GitHub

    missing = [name for name in ("GITHUB_REPOSITORY", "GITHUB_TOKEN") if not os.environ.get(name)]
    if missing:
        fail(f"status: set {' and '.join(missing)} (in Actions they are set for you; pass the token via env)")
    return GitHub(
        os.environ.get("GITHUB_API_URL", "https://api.github.com"),
        os.environ["GITHUB_REPOSITORY"],
        os.environ["GITHUB_TOKEN"],
    )


@status_app.command("set")
def status_set(
    sha: str = typer.Option(..., envvar="GITHUB_SHA", help="commit to mark"),
    state: str = typer.Option(None, help="pending | success | failure | error"),
    description: str = typer.Option("", help="with --state"),
    from_gate: Path = typer.Option(None, help="a gate.json: success only if it passed"),
    signed: Path = typer.Option(
        None,
        help="with --from-gate: a pass counts only if this file's signature (<file>.sig) is there (the training job)",
    ),
    target_url: str = typer.Option(
        None,
        help="link shown beside the status (inside a SkyPilot "
        "managed job: the job's dashboard page when JOBS_DASHBOARD_URL is set)",
    ),
):
    """Set eval-gate: `--state pending --description ...` while training, `--from-gate gate/gate.json` after."""
    from pipeline.github import GitHubError, job_page, set_status, status_from_gate

    if (state is None) == (from_gate is None):
        fail("status set: pass exactly one of --state or --from-gate")
    target_url = job_page(dict(os.environ)) or target_url  # the job's own logs, not the workflow that launched it
    if from_gate is not None:
        state, description = status_from_gate(from_gate)
        if state == "success" and signed is not None and not signed.with_name(signed.name + ".sig").is_file():
            state, description = "error", f"the gate passed but {signed} is unsigned: nothing can be released (job log)"
    try:
        set_status(_github(), sha, state, description, target_url)
    except (GitHubError, ValueError) as err:
        fail(f"status set: {err}")
    typer.echo(f"eval-gate on {sha[:12]}: {state} ({description})")


@status_app.command("require")
def status_require(
    sha: str = typer.Option(..., envvar="GITHUB_SHA", help="commit to check"),
    creator: str = typer.Option(
        "", envvar="EVAL_GATE_ACCOUNT", help="the account whose eval-gate status counts (the job's token's)"
    ),
):
    """Exit 1 unless the commit's eval-gate status is success, set by the eval-gate account (the release check)."""
    from pipeline.github import GitHubError, ReleaseRefused, require_success

    try:
        status = require_success(_github(), sha, creator)
    except (GitHubError, ReleaseRefused) as err:
        fail(f"release refused: {err}")
    typer.echo(f"eval-gate on {sha[:12]}: success ({status.get('description', '')})")


@release_app.command()
def results(sha: str = typer.Option(..., envvar="GIT_SHA", help="the trained commit")):
    """Commit this run's dvc.lock and metrics to branch results/<sha> (the release checks it out)."""
    from pipeline.github import GitHubError, push_results, result_paths, results_branch

    try:
        names = result_paths()
    except FileNotFoundError as missing:
        fail(f"results: {missing} missing; run the whole DAG first")
    try:
        commit = push_results(_github(), sha, {name: Path(name).read_bytes() for name in names})
    except GitHubError as err:
        fail(f"results: {err}")
    typer.echo(f"results of {sha[:12]} committed as {commit[:12]} on {results_branch(sha)}")


@release_app.command("take-results")
def take_results_command(
    sha: str = typer.Option(..., envvar="GITHUB_SHA", help="the tagged commit"),
    checkout: Path = typer.Option(Path("results"), help="where results/<sha> is checked out"),
):
    """Copy the training results (dvc.lock, metrics, the signed release manifest) from results/<sha>,
    refusing a results commit that is not directly on the tagged commit or that changes other files."""
    from pipeline.github import ReleaseRefused, take_results

    try:
        taken = take_results(checkout, sha)
    except ReleaseRefused as err:
        fail(f"release refused: {err}")
    typer.echo(f"took {len(taken)} result file(s) of {sha[:12]} from {checkout}/")


@release_app.command("pr-comment")
def pr_comment(
    out: Path = typer.Option(Path("pr-comment.md"), help="where to write the comment"),
    post: int = typer.Option(None, help="PR number: create or update the one comment there"),
    head: str = typer.Option(None, help="the PR head commit, named in the heading"),
    base: str = typer.Option(
        None,
        help="the base branch's revision (origin/main): changes to the "
        "gate's policy, eval sets or release path are flagged",
    ),
):
    """Assemble the PR comment (contract, params diff, plan, data stats, gate); optionally post it."""
    from pipeline.github import GitHubError, upsert_comment
    from pipeline.pr_comment import build_comment, guarded_changes

    if base:
        p = params()
        guarded = guarded_changes(base, p.validate_.eval_sets, policy=p.gate.policy)
    else:
        guarded = None
    body = build_comment(Path("."), head=head, guarded=guarded)
    write_text(out, body)
    typer.echo(f"PR comment written to {out} ({len(body):,} characters)")
    if post is not None:
        try:
            action, comment_id = upsert_comment(_github(), post, body)
        except GitHubError as err:
            fail(f"pr-comment: {err}")
        typer.echo(f"PR #{post}: comment {comment_id} {action}")
