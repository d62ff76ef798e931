"""Red team: every way found to ship a model the gate did not pass, tried against the release path.
Each attempt must be refused with a message naming what stopped it, and nothing may reach the Hub
stand-in. The honest release goes through (one commit and the tag)."""

import json
import math
import subprocess

import pytest

from pipeline.files import combine_digests, sha256_file
from pipeline.gate import Policy, Rule, decide, paired_bootstrap
from pipeline.github import GitHub, ReleaseRefused, require_success, take_results
from pipeline.signing import generate_keypair
from tests.fake_github import FakeGitHub
from tests.releases import REPO, make_release, run_publish


def refused(hub, release, *needles):
    result = run_publish(hub, release)
    assert result.exit_code == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert hub.requests == [], "nothing may reach the Hub"
    return result.output


def test_the_honest_release_goes_through(hub, tmp_path):
    release = make_release(tmp_path)
    result = run_publish(hub, release)
    assert result.exit_code == 0, result.output
    (commit,) = hub.pushed_commits(REPO)
    assert hub.repos[REPO].tags == {"v1.0.0": commit["oid"]}
    assert sorted(commit["files"]) == sorted([".gitattributes", *(p.name for p in release.card.iterdir())])


# 1. any file of the publishable folder changed after the gate: each kind of file
@pytest.mark.parametrize(
    "name",
    [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
        "README.md",
        "model.safetensors",
    ],
)
def test_a_file_changed_after_the_gate_is_refused(hub, tmp_path, name):
    release = make_release(tmp_path)
    path = release.card / name
    path.write_bytes(path.read_bytes() + b"\n{# jailbroken #}")
    refused(hub, release, f"{name}: changed since the gate (sha256 differs)")


def test_an_added_file_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    (release.card / "special_tokens_map.json").write_text('{"eos_token": "<|never|>"}')
    refused(hub, release, "special_tokens_map.json: not in the signed manifest (added)")


def test_a_removed_file_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    (release.card / "generation_config.json").unlink()
    refused(hub, release, "generation_config.json: missing")


def swap_weights(release) -> None:
    """Other weights in the card, and gate.json (both copies) edited to name their hash."""
    (release.card / "model.safetensors").write_bytes(b"other weights")
    verdict = release.verdict()
    verdict["sha256"] = combine_digests({"model.safetensors": sha256_file(release.card / "model.safetensors")})
    release.write_verdict(verdict)


def test_replaced_weights_with_gate_json_edited_to_match_are_refused(hub, tmp_path):
    release = make_release(tmp_path)
    swap_weights(release)
    refused(hub, release, "differs from the verdict", "was signed for (gate_sha256)")


def test_a_manifest_remade_for_other_weights_without_the_jobs_key_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    swap_weights(release)
    intruder, _ = generate_keypair(tmp_path)  # a key of the attacker's own: everything else made consistent
    release.resign(intruder)
    refused(hub, release, "attestation.json.sig: does not verify against", "not signed by the training job")


def test_a_manifest_edited_after_signing_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    manifest = json.loads(release.manifest.read_text())
    manifest["files"]["model.safetensors"] = "0" * 64
    release.manifest.write_text(json.dumps(manifest))
    refused(hub, release, "manifest.json: not the manifest the training job signed")


def test_an_attestation_edited_after_signing_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    attestation = json.loads(release.attestation.read_text())
    attestation["manifest_sha256"] = "0" * 64
    release.attestation.write_text(json.dumps(attestation))
    refused(hub, release, "does not verify", "not signed by the training job")


def test_a_missing_signature_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    release.attestation.with_name("attestation.json.sig").unlink()
    refused(hub, release, "attestation.json.sig: missing; the training job signs the verdict it reports")


def test_a_signed_verdict_of_another_commit_is_refused(hub, tmp_path):
    """Whoever can push results/<B> could copy run A's results, manifest and signature onto B: the
    signature holds, but it names A."""
    release = make_release(tmp_path)
    result = run_publish(hub, release, commit="b" * 40)
    assert result.exit_code == 1 and f"is not the tagged commit {'b' * 12}" in result.output
    assert hub.requests == []


def test_no_configured_signer_refuses_every_release(hub, tmp_path):
    release = make_release(tmp_path)
    release.signers.write_text("# no key yet\n")
    refused(hub, release, "release-signers: no release signer configured")


def test_a_verdict_whose_passed_contradicts_its_rules_is_refused(hub, tmp_path):
    release = make_release(tmp_path, passed=False)
    verdict = release.verdict()
    verdict["passed"] = True  # flipped by hand; the rules still say golden failed
    release.write_verdict(verdict)
    release.resign()  # even the job's own signature does not make a contradiction true
    refused(hub, release, "passed is true but rule(s) golden did not pass; the verdict contradicts itself")


def test_a_chosen_checkpoint_without_full_suite_results_is_refused(hub, tmp_path):
    release = make_release(tmp_path)
    verdict = release.verdict()
    verdict["candidates"]["epoch-3"]["full_suite"] = False
    release.write_verdict(verdict)
    release.resign()
    refused(hub, release, "candidates.epoch-3: the chosen checkpoint has no passing full-suite results")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda v: v.update(passed="true"), "gate.json: passed: Input should be a valid boolean"),  # truthy, not true
        (lambda v: v.update(rules=[]), "gate.json: rules: List should have at least 1 item"),
        (lambda v: v.update(chosen="epoch-9"), "gate.json: chosen 'epoch-9' is not one of the candidates"),
        (lambda v: v["rules"][0].update(passed=1), "gate.json: rules.0.passed: Input should be a valid boolean"),
        (lambda v: v.update(approved_by="release manager"), "gate.json: approved_by: unknown field"),
    ],
)
def test_a_verdict_not_in_the_gates_shape_is_refused_by_field(hub, tmp_path, edit, needle):
    release = make_release(tmp_path)
    verdict = release.verdict()
    edit(verdict)
    release.write_verdict(verdict)
    release.resign()
    refused(hub, release, needle, "nothing is published")


def test_a_moved_tag_is_refused(hub, tmp_path):
    assert run_publish(hub, make_release(tmp_path / "v1")).exit_code == 0
    before = len(hub.requests)
    other = make_release(tmp_path / "v2", weights=b"a later model, also gated" * 50)
    result = run_publish(hub, other, tag="v1.0.0")
    assert result.exit_code == 1 and "already exists on other weights" in result.output
    assert len(hub.pushed_commits(REPO)) == 1 and not [p for _, p in hub.requests[before:] if "/commit/" in p]


# 2. where the verdict and the status come from
def test_a_status_from_another_account_is_refused():
    with FakeGitHub() as github:
        intruder = github.add_account("mallory")
        GitHub(github.api_url, github.repository, intruder).request(
            "POST", "/statuses/" + "a" * 40, {"state": "success", "context": "eval-gate", "description": "trust me"}
        )
        with pytest.raises(ReleaseRefused, match="no 'eval-gate' status set by 'acme-sft-bot'.*by 'mallory'"):
            require_success(GitHub(github.api_url, github.repository, github.token), "a" * 40, "acme-sft-bot")


def _results_repo(tmp_path, files: dict[str, str]) -> tuple:
    repo = tmp_path / "results"
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True)  # noqa: E731
    repo.mkdir(parents=True)
    run("init", "-q")
    (repo / "params.yaml").write_text("train: {lr: 2.0e-5}\n")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "trained commit")
    trained = run("rev-parse", "HEAD").stdout.strip()
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "results")
    return repo, trained


def test_a_results_commit_not_on_the_tagged_commit_is_refused(tmp_path):
    repo, trained = _results_repo(tmp_path, {"gate/gate.json": "{}"})
    with pytest.raises(ReleaseRefused, match=f"sits on {trained[:12]}, not on the tagged commit {'b' * 12}"):
        take_results(repo, "b" * 40, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_results_commit_touching_other_files_is_refused(tmp_path):
    repo, trained = _results_repo(tmp_path, {"gate/gate.json": "{}", "evals/gate.yaml": "rules: []\n"})
    with pytest.raises(ReleaseRefused, match="changes more than results: evals/gate.yaml"):
        take_results(repo, trained, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    honest, trained = _results_repo(tmp_path / "ok", {"gate/gate.json": "{}", "release/manifest.json": "{}"})
    assert sorted(take_results(honest, trained, tmp_path / "dest")) == ["gate/gate.json", "release/manifest.json"]


# 3. the verdict itself fails closed
POLICY = Policy(rules=[Rule(metric="golden", min=0.5), Rule(metric="general", max_drop=0.05)])


def _items(n: int, right: int) -> dict[str, float]:
    return {f"general/{i}": 1.0 if i < right else 0.0 for i in range(n)}


def test_a_missing_metric_fails_its_rule_by_name():
    verdict = decide(
        POLICY, {"golden": 0.0, "general": 0.9}, {"epoch-1": {"golden": 0.9, "general": None}}, {"epoch-1": "a" * 64}
    )
    assert not verdict.passed and verdict.failed_rules == ["general"]
    assert "missing or not a finite number" in verdict.rules[1].problem


def test_a_nan_score_fails_its_rule_by_name():
    items = {"base": {"general": _items(400, 360)}, "epoch-1": {"general": _items(400, 360)}}
    verdict = decide(
        POLICY,
        {"golden": 0.0, "general": 0.9},
        {"epoch-1": {"golden": math.nan, "general": 0.9}},
        {"epoch-1": "a" * 64},
        items,
    )
    assert not verdict.passed and verdict.failed_rules == ["golden"]


def test_reordered_items_change_nothing_and_other_items_are_refused():
    base, candidate = _items(400, 360), _items(400, 330)
    shuffled = dict(sorted(candidate.items(), key=lambda kv: -kv[1]))  # the wrong answers first: no help
    assert paired_bootstrap(base, shuffled) == paired_bootstrap(base, candidate)
    easier = {f"general/{i + 1000}": 1.0 for i in range(400)}  # other (easier) items under new ids
    with pytest.raises(ValueError, match="paired items differ"):
        paired_bootstrap(base, easier)
