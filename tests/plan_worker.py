"""Two training steps of the engine (single, CPU, fp32) on a random Llama of a given shape; prints
how far the process's peak resident memory grew from before the model existed (MiB)."""

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import TrainConfig
from pipeline.dist import Runtime
from pipeline.train.batches import loss_targets
from pipeline.train.loop import token_loss_sum
from pipeline.train.loss import fuse_loss_head
from pipeline.train.metrics import peak_resident_mib
from pipeline.train.strategies import shard


def main(shape: str, rows: int, seq: int, checkpointing: int) -> None:
    torch.manual_seed(0)
    before = peak_resident_mib()
    config = LlamaConfig(**json.loads(shape), max_position_embeddings=seq)
    cfg = TrainConfig(strategy="single", device="cpu", activation_checkpointing=bool(checkpointing), compile=False)
    sharded = shard(LlamaForCausalLM(config), cfg, Runtime(0, 1, torch.device("cpu")))
    sharded.model.train()
    head = fuse_loss_head(sharded.model)
    input_ids = torch.randint(0, config.vocab_size, (rows, seq))
    position_ids = torch.arange(seq).repeat(rows, 1)
    positions, targets = loss_targets(input_ids, position_ids)  # every next token supervised
    for _ in range(2):  # the second step has the optimizer state the first created
        loss, _ = token_loss_sum(
            sharded.forward, sharded.model, head, input_ids, position_ids, positions, targets, flatten=False
        )
        sharded.backward(loss / len(targets))
        sharded.step(1.0)
    print(json.dumps({"grew_mib": peak_resident_mib() - before}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
