"""The training loop: full fine-tuning (every weight, or the parameters the caller names), cosine
LR with warmup, decoupled weight decay, loss normalised over the supervised tokens of the whole
optimizer step, a checkpoint every epoch with only the last N kept.

Its parts: micro-batches (train/batches.py), the per-step record (train/metrics.py), the resume
point (train/resume.py), the strategies (train/strategies.py) and the epoch export (train/checkpoint.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.dist import Runtime, Strategy, init_runtime
from pipeline.families import Router, own_output_transform_off
from pipeline.families import router as family_router
from pipeline.train.attention import dense_masks, flex_masks
from pipeline.train.batches import Batches, MicroBatch, step_counts
from pipeline.train.checkpoint import rotate, save_checkpoint
from pipeline.train.loss import LossHead, fuse_loss_head
from pipeline.train.metrics import Progress, StepFlops, StepRecorder
from pipeline.train.resume import Resume, fingerprint
from pipeline.train.strategies import shard

Export = Callable[[object, "dict | None"], tuple]  # (model, full state dict or None) -> (model to save, its state)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    local_numel: int = 0  # parameters this rank held while training (sharding: a fraction of the model)
    resumed_from_step: int = 0  # 0: a fresh run; else the step of the resume state it continued from


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def token_loss_sum(
    forward,
    model,
    head: LossHead,
    input_ids,
    position_ids,
    positions,
    targets,
    flatten: bool,
    router: Router | None = None,
    real: torch.Tensor | None = None,
):
    """(sum, not mean, of the losses at `positions`; the router's load-balancing loss or None).
    The output layer runs only at `positions`, fused with the loss and the family's output
    transform (train/loss.py): prompts and padding never reach the vocabulary projection. With
    `flatten`, the micro-batch goes in as one padding-free row (flex attention keeps examples
    apart at block-sparse cost); otherwise one row per packed sequence (dense attention, masked
    per row). Either way the masks keep each layer's own pattern (train/attention.py). `model`:
    the plain ForCausalLM (its config, its output transform switched off while the head applies
    it); `real`: the real-token mask the router loss counts (padding is not routed)."""
    if flatten:
        inputs = {
            "input_ids": input_ids.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1),
            "attention_mask": flex_masks(model.config, position_ids, input_ids.device),
        }
    else:
        inputs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": dense_masks(model.config, position_ids, torch.float32, input_ids.device),
        }
    recording = router.recording() if router else nullcontext()
    with head.supervising(positions, targets), own_output_transform_off(model), recording:
        output = forward(**inputs, use_cache=False)
    aux = router.loss(real.reshape(inputs["input_ids"].shape)) if router else None
    return output.logits, aux  # the head's output: the loss


def as_trained(model, state_dict: dict | None):
    """The default export: the checkpoint is the trained model itself."""
    return model, state_dict


def train(
    model,
    tokenizer,
    packed: dict[str, np.ndarray],
    cfg,
    out_dir: Path,
    meta: dict,
    progress: Progress | None = None,
    runtime: Runtime | None = None,
    state_dir: Path | None = None,
    weights: dict | None = None,
    *,
    trainable: Iterable[torch.nn.Parameter] | None = None,
    export: Export = as_trained,
    plain=None,
) -> TrainResult:
    """Fine-tune `model` on packed rows; write epoch checkpoints under out_dir (rank 0). `model` and
    `weights` as strategies.load_model returns them (a meta-device model is filled from `weights`).

    The caller says what trains and what a checkpoint holds: `trainable`, the parameters that train
    (None: every weight); `export(model, state_dict)`, the model and weights each epoch writes (LoRA
    merges its adapters); `plain`, the causal LM inside a wrapped `model` (None: `model` is one).
    With `state_dir`, the run saves its full state at every epoch end (and every
    `checkpoint_every_steps`) and resumes from it when started again with the same fingerprint.
    """
    runtime = runtime or init_runtime(Strategy.of(cfg.strategy), cfg.device, cfg.collective_timeout_minutes)
    plain = model if plain is None else plain
    flops, sharded = _sharded(model, cfg, runtime, weights, trainable, plain)
    flatten = plain.config._attn_implementation == "flex_attention"  # strategies.prepare_layers chose it
    router = family_router(plain, cfg.router_aux_loss_coef)
    batches = Batches(packed, cfg, runtime.rank, runtime.world_size, tokenizer.pad_token_id)
    total_steps = batches.steps_per_epoch * cfg.epochs
    scheduler = cosine_with_warmup(sharded.optimizer, max(1, math.ceil(cfg.warmup_ratio * total_steps)), total_steps)
    resume = Resume(state_dir, fingerprint(cfg, meta, batches.rows), runtime)
    position = resume.start(sharded, scheduler, out_dir)
    step = resumed_from = position["step"]  # 0 for a fresh run
    head = fuse_loss_head(plain)
    history, tokens = position["history"], position["tokens"]
    recorder = StepRecorder(flops, runtime, cfg.grad_accum, router is not None, total_steps, progress, history, tokens)
    recorder.replay()
    checkpoints = []
    for epoch in range(step // batches.steps_per_epoch + 1, cfg.epochs + 1):
        for local, micro_batches in batches.epoch(epoch, first=step % batches.steps_per_epoch):
            # normalised by the supervised tokens of the whole global step (all ranks, all micro-batches);
            # real tokens and attended keys for the record ride in the same collective, left on the device
            counts = runtime.totals(step_counts(micro_batches))
            step_loss, step_aux = accumulate(
                sharded, plain, head, micro_batches, counts, runtime, flatten, router, cfg.grad_accum
            )
            lr = scheduler.get_last_lr()[0]
            grad_norm = sharded.step(cfg.max_grad_norm)
            recorder.add(
                dict(
                    step=step + 1,
                    epoch=epoch,
                    lr=lr,
                    loss_sum=step_loss,
                    aux_sum=step_aux,
                    grad_norm=grad_norm,
                    counts=counts,
                )
            )
            scheduler.step()
            step += 1
            last = local + 1 == batches.steps_per_epoch
            if len(recorder.pending) == cfg.log_every_steps or last:
                recorder.flush()
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and not last:
                recorder.flush()
                resume.save(epoch, step, sharded, scheduler, recorder.history, recorder.tokens)
        state = sharded.full_state_dict()  # a collective: every rank takes part
        if runtime.is_main:
            meta_now = {**meta, "step": step, "loss": recorder.history[-1]["loss"]}
            checkpoints.append(_save_epoch(model, state, export, tokenizer, out_dir, epoch, meta_now, cfg))
        resume.save(epoch, step, sharded, scheduler, recorder.history, recorder.tokens)
        runtime.barrier()
    resume.finish()
    local_numel = sharded.local_numel()
    sharded.release()
    if router:
        router.remove()
    final_loss = recorder.history[-1]["loss"]
    return TrainResult(
        step, final_loss, recorder.tokens, recorder.seconds, recorder.history, checkpoints, local_numel, resumed_from
    )


def _sharded(model, cfg, runtime: Runtime, weights: dict | None, trainable, plain):
    """(the model's FLOPs per token, the model sharded by the strategy with its optimizer), in train mode."""
    torch.manual_seed(cfg.seed)
    train_only(model, trainable)
    model.config.use_cache = False
    # before sharding hides the full sizes (ZeRO-3 partitions as it loads: ds_numel is the full one)
    flops = StepFlops.of(model.config, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))
    sharded = shard(model, cfg, runtime, weights, plain)
    sharded.model.train()
    return flops, sharded


def _save_epoch(model, state: dict, export: Export, tokenizer, out_dir: Path, epoch: int, meta: dict, cfg) -> str:
    """Rank 0: the epoch's checkpoint as the caller exports it; the oldest beyond keep_last removed."""
    exported, state = export(model, state)
    path = save_checkpoint(
        exported,
        tokenizer,
        out_dir,
        epoch,
        meta,
        state_dict=state,
        dtype=cfg.export_dtype,
        max_shard_size=cfg.export_shard_size,
    )
    rotate(out_dir, cfg.keep_last)
    return str(path)


def train_only(model, trainable: Iterable[torch.nn.Parameter] | None) -> None:
    """Every weight trains, or only `trainable` (adapters: the base stays frozen)."""
    chosen = None if trainable is None else {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(chosen is None or id(p) in chosen)


def accumulate(
    sharded,
    plain,
    head: LossHead,
    micro_batches: list[MicroBatch],
    counts: torch.Tensor,
    runtime: Runtime,
    flatten: bool,
    router: Router | None,
    grad_accum: int,
):
    """Forward and backward over a step's micro-batches: (loss sum, router loss sum), on the device."""
    device = runtime.device
    # gradients are averaged over ranks by the reduce-scatter; scale back to a global sum
    scale = (runtime.world_size / counts[0].clamp(min=1)).to(device, torch.float32)
    step_loss, step_aux = torch.zeros((), device=device), torch.zeros((), device=device)
    for micro in micro_batches:
        input_ids, position_ids, positions, targets, real = (t.to(device, non_blocking=True) for t in micro)
        loss_sum, aux = token_loss_sum(
            sharded.forward, plain, head, input_ids, position_ids, positions, targets, flatten, router, real
        )
        if aux is None:
            sharded.backward(loss_sum * scale)
        else:  # the mean over micro-batches here, over ranks by the gradients' reduce-scatter
            sharded.backward(loss_sum * scale + aux * (router.coef / grad_accum))
            step_aux += aux.detach()
        step_loss += loss_sum.detach()
    return step_loss, step_aux
