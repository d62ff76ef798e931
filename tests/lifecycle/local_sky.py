"""A local stand-in for SkyPilot's managed-job launcher: runs sky/train.yaml's `run:` the way SkyPilot
does on a cluster, with N "nodes" on localhost.

Each node gets a working directory of its own, synced from the project without `.git` (SkyPilot's
workdir sync), the task's `envs` overlaid by the launch's `--env` values, the SKYPILOT_* variables,
and the bucket mount at CHECKPOINT_ROOT (a local folder standing in for the bucket, shared by every
node, as the bucket is). The job's `setup:` (pip installs) is replaced by the test's own environment.
A preemption kills every node's process group, as a lost spot instance takes the whole job down;
`launch` again is SkyPilot's recovery: fresh nodes, same bucket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_workdir(project: Path, dest: Path) -> Path:
    """The project's tracked and untracked files (not ignored), as SkyPilot uploads a workdir: no .git."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=project,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (project / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, dest / name)
    for config in (".dvc/config", ".dvc/config.local"):  # the remote the job pulls from
        if (project / config).is_file():
            (dest / config).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / config, dest / config)
    return dest


@dataclass
class Job:
    nodes: list[subprocess.Popen]
    workdirs: list[Path]
    logs: list[Path]

    def wait(self, timeout: float = 1800) -> list[int]:
        deadline = time.monotonic() + timeout
        return [node.wait(timeout=max(1, deadline - time.monotonic())) for node in self.nodes]

    def preempt(self) -> None:
        """Every process of every node dies at once, as when the machines go: DVC and torchrun start
        process groups of their own, so the whole tree is collected first, then killed."""
        import psutil

        doomed = []
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                doomed += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for process in doomed:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        for node in self.nodes:
            node.wait()
        psutil.wait_procs(doomed, timeout=30)

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


def launch(project: Path, scratch: Path, bucket: Path, env: dict[str, str], num_nodes: int = 2,
           gpus_per_node: int = 1, task: Path = ROOT / "sky/train.yaml") -> Job:
    spec = yaml.safe_load(task.read_text())
    scratch.mkdir(parents=True, exist_ok=True)
    attempt = len(list(scratch.glob("attempt-*")))
    base = scratch / f"attempt-{attempt}"
    port = free_port()
    nodes, workdirs, logs = [], [], []
    for rank in range(num_nodes):
        work = sync_workdir(project, base / f"node{rank}")
        node_env = {**os.environ, **{k: str(v) for k, v in (spec.get("envs") or {}).items() if v is not None}, **env,
                    "CHECKPOINT_ROOT": str(bucket), "SKYPILOT_NODE_RANK": str(rank),
                    "SKYPILOT_NUM_NODES": str(num_nodes), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node),
                    "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * num_nodes), "MASTER_PORT": str(port),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        log = base / f"node{rank}.log"
        with log.open("w") as out:
            nodes.append(subprocess.Popen(["bash", "-c", spec["run"]], cwd=work, env=node_env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        workdirs.append(work)
        logs.append(log)
    return Job(nodes, workdirs, logs)
