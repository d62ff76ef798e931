"""lora: the LoRA baseline full SFT must beat (the method: benchmark LoRA first).

Adapters from peft on every linear layer of the same base (attention and MLP; the head and the
embeddings stay frozen), trained by the same loop on the same prepared data. Each epoch's
checkpoint is the adapter merged into the base, written exactly like a full-SFT checkpoint, so
evaluation, the gate and publishing treat both alike.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "lora-"  # candidate names in the gate: lora-epoch-2 is lora/checkpoints/epoch-2


def checkpoint_path(name: str, full_root: Path, lora_root: Path) -> Path:
    """Where a gate candidate's files are: `lora-epoch-2` under lora_root, `epoch-3` under full_root."""
    return lora_root / name.removeprefix(PREFIX) if name.startswith(PREFIX) else full_root / name


def adapter_config(cfg):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        use_dora=cfg.dora,
        lora_dropout=cfg.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def add_adapters(model, cfg, seed: int = 0):
    """`model` with freshly initialised adapters (B = 0: the wrapped model computes exactly the base);
    only the adapters require gradients."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # every rank (and a rerun) draws the same initial adapters
    return get_peft_model(model, adapter_config(cfg))


def load_with_adapters(base_dir: Path, train_cfg, cfg, runtime):
    """(the base with fresh adapters, weights), as `load_model` returns them for `shard`. Under fsdp2
    every rank builds the wrapped model on the meta device and rank 0 alone loads the base in fp32
    and draws the adapters, whose full state `Sharded` broadcasts into each rank's shards: no rank
    but the first holds a full copy (a 70B base is 280 GB in fp32). One process loads it whole."""
    from pipeline.dist import Strategy
    from pipeline.train.strategies import empty_model, load_model

    one_process = train_cfg.model_copy(update={"strategy": "single"})
    if Strategy.of(train_cfg.strategy).one_process(runtime.world_size):
        model, _ = load_model(base_dir, one_process, runtime)
        return add_adapters(model, cfg), None
    model = add_adapters(empty_model(base_dir), cfg)
    weights = {}
    if runtime.is_main:  # the same seed: the adapters one process would draw
        base, _ = load_model(base_dir, one_process, runtime)
        weights = add_adapters(base, cfg).state_dict()
    return model, weights


def merged(model, state: dict | None = None):
    """(plain model, its state dict): the adapters folded into the base weights by peft's own
    merge, on a CPU copy built from `state` (the full PEFT state dict; a sharded run gathers it on
    rank 0), so the training model keeps its adapters."""
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    state = model.state_dict() if state is None else state
    base = model.get_base_model()
    # the head and the embeddings are frozen: tied in the base, they are still one tensor's values (a sharded
    # run's config may no longer say so, so the state decides)
    config = copy.deepcopy(base.config)
    head = next((v for k, v in state.items() if k.endswith("lm_head.weight")), None)
    embeddings = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
    config.tie_word_embeddings = head is None or (embeddings is not None and torch.equal(head, embeddings))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, filled below; rotary tables real
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        skeleton = get_peft_model(skeleton, model.peft_config["default"])
    missing, unexpected = skeleton.load_state_dict(
        {k: v.detach().to("cpu") for k, v in state.items()}, strict=False, assign=True
    )
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"adapter merge: state dict does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    plain = skeleton.merge_and_unload()
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain, {k: v for k, v in plain.state_dict().items()}


def training_hooks(model) -> dict:
    """What pipeline.train.loop.train needs to know of an adapted model, as its keyword arguments:
    only the adapters train, each epoch's checkpoint is the merged model, and the causal LM inside
    the wrapper is the one whose layers, config and output layer the engine works on."""
    return {
        "trainable": [p for p in model.parameters() if p.requires_grad],
        "export": merged,
        "plain": model.get_base_model(),
    }


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_share(model) -> tuple[int, int]:
    """(trainable, all) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
