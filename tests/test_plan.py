import pytest

from pipeline.plan import GIB, SHAPES, Shape, memory_per_gpu, plan, render_markdown, smallest_fit


@pytest.mark.parametrize(
    "name,published", [("llama-3.1-8b", 8.03e9), ("llama-3.1-70b", 70.6e9), ("llama-3.2-1b", 1.24e9)]
)
def test_parameter_counts_match_the_model_cards(name, published):
    assert Shape(**SHAPES[name]).params == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b"])
def test_fsdp_model_state_within_15_percent_of_zero_formula(name):
    """Reference: ZeRO (Rajbhandari et al. 2020), mixed-precision Adam model state = 16 bytes x params / GPUs."""
    shape = Shape(**SHAPES[name])
    ours = memory_per_gpu(shape, "fsdp2", 8, 8192, checkpointing=True)["model_state"]
    reference = 16 * shape.params / 8 / GIB
    assert ours == pytest.approx(reference, rel=0.15)
    assert ours >= reference  # the gathered layers only add


def test_checkpointing_and_offload_reduce_memory():
    shape = Shape(**SHAPES["llama-3.1-8b"])
    with_ckpt = memory_per_gpu(shape, "fsdp2", 8, 16384, True)["activations"]
    without = memory_per_gpu(shape, "fsdp2", 8, 16384, False)["activations"]
    assert without > 10 * with_ckpt
    assert (
        memory_per_gpu(shape, "zero3_offload", 8, 8192, True)["model_state"]
        < memory_per_gpu(shape, "zero3", 8, 8192, True)["model_state"] / 3
    )


def test_smallest_fit():
    eight, seventy = Shape(**SHAPES["llama-3.1-8b"]), Shape(**SHAPES["llama-3.1-70b"])
    assert smallest_fit(eight, "fsdp2", "H100-80GB", 8, 8192, True)[0] == 1
    assert smallest_fit(eight, "single", "H100-80GB", 8, 8192, True)[0] is None
    # 70B: 16 bytes x 70.6B / 16 GPUs = 66 GiB of state alone, so 2 nodes leave no room for activations;
    # with the root group (2.1B parameters gathered, 6 bytes each: 15 GiB with the layers) and the fused
    # loss head (4.9 GiB: the head's fp32 gradient and one chunk of logits) on every GPU, 3 nodes need
    # 77.4 GiB, above 90% of 80 GB; 4 nodes need 66.4
    assert smallest_fit(seventy, "fsdp2", "H100-80GB", 8, 8192, True)[0] == 4
    # offload keeps 4 bytes a parameter on the GPU: one node fits at 8,192 tokens a GPU, not at 12,288
    assert smallest_fit(seventy, "zero3_offload", "H100-80GB", 8, 8192, True)[0] == 1
    assert smallest_fit(seventy, "zero3_offload", "H100-80GB", 8, 12288, True)[0] == 2


def test_plan_table_hours_and_cost():
    shape = Shape(**SHAPES["llama-3.1-8b"])
    rows = plan(
        shape,
        tokens_per_run=1_000_000_000,
        tokens_per_gpu=8192,
        gpus_per_node=8,
        mfu=0.4,
        prices={"H100-80GB": 3.0, "H200-141GB": 4.0},
    )
    fsdp = next(r for r in rows if r["strategy"] == "fsdp2" and r["gpu"] == "H100-80GB")
    # 8 GPUs x 989 TFLOP/s x 0.4 / (8 FLOPs (6 + 2 recomputed) x 8.03e9) = 49.3k tokens/s -> 1e9 in 5.64 h
    assert fsdp["hours"] == pytest.approx(5.64, rel=0.01)
    assert fsdp["cost"] == pytest.approx(fsdp["hours"] * 8 * 3.0, rel=1e-3)
    text = render_markdown("llama-3.1-8b", shape, rows, 1_000_000_000, 0.4)
    assert "| fsdp2 | H100-80GB | 1 |" in text and "does not fit" in text


@pytest.mark.parametrize(
    "name,published_params,gpus",
    [("llama-3.1-8b", 8.03e9, 8), ("llama-3.1-70b", 70.6e9, 8), ("llama-3.1-70b", 70.6e9, 32)],
)
def test_fsdp_figures_match_the_published_16_bytes_per_parameter(name, published_params, gpus):
    """Reference: ZeRO (Rajbhandari et al. 2020, sec. 3.1): mixed-precision Adam keeps 2 + 2 + K=12 = 16 bytes a
    parameter of model states (their example: 7.5B -> 120 GB). With the model cards' parameter counts:
    Llama-3.1-8B 8.03B -> 128.5 GB, 70B 70.6B -> 1,130 GB, sharded evenly over the GPUs (FSDP / ZeRO-3).
    The numbers are written out here, not recomputed from our own parameter count."""
    reference_gb_per_gpu = {("llama-3.1-8b", 8): 16.06, ("llama-3.1-70b", 8): 141.2, ("llama-3.1-70b", 32): 35.3}[
        (name, gpus)
    ]
    assert reference_gb_per_gpu == pytest.approx(16 * published_params / gpus / 1e9, rel=0.005)
    ours_gb = memory_per_gpu(Shape(**SHAPES[name]), "fsdp2", gpus, 8192, checkpointing=True)["model_state"] * GIB / 1e9
    assert ours_gb == pytest.approx(reference_gb_per_gpu, rel=0.15)


def measured_growth_mib(shape: dict, rows: int, seq: int, checkpointing: bool) -> float:
    """Peak resident memory growth of two engine steps in a fresh process (tests/plan_worker.py); the
    smaller of two runs, since the allocator's leftovers only ever add to a high-water mark."""
    return min(_growth_mib(shape, rows, seq, checkpointing) for _ in range(2))


def _growth_mib(shape: dict, rows: int, seq: int, checkpointing: bool) -> float:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "tests" / "plan_worker.py"),
            json.dumps(shape),
            str(rows),
            str(seq),
            str(int(checkpointing)),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["grew_mib"]


@pytest.mark.e2e  # a training process per measured case
def test_the_plan_matches_measured_peaks_on_cpu():
    """The plan's terms (16 bytes a parameter, what a Llama block saves for backward, one layer's
    gradients in flight, the fused loss head) against the peak resident memory of the engine's own
    steps, fp32 on CPU (compute_bytes=4, eager, every token supervised), with and without activation
    checkpointing. The process's fixed cost (libraries' buffers, thread pools) is measured on a
    model a thousand times smaller and taken off."""
    tiny = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    overhead = measured_growth_mib(tiny, 1, 16, False)
    cases = [  # (shape, rows, sequence length, activation checkpointing)
        (
            dict(
                vocab_size=2048,
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
            ),
            4,
            512,
            False,
        ),
        (
            dict(
                vocab_size=2048,
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
            ),
            8,
            512,
            True,
        ),
        (
            dict(
                vocab_size=4096,
                hidden_size=512,
                intermediate_size=1408,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
            ),
            2,
            512,
            False,
        ),
        (
            dict(
                vocab_size=8192,
                hidden_size=384,
                intermediate_size=1024,
                num_hidden_layers=8,
                num_attention_heads=6,
                num_key_value_heads=2,
            ),
            4,
            256,
            True,
        ),
    ]
    report = []
    for shape, rows, seq, checkpointing in cases:
        planned = (
            memory_per_gpu(
                Shape.from_config({**shape, "tie_word_embeddings": False}),
                "single",
                1,
                rows * seq,
                checkpointing,
                compiled=False,
                compute_bytes=4,
            )["total"]
            * 1024
        )
        measured = measured_growth_mib(shape, rows, seq, checkpointing) - overhead
        report.append((shape["hidden_size"], checkpointing, round(planned), round(measured)))
    for _hidden, _checkpointing, planned, measured in report:
        assert planned == pytest.approx(measured, rel=0.15), report


# Tiny models of each family the presets train, built by transformers from its own config classes. The
# real settings that change the arithmetic are kept: head_dim apart from hidden / heads, MoE experts
# (Qwen3-MoE with a dense layer among the sparse ones, Qwen2-MoE with a shared expert), gpt-oss's
# biases and sinks, Gemma 3's tied embeddings and extra norms, the multimodal wrappers' text_config.
TINY = dict(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "llama": dict(TINY, model_type="llama"),
    "mistral": dict(TINY, model_type="mistral", head_dim=16),
    "qwen3": dict(TINY, model_type="qwen3", head_dim=16),
    "qwen3_moe": dict(
        TINY,
        model_type="qwen3_moe",
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        mlp_only_layers=[1],
    ),
    "qwen2_moe": dict(
        TINY,
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
    ),
    "gemma3_text": dict(TINY, model_type="gemma3_text", head_dim=16, sliding_window=8),
    "gpt_oss": dict(
        TINY, model_type="gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8
    ),
    "gemma3": dict(model_type="gemma3", text_config=dict(TINY, model_type="gemma3_text", head_dim=16)),
    "mistral3": dict(model_type="mistral3", text_config=dict(TINY, model_type="mistral", head_dim=16)),
}


def tiny_text_model(config: dict):
    """The text-only causal LM transformers builds for `config` (for a multimodal config, from its
    text_config: the model pipeline/base.py extracts and the engine trains)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    built = AutoConfig.for_model(config["model_type"], **fields).get_text_config()
    return AutoModelForCausalLM.from_config(built)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_equal_the_models_transformers_builds(family):
    """Total and active parameters from the config alone equal the tiny model's own tensors. Active (what
    a token computes with) is counted from the model too: each expert tensor's share for the experts a
    token is not routed to is taken off."""
    model = tiny_text_model(FAMILIES[family])
    shape = Shape.from_config(FAMILIES[family])
    assert shape.model_type == model.config.model_type
    assert shape.params == sum(p.numel() for p in model.parameters())
    # the same shape from the config.json transformers writes (what `sft tokenizer` fetches)
    assert Shape.from_config(model.config.to_dict()) == shape
    experts = model.config.to_dict().get("num_experts") or model.config.to_dict().get("num_local_experts") or 0
    if experts:
        routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        skipped = routed * (experts - model.config.num_experts_per_tok) // experts
        assert shape.active_params == shape.params - skipped
        assert shape.active_params < shape.params
    else:
        assert shape.active_params == shape.params


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("qwen3-8b", 8.19e9, None),
        ("qwen3-30b-a3b", 30.5e9, 3.3e9),
        ("gemma-3-27b", 27.0e9, None),
        ("gpt-oss-20b", 20.9e9, 3.6e9),
        ("llama-3.3-70b", 70.6e9, None),
        ("mistral-small-3.2-24b", 23.6e9, None),
    ],
)
def test_new_shapes_match_the_model_cards(name, total, active):
    """Model cards: Qwen3-8B 8.2B; Qwen3-30B-A3B 30.5B, 3.3B activated; Gemma 3 27B 27.4B with its 0.4B
    SigLIP vision tower (not trained here); gpt-oss-20b 21B (20.9B), 3.6B active, which OpenAI counts
    without the input embedding table (a lookup, no compute); Llama 3.3 70B; Mistral Small 3.2 24B, of
    which 0.4B is its Pixtral vision encoder (23.6B text)."""
    shape = Shape(**SHAPES[name])
    assert shape.params == pytest.approx(total, rel=0.01)
    if active:
        lookup = shape.vocab_size * shape.hidden_size  # OpenAI's and Qwen's active counts leave the lookup out
        assert shape.active_params - (lookup if name == "gpt-oss-20b" else 0) == pytest.approx(active, rel=0.02)


def test_moe_memory_follows_total_and_time_follows_active():
    """Qwen3-30B-A3B stores 30.5B parameters (16 bytes each, sharded) but a token runs through 3.35B:
    its model state is that of a 30B model, its hours near those of a 3B one."""
    moe = Shape(**SHAPES["qwen3-30b-a3b"])
    dense8 = Shape(**SHAPES["qwen3-8b"])
    state = memory_per_gpu(moe, "fsdp2", 8, 8192, True)["model_state"]
    assert state == pytest.approx(16 * moe.params / 8 / GIB)
    rows = {r["strategy"]: r for r in plan(moe, 10**9, 8192, 8, 0.4, {"H100-80GB": 3.0}) if r["gpu"] == "H100-80GB"}
    rows8 = {r["strategy"]: r for r in plan(dense8, 10**9, 8192, 8, 0.4, {"H100-80GB": 3.0}) if r["gpu"] == "H100-80GB"}
    assert rows["fsdp2"]["hours"] == pytest.approx(
        rows8["fsdp2"]["hours"] * moe.active_params / dense8.params, rel=0.01
    )
    assert "30.53B parameters, 3.35B active" in render_markdown("qwen3-30b-a3b", moe, list(rows.values()), 10**9, 0.4)
