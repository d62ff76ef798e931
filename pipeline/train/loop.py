"""The training loop: full fine-tuning (every weight), cosine LR with warmup, decoupled weight
decay, loss normalised over the supervised tokens of the whole optimizer step, a checkpoint
every epoch with only the last N kept."""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.families import Router, own_output_transform_off, router as family_router
from pipeline.prepare import IGNORE
from pipeline.train.checkpoint import clear_train_state, load_train_state, rotate, save_checkpoint, save_train_state
from pipeline.train.attention import dense_masks, flex_masks
from pipeline.train.loss import LossHead, fuse_loss_head
from pipeline.train.strategies import Runtime, init_runtime, shard


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


def loss_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) of every supervised next-token prediction in a micro-batch, as flat
    indices into its [rows * length] tokens. Built on the host, before the batch moves, so the
    device never waits on a data-dependent size."""
    following = labels.flatten()[1:]
    # token t predicts t + 1, never across an example start (a new row or a packed neighbour)
    following = following.masked_fill(position_ids.flatten()[1:] == 0, IGNORE)
    positions = (following != IGNORE).nonzero().squeeze(1)
    return positions, following[positions]


def real_tokens(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[rows, length] True where a token belongs to an example: the padding is the segment after a
    row's last example (prepare restarts its positions), all pad ids and no labels. Not `input_ids
    != pad_id`, which misses real tokens where the pad id is also a real token (often eos)."""
    documents = (position_ids == 0).cumsum(-1)
    last = documents == documents[:, -1:]
    example_like = (input_ids != pad_id) | (labels != IGNORE)
    padded = ~(example_like & last).any(-1)
    return ~(last & padded[:, None])


def token_loss_sum(forward, model, head: LossHead, input_ids, position_ids, positions, targets, flatten: bool,
                   router: Router | None = None, real: torch.Tensor | None = None):
    """(sum, not mean, of the losses at `positions`; the router's load-balancing loss or None).
    The output layer runs only at `positions`, fused with the loss and the family's output
    transform (train/loss.py): prompts and padding never reach the vocabulary projection. With
    `flatten`, the micro-batch goes in as one padding-free row (flex attention keeps examples
    apart at block-sparse cost); otherwise one row per packed sequence (dense attention, masked
    per row). Either way the masks keep each layer's own pattern (train/attention.py). `model`:
    the plain ForCausalLM (its config, its output transform switched off while the head applies
    it); `real`: the real-token mask the router loss counts (padding is not routed)."""
    if flatten:
        inputs = {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1),
                  "attention_mask": flex_masks(model.config, position_ids, input_ids.device)}
    else:
        inputs = {"input_ids": input_ids, "position_ids": position_ids,
                  "attention_mask": dense_masks(model.config, position_ids, torch.float32, input_ids.device)}
    recording = router.recording() if router else nullcontext()
    with head.supervising(positions, targets), own_output_transform_off(model), recording:
        output = forward(**inputs, use_cache=False)
    aux = router.loss(real.reshape(inputs["input_ids"].shape)) if router else None
    return output.logits, aux  # the head's output: the loss


def trim_padding(batch: dict[str, torch.Tensor], lengths: torch.Tensor, multiple: int) -> dict[str, torch.Tensor]:
    """Cut the padding columns every row of the batch shares (the unpacked, length-bucketed path):
    keep the longest row's real tokens (prepare's `lengths`), rounded up to `multiple` so a
    compiled model sees only a few shapes."""
    width = batch["labels"].shape[1]
    keep = min(width, -(-int(lengths.max()) // multiple) * multiple)
    return {k: v[:, :keep] for k, v in batch.items()} if keep < width else batch


@dataclass(frozen=True)
class StepFlops:
    """A step's FLOPs two ways. `nominal`: 6N per real token, the usual MFU convention. `executed`:
    what the engine runs: 6 per body parameter per token, the vocabulary projection only on the
    supervised rows (the fused loss head projects nothing else), the embedding lookup free, and
    causal attention within each example (4 * hidden FLOPs a layer per key forward, x3 with backward)."""
    params: int
    head: int  # vocabulary x hidden: the projection's matmul
    embeddings: int  # parameters of the input and output embeddings (one matrix when tied)
    attention_per_key: int  # 12 * hidden * layers

    @classmethod
    def of(cls, config, params: int) -> StepFlops:
        head = config.vocab_size * config.hidden_size
        tied = getattr(config, "tie_word_embeddings", False)
        return cls(params, head, head if tied else 2 * head, 12 * config.hidden_size * config.num_hidden_layers)

    def nominal(self, tokens: float) -> float:
        return 6 * self.params * tokens

    def executed(self, tokens: float, logit_rows: float, keys: float) -> float:
        """`keys`: the sum over real tokens of the keys each attends to (its position + 1)."""
        return 6 * (self.params - self.embeddings) * tokens + 6 * self.head * logit_rows + self.attention_per_key * keys


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return peak_resident_mib() / 1024


def peak_resident_mib() -> float:
    """This process's own peak resident memory. Not getrusage's ru_maxrss, where Linux carries the
    parent's peak across exec: a worker started by a large process (torchrun, pytest, dvc) would read
    its parent's figure."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint(cfg, meta: dict, rows: int) -> str:
    """What a resumed run must share with the run that wrote the state: the math (config, data and
    this package's code), not the logistics."""
    config = {k: v for k, v in cfg.model_dump().items() if k not in ("keep_last", "checkpoint_every_steps", "log_every_steps", "device",
                                                                 "export_dtype", "export_shard_size",
                                                                 "collective_timeout_minutes")}
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(__file__).parent.glob("*.py"))}
    blob = json.dumps({"config": config, "data": meta.get("data_sha256"), "rows": rows, "code": code,
                       "adapters": meta.get("adapters")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train(model, tokenizer, packed: dict[str, np.ndarray], cfg, out_dir: Path, meta: dict,
          progress=None, runtime: Runtime | None = None, state_dir: Path | None = None,
          weights: dict | None = None) -> TrainResult:
    """Fine-tune `model` on packed rows; write epoch checkpoints under out_dir (rank 0). `model` and
    `weights` as strategies.load_model returns them (a meta-device model is filled from `weights`).

    With `state_dir`, the run saves its full state at every epoch end (and every
    `checkpoint_every_steps`) and resumes from it when started again with the same fingerprint.
    """
    runtime = runtime or init_runtime(cfg.strategy, cfg.device, cfg.collective_timeout_minutes)
    device = runtime.device
    torch.manual_seed(cfg.seed)
    if not hasattr(model, "peft_config"):  # full SFT: every weight; with adapters (sft lora), theirs alone
        for p in model.parameters():
            p.requires_grad_(True)
    model.config.use_cache = False
    # before sharding hides the full sizes (ZeRO-3 partitions as it loads: ds_numel is the full one)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    flops = StepFlops.of(model.config, params)
    sharded = shard(model, cfg, runtime, weights)
    sharded.model.train()
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    flatten = plain.config._attn_implementation == "flex_attention"  # strategies.prepare_layers chose it
    router = family_router(plain, cfg.router_aux_loss_coef)

    data = {k: torch.from_numpy(packed[k].astype(np.int64)) for k in ("input_ids", "labels", "position_ids")}
    rows, width = data["labels"].shape
    lengths = torch.from_numpy(packed["lengths"]) if "lengths" in packed else None  # unpacked rows only
    unpacked = lengths is not None
    per_step = cfg.micro_batch_size * cfg.grad_accum * runtime.world_size  # rows per optimizer step
    steps_per_epoch = max(1, rows // per_step)  # drop the ragged tail: every step has the same size
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, math.ceil(cfg.warmup_ratio * total_steps))
    scheduler = cosine_with_warmup(sharded.optimizer, warmup_steps, total_steps)

    history, checkpoints, tokens, step = [], [], 0, 0
    run_id = fingerprint(cfg, meta, rows)
    resumed = load_train_state(state_dir, run_id, runtime) if state_dir else None
    if resumed:
        path, trainer = resumed
        sharded.load(path / "shards")
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        step, history, tokens = trainer["step"], trainer["history"], trainer["tokens"]
        if progress and runtime.is_main:  # the record starts afresh with the steps already run, in order
            for record in history:
                progress(record, total_steps)
    elif state_dir:  # a fresh run: nothing from another configuration may survive
        # emptied, not removed: either may be a link into a bucket; every node clears its own view
        for stale in ([Path(out_dir)] if runtime.is_main else []) + ([Path(state_dir)] if runtime.is_node_main else []):
            clear_train_state(stale)
    runtime.barrier()
    resumed_from = step  # 0 for a fresh run

    def save_state(epoch: int):
        if state_dir:
            save_train_state(state_dir, sharded, {
                "epoch": epoch, "step": step, "fingerprint": run_id, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "tokens": tokens}, runtime)

    peak = peak_flops(device)
    head = fuse_loss_head(model)
    pending: list[dict] = []  # steps run but not yet read back from the device
    window_started = started = time.perf_counter()

    def flush() -> None:
        """Read the pending steps' figures back from the device in one go (the only host sync of
        training), then record and report them. Speeds are the window's: steps run asynchronously."""
        nonlocal tokens, window_started
        if not pending:
            return
        columns = torch.stack([torch.cat([torch.stack([p.pop("loss_sum").to(device, torch.float64),
                                                       p.pop("aux_sum").to(device, torch.float64),
                                                       p.pop("grad_norm").to(device, torch.float64)]),
                                          p.pop("counts").to(device)]) for p in pending])
        losses, aux_sums = runtime.totals(columns[:, :2].flatten()).view(-1, 2).T.tolist()  # summed over ranks
        figures = columns[:, 2:].tolist()  # the same on every rank
        seconds = (time.perf_counter() - window_started) / len(pending)
        for record, loss, aux_sum, figure in zip(pending, losses, aux_sums, figures):
            grad_norm, supervised, step_tokens, keys = figure
            tokens += int(step_tokens)
            if router:  # the load-balancing loss, averaged over micro-batches and ranks, before its coefficient
                record["router_aux_loss"] = round(aux_sum / (cfg.grad_accum * runtime.world_size), 5)
            record.update(loss=round(loss / max(supervised, 1), 5), grad_norm=round(grad_norm, 4),
                          tokens_per_s=round(step_tokens / seconds, 1),
                          # against the cards' dense bf16 peak: 6N per real token, and the FLOPs actually run
                          mfu=round(flops.nominal(step_tokens) / seconds / (peak * runtime.world_size), 4)
                          if peak else None,
                          mfu_executed=round(flops.executed(step_tokens, supervised, keys)
                                             / seconds / (peak * runtime.world_size), 4) if peak else None,
                          peak_mem_gib=round(peak_memory_gib(device), 3))
            history.append(record)
            if progress and runtime.is_main:
                progress(record, total_steps)
        pending.clear()
        window_started = time.perf_counter()

    for epoch in range(step // steps_per_epoch + 1, cfg.epochs + 1):
        # the same permutation on every rank; each rank takes its own stride of every step
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if unpacked:  # keep prepare's length buckets together: shuffle whole steps, not rows
            blocks = torch.randperm(steps_per_epoch, generator=generator)
            order = (blocks[:, None] * per_step + torch.arange(per_step)).flatten()
        else:
            order = torch.randperm(rows, generator=generator)
        for local in range(step % steps_per_epoch, steps_per_epoch):
            index = order[local * per_step:(local + 1) * per_step][runtime.rank::runtime.world_size]
            micro_batches = []
            for micro in range(cfg.grad_accum):  # on the host: targets and sizes need no device sync
                part = index[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]
                batch = {k: v[part] for k, v in data.items()}
                if unpacked:  # packed rows are full; length-bucketed single examples are not
                    batch = trim_padding(batch, lengths[part], multiple=max(8, width // 8))
                positions, targets = loss_targets(batch["labels"], batch["position_ids"])
                real = real_tokens(batch["input_ids"], batch["labels"], batch["position_ids"], tokenizer.pad_token_id)
                micro_batches.append((batch["input_ids"], batch["position_ids"], positions, targets, real))
            # normalise by the supervised tokens of the whole global step (all ranks, all micro-batches);
            # real tokens and attended keys for the record ride in the same collective, left on the device
            real = [m[4] for m in micro_batches]
            counts = runtime.totals([
                sum(len(m[3]) for m in micro_batches), sum(int(r.sum()) for r in real),
                sum(int((m[1] + 1)[r].sum()) for m, r in zip(micro_batches, real))])
            # gradients are averaged over ranks by the reduce-scatter; scale back to a global sum
            scale = (runtime.world_size / counts[0].clamp(min=1)).to(device, torch.float32)
            step_loss, step_aux = torch.zeros((), device=device), torch.zeros((), device=device)
            for micro in micro_batches:
                input_ids, position_ids, positions, targets, real = (t.to(device, non_blocking=True) for t in micro)
                loss_sum, aux = token_loss_sum(sharded.forward, plain, head, input_ids, position_ids, positions,
                                               targets, flatten, router, real)
                if aux is None:
                    sharded.backward(loss_sum * scale)
                else:  # the mean over micro-batches here, over ranks by the gradients' reduce-scatter
                    sharded.backward(loss_sum * scale + aux * (router.coef / cfg.grad_accum))
                    step_aux += aux.detach()
                step_loss += loss_sum.detach()
            pending.append({"step": step + 1, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                            "loss_sum": step_loss, "aux_sum": step_aux, "grad_norm": sharded.step(cfg.max_grad_norm),
                            "counts": counts})
            scheduler.step()
            step += 1
            every = cfg.checkpoint_every_steps
            if len(pending) == cfg.log_every_steps or local + 1 == steps_per_epoch:
                flush()
            if every and step % every == 0 and local + 1 < steps_per_epoch:
                flush()
                save_state(epoch)
        state = sharded.full_state_dict()  # a collective: every rank takes part
        if runtime.is_main:
            path = save_checkpoint(model, tokenizer, out_dir, epoch,
                                   {**meta, "step": step, "loss": history[-1]["loss"]}, state_dict=state,
                                   dtype=cfg.export_dtype, max_shard_size=cfg.export_shard_size)
            checkpoints.append(str(path))
            rotate(out_dir, cfg.keep_last)
        save_state(epoch)
        runtime.barrier()
    if state_dir and runtime.is_node_main:
        clear_train_state(state_dir)  # finished: a later run starts afresh instead of resuming at the end
    runtime.barrier()
    local_numel = sharded.local_numel()
    sharded.release()
    if router:
        router.remove()
    return TrainResult(step, history[-1]["loss"], tokens, time.perf_counter() - started, history, checkpoints,
                       local_numel, resumed_from)
