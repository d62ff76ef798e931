"""Epoch checkpoints: written atomically, carrying their config and data hash, last N kept."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pipeline.files import atomic_dir, sha256_file

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
_EPOCH = re.compile(r"^epoch-(\d+)$")


def save_checkpoint(model, tokenizer, root: Path, epoch: int, meta: dict, state_dict: dict | None = None) -> Path:
    """Weights, tokenizer and meta go into a temporary folder; the manifest (sha256) comes last."""
    path = Path(root) / f"epoch-{epoch}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps({"epoch": epoch, **meta}, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps({"epoch": epoch, "weights": WEIGHTS,
                                                "sha256": sha256_file(tmp / WEIGHTS)}, indent=2) + "\n")
    return path


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    found = []
    for child in Path(root).glob("epoch-*"):
        match = _EPOCH.match(child.name)
        if match and (child / MANIFEST).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; return the deleted ones."""
    doomed = list_checkpoints(root)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def weights_sha256(checkpoint: Path) -> str:
    """The recorded hash, verified against the file: a changed file is an error, not a new hash."""
    recorded = json.loads((Path(checkpoint) / MANIFEST).read_text())["sha256"]
    actual = sha256_file(Path(checkpoint) / WEIGHTS)
    if actual != recorded:
        raise ValueError(f"{checkpoint}/{WEIGHTS}: sha256 {actual} differs from its manifest ({recorded})")
    return actual
