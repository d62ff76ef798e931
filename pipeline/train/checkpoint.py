"""Epoch checkpoints: written atomically, carrying their config and data hash, last N kept."""

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
    return drop_tied_head(model, {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype)
                                  for k, v in state.items()})


def save_checkpoint(model, tokenizer, root: Path, epoch: int, meta: dict, state_dict: dict | None = None,
                    dtype: str = "bfloat16", max_shard_size: str = "5GB") -> Path:
    """Weights (sharded with an index past `max_shard_size`, as transformers writes large models),
    tokenizer and meta go into a temporary folder; the manifest (sha256 of every file) comes last."""
    path = Path(root) / f"epoch-{epoch}"
    if hasattr(model, "peft_config"):  # LoRA: the adapters merged, so the checkpoint is a plain model
        from pipeline.lora import merged

        model, state_dict = merged(model, state_dict)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=export_state(model, state_dict, dtype), max_shard_size=max_shard_size)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype  # the exported weights' dtype, whatever the training copy was
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps({"epoch": epoch, **meta}, indent=2) + "\n")
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        weights = {f.name: files[f.name] for f in weight_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps({"epoch": epoch, "weights": sorted(weights),
                                                "sha256": combine_digests(weights), "files": files},
                                               indent=2) + "\n")
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


# ------------------------------------------------------------------ resumable training state
# Sharded model + optimizer (torch.distributed.checkpoint, every rank writes its own shard) and the
# loop's position (epoch, step, scheduler, RNG, loss history), one write-once folder per step:
# `step-00000120/`. Nodes need not share a filesystem: on the cluster each node writes to its own
# mount of the bucket, uploaded in the background, so nothing is renamed and nothing is trusted
# until it is listed. Each node, after its ranks have written, records the files it sees with their
# sizes (`node-<n>.json`); a step is complete in a node's view when every node's listing is there
# and every listed file has its listed size. Resume takes the newest step complete in every node's
# view, so a node whose uploads were still in flight when the job died costs one step, not the run.

_STEP = re.compile(r"^step-(\d+)$")
_NODE = "node-{}.json"
_LISTING = re.compile(r"node-\d+\.json")


def _step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _step_folders(root: Path) -> dict[int, Path]:
    """{step: folder} of every step folder under `root`, complete or not."""
    return {int(m.group(1)): folder for folder in Path(root).glob("step-*") if (m := _STEP.match(folder.name))}


def _remove(path: Path) -> None:
    """Delete a file or folder that another node on a shared filesystem may be deleting too:
    only "already gone" is tolerated, any other failure is an error."""
    if path.is_dir() and not path.is_symlink():
        while path.exists():
            try:
                shutil.rmtree(path)
            except FileNotFoundError:  # a file went under us: carry on with what is left
                continue
    else:
        path.unlink(missing_ok=True)


def _listed_files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and not _LISTING.fullmatch(f.name)}


def complete_steps(root: Path, fingerprint: str) -> list[int]:
    """Steps whose state is complete in this node's view and was written by a run with this
    fingerprint, oldest first."""
    return sorted(step for step, folder in _step_folders(root).items() if _is_complete(folder, fingerprint))


def _is_complete(folder: Path, fingerprint: str) -> bool:
    # another node may be pruning this folder, or still writing a listing, while this one reads it:
    # a file that vanishes or does not parse yet makes the step incomplete, not the run fail
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
        if recorded.get("fingerprint") != fingerprint:
            return False
        listed = {}
        for node in range(recorded["nodes"]):
            listed.update(json.loads((folder / _NODE.format(node)).read_text()))
        return all((folder / name).stat().st_size == size for name, size in listed.items())
    except (FileNotFoundError, ValueError):
        return False


def save_train_state(root: Path, sharded, trainer: dict, runtime) -> None:
    """Every rank writes its shards (the strategy's own format), rank 0 the loop's state and the
    manifest, then each node lists what it wrote; older steps go once two newer ones are complete."""
    import torch

    folder = _step_folder(root, trainer["step"])
    if runtime.is_node_main:  # a folder left by a crashed attempt at this step must not count as done
        folder.mkdir(parents=True, exist_ok=True)
        for listing in folder.glob(_NODE.format("*")):
            _remove(listing)
    runtime.barrier()
    sharded.save(folder / "shards")
    runtime.barrier()
    if runtime.is_main:
        torch.save(trainer, folder / "trainer.pt")
        (folder / MANIFEST).write_text(json.dumps({**{k: trainer[k] for k in ("epoch", "step", "fingerprint")},
                                                   "nodes": runtime.nodes}) + "\n")
    runtime.barrier()  # on a shared filesystem another node must not list trainer.pt half-written
    if runtime.is_node_main:
        (folder / _NODE.format(runtime.node)).write_text(json.dumps(_listed_files(folder)) + "\n")
    runtime.barrier()
    if runtime.is_node_main:
        # keep the two newest steps complete in this node's view, and anything newer: the newest may
        # still be uploading this node's own files (they are visible here before they reach the bucket)
        done = complete_steps(root, trainer["fingerprint"])
        for step, old in _step_folders(root).items():
            if len(done) > 1 and step < done[-2]:
                _remove(old)
    runtime.barrier()


def load_train_state(root: Path, fingerprint: str, runtime=None) -> tuple[Path, dict] | None:
    """The newest state complete in every node's view and written by a run with the same
    fingerprint, else None. A collective when `runtime` spans several processes."""
    import torch

    steps = set(complete_steps(root, fingerprint))
    if runtime is not None:
        for other in runtime.gather(sorted(steps)):
            steps &= set(other)
    if not steps:
        return None
    folder = _step_folder(root, max(steps))
    return folder, torch.load(folder / "trainer.pt", weights_only=False)


def clear_train_state(root: Path) -> None:
    """Empty the state folder. It may be a symlink into a bucket mount (sky/train.yaml): the link
    stays, its contents go, and a failure to delete is an error (a stale state would make the next
    run "resume" at the end of this one)."""
    root = Path(root)
    if not root.exists():
        return
    for child in root.iterdir():
        _remove(child)
