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


# ------------------------------------------------------------------ resumable training state
# One copy, the newest: sharded model + optimizer (torch.distributed.checkpoint, every rank
# writes its own shard), and the loop's position (epoch, step, scheduler, RNG, loss history).
# It is written to a temporary folder and swapped in once every rank has finished writing; the
# manifest goes last, so a folder without one is a write that never finished and is ignored.

def save_train_state(root: Path, sharded, trainer: dict, runtime) -> None:
    """Every rank writes its shards (the strategy's own format), rank 0 the loop's state, then the
    manifest; `latest` is swapped in only when all of it is on disk."""
    import torch

    root = Path(root)
    tmp, latest, old = root / ".tmp", root / "latest", root / ".old"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    sharded.save(tmp / "shards")
    runtime.barrier()
    if runtime.is_main:
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / MANIFEST).write_text(json.dumps({k: trainer[k] for k in ("epoch", "step", "fingerprint")}) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if latest.exists():
            latest.rename(old)
        tmp.rename(latest)
        shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()


def load_train_state(root: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The newest complete state written by a run with the same fingerprint, else None."""
    import torch

    latest = Path(root) / "latest"
    if not (latest / MANIFEST).exists():
        return None
    if json.loads((latest / MANIFEST).read_text()).get("fingerprint") != fingerprint:
        return None
    return latest, torch.load(latest / "trainer.pt", weights_only=False)


def clear_train_state(root: Path) -> None:
    shutil.rmtree(Path(root), ignore_errors=True)
