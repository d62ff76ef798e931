"""plan: GPU memory per strategy, the smallest fitting node count, tokens, hours and cost.

From the model's config alone (no weights). Per GPU, in bytes:
- model state: mixed-precision AdamW keeps 16 bytes a parameter (fp32 master 4 + fp32 gradients 4
  + Adam moments 8; DeepSpeed: bf16 weights and gradients 2 + 2 beside fp32 master and moments
  12), sharded over the GPUs by FSDP2 and ZeRO-3; ZeRO-3 offload keeps only bf16 weights and
  gradients (4 bytes) on the GPU and the other 14, plus a bf16 staging copy, on the host (18
  bytes a parameter, `host_gib_per_node`).
- gathered: sharded strategies hold one decoder layer gathered in bf16 plus the prefetched next,
  and the root group (embeddings and head) gathered in bf16 with its fp32 gradients unsharded
  until the step's reduce-scatter: 6 bytes per root parameter.
- activations: what autograd saves for backward in a Llama block (RMSNorm, grouped-query
  attention with a fused kernel, so no seq^2 term, SwiGLU): about 10h + 2kv + 4i values a token
  a layer at the compute dtype (2 bytes in bf16); with activation checkpointing only each
  layer's input (the residual stream: fp32 under single-GPU autocast, whose master weights are
  fp32; bf16 under fsdp2/ZeRO-3) plus one layer recomputed.
- backward: one layer's gradients in flight, as large as its saved activations.
- loss head: the output layer is fused with the loss (pipeline/train/loss.py), so logits exist
  one chunk at a time (fp32 plus the compute-dtype gradient: 6 bytes a logit in bf16, 4 in fp32,
  over at most 2^27 logits), beside the head's fp32 weight gradient held from forward to backward
  (4 bytes a head parameter), its compute-dtype copy under single-GPU autocast, and the
  supervised rows' hidden states and their gradient.
Checked against measured peaks on CPU in tests/test_plan.py (fp32: compute_bytes=4).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.train.loss import CHUNK_ELEMENTS

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


def activation_values(shape: Shape, compiled: bool) -> int:
    """Values a Llama block saves for backward, per token. Eager: the norms' inputs and outputs, q,
    k, v, the attention output (before and after the head transpose), gate, up, SiLU and product.
    Compiled (torch.compile's partitioner recomputes the norms and pointwise ops in backward): the
    matmuls' inputs and outputs only."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    return (4 * h + 2 * kv + 3 * i) if compiled else (10 * h + 2 * kv + 4 * i)


def memory_per_gpu(shape: Shape, strategy: str, gpus: int, tokens_per_gpu: int, checkpointing: bool,
                   compiled: bool = True, supervised_share: float = 1.0, compute_bytes: int = 2) -> dict:
    """GiB per GPU, by component (see the module's docstring). `supervised_share`: the share of
    tokens whose logits are computed (the engine projects only where a loss is taken; 1.0 is the
    safe side); `compute_bytes` 4 for fp32 compute (CPU)."""
    p, h, tokens = shape.params, shape.hidden_size, tokens_per_gpu
    state_bytes = {"single": 16 * p, "fsdp2": 16 * p / gpus, "zero3": 16 * p / gpus,
                   "zero3_offload": 4 * p / gpus}[strategy]
    root = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    gathered = 0 if strategy == "single" else 2 * 2 * shape.layer_params + 6 * root
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
    loss_head = (chunk * (4 + compute_bytes if compute_bytes < 4 else 4) + 4 * head + head_copy
                 + 2 * rows * h * residual_bytes)
    parts = {"model_state": state_bytes, "gathered": gathered, "activations": activations, "backward": layer,
             "loss_head": loss_head}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def host_gib_per_node(shape: Shape, strategy: str, nodes: int) -> float:
    """CPU memory each node needs for the strategy's offloaded state (0 when nothing is offloaded)."""
    return 18 * shape.params / nodes / GIB if strategy == "zero3_offload" else 0.0


def smallest_fit(shape: Shape, strategy: str, gpu: str, gpus_per_node: int, tokens_per_gpu: int,
                 checkpointing: bool, headroom: float = 0.9, max_nodes: int = 64, **run) -> tuple[int | None, float]:
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


def plan(shape: Shape, tokens_per_run: int, tokens_per_gpu: int, gpus_per_node: int, mfu: float,
         prices: dict[str, float], checkpointing: bool = True, compiled: bool = True,
         supervised_share: float = 1.0) -> list[dict]:
    rows = []
    for strategy in STRATEGIES:
        for gpu in GPUS:
            nodes, need = smallest_fit(shape, strategy, gpu, gpus_per_node, tokens_per_gpu, checkpointing,
                                       compiled=compiled, supervised_share=supervised_share)
            row = {"strategy": strategy, "gpu": gpu, "nodes": nodes, "gib_per_gpu": round(need, 1)}
            if nodes:
                row["host_gib_per_node"] = round(host_gib_per_node(shape, strategy, nodes), 1)
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
             "| strategy | GPU | nodes | GiB per GPU | host GiB per node (offload) | hours | cost (USD) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["nodes"]:
            host = r["host_gib_per_node"] or "-"
            lines.append(f"| {r['strategy']} | {r['gpu']} | {r['nodes']} | {r['gib_per_gpu']} | {host} | {r['hours']} | "
                         f"{r['cost']:,.0f} |")
        else:
            lines.append(f"| {r['strategy']} | {r['gpu']} | does not fit | {r['gib_per_gpu']} | - | - | - |")
    return "\n".join(lines) + "\n"
