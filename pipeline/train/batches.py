"""The packed rows as micro-batches: each epoch's order, each rank's share of a step, the
supervised targets and real-token masks built on the host before a batch moves to the device."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.prepare import IGNORE


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


def trim_padding(batch: dict[str, torch.Tensor], lengths: torch.Tensor, multiple: int) -> dict[str, torch.Tensor]:
    """Cut the padding columns every row of the batch shares (the unpacked, length-bucketed path):
    keep the longest row's real tokens (prepare's `lengths`), rounded up to `multiple` so a
    compiled model sees only a few shapes."""
    width = batch["labels"].shape[1]
    keep = min(width, -(-int(lengths.max()) // multiple) * multiple)
    return {k: v[:, :keep] for k, v in batch.items()} if keep < width else batch


class MicroBatch(NamedTuple):
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor  # flat indices of the supervised predictions (loss_targets)
    targets: torch.Tensor
    real: torch.Tensor  # the real-token mask (real_tokens)


class Batches:
    """Every optimizer step's rows, the same permutation on every rank, each rank taking its own
    stride. The ragged tail of an epoch is dropped: every step has the same size."""

    def __init__(self, packed: dict[str, np.ndarray], cfg, rank: int, world_size: int, pad_id: int):
        self.data = {k: torch.from_numpy(packed[k].astype(np.int64)) for k in ("input_ids", "labels", "position_ids")}
        self.rows, self.width = self.data["labels"].shape
        self.lengths = torch.from_numpy(packed["lengths"]) if "lengths" in packed else None  # unpacked rows only
        self.per_step = cfg.micro_batch_size * cfg.grad_accum * world_size  # rows per optimizer step
        self.steps_per_epoch = max(1, self.rows // self.per_step)
        self.micro_batch_size, self.grad_accum, self.seed = cfg.micro_batch_size, cfg.grad_accum, cfg.seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id

    def epoch(self, epoch: int, first: int = 0):
        """(step within the epoch, its micro-batches) from step `first` to the epoch's end."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        if self.lengths is not None:  # keep prepare's length buckets together: shuffle whole steps, not rows
            blocks = torch.randperm(self.steps_per_epoch, generator=generator)
            order = (blocks[:, None] * self.per_step + torch.arange(self.per_step)).flatten()
        else:
            order = torch.randperm(self.rows, generator=generator)
        for local in range(first, self.steps_per_epoch):
            index = order[local * self.per_step : (local + 1) * self.per_step][self.rank :: self.world_size]
            yield (
                local,
                [
                    self.micro_batch(index[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size])
                    for micro in range(self.grad_accum)
                ],
            )

    def micro_batch(self, part: torch.Tensor) -> MicroBatch:
        """On the host: targets and sizes need no device sync."""
        batch = {k: v[part] for k, v in self.data.items()}
        if self.lengths is not None:  # packed rows are full; length-bucketed single examples are not
            batch = trim_padding(batch, self.lengths[part], multiple=max(8, self.width // 8))
        positions, targets = loss_targets(batch["labels"], batch["position_ids"])
        real = real_tokens(batch["input_ids"], batch["labels"], batch["position_ids"], self.pad_id)
        return MicroBatch(batch["input_ids"], batch["position_ids"], positions, targets, real)


def step_counts(micro_batches: list[MicroBatch]) -> list[int]:
    """This rank's (supervised predictions, real tokens, attended keys) of a step: the loss is
    normalised by the first summed over ranks; the others are the record's."""
    return [
        sum(len(m.targets) for m in micro_batches),
        sum(int(m.real.sum()) for m in micro_batches),
        sum(int((m.position_ids + 1)[m.real].sum()) for m in micro_batches),
    ]
