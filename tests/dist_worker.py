"""Trains the tiny model for one epoch with a given strategy; run directly or under torchrun."""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipeline.config import LoraConfig, TrainConfig
from pipeline.dist import Strategy, close, init_runtime
from pipeline.lora import load_with_adapters, training_hooks
from pipeline.prepare import prepare
from pipeline.train.loop import train
from pipeline.train.strategies import load_model


def main(
    model_dir: str,
    out: str,
    strategy: str,
    grad_accum: int,
    epochs: int = 1,
    kill_at_step: int = 0,
    micro_batch_size: int = 2,
) -> None:
    torch.set_num_threads(1)
    strategy, _, adapters = strategy.partition("+")  # e.g. fsdp2+lora
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": f"Repeat after me: cat dog {i % 9}", "response": f"cat dog {i % 9} {i % 4}"} for i in range(96)]
    packed = prepare(tokenizer, rows, [], max_len=48, replay_share=0.0, seed=0)
    arrays = {"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids}
    cfg = TrainConfig(
        lr=2e-3,
        epochs=epochs,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        warmup_ratio=0.03,
        override_method_ranges=True,
        strategy=strategy,
        device="cpu",
        checkpoint_every_steps=2,
        export_dtype="float32",  # compared to 1e-4 across strategies: no bf16 rounding
        log_every_steps=1 if kill_at_step else 10,
    )  # a kill lands right after its step's record

    def crash(record, total):  # a preemption: rank 0 dies without warning in the middle of an epoch
        if record["step"] == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    runtime = init_runtime(Strategy.of(strategy), "cpu")
    if adapters:  # `sft lora`'s path: the frozen base and the adapters, loaded and sharded as for full SFT
        model, weights = load_with_adapters(
            Path(model_dir), cfg, LoraConfig(rank=4, alpha=8, lr=2e-3, override_method_ranges=True), runtime
        )
    else:
        model, weights = load_model(Path(model_dir), cfg, runtime)  # the production path: no full copy past rank 0
    hooks = training_hooks(model) if adapters else {}
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    result = train(
        model,
        tokenizer,
        arrays,
        cfg,
        Path(out) / "checkpoints",
        {"data_sha256": "fixed"},
        crash,
        runtime=runtime,
        state_dir=Path(out) / "state",
        weights=weights,
        **hooks,
    )
    local = result.local_numel
    report = {
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "full_numel": full,
        "local_numel": local,
        "losses": [h["loss"] for h in result.history],
        "steps": [h["step"] for h in result.history],
        "grad_norms": [h["grad_norm"] for h in result.history],
        "router_aux_losses": [h.get("router_aux_loss") for h in result.history],
        "resumed_from": result.resumed_from_step,
    }
    (Path(out) / f"rank{runtime.rank}.json").write_text(json.dumps(report))
    close(runtime)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
