"""`sft publish` end to end against a local Hub-API server: the gate and the weights' hash decide."""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.files import combine_digests
from tests.fake_hub import FakeHub

REPO = "acme/tiny-sft"
WEIGHTS = b"\x00safetensors bytes the gate passed" * 100
CARD = "---\nlicense: apache-2.0\nbase_model: demo/tiny-llama\n---\n\n# acme/tiny-sft\n"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    # the Makefile runs tests offline; this server is the only "Hub" they reach. No Xet: it speaks LFS.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as server:
        yield server


def weights_digest(weights: bytes) -> str:
    """What the gate records for a folder with one model.safetensors."""
    return combine_digests({"model.safetensors": hashlib.sha256(weights).hexdigest()})


def make_release(tmp_path, passed=True, weights=WEIGHTS, gate_sha=None):
    card = tmp_path / "card"
    card.mkdir()
    (card / "model.safetensors").write_bytes(weights)
    (card / "README.md").write_text(CARD)
    (card / "config.json").write_text('{"model_type": "llama"}\n')
    rules = [{"metric": "golden", "rule": ">= 0.5", "observed": 0.585 if passed else 0.13, "passed": passed}]
    verdict = {"passed": passed, "chosen": "epoch-3", "rules": rules,
               "sha256": gate_sha or weights_digest(WEIGHTS)}
    (tmp_path / "gate.json").write_text(json.dumps(verdict))
    return card, tmp_path / "gate.json"


def run_publish(hub, card, gate, tag="v1.0.0"):
    return CliRunner().invoke(app, ["publish", "--tag", tag, "--folder", str(card), "--gate", str(gate),
                                    "--repo-id", REPO, "--endpoint", hub.endpoint, "--token", hub.token])


def test_failed_gate_uploads_nothing(hub, tmp_path):
    card, gate = make_release(tmp_path, passed=False)
    result = run_publish(hub, card, gate)
    assert result.exit_code == 1
    assert "passed is not true (failing rules: golden)" in result.output
    assert hub.requests == []


def test_weights_changed_after_the_gate_upload_nothing(hub, tmp_path):
    card, gate = make_release(tmp_path, weights=WEIGHTS + b"retrained")
    result = run_publish(hub, card, gate)
    assert result.exit_code == 1
    assert "weights (model.safetensors) sha256" in result.output and "not the weights the gate passed" in result.output
    assert hub.requests == []


def test_publish_makes_one_private_commit_and_tags_it(hub, tmp_path):
    card, gate = make_release(tmp_path)
    result = run_publish(hub, card, gate)
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
    card, gate = make_release(tmp_path)
    assert run_publish(hub, card, gate).exit_code == 0
    before = len(hub.requests)
    again = run_publish(hub, card, gate)
    assert again.exit_code == 0, again.output
    assert "already holds these weights" in again.output
    assert len(hub.pushed_commits(REPO)) == 1
    retried = [path for _, path in hub.requests[before:]]
    assert not [p for p in retried if "/commit/" in p or "/lfs-upload/" in p or "/tag/" in p]


def test_retry_after_a_lost_tag_tags_without_a_second_commit(hub, tmp_path):
    card, gate = make_release(tmp_path)
    assert run_publish(hub, card, gate).exit_code == 0
    hub.repos[REPO].tags.clear()  # the commit landed, the tag request did not
    again = run_publish(hub, card, gate)
    assert again.exit_code == 0, again.output
    commits = hub.pushed_commits(REPO)
    assert len(commits) == 1 and hub.repos[REPO].tags == {"v1.0.0": commits[0]["oid"]}


def test_an_existing_tag_on_other_weights_is_never_moved(hub, tmp_path):
    card, gate = make_release(tmp_path)
    assert run_publish(hub, card, gate).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    new_weights = WEIGHTS + b"v2"
    card2, gate2 = make_release(other, weights=new_weights, gate_sha=weights_digest(new_weights))
    result = run_publish(hub, card2, gate2, tag="v1.0.0")
    assert result.exit_code == 1 and "already exists on other weights" in result.output
    assert len(hub.pushed_commits(REPO)) == 1
