"""Epoch checkpoints: written atomically, carrying their config and data hash, last N kept.
(The resumable training state is train/resume.py's.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pipeline.files import atomic_dir, combine_digests, sha256_file, weight_files

MANIFEST = "manifest.json"
_EPOCH = re.compile(r"^epoch-(\d+)$")


def export_state(model, state_dict: dict | None, dtype: str) -> dict:
    """The weights to export, in `dtype` (bfloat16: half the bytes of the fp32 master weights, what the
    base ships in and what the Hub receives); the tied head is saved once, as save_pretrained does."""
    import torch

    from pipeline.train.strategies import drop_tied_head

    state = model.state_dict() if state_dict is None else state_dict
    cast = getattr(torch, dtype)
    return drop_tied_head(
        model, {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype) for k, v in state.items()}
    )


def save_checkpoint(
    model,
    tokenizer,
    root: Path,
    epoch: int,
    meta: dict,
    state_dict: dict | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
) -> Path:
    """Weights (sharded with an index past `max_shard_size`, as transformers writes large models),
    tokenizer and meta go into a temporary folder; the manifest (sha256 of every file) comes last.
    `model`: a plain causal LM (the training loop's export hook has merged any adapters)."""
    path = Path(root) / f"epoch-{epoch}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=export_state(model, state_dict, dtype), max_shard_size=max_shard_size)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype  # the exported weights' dtype, whatever the training copy was
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps({"epoch": epoch, **meta}, indent=2) + "\n")
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        weights = {f.name: files[f.name] for f in weight_files(tmp)}
        (tmp / MANIFEST).write_text(
            json.dumps(
                {"epoch": epoch, "weights": sorted(weights), "sha256": combine_digests(weights), "files": files},
                indent=2,
            )
            + "\n"
        )
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
    """The recorded weights hash, after every file the manifest lists is verified: a changed,
    missing or added weight file is an error, not a new hash."""
    checkpoint = Path(checkpoint)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for name, recorded in manifest["files"].items():
        if not (checkpoint / name).is_file():
            raise ValueError(f"{checkpoint}/{name}: missing (listed in its {MANIFEST})")
        actual = sha256_file(checkpoint / name)
        if actual != recorded:
            raise ValueError(f"{checkpoint}/{name}: sha256 {actual} differs from its {MANIFEST} ({recorded})")
    extra = sorted(f.name for f in weight_files(checkpoint) if f.name not in manifest["weights"])
    if extra:
        raise ValueError(f"{checkpoint}: weight files {extra} are not in its {MANIFEST}")
    return manifest["sha256"]
