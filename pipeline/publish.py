"""publish: push the card/ folder (weights + model card) to the Hugging Face Hub, tagged.

Refuses, before any request, unless gate.json says the gate passed AND the weights in the
folder hash to the sha256 the gate recorded: nothing reaches the Hub but the exact bytes the
evals passed. One commit for the whole folder (huggingface_hub `upload_folder`), then the
release tag on that commit. A retry is harmless: a tag that already names these weights means
the release is done; files the Hub already holds are not committed again (no empty commit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import combine_digests, sha256_files, weight_files


class PublishRefused(ValueError):
    """The release must not happen; the message says which file and field stopped it."""


@dataclass(frozen=True)
class Published:
    repo_id: str
    tag: str
    commit: str
    created: bool  # False: the tag already named these weights, nothing was pushed


def check_release(folder: Path, gate_path: Path) -> dict:
    """The gate verdict, if it passed for exactly the weights in `folder`; else PublishRefused."""
    folder, gate_path = Path(folder), Path(gate_path)
    if not gate_path.is_file():
        raise PublishRefused(f"{gate_path}: not found; run `sft gate` (the release needs its verdict)")
    try:
        verdict = json.loads(gate_path.read_text())
    except json.JSONDecodeError as err:
        raise PublishRefused(f"{gate_path}: not valid JSON ({err.msg})") from None
    if not isinstance(verdict, dict) or verdict.get("passed") is not True:
        failed = [r.get("metric") for r in verdict.get("rules", []) if not r.get("passed")] if isinstance(
            verdict, dict) else []
        raise PublishRefused(f"{gate_path}: passed is not true (failing rules: {', '.join(map(str, failed)) or '-'}); "
                             "nothing is published")
    expected = verdict.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise PublishRefused(f"{gate_path}: sha256: missing or not a sha256 hex digest")
    weights = weight_files(folder)
    if not weights:
        raise PublishRefused(f"{folder}: no *.safetensors weights; run `sft card`")
    actual = sha256_files(weights)
    if actual != expected:
        names = ", ".join(w.name for w in weights)
        raise PublishRefused(f"{folder}: weights ({names}) sha256 {actual} differs from {gate_path} sha256 "
                             f"{expected}; these are not the weights the gate passed")
    return verdict


def publish(folder: Path, gate_path: Path, repo_id: str, tag: str, *, endpoint: str | None = None,
            token: str | None = None, private: bool = True) -> Published:
    """Check the gate, then create the repo (private unless told), commit the folder once, tag it."""
    from huggingface_hub import HfApi

    verdict = check_release(folder, gate_path)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)  # an existing repo keeps its visibility

    tagged = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
    if tag in tagged:
        # a tag never moves: it either already names these weights (a retry) or the release is refused
        names = [w.name for w in weight_files(folder)]
        remote = api.get_paths_info(repo_id, names, revision=tagged[tag])
        lfs = {f.path: f.lfs.sha256 for f in remote if getattr(f, "lfs", None)}
        remote_sha = combine_digests(lfs) if sorted(lfs) == sorted(names) else None
        if remote_sha != verdict["sha256"]:
            raise PublishRefused(f"{repo_id}@{tag}: the tag already exists on other weights ({remote_sha}); "
                                 "use a new tag")
        return Published(repo_id, tag, tagged[tag], created=False)

    # create_commit skips files whose content the Hub already has, and makes no commit when all are
    # unchanged (a retry after the commit succeeded but the tag did not)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder),
        commit_message=f"Release {tag}: {verdict['chosen']} (weights sha256 {verdict['sha256'][:12]})",
        commit_description=f"Passed the eval gate; weights sha256 {verdict['sha256']}.",
    )
    api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=f"weights sha256 {verdict['sha256']}")
    return Published(repo_id, tag, commit.oid, created=True)
