"""Resuming a run: the fingerprint a resumed run must share with the one that wrote the state, and
the state itself (sharded model and optimizer, the loop's position), saved at epoch ends and every
`train.checkpoint_every_steps`, loaded when the same run starts again."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch

from pipeline.train.checkpoint import MANIFEST

# the logistics: settings a resumed run may change without changing the math
LOGISTICS = (
    "keep_last",
    "checkpoint_every_steps",
    "log_every_steps",
    "device",
    "export_dtype",
    "export_shard_size",
    "collective_timeout_minutes",
)


def fingerprint(cfg, meta: dict, rows: int) -> str:
    """What a resumed run must share with the run that wrote the state: the math (config, data and
    the training code: this package and the distributed runtime), not the logistics."""
    config = {k: v for k, v in cfg.model_dump().items() if k not in LOGISTICS}
    sources = sorted(Path(__file__).parent.glob("*.py")) + [Path(__file__).parents[1] / "dist.py"]
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}
    blob = json.dumps(
        {
            "config": config,
            "data": meta.get("data_sha256"),
            "rows": rows,
            "code": code,
            "adapters": meta.get("adapters"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Resume:
    """One run's resume point under `state_dir` (None: the run keeps no state and always starts afresh)."""

    def __init__(self, state_dir: Path | None, run_id: str, runtime):
        self.state_dir, self.run_id, self.runtime = state_dir, run_id, runtime

    def start(self, sharded, scheduler, out_dir: Path) -> dict:
        """Load the newest matching state into `sharded` and `scheduler` and return the loop's position
        {"step", "history", "tokens"}; a fresh run (step 0) first empties the checkpoints and the state."""
        runtime = self.runtime
        position = {"step": 0, "history": [], "tokens": 0}
        resumed = load_train_state(self.state_dir, self.run_id, runtime) if self.state_dir else None
        if resumed:
            path, trainer = resumed
            sharded.load(path / "shards")
            scheduler.load_state_dict(trainer["scheduler"])
            torch.set_rng_state(trainer["rng"])
            position = {k: trainer[k] for k in position}
        elif self.state_dir:  # a fresh run: nothing from another configuration may survive
            # emptied, not removed: either may be a link into a bucket; every node clears its own view
            stale = [Path(out_dir)] if runtime.is_main else []
            for folder in stale + ([Path(self.state_dir)] if runtime.is_node_main else []):
                clear_train_state(folder)
        runtime.barrier()
        return position

    def save(self, epoch: int, step: int, sharded, scheduler, history: list[dict], tokens: int) -> None:
        if self.state_dir:
            save_train_state(
                self.state_dir,
                sharded,
                {
                    "epoch": epoch,
                    "step": step,
                    "fingerprint": self.run_id,
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": history,
                    "tokens": tokens,
                },
                self.runtime,
            )

    def finish(self) -> None:
        """Finished: a later run starts afresh instead of resuming at the end."""
        if self.state_dir and self.runtime.is_node_main:
            clear_train_state(self.state_dir)
        self.runtime.barrier()


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
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and not _LISTING.fullmatch(f.name)
    }


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
        (folder / MANIFEST).write_text(
            json.dumps({**{k: trainer[k] for k in ("epoch", "step", "fingerprint")}, "nodes": runtime.nodes}) + "\n"
        )
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
