"""The model's tail fused with the loss: vocabulary projection and cross-entropy in chunks of rows,
gradients computed in the forward pass, so no [tokens x vocabulary] logits tensor (nor its fp32
copy and gradient, about 14 bytes per logit) is ever held whole.

The loss is the graph's end and a scalar, so the gradient of a chunk's loss with respect to its
logits (softmax minus one-hot) is known in forward; the backward pass only scales what forward
stored. This is the design of Liger's fused linear cross-entropy, in plain torch ops: it runs on
CPU (the tests, the demo) and under every strategy, since it stays inside the head module's own
forward, where FSDP2 and ZeRO-3 have its weight gathered.

Some families transform the output layer's result before the loss (pipeline/families.py: Gemma 2's
softcap, Granite's and Cohere's scale). The head applies that transform itself, chunk by chunk, with
its exact gradient, while the model's own transform is switched off: a head that returns a loss
would otherwise have the transform applied to the loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

CHUNK_ELEMENTS = 2**27  # logits per chunk: 512 MiB in fp32 (about 1,000 rows of a 128k vocabulary)


@dataclass(frozen=True)
class OutputTransform:
    """What a family's forward does to `lm_head`'s output: logits = softcap(scale * z), where
    softcap(x) = cap * tanh(x / cap) (none when `softcap` is None)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """In place on `z` (a fresh fp32 chunk of logits)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def scale_gradient(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d loss / d z from d loss / d logits (both fp32, in place on `grad`): the chain rule
        through the softcap (1 - tanh^2, from the capped logits themselves) and the scale."""
        if self.softcap is not None:
            grad.mul_(1 - (logits / self.softcap).square_())
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


IDENTITY = OutputTransform()


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(transform(hidden[i] @ weight.T), targets[i]), matmuls in `dtype`, softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, transform=IDENTITY):
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(dtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].to(dtype)
            t = targets[start : start + rows]
            logits = transform((h @ w.T).float())
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                if transform.identity:  # softmax, in place of the logits
                    grad_logits = logits.sub_(lse[:, None]).exp_()
                else:  # the capped logits are needed for the chain rule: one more chunk
                    grad_logits = logits.sub(lse[:, None]).exp_()
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1
                if not transform.identity:
                    grad_logits = transform.scale_gradient(grad_logits, logits)
                grad_logits = grad_logits.to(dtype)
                if need_hidden:
                    grad_hidden[start : start + rows] = grad_logits @ w
                if need_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:  # accumulated in fp32 over the chunks
                        grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)  # scaled in place: no second copy of the head's gradient
        grad_hidden = saved.pop(0).mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_weight = saved.pop(0).mul_(grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick here (bf16 on a single GPU), else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class LossHead(nn.Linear):
    """The output projection (`lm_head`, same weight, same state-dict key). While `supervising`, its
    forward takes every position's hidden state and returns the summed loss of the supervised ones
    instead of logits; otherwise it is the plain linear layer (evaluation, generation)."""

    supervised: tuple[torch.Tensor, torch.Tensor] | None = None
    transform: OutputTransform = IDENTITY  # the family's own (pipeline/families.py), set by fuse_loss_head

    @classmethod
    def replacing(cls, linear: nn.Linear) -> LossHead:
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight, head.bias = linear.weight, linear.bias  # the same parameters: tying and sharding hold
        return head

    @contextmanager
    def supervising(self, positions: torch.Tensor, targets: torch.Tensor):
        """`positions`: flat indices into the batch's tokens; `targets`: the token each one predicts."""
        self.supervised = (positions, targets)
        try:
            yield
        finally:
            self.supervised = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.supervised is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("the fused loss head has no bias term; this model's output layer has one")
        positions, targets = self.supervised
        rows = hidden.flatten(0, -2)[positions]
        return LinearCrossEntropy.apply(rows, self.weight, targets, compute_dtype(rows), self.transform)


def fuse_loss_head(plain) -> LossHead:
    """Swap a causal LM's output layer for a LossHead (in place) that applies the family's output
    transform. A wrapped model (LoRA adapters) passes the causal LM inside it."""
    from pipeline.families import output_transform

    head = plain.get_output_embeddings()
    if not isinstance(head, LossHead):
        head = LossHead.replacing(head)
        plain.set_output_embeddings(head)
    head.transform = output_transform(plain.config)
    return head
