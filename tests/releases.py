"""An honest release as the training job leaves it, for the publish and red-team tests: the card
folder (weights, config, tokenizer, chat template, generation config, model card, verdict), gate.json
consistent with its rules, the release manifest `sft card` writes, and the attestation `sft sign`
writes (the commit and the manifest's hash) signed by the job's key."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from pipeline.artifacts import write
from pipeline.cli import app
from pipeline.files import combine_digests, file_manifest, sha256_file
from pipeline.signing import generate_keypair, sign
from tests.verdicts import drop_rule, hard_rule, make_verdict

REPO = "acme/tiny-sft"
COMMIT = "c0ffee" * 6 + "c0ff"  # the trained (and tagged) commit
WEIGHTS = b"\x00safetensors bytes the gate passed" * 100
CARD = "---\nlicense: apache-2.0\nbase_model: demo/tiny-llama\n---\n\n# acme/tiny-sft\n"
CHECKPOINT_FILES = {
    "config.json": '{"model_type": "llama", "dtype": "bfloat16"}\n',
    "generation_config.json": '{"eos_token_id": 2, "do_sample": false}\n',
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"eos_token": "<|end|>"}\n',
    "chat_template.jinja": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}",
}


@functools.cache
def job_key() -> tuple[str, str]:
    """(private key, allowed-signers line) of the training job, made once per test session."""
    return generate_keypair(Path(tempfile.mkdtemp(prefix="release-key-")))


def weights_digest(weights: bytes) -> str:
    """What the gate records for a folder with one model.safetensors."""
    return combine_digests({"model.safetensors": hashlib.sha256(weights).hexdigest()})


@dataclass
class Release:
    card: Path
    gate: Path
    manifest: Path
    signers: Path

    def verdict(self) -> dict:
        return json.loads(self.gate.read_text())

    def write_verdict(self, verdict: dict) -> None:
        """gate.json edited in both places it lives (gate/ and card/), as an attacker would."""
        for path in (self.gate, self.card / "gate.json"):
            path.write_text(json.dumps(verdict))

    @property
    def attestation(self) -> Path:
        return self.manifest.with_name("attestation.json")

    def resign(self, private_key: str | None = None, commit: str = COMMIT) -> None:
        """A manifest re-made for the folder as it is now, attested for `commit` and signed (by
        `private_key`, default the job's)."""
        self.manifest.write_text(
            json.dumps(
                {
                    **json.loads(self.manifest.read_text()),
                    "gate_sha256": sha256_file(self.gate),
                    "files": file_manifest(self.card),
                }
            )
        )
        attest(self.manifest, commit, private_key or job_key()[0])


def attest(manifest: Path, commit: str, private_key: str) -> None:
    """What `sft sign` writes: the commit and the manifest's sha256, signed."""
    attestation = manifest.with_name("attestation.json")
    attestation.write_text(json.dumps({"commit": commit, "manifest_sha256": sha256_file(manifest)}))
    sign(attestation, private_key)


def make_release(folder: Path, passed: bool = True, weights: bytes = WEIGHTS) -> Release:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(weights)
    for name, text in CHECKPOINT_FILES.items():
        (checkpoint / name).write_text(text)
    rules = [hard_rule("golden", 0.585 if passed else 0.13, 0.5), drop_rule("general", 0.9, 0.92)]
    verdict = make_verdict(rules, "epoch-3", weights_digest(weights), files=file_manifest(checkpoint))
    gate = folder / "gate" / "gate.json"
    write(gate, verdict)
    card = folder / "card"  # what `sft card` assembles
    shutil.copytree(checkpoint, card)
    (card / "README.md").write_text(CARD)
    shutil.copy2(gate, card / "gate.json")
    manifest = folder / "release" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(
        json.dumps(
            {
                "chosen": "epoch-3",
                "sha256": verdict.sha256,
                "gate_sha256": sha256_file(gate),
                "files": file_manifest(card),
            }
        )
    )
    signers = folder / "release-signers"
    signers.write_text(job_key()[1] + "\n")
    attest(manifest, COMMIT, job_key()[0])
    return Release(card, gate, manifest, signers)


def run_publish(hub, release: Release, tag: str = "v1.0.0", commit: str = COMMIT):
    return CliRunner().invoke(
        app,
        [
            "publish",
            "--tag",
            tag,
            "--sha",
            commit,
            "--folder",
            str(release.card),
            "--gate",
            str(release.gate),
            "--manifest",
            str(release.manifest),
            "--signers",
            str(release.signers),
            "--repo-id",
            REPO,
            "--endpoint",
            hub.endpoint,
            "--token",
            hub.token,
        ],
    )
