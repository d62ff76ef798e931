"""What each optimizer step records: loss, gradient norm, throughput, MFU and peak memory.

Steps run asynchronously on the device; `StepRecorder` keeps their figures there and reads a
window of them back in one go (the only host sync of training), then records and reports them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


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


Progress = Callable[[dict, int], None]  # (a step's record, total steps): rank 0's progress report


class StepRecorder:
    """The run's per-step records (`history`) and token count. `add` takes a step whose figures are
    still on the device: its loss and router-loss sums (this rank's), gradient norm and the step's
    counts (summed over ranks: supervised predictions, real tokens, attended keys)."""

    def __init__(
        self,
        flops: StepFlops,
        runtime,
        grad_accum: int,
        routed: bool,
        total_steps: int,
        progress: Progress | None = None,
        history: list[dict] | None = None,
        tokens: int = 0,
    ):
        self.flops, self.runtime, self.grad_accum, self.routed = flops, runtime, grad_accum, routed
        self.total_steps = total_steps
        self.progress = progress if runtime.is_main else None
        self.history, self.tokens = [] if history is None else history, tokens
        self.peak = peak_flops(runtime.device)
        self.pending: list[dict] = []  # steps run but not yet read back from the device
        self.window_started = self.started = time.perf_counter()

    def replay(self) -> None:
        """Report the steps a resumed run already ran, in order: the record starts afresh with them."""
        for record in self.history if self.progress else ():
            self.progress(record, self.total_steps)

    def add(self, record: dict) -> None:
        self.pending.append(record)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def flush(self) -> None:
        """Read the pending steps' figures back from the device in one go, then record and report
        them. Speeds are the window's: steps run asynchronously."""
        if not self.pending:
            return
        device, world_size = self.runtime.device, self.runtime.world_size
        columns = torch.stack(
            [
                torch.cat(
                    [
                        torch.stack(
                            [
                                p.pop("loss_sum").to(device, torch.float64),
                                p.pop("aux_sum").to(device, torch.float64),
                                p.pop("grad_norm").to(device, torch.float64),
                            ]
                        ),
                        p.pop("counts").to(device),
                    ]
                )
                for p in self.pending
            ]
        )
        losses, aux_sums = self.runtime.totals(columns[:, :2].flatten()).view(-1, 2).T.tolist()  # summed over ranks
        figures = columns[:, 2:].tolist()  # the same on every rank
        seconds = (time.perf_counter() - self.window_started) / len(self.pending)
        peak = self.peak
        for record, loss, aux_sum, figure in zip(self.pending, losses, aux_sums, figures, strict=True):
            grad_norm, supervised, step_tokens, keys = figure
            self.tokens += int(step_tokens)
            if self.routed:  # the load-balancing loss, averaged over micro-batches and ranks, before its coefficient
                record["router_aux_loss"] = round(aux_sum / (self.grad_accum * world_size), 5)
            record.update(
                loss=round(loss / max(supervised, 1), 5),
                grad_norm=round(grad_norm, 4),
                tokens_per_s=round(step_tokens / seconds, 1),
                # against the cards' dense bf16 peak: 6N per real token, and the FLOPs actually run
                mfu=round(self.flops.nominal(step_tokens) / seconds / (peak * world_size), 4) if peak else None,
                mfu_executed=round(
                    self.flops.executed(step_tokens, supervised, keys) / seconds / (peak * world_size), 4
                )
                if peak
                else None,
                peak_mem_gib=round(peak_memory_gib(device), 3),
            )
            self.history.append(record)
            if self.progress:
                self.progress(record, self.total_steps)
        self.pending.clear()
        self.window_started = time.perf_counter()
