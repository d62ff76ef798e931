"""A local stand-in for SkyPilot's managed jobs: `sky jobs launch TASK` runs the task's `run:` the way
SkyPilot does on a cluster, with N "nodes" on localhost.

It is installed as the `sky` command of a package named skypilot (tests/lifecycle/act.py builds the
wheel), so train.yml's own `pip install skypilot==...` and `sky jobs launch ...` lines reach it
unchanged. What it does, as SkyPilot would:
- the workdir is uploaded once (the project's files without .git: tracked and not ignored, plus
  .dvc/config), then every node gets a copy of its own: no shared filesystem;
- each node's environment is the machine's (LOCAL_SKY_MACHINE_ENV: what the test's machines have,
  such as the Hub's address) plus the task's `envs`, overlaid by the launch's `--env`/`--secret`
  values (NAME alone takes the value from the caller's environment), plus SKYPILOT_NODE_RANK,
  SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE and SKYPILOT_TASK_ID (the managed
  job's id in it stays, its launch time changes on recovery); nothing else of the caller's
  environment reaches the job, so a variable train.yml forgets to pass is missing here too;
- the bucket named by `file_mounts` is a local folder (LOCAL_SKY_ROOT/buckets/<name>) mounted at
  its path, shared by every node and every attempt, as the bucket is;
- `--async` returns at once; a controller process runs the attempts and applies `job_recovery`:
  a job that ends with a non-zero exit is relaunched up to `max_restarts_on_errors` times;
- a preemption (`preempt`) kills every process of the job at once; `recover` is SkyPilot's recovery
  from it: fresh nodes (new working directories), same bucket.
The job's `setup:` (pip installs) is replaced by the test's own environment.
"""

from __future__ import annotations

import argparse
import json
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

from pipeline.files import copy_project

ROOT = Path(__file__).resolve().parents[2]
PASSED_THROUGH = ("HOME", "LANG", "TMPDIR", "USER")  # what any machine has


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_workdir(project: Path, dest: Path) -> Path:
    """The project's tracked and untracked files (not ignored), as SkyPilot uploads a workdir: no .git."""
    copy_project(project, dest)
    for name in (".dvc/config", ".dvc/config.local"):  # the remote the job pulls from, even where ignored
        if (project / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, dest / name)
    return dest


def kill_tree(pids: list[int]) -> None:
    """Every process under `pids` dies at once, as when the machines go: DVC and torchrun start
    process groups of their own, so the whole tree is collected first, then killed."""
    import psutil

    doomed = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            doomed += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in doomed:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(doomed, timeout=30)


@dataclass
class Nodes:
    processes: list[subprocess.Popen]
    logs: list[Path]

    def wait(self) -> list[int]:
        return [process.wait() for process in self.processes]


def start_nodes(
    workdir: Path, attempt: Path, bucket: Path, env: dict[str, str], spec: dict, task_id: str, gpus_per_node: int = 1
) -> Nodes:
    num_nodes = int(spec.get("num_nodes", 1))
    mount = next(iter(spec.get("file_mounts") or {"${CHECKPOINT_ROOT}": None}))
    port = free_port()
    processes, logs = [], []
    for rank in range(num_nodes):
        work = attempt / f"node{rank}"
        shutil.copytree(workdir, work)
        node_env = {
            **env,
            "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NUM_NODES": str(num_nodes),
            "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node),
            "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * num_nodes),
            "MASTER_PORT": str(port),
            "SKYPILOT_TASK_ID": task_id,
        }
        node_env[mount.strip("${}")] = str(bucket)  # the mount point is the bucket itself
        log = attempt / f"node{rank}.log"
        with log.open("w") as out:
            processes.append(
                subprocess.Popen(
                    ["bash", "-c", spec["run"]],
                    cwd=work,
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        logs.append(log)
    return Nodes(processes, logs)


class ManagedJob:
    """A launched job's record on disk (LOCAL_SKY_ROOT/jobs/<name>): request.json (task, environment,
    bucket), workdir/ (the upload), attempt-N/ (nodes' folders and logs, pids.json, result.json)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def request(self) -> dict:
        return json.loads((self.folder / "request.json").read_text())

    def attempts(self) -> list[Path]:
        return sorted(self.folder.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))

    def run_attempts(self) -> None:
        """The controller: attempts until one ends 0 or the restarts allowed on errors are spent."""
        request = self.request
        spec = request["spec"]
        restarts = ((spec.get("resources") or {}).get("job_recovery") or {}).get("max_restarts_on_errors", 0)
        for _ in range(restarts + 1):
            attempt = self.folder / f"attempt-{len(self.attempts())}"
            attempt.mkdir()
            launched = time.strftime("%Y-%m-%d-%H-%M-%S-000000", time.gmtime())
            task_id = f"sky-managed-{launched}_{self.folder.name}_{request['job_id']}-0"
            nodes = start_nodes(
                self.folder / "workdir", attempt, Path(request["bucket"]), request["env"], spec, task_id
            )
            (attempt / "pids.json").write_text(json.dumps([p.pid for p in nodes.processes]))
            codes = nodes.wait()
            (attempt / "result.json").write_text(json.dumps({"codes": codes}))
            if not any(codes):
                return

    def start_controller(self) -> None:
        with (self.folder / "controller.log").open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.lifecycle.local_sky", "controller", str(self.folder)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        (self.folder / "controller.pid").write_text(str(process.pid))

    def controller_running(self) -> bool:
        import psutil

        try:
            return psutil.Process(int((self.folder / "controller.pid").read_text())).status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, FileNotFoundError):
            return False

    def wait(self, timeout: float = 1800) -> list[dict]:
        """Every attempt's result, once the controller is done."""
        deadline = time.monotonic() + timeout
        while self.controller_running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.folder.name} still running after {timeout} s")
            time.sleep(1)
        return [json.loads((a / "result.json").read_text()) for a in self.attempts() if (a / "result.json").exists()]

    def preempt(self) -> None:
        """The machines go: the controller's and every node's processes die at once."""
        pids = [int((self.folder / "controller.pid").read_text())]
        attempts = self.attempts()
        if attempts and (attempts[-1] / "pids.json").exists():
            pids += json.loads((attempts[-1] / "pids.json").read_text())
        kill_tree(pids)

    def recover(self) -> None:
        """SkyPilot's recovery after a preemption: the same task on fresh nodes."""
        self.start_controller()

    def log(self, rank: int = 0, attempt: int = -1) -> str:
        return (self.attempts()[attempt] / f"node{rank}.log").read_text(errors="replace")

    def node_dirs(self, attempt: int = -1) -> list[Path]:
        return sorted(self.attempts()[attempt].glob("node*/"))


def launch(
    task: Path, name: str, values: dict[str, str], workdir: Path, sky_root: Path, machine_env: dict[str, str]
) -> ManagedJob:
    spec = yaml.safe_load(task.read_text())
    envs = {k: "" if v is None else str(v) for k, v in (spec.get("envs") or {}).items()}
    env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    env.update(machine_env)
    env.update(envs)
    env.update(values)
    bucket_name = next(iter((spec.get("file_mounts") or {}).values()), {}).get("name", "")
    for key, value in env.items():
        bucket_name = bucket_name.replace(f"${{{key}}}", value)
    if not bucket_name:
        raise SystemExit(f"{task}: file_mounts bucket name is empty (CHECKPOINT_BUCKET not passed?)")
    bucket = sky_root / "buckets" / bucket_name
    bucket.mkdir(parents=True, exist_ok=True)
    job = ManagedJob(sky_root / "jobs" / name)
    if job.folder.exists():
        raise SystemExit(f"a managed job named {name} already exists")
    job_id = len(list((sky_root / "jobs").glob("*"))) if (sky_root / "jobs").is_dir() else 0
    upload_workdir(workdir, job.folder / "workdir")
    (job.folder / "request.json").write_text(
        json.dumps({"spec": spec, "env": env, "bucket": str(bucket), "job_id": job_id + 1})
    )
    job.start_controller()
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sky")
    groups = parser.add_subparsers(dest="group", required=True)
    controller = groups.add_parser("controller")
    controller.add_argument("folder", type=Path)
    jobs = groups.add_parser("jobs").add_subparsers(dest="command", required=True)
    start = jobs.add_parser("launch")
    start.add_argument("task", type=Path)
    start.add_argument("--async", dest="detach", action="store_true")
    start.add_argument("--yes", "-y", action="store_true")
    start.add_argument("--name", required=True)
    start.add_argument("--env", action="append", default=[])
    start.add_argument("--secret", action="append", default=[])
    args = parser.parse_args(argv)
    if args.group == "controller":
        ManagedJob(args.folder).run_attempts()
        return 0
    values = {}
    for item in args.env + args.secret:
        key, has_value, value = item.partition("=")
        if not has_value and key not in os.environ:
            raise SystemExit(f"--env/--secret {key}: not set in the environment")
        values[key] = value if has_value else os.environ[key]
    root = Path(os.environ["LOCAL_SKY_ROOT"])
    job = launch(
        args.task, args.name, values, Path.cwd(), root, json.loads(os.environ.get("LOCAL_SKY_MACHINE_ENV", "{}"))
    )
    print(f"Managed job {args.name!r} submitted with ID {job.request['job_id']} ({job.folder})")
    if not args.detach:
        job.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
