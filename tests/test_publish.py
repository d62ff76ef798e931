"""`sft publish` end to end against a local Hub-API server: the gate and the weights' hash decide."""

import hashlib

from tests.releases import CARD, REPO, WEIGHTS, make_release, run_publish


def test_failed_gate_uploads_nothing(hub, tmp_path):
    result = run_publish(hub, make_release(tmp_path, passed=False))
    assert result.exit_code == 1
    assert "passed is not true (failing rules: golden)" in result.output
    assert hub.requests == []


def test_weights_changed_after_the_gate_upload_nothing(hub, tmp_path):
    release = make_release(tmp_path)
    (release.card / "model.safetensors").write_bytes(WEIGHTS + b"retrained")
    result = run_publish(hub, release)
    assert result.exit_code == 1
    assert "model.safetensors: changed since the gate (sha256 differs)" in result.output
    assert hub.requests == []


def test_publish_makes_one_private_commit_and_tags_it(hub, tmp_path):
    result = run_publish(hub, make_release(tmp_path))
    assert result.exit_code == 0, result.output
    commits = hub.pushed_commits(REPO)
    assert len(commits) == 1
    files = commits[0]["files"]
    assert files["model.safetensors"]["lfs"] == hashlib.sha256(WEIGHTS).hexdigest()  # weights went through LFS
    assert hub.lfs[files["model.safetensors"]["lfs"]] == WEIGHTS
    assert files["README.md"]["content"].decode() == CARD
    assert hub.repos[REPO].tags == {"v1.0.0": commits[0]["oid"]}
    assert hub.repos[REPO].private


def test_retry_after_success_pushes_nothing(hub, tmp_path):
    release = make_release(tmp_path)
    assert run_publish(hub, release).exit_code == 0
    before = len(hub.requests)
    again = run_publish(hub, release)
    assert again.exit_code == 0, again.output
    assert "already holds these weights" in again.output
    assert len(hub.pushed_commits(REPO)) == 1
    retried = [path for _, path in hub.requests[before:]]
    assert not [p for p in retried if "/commit/" in p or "/lfs-upload/" in p or "/tag/" in p]


def test_retry_after_a_lost_tag_tags_without_a_second_commit(hub, tmp_path):
    release = make_release(tmp_path)
    assert run_publish(hub, release).exit_code == 0
    hub.repos[REPO].tags.clear()  # the commit landed, the tag request did not
    again = run_publish(hub, release)
    assert again.exit_code == 0, again.output
    commits = hub.pushed_commits(REPO)
    assert len(commits) == 1 and hub.repos[REPO].tags == {"v1.0.0": commits[0]["oid"]}


def test_an_existing_tag_on_other_weights_is_never_moved(hub, tmp_path):
    release = make_release(tmp_path)
    assert run_publish(hub, release).exit_code == 0
    other = make_release(tmp_path / "other", weights=WEIGHTS + b"v2")  # gated and signed, other weights
    result = run_publish(hub, other, tag="v1.0.0")
    assert result.exit_code == 1 and "already exists on other weights" in result.output
    assert len(hub.pushed_commits(REPO)) == 1
