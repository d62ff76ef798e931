"""plan: GPU memory per strategy, the smallest fitting node count, tokens, hours and cost.

From the model's config alone (no weights). Bytes per parameter for mixed-precision AdamW:
fp32 master weights 4 + fp32 gradients 4 + Adam moments 8 = 16 (DeepSpeed keeps bf16 weights
and gradients beside an fp32 master copy: 2 + 2 + 12 = 16 as well). FSDP2 and ZeRO-3 shard all
16 bytes over the GPUs; ZeRO-3 with offload keeps only bf16 weights and gradients (4 bytes) on
the GPU. Activations (bf16, flash attention, so no seq^2 term) follow Korthikanti et al. 2022:
about 34 * hidden bytes per token per layer, or only each layer's 2 * hidden-byte input with
activation checkpointing plus one layer recomputed; the fp32 logits for the loss come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
GPUS = {"H100-80GB": 80, "H200-141GB": 141}
STRATEGIES = ("single", "fsdp2", "zero3", "zero3_offload")
PEAK_BF16_TFLOPS = {"H100-80GB": 989, "H200-141GB": 989}

# Published shapes (config.json of each model), so a plan needs no download.
SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
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

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        return cls(**{k: config.get(k, getattr(cls, k, None)) for k in cls.__dataclass_fields__})

    @property
    def params(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)
        layer = h * h * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + h

    @property
    def layer_params(self) -> int:
        return (self.params - self.vocab_size * self.hidden_size) // self.num_hidden_layers


def memory_per_gpu(shape: Shape, strategy: str, gpus: int, tokens_per_gpu: int, checkpointing: bool) -> dict:
    """GiB per GPU, by component."""
    p = shape.params
    state_bytes = {"single": 16 * p, "fsdp2": 16 * p / gpus, "zero3": 16 * p / gpus,
                   "zero3_offload": 4 * p / gpus}[strategy]
    gathered = 0 if strategy == "single" else 2 * 2 * shape.layer_params  # bf16 layer + the prefetched next
    h, layers = shape.hidden_size, shape.num_hidden_layers
    if checkpointing:
        activations = tokens_per_gpu * h * 2 * layers + tokens_per_gpu * 34 * h
    else:
        activations = tokens_per_gpu * 34 * h * layers
    logits = tokens_per_gpu * shape.vocab_size * (4 + 2)  # fp32 for the loss + the bf16 output
    parts = {"model_state": state_bytes + gathered, "activations": activations, "logits": logits}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def smallest_fit(shape: Shape, strategy: str, gpu: str, gpus_per_node: int, tokens_per_gpu: int,
                 checkpointing: bool, headroom: float = 0.9, max_nodes: int = 64) -> tuple[int | None, float]:
    """The fewest nodes whose per-GPU memory fits in `headroom` of the card; (None, need) if none do."""
    for nodes in range(1, max_nodes + 1):
        gpus = 1 if strategy == "single" else nodes * gpus_per_node
        need = memory_per_gpu(shape, strategy, gpus, tokens_per_gpu, checkpointing)["total"]
        if need <= headroom * GPUS[gpu]:
            return nodes, need
        if strategy == "single":
            return None, need
    return None, need


def plan(shape: Shape, tokens_per_run: int, tokens_per_gpu: int, gpus_per_node: int, mfu: float,
         prices: dict[str, float], checkpointing: bool = True) -> list[dict]:
    rows = []
    for strategy in STRATEGIES:
        for gpu in GPUS:
            nodes, need = smallest_fit(shape, strategy, gpu, gpus_per_node, tokens_per_gpu, checkpointing)
            row = {"strategy": strategy, "gpu": gpu, "nodes": nodes, "gib_per_gpu": round(need, 1)}
            if nodes:
                gpus = 1 if strategy == "single" else nodes * gpus_per_node
                # 6N FLOPs per token forward+backward, plus 2N more when activations are recomputed
                flops_per_token = (8 if checkpointing else 6) * shape.params
                tokens_per_second = gpus * PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu / flops_per_token
                if strategy == "zero3_offload":
                    tokens_per_second *= 0.5  # optimizer steps on the CPU: a rough halving
                hours = tokens_per_run / tokens_per_second / 3600
                row.update(gpus=gpus, hours=round(hours, 2), cost=round(hours * gpus * prices.get(gpu, 0.0), 2))
            rows.append(row)
    return rows


def render_markdown(name: str, shape: Shape, rows: list[dict], tokens_per_run: int, mfu: float) -> str:
    lines = [f"## GPU plan: {name} ({shape.params / 1e9:.2f}B parameters)", "",
             f"{tokens_per_run:,} tokens per run; throughput assumed at {mfu:.0%} MFU.", "",
             "| strategy | GPU | nodes | GiB per GPU | hours | cost (USD) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["nodes"]:
            lines.append(f"| {r['strategy']} | {r['gpu']} | {r['nodes']} | {r['gib_per_gpu']} | {r['hours']} | "
                         f"{r['cost']:,.0f} |")
        else:
            lines.append(f"| {r['strategy']} | {r['gpu']} | does not fit | {r['gib_per_gpu']} | - | - |")
    return "\n".join(lines) + "\n"
