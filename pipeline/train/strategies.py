"""How the model is spread over devices, chosen by `train.strategy`.

- single: one process, one device.
- fsdp2: torch `fully_shard` on every decoder layer and on the root, launched by torchrun
  (one node or many). Parameters, gradients and optimizer state are sharded over the ranks;
  on GPU, bf16 compute with fp32 gradient reduction. Works on CPU with gloo too (the tests).
- zero3 / zero3_offload: DeepSpeed ZeRO-3 (the same sharding, DeepSpeed's engine), the
  offload variant keeping optimizer state and parameters in CPU memory between uses.

`Strategy` (pipeline/dist.py) says which. The loop sees one interface, `Sharded`: forward
through `.model`, then `backward`, `step`, `full_state_dict` (consolidated weights for the epoch
export) and `save`/`load` (sharded resume state: torch.distributed.checkpoint, or DeepSpeed's
own format).

On GPU every strategy uses flex attention over padding-free rows (examples never attend to
each other, at block-sparse cost) and compiles each decoder layer (`train.compile`). Everywhere
the output layer is fused with the loss (train/loss.py): logits are never held whole.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from pipeline.dist import Runtime, Strategy
from pipeline.train.loss import fuse_loss_head


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale."""

    def is_matrix(p):  # ZeRO-3 partitions as it loads: a parameter's own shape is then ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def uses_flex_attention(model, device: torch.device) -> bool:
    # flex attention has no CPU backward; dense attention per packed row is right there. Every
    # supported family runs under flex (transformers' own flag; tests/test_families.py)
    return device.type == "cuda" and model._supports_flex_attn


def prepare_layers(model, cfg, device: torch.device, plain=None):
    """Attention kernel, activation checkpointing and compilation: the same for every strategy,
    applied before sharding (the order torchtitan uses). `plain`: the causal LM inside `model` when
    the caller wrapped it (LoRA adapters); None: `model` is one."""
    plain = model if plain is None else plain
    if uses_flex_attention(model, device):
        model.set_attn_implementation("flex_attention")
    fuse_loss_head(plain)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile and device.type == "cuda":
        for layer in decoder_layers(plain):  # one graph per block: compiles fast, no recompiles per batch
            layer.compile()
    return model


def decoder_layers(plain):
    """The transformer blocks of a causal LM."""
    return plain.model.layers


def load_model(base_dir: Path, cfg, runtime: Runtime):
    """The base model (fp32 master weights), loaded so that no rank but the first ever holds a
    full copy: (model, weights). For fsdp2 every rank builds the model on the meta device and
    rank 0 alone reads the weights (`weights`, in the files' dtype; empty elsewhere), which
    `Sharded` broadcasts tensor by tensor into each rank's shard. For ZeRO-3, transformers loads
    under DeepSpeed's `zero.Init`: parameters are partitioned as they are created and filled
    from rank 0. `single` loads the whole model: it is one process."""
    from transformers import AutoModelForCausalLM

    strategy = Strategy.of(cfg.strategy)
    if strategy.one_process(runtime.world_size):
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), None
    if strategy.deepspeed:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()  # takes over the process group, so the config sees every rank
        zero_init = HfDeepSpeedConfig(deepspeed_config(cfg, runtime))  # transformers holds it weakly
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.zero_init_config = zero_init  # alive until deepspeed.initialize has taken the model
        return model, None
    model = empty_model(base_dir)
    weights = {}
    if runtime.is_main:
        weights = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").state_dict()
    return model, weights


def empty_model(base_dir: Path):
    """The base's architecture with its parameters on the meta device (buffers, the rotary tables,
    real), tied as the base is: what each rank of an fsdp2 run builds before sharding."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir), dtype=torch.float32)
    model.tie_weights()  # before sharding: a tied head must be one parameter to fully_shard
    return model


def materialize(model, weights: dict, device: torch.device) -> None:
    """Allocate a sharded meta-device model's own shards on `device`, then fill them from rank 0's
    full `weights`, one tensor at a time (torch's broadcast_from_rank0): a rank never holds more
    than its shards plus one full tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # not in the checkpoint (rotary tables): kept from init
            buffer.copy_(buffers[name])
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    weights.clear()  # rank 0's full copy: the shards hold the weights now


class Sharded:
    """single and fsdp2: plain torch modules, AdamW, torch.distributed.checkpoint for resume."""

    def __init__(self, model, cfg, runtime: Runtime, weights: dict | None = None, plain=None):
        self.runtime = runtime
        strategy = Strategy.of(cfg.strategy)
        self.fsdp = strategy.fsdp and not strategy.unsharded(runtime.world_size)
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and not self.fsdp:
            raise ValueError(
                f"train.strategy={cfg.strategy}: a model on the meta device loads only under fsdp2 "
                "on more than one rank"
            )
        if not on_meta:
            model.to(runtime.device)
        prepare_layers(model, cfg, runtime.device, plain)
        if self.fsdp:
            apply_fsdp2(model, runtime.device, model if plain is None else plain)
        if on_meta:
            materialize(model, {} if weights is None else weights, runtime.device)
        self.model = model
        # fused: one kernel over every tensor, which also applies the gradient clipping (step)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=True
        )
        # fsdp2 casts through its mixed-precision policy; a single GPU uses autocast
        self.autocast = torch.autocast(
            runtime.device.type, dtype=torch.bfloat16, enabled=runtime.device.type == "cuda" and not self.fsdp
        )

    def forward(self, **inputs):
        with self.autocast:
            return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` and update; the gradient norm before clipping stays on the device.
        The clip is folded into fused AdamW: its kernel divides every gradient by `grad_scale` (the
        hook torch's GradScaler uses), so clipping costs no pass over the gradients of its own."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # clip_grad_norm_'s factor, max_norm / (norm + 1e-6) when below 1, as a divisor
        self.optimizer.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp(min=1.0).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def local_numel(self) -> int:
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.model.parameters())

    def release(self) -> None:
        """Nothing to tear down: plain modules and a torch optimizer."""

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0's CPU (None: use the model's own state dict)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return drop_tied_head(self.model, state)

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process without a process group is a supported case
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def apply_fsdp2(model, device: torch.device, plain=None):
    """Shard each decoder layer (of `plain`, the causal LM inside a wrapped `model`), then the root
    (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model if plain is None else plain):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def drop_tied_head(model, state: dict) -> dict:
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; saved once, as save_pretrained does
    return state


def deepspeed_config(cfg, runtime: Runtime) -> dict:
    """ZeRO-3 as DeepSpeed's users write it. Gradient clipping is DeepSpeed's; the LR schedule and
    the loss normalisation stay the loop's, so every strategy trains the same math."""
    zero = {
        "stage": 3,
        "overlap_comm": runtime.device.type == "cuda",
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if Strategy.of(cfg.strategy).offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": runtime.device.type == "cuda"}
        zero["offload_param"] = {"device": "cpu", "pin_memory": runtime.device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * runtime.world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": runtime.device.type == "cuda"},
        "communication_data_type": "fp32",  # gradients reduced in fp32, as fsdp2's reduce_dtype
        "zero_optimization": zero,
        # off GPU, DeepSpeed's CPU Adam would need a C++ build; torch's AdamW is the same update
        "zero_force_ds_cpu_optimizer": runtime.device.type == "cuda",
        "steps_per_print": 2**31,  # the loop reports progress
        "wall_clock_breakdown": False,
    }


class DeepSpeedSharded:
    """zero3 and zero3_offload through a DeepSpeed engine."""

    def __init__(self, model, cfg, runtime: Runtime, plain=None):
        import deepspeed

        self.runtime = runtime
        prepare_layers(model, cfg, runtime.device, plain)
        groups = param_groups(model, cfg.weight_decay)
        if Strategy.of(cfg.strategy).offload and runtime.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(0.9, 0.95), adamw_mode=True)
        else:  # torch's fused AdamW on GPU (one kernel over all tensors, no JIT build), as fsdp2 uses
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=runtime.device.type == "cuda")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, runtime))
        self.model = self.engine
        self.module = model
        # the client optimizer owns the param groups DeepSpeed steps with: the LR schedule drives it
        self.optimizer = optimizer
        self.grad_accum = cfg.grad_accum

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by its accumulation steps; the loop already normalised the loss
        self.engine.backward(loss * self.grad_accum)
        self.engine.step()  # a no-op until the accumulation boundary

    def step(self, max_norm: float) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()  # DeepSpeed clipped with it already
        return torch.as_tensor(0.0 if norm is None else norm)

    def local_numel(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.module.parameters())

    def release(self) -> None:
        """DeepSpeed's own teardown: the ZeRO-3 hooks and buffers that hold the process group."""
        self.engine.destroy()

    def full_state_dict(self) -> dict | None:
        state = self.engine._zero3_consolidated_16bit_state_dict()  # a collective; rank 0 gets the weights
        return drop_tied_head(self.module, {k: v.cpu() for k, v in state.items()}) if self.runtime.is_main else None

    def save(self, path: Path) -> None:
        # DeepSpeed creates the folder on rank 0 only; nodes without a shared filesystem need their own
        (Path(path) / "state").mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(path), tag="state", save_latest=False)

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="state")


def shard(model, cfg, runtime: Runtime, weights: dict | None = None, plain=None):
    """`model` and `weights` as `load_model` returns them (or any model with its weights in place);
    `plain`: the causal LM inside `model` when the caller wrapped it (None: `model` is one)."""
    if Strategy.of(cfg.strategy).deepspeed:
        if runtime.world_size == 1 and "WORLD_SIZE" not in os.environ:
            raise RuntimeError(f"train.strategy={cfg.strategy} runs under torchrun or the deepspeed launcher")
        return DeepSpeedSharded(model, cfg, runtime, plain)
    return Sharded(model, cfg, runtime, weights, plain)
