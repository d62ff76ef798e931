"""plan: GPU memory per strategy, the smallest fitting node count, tokens, hours and cost.

From the model's config alone (no weights). The shape (`Shape`) is read from config.json through
transformers' own config class for its `model_type` (so a default the file leaves out, e.g. Gemma 3's
vocabulary, is the library's), from `text_config` for multimodal checkpoints (the language model is
what is trained, see pipeline/base.py).

Parameters. Per decoder layer: attention q, k, v, o with q = heads x head_dim and k = v = kv_heads x
head_dim (head_dim is its own field: Gemma 3 27B has 32 x 128 = 4,096 beside a 5,376 residual
stream; Qwen3-30B-A3B 4,096 beside 2,048), their biases where the family has them (gpt-oss: all
four, Qwen2: q, k, v), per-head q/k RMSNorms (Qwen3, Gemma 3: 2 x head_dim) and attention sinks
(gpt-oss: one a head); the norms (2 x hidden, Gemma 3: 4 x hidden); the MLP: a dense SwiGLU of
3 x hidden x intermediate or, in MoE layers, `num_experts` SwiGLU experts of 3 x hidden x
moe_intermediate (gpt-oss: plus their biases) behind a router of hidden x num_experts (+ a bias in
gpt-oss), plus a shared expert and its gate where the family has one (Qwen2-MoE). Then the
embeddings (once when tied) and the final norm. Checked against the parameter count of tiny models
of each family built by transformers (tests/test_plan.py).

MoE: memory counts every expert (all are stored, trained and sharded: `params`); compute counts the
`num_experts_per_tok` experts a token runs through (`active_params`: `params` less the experts a
token skips), so hours follow active, memory follows total.

Per GPU, in bytes:
- model state: mixed-precision AdamW keeps 16 bytes a parameter (fp32 master 4 + fp32 gradients 4
  + Adam moments 8; DeepSpeed: bf16 weights and gradients 2 + 2 beside fp32 master and moments
  12), sharded over the GPUs by FSDP2 and ZeRO-3; ZeRO-3 offload keeps only bf16 weights and
  gradients (4 bytes) on the GPU and the other 14, plus a bf16 staging copy, on the host (18
  bytes a parameter, `host_gib_per_node`).
- gathered: sharded strategies hold one decoder layer gathered in bf16 plus the prefetched next
  (the largest layer, all its experts), and the root group (embeddings and head) gathered in bf16
  with its fp32 gradients unsharded until the step's reduce-scatter: 6 bytes per root parameter.
- activations: what autograd saves for backward in a block (RMSNorm, grouped-query attention with
  a fused kernel, so no seq^2 term, SwiGLU): about 6h + 4q + 2kv + 4i values a token a layer at the
  compute dtype (2 bytes in bf16; h hidden, q and kv the attention widths above, i the
  intermediate size; in MoE layers i is experts-per-token x moe_intermediate plus the shared
  expert, and the router's logits and each routed copy of the token's input and output are
  added); with activation checkpointing only each layer's input (the residual stream: fp32 under
  single-GPU autocast, whose master weights are fp32; bf16 under fsdp2/ZeRO-3) plus one layer
  recomputed. The Llama terms are checked against measured peaks (tests/test_plan.py). Measured once
  more on CPU (fp32, eager; tests/plan_worker.py with AutoModelForCausalLM by model_type): a tiny Qwen3
  (q/k norms) peaked at 338 MiB against 318 planned; a tiny Qwen3-MoE (8 experts, 2 a token) at 350
  and 353 MiB (with checkpointing) against 303 and 298, about 15% above: likely the eager expert
  loop's many variable-size buffers, not counted. Small beside the model state at scale.
- backward: one layer's gradients in flight, as large as its saved activations.
- loss head: the output layer is fused with the loss (pipeline/train/loss.py), so logits exist
  one chunk at a time (fp32 plus the compute-dtype gradient: 6 bytes a logit in bf16, 4 in fp32,
  over at most 2^27 logits), beside the head's fp32 weight gradient held from forward to backward
  (4 bytes a head parameter), its compute-dtype copy under single-GPU autocast, and the
  supervised rows' hidden states and their gradient.
Checked against measured peaks on CPU in tests/test_plan.py (fp32: compute_bytes=4).

Time: 6 FLOPs a token per active parameter forward and backward, 2 more when activations are
recomputed, at the configured MFU. Attention's own seq^2 FLOPs are left out (with packed rows the
span is each example, which the plan does not know): long examples (16k-token reasoning traces)
take longer than the figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.train.loss import CHUNK_ELEMENTS

GIB = 1024**3
GPUS = {"H100-80GB": 80, "H200-141GB": 141}
STRATEGIES = ("single", "fsdp2", "zero3", "zero3_offload")
PEAK_BF16_TFLOPS = {"H100-80GB": 989, "H200-141GB": 989}

# Published shapes: excerpts of each model's config.json (key names and nesting as published), so a
# plan needs no download. `Shape.from_config` reads them as it reads a downloaded config.json.
PUBLISHED = {
    # meta-llama/Llama-3.1-8B-Instruct config.json
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-3.1-70B-Instruct config.json
    "llama-3.1-70b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-3.3-70B-Instruct config.json (@6f6073b4): the Llama-3.1-70B architecture
    "llama-3.3-70b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-3.2-1B-Instruct config.json
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    # Qwen/Qwen3-8B config.json (@b968826d), as quoted in public code (e.g. lumenrl's model-registry
    # tests); 8.19B parameters, the model card's 8.2B
    "qwen3-8b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # Qwen/Qwen3-30B-A3B config.json (@ad44e777), as quoted in public code (a vLLM-side qwen3_moe test
    # config): every layer MoE (decoder_sparse_step 1, no mlp_only_layers), no shared expert
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # google/gemma-3-27b-it config.json (@005ad340; Gemma3ForConditionalGeneration), text_config as
    # published (quoted in TensorRT-LLM's Gemma 3 tests): it leaves out vocab_size (the config class's
    # 262,208) and tie_word_embeddings (tied); the vision tower is not trained (pipeline/base.py)
    "gemma-3-27b": dict(
        model_type="gemma3",
        text_config=dict(
            model_type="gemma3_text",
            head_dim=128,
            hidden_size=5376,
            intermediate_size=21504,
            num_attention_heads=32,
            num_hidden_layers=62,
            num_key_value_heads=16,
            query_pre_attn_scalar=168,
            sliding_window=1024,
        ),
    ),
    # openai/gpt-oss-20b config.json (@6cee5e81), as quoted in public code (gpt-oss ports' config tests):
    # 32 experts of 2,880, 4 a token, biases on attention and experts, attention sinks; 20.91B
    # parameters (the model card's 21B, 3.6B active without the input embeddings)
    "gpt-oss-20b": dict(
        model_type="gpt_oss",
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        experts_per_token=4,
        attention_bias=True,
        sliding_window=128,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    # mistralai/Mistral-Small-3.2-24B-Instruct-2506 config.json (@95a6d26c; Mistral3ForConditionalGeneration),
    # text_config as quoted in public code (TensorRT-LLM's Mistral Small 3.1 fixture, the same text
    # tower; a memory estimator counting 23,572,403,200 text parameters)
    "mistral-small-3.2-24b": dict(
        model_type="mistral3",
        text_config=dict(
            model_type="mistral",
            vocab_size=131072,
            hidden_size=5120,
            intermediate_size=32768,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
}

# The Hub repositories each shape describes (a preset's base.model names one of them)
HUB_IDS = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B"),
    "llama-3.3-70b": ("meta-llama/Llama-3.3-70B-Instruct",),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"),
    "qwen3-8b": ("Qwen/Qwen3-8B",),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B",),
    "gemma-3-27b": ("google/gemma-3-27b-it",),
    "gpt-oss-20b": ("openai/gpt-oss-20b",),
    "mistral-small-3.2-24b": ("mistralai/Mistral-Small-3.2-24B-Instruct-2506",),
}

# What a family's config does not spell out: per-head q/k norms, norms a layer, biases, sinks
FAMILY_TRAITS = {
    "qwen3": dict(qk_norm=True),
    "qwen3_moe": dict(qk_norm=True),
    "gemma3_text": dict(qk_norm=True, norms_per_layer=4),
    "gpt_oss": dict(attention_sinks=True, expert_bias=True, router_bias=True),
    "qwen2": dict(qkv_bias=True),
}


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    model_type: str = "llama"
    num_experts: int = 0  # MoE: experts a layer (0: dense)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # None: intermediate_size (gpt-oss, Mixtral)
    shared_expert_intermediate_size: int = 0  # an always-on expert beside the routed ones (Qwen2-MoE)
    moe_layers: int | None = None  # None: every layer when num_experts
    attention_bias: bool = False  # q, k, v and o
    qkv_bias: bool = False  # q, k and v only
    qk_norm: bool = False
    norms_per_layer: int = 2
    attention_sinks: bool = False
    expert_bias: bool = False
    router_bias: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """From a config.json's dict. With a model_type, through transformers' config class (its
        defaults, its key names; the text model of a multimodal config); without one, the keys as given
        (the Llama arithmetic)."""
        if "model_type" not in config:
            return cls(**{k: config.get(k, getattr(cls, k, None)) for k in cls.__dataclass_fields__})
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k != "model_type"}
        text = AutoConfig.for_model(config["model_type"], **fields).get_text_config()
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
        layers = text.num_hidden_layers
        moe_layers = None
        if experts and hasattr(text, "decoder_sparse_step"):  # Qwen MoE: some layers may stay dense
            skip = set(getattr(text, "mlp_only_layers", None) or [])
            moe_layers = sum(1 for i in range(layers) if i not in skip and (i + 1) % text.decoder_sparse_step == 0)
        shared = getattr(text, "shared_expert_intermediate_size", 0) or 0
        traits = FAMILY_TRAITS.get(text.model_type, {})
        return cls(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            tie_word_embeddings=bool(text.tie_word_embeddings),
            head_dim=getattr(text, "head_dim", None),
            model_type=text.model_type,
            num_experts=experts,
            num_experts_per_tok=getattr(text, "num_experts_per_tok", 0) if experts else 0,
            moe_intermediate_size=getattr(text, "moe_intermediate_size", None),
            shared_expert_intermediate_size=shared if experts else 0,
            moe_layers=moe_layers,
            attention_bias=bool(getattr(text, "attention_bias", False)),
            qkv_bias=bool(getattr(text, "qkv_bias", traits.get("qkv_bias", False))),
            **{k: v for k, v in traits.items() if k != "qkv_bias"},
        )

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_width

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_width

    @property
    def expert_intermediate(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def sparse_layers(self) -> int:
        if not self.num_experts:
            return 0
        return self.num_hidden_layers if self.moe_layers is None else self.moe_layers

    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        params = h * q + 2 * h * kv + q * h
        params += (q + 2 * kv + h) * self.attention_bias + (q + 2 * kv) * self.qkv_bias
        params += 2 * self.head_width * self.qk_norm + self.num_attention_heads * self.attention_sinks
        return params + self.norms_per_layer * h

    def expert_params(self) -> int:
        h, i = self.hidden_size, self.expert_intermediate
        return 3 * h * i + (2 * i + h) * self.expert_bias

    def moe_fixed_params(self) -> int:
        """A MoE layer's parameters every token uses: the router and the shared expert with its gate."""
        h, shared = self.hidden_size, self.shared_expert_intermediate_size
        return h * self.num_experts + self.num_experts * self.router_bias + (3 * h * shared + h if shared else 0)

    def layer_params(self, experts: int | None = None) -> int:
        """The largest decoder layer; `experts`: count only that many of its experts (active)."""
        if not self.num_experts:
            return self.attention_params() + 3 * self.hidden_size * self.intermediate_size
        count = self.num_experts if experts is None else experts
        return self.attention_params() + self.moe_fixed_params() + count * self.expert_params()

    def _total(self, experts: int | None) -> int:
        dense_layers = self.num_hidden_layers - self.sparse_layers
        dense = self.attention_params() + 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        sparse = self.layer_params(experts) if self.num_experts else 0
        return self.sparse_layers * sparse + dense_layers * dense + embeddings + self.hidden_size

    @property
    def params(self) -> int:
        return self._total(None)

    @property
    def active_params(self) -> int:
        """What one token computes with: `params` less the experts it is not routed to."""
        return self._total(self.num_experts_per_tok) if self.num_experts else self.params


SHAPES = {name: asdict(Shape.from_config(config)) for name, config in PUBLISHED.items()}


def activation_values(shape: Shape, compiled: bool) -> int:
    """Values a block saves for backward, per token (the largest layer: a MoE one where there are).
    Eager: the norms' inputs and outputs (4h, 2h more for each extra norm) and their fp32 upcasts
    (2h), q, rotated q and the attention output before and after the head transpose (4q), k, v, q/k
    norms' outputs, gate, up, SiLU and product. Compiled (torch.compile's partitioner recomputes the
    norms and pointwise ops in backward): the matmuls' inputs and outputs only (2h + 2q + 2kv + 3i).
    MoE: i is experts-a-token x moe_intermediate plus the shared expert; the router's logits and each
    routed copy of the token in and out (2 x experts-a-token x h) are added."""
    h, q, kv = shape.hidden_size, shape.q_width, shape.kv_width
    if shape.num_experts:
        k = shape.num_experts_per_tok
        i = k * shape.expert_intermediate + shape.shared_expert_intermediate_size
        routing = shape.num_experts + 2 * k * h
    else:
        i, routing = shape.intermediate_size, 0
    if compiled:
        return 2 * h + 2 * q + 2 * kv + 3 * i + routing
    extra_norms = 2 * h * (shape.norms_per_layer - 2) + (q + kv) * shape.qk_norm
    return 6 * h + 4 * q + 2 * kv + 4 * i + routing + extra_norms


def memory_per_gpu(
    shape: Shape,
    strategy: str,
    gpus: int,
    tokens_per_gpu: int,
    checkpointing: bool,
    compiled: bool = True,
    supervised_share: float = 1.0,
    compute_bytes: int = 2,
) -> dict:
    """GiB per GPU, by component (see the module's docstring). `supervised_share`: the share of
    tokens whose logits are computed (the engine projects only where a loss is taken; 1.0 is the
    safe side); `compute_bytes` 4 for fp32 compute (CPU)."""
    p, h, tokens = shape.params, shape.hidden_size, tokens_per_gpu
    state_bytes = {"single": 16 * p, "fsdp2": 16 * p / gpus, "zero3": 16 * p / gpus, "zero3_offload": 4 * p / gpus}[
        strategy
    ]
    root = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    gathered = 0 if strategy == "single" else 2 * 2 * shape.layer_params() + 6 * root
    layer = tokens * activation_values(shape, compiled) * compute_bytes
    residual_bytes = 4 if strategy == "single" else compute_bytes  # fp32 master weights keep it fp32 under autocast
    if checkpointing:
        activations = tokens * h * residual_bytes * shape.num_hidden_layers + layer
    else:
        activations = layer * shape.num_hidden_layers
    head = shape.vocab_size * h
    rows = tokens * supervised_share
    chunk = min(rows, max(1, CHUNK_ELEMENTS // shape.vocab_size)) * shape.vocab_size
    head_copy = 2 * head if strategy == "single" and compute_bytes == 2 else 0  # fp32 master cast for the matmul
    loss_head = (
        chunk * (4 + compute_bytes if compute_bytes < 4 else 4) + 4 * head + head_copy + 2 * rows * h * residual_bytes
    )
    parts = {
        "model_state": state_bytes,
        "gathered": gathered,
        "activations": activations,
        "backward": layer,
        "loss_head": loss_head,
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def host_gib_per_node(shape: Shape, strategy: str, nodes: int) -> float:
    """CPU memory each node needs for the strategy's offloaded state (0 when nothing is offloaded)."""
    return 18 * shape.params / nodes / GIB if strategy == "zero3_offload" else 0.0


def smallest_fit(
    shape: Shape,
    strategy: str,
    gpu: str,
    gpus_per_node: int,
    tokens_per_gpu: int,
    checkpointing: bool,
    headroom: float = 0.9,
    max_nodes: int = 64,
    **run,
) -> tuple[int | None, float]:
    """The fewest nodes whose per-GPU memory fits in `headroom` of the card; (None, need) if none do.
    `run`: memory_per_gpu's compiled and supervised_share."""
    for nodes in range(1, max_nodes + 1):
        gpus = 1 if strategy == "single" else nodes * gpus_per_node
        need = memory_per_gpu(shape, strategy, gpus, tokens_per_gpu, checkpointing, **run)["total"]
        if need <= headroom * GPUS[gpu]:
            return nodes, need
        if strategy == "single":
            return None, need
    return None, need


def plan(
    shape: Shape,
    tokens_per_run: int,
    tokens_per_gpu: int,
    gpus_per_node: int,
    mfu: float,
    prices: dict[str, float],
    checkpointing: bool = True,
    compiled: bool = True,
    supervised_share: float = 1.0,
) -> list[dict]:
    rows = []
    for strategy in STRATEGIES:
        for gpu in GPUS:
            nodes, need = smallest_fit(
                shape,
                strategy,
                gpu,
                gpus_per_node,
                tokens_per_gpu,
                checkpointing,
                compiled=compiled,
                supervised_share=supervised_share,
            )
            row = {"strategy": strategy, "gpu": gpu, "nodes": nodes, "gib_per_gpu": round(need, 1)}
            if nodes:
                row["host_gib_per_node"] = round(host_gib_per_node(shape, strategy, nodes), 1)
                gpus = 1 if strategy == "single" else nodes * gpus_per_node
                # 6N FLOPs per token forward+backward, plus 2N more when activations are recomputed;
                # N the parameters a token computes with (a MoE token skips most experts)
                flops_per_token = (8 if checkpointing else 6) * shape.active_params
                tokens_per_second = gpus * PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu / flops_per_token
                if strategy == "zero3_offload":
                    tokens_per_second *= 0.5  # optimizer steps on the CPU: a rough halving
                hours = tokens_per_run / tokens_per_second / 3600
                row.update(gpus=gpus, hours=round(hours, 2), cost=round(hours * gpus * prices.get(gpu, 0.0), 2))
            rows.append(row)
    return rows


def render_markdown(name: str, shape: Shape, rows: list[dict], tokens_per_run: int, mfu: float) -> str:
    active = f", {shape.active_params / 1e9:.2f}B active" if shape.num_experts else ""
    lines = [
        f"## GPU plan: {name} ({shape.params / 1e9:.2f}B parameters{active})",
        "",
        f"{tokens_per_run:,} tokens per run; throughput assumed at {mfu:.0%} MFU.",
        "",
        "| strategy | GPU | nodes | GiB per GPU | host GiB per node (offload) | hours | cost (USD) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["nodes"]:
            host = r["host_gib_per_node"] or "-"
            lines.append(
                f"| {r['strategy']} | {r['gpu']} | {r['nodes']} | {r['gib_per_gpu']} | {host} | {r['hours']} | "
                f"{r['cost']:,.0f} |"
            )
        else:
            lines.append(f"| {r['strategy']} | {r['gpu']} | does not fit | {r['gib_per_gpu']} | - | - | - |")
    return "\n".join(lines) + "\n"
