"""The training loop: full fine-tuning (every weight), cosine LR with warmup, decoupled weight
decay, loss normalised over the supervised tokens of the whole optimizer step, a checkpoint
every epoch with only the last N kept."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.prepare import IGNORE
from pipeline.train.checkpoint import (
    clear_train_state,
    load_train_state,
    restore_shards,
    rotate,
    save_checkpoint,
    save_train_state,
)
from pipeline.train.strategies import Runtime, full_state_dict, init_runtime, prepare_model


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def token_loss_sum(model, input_ids, labels, position_ids) -> torch.Tensor:
    """Sum (not mean) of next-token losses over supervised positions."""
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def fingerprint(cfg, meta: dict, rows: int) -> str:
    """What a resumed run must share with the run that wrote the state: the math (config, data and
    this package's code), not the logistics."""
    config = {k: v for k, v in cfg.model_dump().items() if k not in ("keep_last", "checkpoint_every_steps", "device")}
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(__file__).parent.glob("*.py"))}
    blob = json.dumps({"config": config, "data": meta.get("data_sha256"), "rows": rows, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train(model, tokenizer, packed: dict[str, np.ndarray], cfg, out_dir: Path, meta: dict,
          progress=None, runtime: Runtime | None = None, state_dir: Path | None = None) -> TrainResult:
    """Fine-tune `model` on packed rows; write epoch checkpoints under out_dir (rank 0).

    With `state_dir`, the run saves its full state at every epoch end (and every
    `checkpoint_every_steps`) and resumes from it when started again with the same fingerprint.
    """
    runtime = runtime or init_runtime(cfg.strategy, cfg.device)
    device = runtime.device
    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(True)  # full SFT: every weight
    model.config.use_cache = False
    model = prepare_model(model, cfg.strategy, runtime)
    model.train()

    data = {k: torch.from_numpy(v.astype(np.int64)) for k, v in packed.items()}
    rows = data["input_ids"].shape[0]
    per_step = cfg.micro_batch_size * cfg.grad_accum * runtime.world_size  # rows per optimizer step
    steps_per_epoch = max(1, rows // per_step)  # drop the ragged tail: every step has the same size
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = cosine_with_warmup(optimizer, warmup_steps, total_steps)
    # fsdp2 casts through its mixed-precision policy; a single GPU uses autocast
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.strategy == "single")

    history, checkpoints, tokens, step = [], [], 0, 0
    run_id = fingerprint(cfg, meta, rows)
    resumed = load_train_state(state_dir, run_id) if state_dir else None
    if resumed:
        path, trainer = resumed
        restore_shards(path, model, optimizer)
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        step, history, tokens = trainer["step"], trainer["history"], trainer["tokens"]
    elif runtime.is_main:  # a fresh run: nothing from another configuration may survive
        for stale in [Path(out_dir), Path(state_dir)] if state_dir else []:
            shutil.rmtree(stale, ignore_errors=True)
    runtime.barrier()

    def save_state(epoch: int):
        if state_dir:
            save_train_state(state_dir, model, optimizer, {
                "epoch": epoch, "step": step, "fingerprint": run_id, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "tokens": tokens}, runtime)

    params = sum(p.numel() for p in model.parameters())  # a sharded DTensor reports its full size
    peak = peak_flops(device)
    started = time.perf_counter()
    for epoch in range(step // steps_per_epoch + 1, cfg.epochs + 1):
        # the same permutation on every rank; each rank takes its own stride of every step
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for local in range(step % steps_per_epoch, steps_per_epoch):
            index = order[local * per_step:(local + 1) * per_step][runtime.rank::runtime.world_size]
            step_started = time.perf_counter()
            batch = {k: v[index].to(device) for k, v in data.items()}
            # normalise by the supervised tokens of the whole global step (all ranks, all micro-batches)
            supervised = runtime.sum(int((batch["labels"][:, 1:] != IGNORE).sum()))
            # gradients are averaged over ranks by the reduce-scatter; scale back to a global sum
            scale = runtime.world_size / max(supervised, 1)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                part = slice(micro * cfg.micro_batch_size, (micro + 1) * cfg.micro_batch_size)
                with autocast:
                    loss_sum = token_loss_sum(model, batch["input_ids"][part], batch["labels"][part],
                                              batch["position_ids"][part])
                (loss_sum * scale).backward()
                step_loss += loss_sum.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = int(runtime.sum(int((batch["input_ids"] != tokenizer.pad_token_id).sum())))
            tokens += step_tokens
            seconds = time.perf_counter() - step_started
            record = {"step": step, "epoch": epoch, "loss": round(runtime.sum(step_loss) / max(supervised, 1), 5),
                      "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                      "tokens_per_s": round(step_tokens / seconds, 1),
                      # 6N FLOPs per real token (forward + backward) against the cards' dense bf16 peak
                      "mfu": round(6 * params * step_tokens / seconds / (peak * runtime.world_size), 4) if peak else None,
                      "peak_mem_gib": round(peak_memory_gib(device), 3)}
            history.append(record)
            if progress and runtime.is_main:
                progress(record, total_steps)
            every = cfg.checkpoint_every_steps
            if every and step % every == 0 and local + 1 < steps_per_epoch:
                save_state(epoch)
        state = full_state_dict(model, runtime)  # a collective: every rank takes part
        if runtime.is_main:
            path = save_checkpoint(model, tokenizer, out_dir, epoch,
                                   {**meta, "step": step, "loss": history[-1]["loss"]}, state_dict=state)
            checkpoints.append(str(path))
            rotate(out_dir, cfg.keep_last)
        save_state(epoch)
        runtime.barrier()
    if state_dir and runtime.is_main:
        clear_train_state(state_dir)  # finished: a later run starts afresh instead of resuming at the end
    runtime.barrier()
    return TrainResult(step, history[-1]["loss"], tokens, time.perf_counter() - started, history, checkpoints)
