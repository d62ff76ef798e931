"""Loads and shards a base model the way `sft train` does, and reports each rank's peak resident
memory before and after (run under torchrun)."""

import json
import sys
from pathlib import Path

import accelerate  # noqa: F401  (the libraries loading touches, imported first: the measure is the weights)
import torch
import torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from safetensors.torch import save_file

try:
    import deepspeed  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
except ImportError:  # fsdp2 only
    pass

from pipeline.config import LoraConfig, TrainConfig
from pipeline.dist import Strategy, close, init_runtime
from pipeline.lora import load_with_adapters, training_hooks
from pipeline.train.metrics import peak_resident_mib
from pipeline.train.strategies import load_model, shard


def main(base_dir: str, out: str, strategy: str) -> None:
    torch.set_num_threads(1)
    strategy, _, adapters = strategy.partition("+")  # fsdp2+lora: `sft lora`'s loading
    cfg = TrainConfig(strategy=strategy, device="cpu", export_dtype="float32")
    runtime = init_runtime(Strategy.of(strategy), "cpu")
    before = peak_resident_mib()
    if adapters:
        model, weights = load_with_adapters(Path(base_dir), cfg, LoraConfig(), runtime)
    else:
        model, weights = load_model(Path(base_dir), cfg, runtime)
    full_numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    plain = training_hooks(model)["plain"] if adapters else None  # the causal LM inside peft's wrapper
    sharded = shard(model, cfg, runtime, weights, plain)  # fsdp2 fills its shards here
    after = peak_resident_mib()
    state = sharded.full_state_dict()  # a collective: rank 0 gets every weight back
    if runtime.is_main:
        save_file(state if state is not None else model.state_dict(), str(Path(out) / "gathered.safetensors"))
    (Path(out) / f"rank{runtime.rank}.json").write_text(
        json.dumps(
            {
                "rank": runtime.rank,
                "before_mib": before,
                "after_mib": after,
                "local_numel": sharded.local_numel(),
                "full_numel": full_numel,
            }
        )
    )
    sharded.release()
    close(runtime)


if __name__ == "__main__":
    main(*sys.argv[1:])
