"""The distributed runtime in one place: which strategy a run uses, the torchrun relaunch, and
joining and leaving the process group.

- `Strategy.of(train.strategy)`: what the rest of the code asks of the strategy name (sharded or
  not, DeepSpeed or fsdp2, offloaded, launched by torchrun), resolved once.
- `training_command` / `data_parallel_command`: the torchrun line that re-runs `sft <argv>`, on
  every GPU of every node (training) or of this node (evaluation); `relaunch_under_torchrun` execs it.
- `init_runtime` / `join_process_group` / `close`: this process's `Runtime` (rank, world, device)
  and the orderly exit from the group.
- `world`, `is_main`, `from_rank_zero`: rank questions asked where no Runtime is at hand (lm-eval's
  callbacks in pipeline/evaluate.py).
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STRATEGIES = ("single", "fsdp2", "zero3", "zero3_offload")


@dataclass(frozen=True)
class Strategy:
    """How the model is spread over devices (pipeline/train/strategies.py implements each)."""

    name: str
    sharded: bool  # parameters, gradients and optimizer state split over ranks; one process per GPU
    deepspeed: bool  # DeepSpeed's ZeRO-3 engine rather than torch's fully_shard
    offload: bool  # optimizer state and parameters kept in CPU memory between uses

    @classmethod
    def of(cls, name: str) -> Strategy:
        if name not in STRATEGIES:
            raise ValueError(f"train.strategy={name!r}: not one of {', '.join(STRATEGIES)}")
        return cls(name, sharded=name != "single", deepspeed=name.startswith("zero3"), offload=name == "zero3_offload")

    @property
    def fsdp(self) -> bool:
        return self.sharded and not self.deepspeed

    @property
    def needs_launcher(self) -> bool:
        """One process per GPU, started by torchrun (or the deepspeed launcher)."""
        return self.sharded

    def unsharded(self, world_size: int) -> bool:
        """fsdp2 on one GPU shards nothing: it runs the single path (autocast, no all-gathers), which
        measured about 19% faster."""
        return self.fsdp and world_size == 1

    def one_process(self, world_size: int) -> bool:
        """The whole model in this process: single, or fsdp2 on one rank."""
        return not self.sharded or self.unsharded(world_size)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    node: int = 0  # torchrun's GROUP_RANK: which machine
    nodes: int = 1
    local_rank: int = 0  # rank within the node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """One process per machine: for work on the node's own filesystem."""
        return self.local_rank == 0

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def totals(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Each number summed over all ranks, as a float64 tensor left where the collective ran: the
        host reads it only when it needs the figures (on a GPU, reading it waits for the queue)."""
        tensor = torch.as_tensor(values, dtype=torch.float64).contiguous()  # collectives need one block
        if self.world_size == 1:
            return tensor
        if tensor.device != self.device:  # pinned and asynchronous: a plain copy would wait for the GPU
            tensor = (tensor.pin_memory() if self.device.type == "cuda" else tensor).to(self.device, non_blocking=True)
        dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ------------------------------------------------------------------ the relaunch under torchrun


def _torchrun(
    argv: list[str], per_node: str, nodes: int = 1, node_rank: str = "0", master: str = "", port: str = "29500"
) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", per_node]
    if nodes == 1:
        launcher.append("--standalone")  # a free local port: two runs on one machine never collide
    else:
        launcher += ["--nnodes", str(nodes), "--node-rank", node_rank, "--master-addr", master, "--master-port", port]
    return [*launcher, "-m", "pipeline.cli", *argv]


def training_command(strategy: Strategy, argv: list[str], env) -> list[str] | None:
    """The torchrun command that re-runs this command (`argv`, e.g. ["train"]) on every GPU of every
    node, or None when it needs no launcher (single) or already runs under one. Nodes come from
    SkyPilot's variables, so `dvc repro` on a cluster node (or `dvc exp run` on one machine) trains
    the same way as a hand-written torchrun line."""
    if not strategy.needs_launcher or "WORLD_SIZE" in env:
        return None
    per_node = env.get("SKYPILOT_NUM_GPUS_PER_NODE") or str(torch.cuda.device_count())
    if int(per_node) < 1:
        raise RuntimeError(
            f"train.strategy={strategy.name} needs one process per GPU and this machine has none: "
            "set SKYPILOT_NUM_GPUS_PER_NODE (processes per node; gloo on CPU) or run "
            "`torchrun --nproc-per-node N -m pipeline.cli train`"
        )
    nodes = int(env.get("SKYPILOT_NUM_NODES", "1"))
    if nodes == 1:
        return _torchrun(argv, per_node)
    missing = [name for name in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS") if not env.get(name)]
    if missing:
        raise RuntimeError(
            f"train.strategy={strategy.name} on SKYPILOT_NUM_NODES={nodes} nodes: {', '.join(missing)} "
            "not set (SkyPilot sets them on every node; by hand, set them or run torchrun)"
        )
    master = env["SKYPILOT_NODE_IPS"].split()[0]  # one address per line, node 0 first
    return _torchrun(argv, per_node, nodes, env["SKYPILOT_NODE_RANK"], master, env.get("MASTER_PORT", "29500"))


def data_parallel_command(argv: list[str], env) -> list[str] | None:
    """The torchrun command that re-runs `sft <argv>` once per GPU of this node, or None on one
    device or under a launcher already. Evaluation stays on one node: node 0 runs it."""
    gpus = torch.cuda.device_count()
    if "WORLD_SIZE" in env or gpus < 2:
        return None
    return _torchrun(argv, str(gpus))


def relaunch_under_torchrun(command: list[str] | None, why: str, say: Callable[[str], None] = print) -> None:
    """Replace this process by `command` (one of the above) when there is one: `dvc repro` runs plain
    `sft train`, which must become one process per GPU. Says `why: <command>` first."""
    if not command:
        return
    say(f"{why}: {shlex.join(command)}")
    sys.stdout.flush()
    os.execv(command[0], command)


# ------------------------------------------------------------------ the process group


def init_runtime(strategy: Strategy, device_name: str, collective_timeout_minutes: int = 60) -> Runtime:
    """This process's Runtime for `strategy`: one process when unsharded, else a rank of the
    process group torchrun started."""
    if not strategy.sharded:
        return Runtime(0, 1, pick_device(device_name))
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            f"train.strategy={strategy.name} runs under torchrun, e.g. "
            "`torchrun --nproc-per-node 8 -m pipeline.cli train` (see sky/train.yaml)"
        )
    return join_process_group(device_name, collective_timeout_minutes)


def init_data_parallel(timeout_minutes: int = 60) -> Runtime:
    """Evaluation's Runtime: under torchrun a rank of the process group on its own GPU, whose
    timeout bounds a wait in a collective (the slowest rank's share of a long generative task);
    alone, rank 0 of 1. Leave with `close`."""
    if "WORLD_SIZE" not in os.environ:
        return Runtime(0, 1, pick_device("auto"))
    return join_process_group("auto", timeout_minutes)


def join_process_group(device_name: str, collective_timeout_minutes: int = 60) -> Runtime:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) on this rank's own GPU. Its timeout
    bounds how long ranks wait in a collective, e.g. while rank 0 gathers, writes and hashes an
    epoch's export (minutes at 70B)."""
    device = pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=collective_timeout_minutes)
        )
    world_size = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return Runtime(
        dist.get_rank(),
        world_size,
        device,
        node=int(os.environ.get("GROUP_RANK", "0")),
        nodes=world_size // per_node,
        local_rank=local_rank,
    )


def close(runtime: Runtime) -> None:
    """Leave the process group together: a rank that tears its group down while another still
    talks to it, or leaves it to interpreter exit, can abort the process after a finished run."""
    if runtime.world_size > 1 and dist.is_initialized():
        gc.collect()  # engines and hooks that still hold the group's handles go first
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------ rank questions without a Runtime


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def from_rank_zero(value):
    """Rank 0's value on every rank: a decision all processes take together (which checkpoint next)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
