"""How the model is spread over devices, chosen by `train.strategy`: one function per strategy.

- single: one process, one device.
- fsdp2: torch `fully_shard` on every decoder layer and on the root, launched by torchrun
  (one node or many). Parameters, gradients and optimizer state are sharded over the ranks;
  on GPU, bf16 compute with fp32 gradient reduction. Works on CPU with gloo too (the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """Sum a number over all ranks (identity for one process)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_runtime(strategy: str, device_name: str) -> Runtime:
    if strategy == "single":
        return Runtime(0, 1, pick_device(device_name))
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(f"train.strategy={strategy} runs under torchrun, e.g. "
                           "`torchrun --nproc-per-node 8 -m pipeline.cli train` (see sky/train.yaml)")
    device = pick_device(device_name)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def apply_fsdp2(model, device: torch.device):
    """Shard each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def prepare_model(model, strategy: str, runtime: Runtime):
    model.to(runtime.device)
    if strategy == "fsdp2":
        apply_fsdp2(model, runtime.device)
    return model


def full_state_dict(model, runtime: Runtime) -> dict | None:
    """The whole model's weights on rank 0's CPU (None: use the model's own state dict)."""
    if runtime.world_size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; saved once, as save_pretrained does
    return state


def close(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
