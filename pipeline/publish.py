"""publish: push the card/ folder (weights + model card) to the Hugging Face Hub, tagged.

Refuses, before any request, unless all of this holds, naming what stopped it:
1. the training job's signed attestation (`release/attestation.json`: this commit, and the sha256 of
   the release manifest `sft card` wrote) verifies against the committed `.github/release-signers`
   (pipeline/signing.py), names the tagged commit, and names this manifest;
2. every file in the folder has exactly the sha256 the manifest lists: none missing, none added,
   none changed (weight shards, config, tokenizer, chat template, generation config, card);
3. gate.json is the one the manifest names, says passed, and agrees with its own rules: every rule
   passed, the chosen checkpoint ran the full suite, and the weights hash to its sha256.
One commit for the whole folder (huggingface_hub `upload_folder`), then the release tag on that
commit. A retry is harmless: a tag that already names these weights means the release is done;
files the Hub already holds are not committed again (no empty commit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ArtifactError, Verdict, read
from pipeline.files import combine_digests, file_manifest, manifest_differences, sha256_file, sha256_files, weight_files


class PublishRefused(ValueError):
    """The release must not happen; the message says which file and field stopped it."""


@dataclass(frozen=True)
class Published:
    repo_id: str
    tag: str
    commit: str
    created: bool  # False: the tag already named these weights, nothing was pushed


def check_release(
    folder: Path,
    gate_path: Path,
    manifest_path: Path | None = None,
    signers: Path | None = None,
    commit: str | None = None,
) -> Verdict:
    """The gate verdict, if the signed attestation, the manifest, the folder's files and the verdict
    all agree (module docstring); else PublishRefused. Without `manifest_path`, only the verdict and
    the weights are checked."""
    from pipeline.signing import SignatureError, verify

    folder, gate_path = Path(folder), Path(gate_path)
    if manifest_path is not None:
        attestation_path = Path(manifest_path).with_name("attestation.json")
        try:
            verify(attestation_path, signers)
        except SignatureError as err:
            raise PublishRefused(str(err)) from None
        attestation = _load_json(attestation_path, "the training job writes it with `sft sign`")
        if not commit or attestation.get("commit") != commit:
            raise PublishRefused(
                f"{attestation_path}: commit {str(attestation.get('commit'))[:12]} is not the tagged "
                f"commit {str(commit)[:12]}; a signed verdict of another commit proves nothing here"
            )
        if not Path(manifest_path).is_file() or attestation.get("manifest_sha256") != sha256_file(manifest_path):
            raise PublishRefused(f"{manifest_path}: not the manifest the training job signed (manifest_sha256)")
    if not gate_path.is_file():
        raise PublishRefused(f"{gate_path}: not found; run `sft gate` (the release needs its verdict)")
    try:
        verdict = read(gate_path, Verdict)
    except ArtifactError as err:
        raise PublishRefused(f"{err}; nothing is published") from None
    if not verdict.passed:
        failed = [r.metric for r in verdict.rules if not r.passed]
        raise PublishRefused(
            f"{gate_path}: passed is not true (failing rules: {', '.join(failed) or '-'}); nothing is published"
        )
    _check_consistent(verdict, gate_path)
    expected = verdict.sha256
    if len(expected) != 64:
        raise PublishRefused(f"{gate_path}: sha256: missing or not a sha256 hex digest")
    if manifest_path is not None:
        _check_files(folder, gate_path, verdict, _load_json(Path(manifest_path), "run `sft card`"), Path(manifest_path))
    weights = weight_files(folder)
    if not weights:
        raise PublishRefused(f"{folder}: no *.safetensors weights; run `sft card`")
    actual = sha256_files(weights)
    if actual != expected:
        names = ", ".join(w.name for w in weights)
        raise PublishRefused(
            f"{folder}: weights ({names}) sha256 {actual} differs from {gate_path} sha256 "
            f"{expected}; these are not the weights the gate passed"
        )
    return verdict


def _load_json(path: Path, fix: str):
    if not path.is_file():
        raise PublishRefused(f"{path}: not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PublishRefused(f"{path}: not valid JSON ({err.msg})") from None


def _check_consistent(verdict: Verdict, gate_path: Path) -> None:
    """A verdict that says passed must show it: every rule of the chosen checkpoint passed, and that
    checkpoint ran the full suite and passed it. (The model already refused a verdict without rules,
    or whose chosen checkpoint is no candidate.)"""
    failing = [r.metric for r in verdict.rules if not r.passed]
    if failing or verdict.failed_rules:
        raise PublishRefused(
            f"{gate_path}: passed is true but rule(s) {', '.join(failing or verdict.failed_rules)} "
            "did not pass; the verdict contradicts itself"
        )
    chosen = verdict.candidates[verdict.chosen]
    if not chosen.full_suite or not chosen.passed:
        raise PublishRefused(
            f"{gate_path}: candidates.{verdict.chosen}: the chosen checkpoint has no passing full-suite results"
        )


def _check_files(folder: Path, gate_path: Path, verdict: Verdict, manifest: dict, manifest_path: Path) -> None:
    """The folder holds exactly the manifest's files, byte for byte, and the manifest is of this verdict."""
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise PublishRefused(f"{manifest_path}: files: missing or empty")
    if manifest.get("gate_sha256") != sha256_file(gate_path):
        raise PublishRefused(f"{gate_path}: differs from the verdict {manifest_path} was signed for (gate_sha256)")
    missing, extra, changed = manifest_differences(listed, file_manifest(folder))
    for problem, names in (
        ("missing", missing),
        ("not in the signed manifest (added)", extra),
        ("changed since the gate (sha256 differs)", changed),
    ):
        if names:
            raise PublishRefused(f"{folder}: {', '.join(names)}: {problem}; {manifest_path} lists what the gate passed")
    gated = verdict.files or {}
    if not gated or any(listed.get(name) != digest for name, digest in gated.items()):
        raise PublishRefused(f"{gate_path}: files: the checkpoint files the gate passed are not the manifest's")


def publish(
    folder: Path,
    gate_path: Path,
    repo_id: str,
    tag: str,
    *,
    manifest_path: Path,
    signers: Path,
    commit: str,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = True,
) -> Published:
    """Check the release (signature first) for the tagged `commit`, then create the repo (private
    unless told), commit the folder once, tag it."""
    from huggingface_hub import HfApi

    verdict = check_release(folder, gate_path, manifest_path, signers, commit)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)  # an existing repo keeps its visibility

    tagged = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
    if tag in tagged:
        # a tag never moves: it either already names these weights (a retry) or the release is refused
        names = [w.name for w in weight_files(folder)]
        remote = api.get_paths_info(repo_id, names, revision=tagged[tag])
        lfs = {f.path: f.lfs.sha256 for f in remote if getattr(f, "lfs", None)}
        remote_sha = combine_digests(lfs) if sorted(lfs) == sorted(names) else None
        if remote_sha != verdict.sha256:
            raise PublishRefused(
                f"{repo_id}@{tag}: the tag already exists on other weights ({remote_sha}); use a new tag"
            )
        return Published(repo_id, tag, tagged[tag], created=False)

    # create_commit skips files whose content the Hub already has, and makes no commit when all are
    # unchanged (a retry after the commit succeeded but the tag did not)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=f"Release {tag}: {verdict.chosen} (weights sha256 {verdict.sha256[:12]})",
        commit_description=f"Passed the eval gate; weights sha256 {verdict.sha256}.",
    )
    api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=f"weights sha256 {verdict.sha256}")
    return Published(repo_id, tag, commit.oid, created=True)
