"""Tiny random models of every supported family, with the settings that make each family differ
(tests/test_families.py, tests/family_worker.py), and packed rows of prompt-masked examples."""

from __future__ import annotations

import torch

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
WINDOW = 16  # shorter than every example below, so a window that is ignored shows
EXPERTS = dict(num_local_experts=6, num_experts_per_tok=2)
TWO_KINDS = ["sliding_attention", "full_attention"]

# model_type -> the real settings that matter to the engine (output transforms as the published
# models set them, windows, sinks, experts)
FAMILIES: dict[str, dict] = {
    "llama": dict(
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(
        head_dim=32,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    ),
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, **EXPERTS),
    "gemma": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=WINDOW,
        layer_types=TWO_KINDS,
    ),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, layer_types=TWO_KINDS, final_logit_softcapping=30.0),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": {},
    "granite": dict(
        logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625
    ),
    "granitemoe": dict(logits_scaling=16.0, **EXPERTS),
    "gpt_oss": dict(
        head_dim=16, sliding_window=WINDOW, layer_types=TWO_KINDS, max_position_embeddings=131072, **EXPERTS
    ),
    "cohere": dict(logit_scale=0.0625),
    "cohere2": dict(logit_scale=0.25, sliding_window=WINDOW, layer_types=TWO_KINDS),
    "smollm3": dict(no_rope_layers=[1, 0]),
    "glm4": {},
    "exaone4": dict(sliding_window=WINDOW, layer_types=TWO_KINDS),
    "olmo3": dict(sliding_window=WINDOW, layer_types=TWO_KINDS),
    "starcoder2": dict(sliding_window=WINDOW),
}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "gpt_oss":  # sinks start at zero; random ones make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1)
    return model.eval()


def examples(lengths=(37, 23, 52, 30), prompts=(10, 8, 20, 6), seed: int = 1):
    """(input_ids, labels) per example: random tokens, the first `prompt` tokens unsupervised."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n, p in zip(lengths, prompts, strict=True):
        ids = torch.randint(3, VOCAB, (n,), generator=generator)
        labels = ids.clone()
        labels[:p] = -100
        out.append((ids, labels))
    return out


def pack(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int, pad_id: int = 0):
    """[rows, width] input_ids, labels and position ids, as prepare lays them out: examples left
    to right, position ids restarting per example, the padding a segment of its own."""
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            input_ids[r, at : at + len(ids)] = ids
            labels[r, at : at + len(ids)] = lab
            positions[r, at : at + len(ids)] = torch.arange(len(ids))
            at += len(ids)
        positions[r, at:] = torch.arange(width - at)
    return input_ids, labels, positions
