"""signing: the training job signs the release manifest; the release verifies it before anything else.

OpenSSH's file signatures (`ssh-keygen -Y sign / verify`), a standard offline tool every runner has:
the private key is a secret only the training job holds (RELEASE_SIGNING_KEY), the public key is
committed in `.github/release-signers` (an allowed-signers file, reviewed like code). Whoever can
push a `results/*` branch or set a commit status still cannot produce a signature that verifies.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

NAMESPACE = "sft-release"  # binds a signature to this use: a key's other signatures do not verify here
IDENTITY = "sft-release"  # the principal named in the allowed-signers file


class SignatureError(RuntimeError):
    """Signing or verification failed; the message names the file and the reason."""


def _ssh_keygen(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ssh-keygen", *args], input=stdin, capture_output=True)
    except FileNotFoundError:
        raise SignatureError("ssh-keygen not found: install OpenSSH's client (Debian/Ubuntu: openssh-client)") from None


def sign(path: Path, private_key: str) -> Path:
    """Write `<path>.sig`, the signature of `path` by `private_key` (OpenSSH private key text)."""
    path = Path(path)
    if not private_key.strip():
        raise SignatureError("no signing key: set RELEASE_SIGNING_KEY (docs/ci.md, 'Signed verdicts')")
    with tempfile.TemporaryDirectory() as scratch:
        key = Path(scratch) / "key"
        key.touch(mode=0o600)
        key.write_text(private_key.strip() + "\n")
        signature = path.with_name(path.name + ".sig")
        signature.unlink(missing_ok=True)  # ssh-keygen refuses to overwrite
        done = _ssh_keygen(["-Y", "sign", "-q", "-f", str(key), "-n", NAMESPACE, str(path)])
        if done.returncode != 0:
            raise SignatureError(f"{path}: signing failed: {done.stderr.decode(errors='replace').strip()}")
    return signature


def verify(path: Path, signers: Path) -> None:
    """Raise SignatureError unless `<path>.sig` is a signature of `path` by a key in `signers`."""
    path, signers = Path(path), Path(signers)
    signature = path.with_name(path.name + ".sig")
    if not signers.is_file() or not any(
        line.strip() and not line.lstrip().startswith("#") for line in signers.read_text().splitlines()
    ):
        raise SignatureError(
            f"{signers}: no release signer configured; add the training job's public key "
            "(docs/ci.md, 'Signed verdicts')"
        )
    for needed in (path, signature):
        if not needed.is_file():
            raise SignatureError(f"{needed}: missing; the training job signs the verdict it reports")
    done = _ssh_keygen(
        ["-Y", "verify", "-f", str(signers), "-I", IDENTITY, "-n", NAMESPACE, "-s", str(signature)],
        stdin=path.read_bytes(),
    )
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise SignatureError(
            f"{signature}: does not verify against {signers} ({reason[-1] if reason else 'no reason'});"
            " this verdict was not signed by the training job"
        )


def generate_keypair(folder: Path) -> tuple[str, str]:
    """(private key text, allowed-signers line) of a new ed25519 key: for tests and first setup."""
    key = Path(folder) / "release-key"
    done = _ssh_keygen(["-t", "ed25519", "-N", "", "-q", "-C", IDENTITY, "-f", str(key)])
    if done.returncode != 0:
        raise SignatureError(f"ssh-keygen: {done.stderr.decode(errors='replace').strip()}")
    public = key.with_suffix(".pub").read_text().split()
    return key.read_text(), f"{IDENTITY} {public[0]} {public[1]}"


def signing_key_from_env() -> str:
    return os.environ.get("RELEASE_SIGNING_KEY", "")
