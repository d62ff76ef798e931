"""What each supported model family needs from the training engine, and the refusal of the rest.

The engine (pipeline/train/) runs a model's own decoder, but not its own loss: examples are packed
into rows (position ids restarting per example), the output layer is fused with the loss, and on
GPU a micro-batch runs as one padding-free row through flex attention. For each family below,
tests/test_families.py proves on a tiny random model with the family's real settings that this
reproduces the model's own `forward(labels=...)` on each example alone, loss and every gradient.
A `model_type` not listed is refused before any download or GPU hour: nothing proves it.

Per family the engine needs:
- the output transform its forward applies to `lm_head`'s output (Gemma 2's final logit softcap,
  Granite's division by `logits_scaling`, Cohere's `logit_scale`): the fused head applies it and
  the model's own is switched off while it does (pipeline/train/loss.py);
- its attention pattern (pipeline/train/attention.py): full or sliding-window per layer,
  from `config.layer_types` (or one window for every layer where the family reads
  `config.sliding_window` without layer types), always within one example;
- for mixture-of-experts families, the router's load-balancing loss (the family's own
  `load_balancing_loss_func`), over real tokens only, weighted by `train.router_aux_loss_coef`
  (default: the model's `router_aux_loss_coef`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.train.loss import OutputTransform


@dataclass(frozen=True)
class Family:
    name: str  # as people say it
    transform: str | None = None  # "softcap" | "divide" | "multiply": what forward does to lm_head's output
    moe: bool = False  # a router with a load-balancing loss
    window_without_layer_types: bool = False  # every layer reads config.sliding_window (Mistral-style)


# The families tests/test_families.py proves (one tiny model each, real settings). Adding a
# family here without adding it there fails tests/test_families.py::test_every_supported_family_is_proven.
SUPPORTED: dict[str, Family] = {
    "llama": Family("Llama 3.x"),
    "qwen2": Family("Qwen2 / Qwen2.5"),
    "qwen3": Family("Qwen3"),
    "qwen3_moe": Family("Qwen3-MoE", moe=True, window_without_layer_types=True),
    "mistral": Family("Mistral", window_without_layer_types=True),
    "mixtral": Family("Mixtral", moe=True, window_without_layer_types=True),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma 2", transform="softcap"),
    "gemma3_text": Family("Gemma 3", transform="softcap"),
    "phi3": Family("Phi-3 / Phi-4", window_without_layer_types=True),
    "olmo2": Family("OLMo 2"),
    "granite": Family("Granite 3.x", transform="divide"),
    "granitemoe": Family("Granite 3.x MoE", transform="divide", moe=True),
    "gpt_oss": Family("gpt-oss", moe=True),
    "cohere": Family("Command R (Cohere)", transform="multiply"),
    "cohere2": Family("Command R7B (Cohere 2)", transform="multiply"),
    "smollm3": Family("SmolLM3"),
    "glm4": Family("GLM-4"),
    "exaone4": Family("EXAONE 4"),
    "olmo3": Family("OLMo 3"),
    "starcoder2": Family("StarCoder2", window_without_layer_types=True),
}

# Families people ask for, and why they are refused (what the engine would get wrong).
REFUSED_BECAUSE = {
    "falcon_h1": "its state-space mixer carries state across packed examples",
    "jamba": "its state-space mixer carries state across packed examples",
    "bamba": "its state-space mixer carries state across packed examples",
    "granitemoehybrid": "its state-space mixer carries state across packed examples",
    "mamba": "its state-space mixer carries state across packed examples",
    "mamba2": "its state-space mixer carries state across packed examples",
    "qwen3_next": "its linear-attention layers carry state across packed examples",
    "llama4": "its chunked attention has no packed-row mask here (and the multimodal model is not a text model)",
    "llama4_text": "its chunked attention has no packed-row mask here",
}


class UnsupportedModel(ValueError):
    """A base the engine cannot train exactly; the message names the fix."""


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def family_of(config, where: str = "base") -> Family:
    """The family of a model config (an object or config.json's dict), or UnsupportedModel."""
    model_type = _get(config, "model_type")
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    why = REFUSED_BECAUSE.get(model_type, "no test proves the training engine reproduces its own forward")
    supported = ", ".join(f"{k} ({f.name})" for k, f in SUPPORTED.items())
    raise UnsupportedModel(
        f"{where}: model_type {model_type!r} is not supported: {why}. Supported model types: {supported}"
    )


def text_config(config: dict):
    """What the engine trains from a config.json: its text model's config with the class's defaults
    (`sft base` extracts a multimodal checkpoint's language model, pipeline/base.py; Gemma 3 leaves
    max_position_embeddings to its class), or the dict itself where transformers does not know the
    model_type."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(config.get("model_type"), **fields).get_text_config()
    except (KeyError, ValueError, TypeError):
        return config


def check_model(config, max_seq_len: int, where: str = "base") -> Family:
    """Refuse what the engine cannot train exactly: an unproven family, or rows longer than the
    positions the model was trained for. `config`: a config object, or config.json's dict."""
    if isinstance(config, dict):
        config = text_config(config)
    family = family_of(config, where)
    dropout = _get(config, "attention_dropout") or 0.0
    if dropout > 0:
        raise UnsupportedModel(
            f"{where}: attention_dropout {dropout}: flex attention (the GPU path) runs no attention dropout, so "
            "training would crash or differ from what tests/test_families.py proves; use a checkpoint whose "
            "config.json sets attention_dropout: 0.0"
        )
    positions = _get(config, "max_position_embeddings")
    if positions and max_seq_len > positions:
        raise UnsupportedModel(
            f"params.yaml prepare.max_seq_len {max_seq_len} is beyond {where}'s max_position_embeddings "
            f"{positions}: tokens past position {positions} sit where the model never trained. Lower "
            f"prepare.max_seq_len to at most {positions}, or pick a base whose config.json extends its "
            "positions (rope scaling such as YaRN raises max_position_embeddings)"
        )
    return family


def output_transform(config) -> OutputTransform:
    family = SUPPORTED.get(_get(config, "model_type"))
    kind = family.transform if family else None
    if kind == "softcap":
        return OutputTransform(softcap=_get(config, "final_logit_softcapping"))
    if kind == "divide":
        return OutputTransform(scale=1.0 / _get(config, "logits_scaling", 1.0))
    if kind == "multiply":
        return OutputTransform(scale=_get(config, "logit_scale", 1.0))
    return OutputTransform()


@contextmanager
def own_output_transform_off(model):
    """While the fused head applies the family's output transform, the model's forward must not
    apply it again (to the loss the head returns). `model`: the plain ForCausalLM."""
    family = SUPPORTED.get(model.config.model_type)
    kind = family.transform if family else None
    target, key, neutral = {
        "softcap": (model.config, "final_logit_softcapping", None),
        "divide": (model.config, "logits_scaling", 1.0),
        "multiply": (model, "logit_scale", 1.0),
    }.get(kind, (None, None, None))
    if target is None:
        yield
        return
    own = getattr(target, key)
    setattr(target, key, neutral)
    try:
        yield
    finally:
        setattr(target, key, own)


def layer_attention(config, layer: int) -> tuple[str, int | None]:
    """("full" | "sliding", the window) for one decoder layer, as the family's forward builds its
    mask. Chunked attention (Llama 4) is not proven here: refused by name."""
    layer_types = _get(config, "layer_types")
    if layer_types:
        kind = layer_types[layer]
        if kind == "sliding_attention":
            return "sliding", _get(config, "sliding_window")
        if kind != "full_attention":
            raise UnsupportedModel(f"layer {layer}: attention type {kind!r} has no packed-row mask here")
        return "full", None
    family = SUPPORTED.get(_get(config, "model_type"))
    window = _get(config, "sliding_window")
    if family and family.window_without_layer_types and window is not None:
        return "sliding", window
    return "full", None


class Router:
    """The MoE load-balancing loss the engine adds: the family's own `load_balancing_loss_func` on
    the router logits of one forward, over the real tokens only, weighted by `coef`.

    The logits are recorded by hooks on the modules the model itself records them from (its
    `_can_record_outputs["router_logits"]`), not through `output_router_logits=True`: the model's
    forward would then compute the loss itself from `attention_mask`, which here holds the engine's
    own masks, not a padding mask. The hooks always record (no branch inside a compiled layer); the
    loss takes the first logits of each `recording()`, one a MoE layer, so a layer recomputed in
    backward (activation checkpointing) adds nothing to it."""

    def __init__(self, model, coef: float):
        import sys

        self.coef = coef
        self.num_experts, self.top_k = model.num_experts, model.num_experts_per_tok
        # the family's modeling module (FSDP2 wraps the class in one of its own: walk the MRO)
        modules = (sys.modules[c.__module__] for c in type(model).__mro__)
        self.balance = next(m.load_balancing_loss_func for m in modules if hasattr(m, "load_balancing_loss_func"))
        spec = next(
            m._can_record_outputs["router_logits"]
            for m in model.modules()
            if "router_logits" in (getattr(m, "_can_record_outputs", None) or {})
        )
        routers = [
            m
            for name, m in model.named_modules()
            if isinstance(m, spec.target_class) and (not spec.layer_name or name.endswith(spec.layer_name))
        ]
        if not routers:
            raise UnsupportedModel(
                f"{model.config.model_type}: no router modules to take the load-balancing loss "
                "from; set train.router_aux_loss_coef: 0 to train without it"
            )
        self.logits: list = []
        self.forward_logits: list = []

        def grab(module, args, output):
            self.logits.append(output[spec.index] if isinstance(output, (tuple, list)) else output)

        self.hooks = [m.register_forward_hook(grab) for m in routers]

    @contextmanager
    def recording(self):
        self.logits = []
        yield
        self.forward_logits = self.logits[: len(self.hooks)]

    def loss(self, real):
        """`real`: [rows, length] True on the tokens of examples (the padding is not routed)."""
        return self.balance(tuple(self.forward_logits), self.num_experts, self.top_k, real)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def router(model, coef: float | None) -> Router | None:
    """The MoE load-balancing loss the engine adds, or None (a dense family, or coef 0).
    `model`: the plain ForCausalLM; `coef` None takes the model's own `router_aux_loss_coef`."""
    family = SUPPORTED.get(model.config.model_type)
    if not (family and family.moe):
        return None
    coef = model.config.router_aux_loss_coef if coef is None else coef
    if not coef:
        return None
    return Router(model, coef)
