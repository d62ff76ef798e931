import pytest

from pipeline.plan import GIB, SHAPES, Shape, memory_per_gpu, plan, render_markdown, smallest_fit


@pytest.mark.parametrize("name,published", [("llama-3.1-8b", 8.03e9), ("llama-3.1-70b", 70.6e9),
                                            ("llama-3.2-1b", 1.24e9)])
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
    assert memory_per_gpu(shape, "zero3_offload", 8, 8192, True)["model_state"] < \
        memory_per_gpu(shape, "zero3", 8, 8192, True)["model_state"] / 3


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
    rows = plan(shape, tokens_per_run=1_000_000_000, tokens_per_gpu=8192, gpus_per_node=8, mfu=0.4,
                prices={"H100-80GB": 3.0, "H200-141GB": 4.0})
    fsdp = next(r for r in rows if r["strategy"] == "fsdp2" and r["gpu"] == "H100-80GB")
    # 8 GPUs x 989 TFLOP/s x 0.4 / (8 FLOPs (6 + 2 recomputed) x 8.03e9) = 49.3k tokens/s -> 1e9 in 5.64 h
    assert fsdp["hours"] == pytest.approx(5.64, rel=0.01)
    assert fsdp["cost"] == pytest.approx(fsdp["hours"] * 8 * 3.0, rel=1e-3)
    text = render_markdown("llama-3.1-8b", shape, rows, 1_000_000_000, 0.4)
    assert "| fsdp2 | H100-80GB | 1 |" in text and "does not fit" in text


@pytest.mark.parametrize("name,published_params,gpus", [("llama-3.1-8b", 8.03e9, 8), ("llama-3.1-70b", 70.6e9, 8),
                                                        ("llama-3.1-70b", 70.6e9, 32)])
def test_fsdp_figures_match_the_published_16_bytes_per_parameter(name, published_params, gpus):
    """Reference: ZeRO (Rajbhandari et al. 2020, sec. 3.1): mixed-precision Adam keeps 2 + 2 + K=12 = 16 bytes a
    parameter of model states (their example: 7.5B -> 120 GB). With the model cards' parameter counts:
    Llama-3.1-8B 8.03B -> 128.5 GB, 70B 70.6B -> 1,130 GB, sharded evenly over the GPUs (FSDP / ZeRO-3).
    The numbers are written out here, not recomputed from our own parameter count."""
    reference_gb_per_gpu = {("llama-3.1-8b", 8): 16.06, ("llama-3.1-70b", 8): 141.2,
                            ("llama-3.1-70b", 32): 35.3}[(name, gpus)]
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
    result = subprocess.run([sys.executable, str(root / "tests" / "plan_worker.py"), json.dumps(shape), str(rows),
                             str(seq), str(int(checkpointing))], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])["grew_mib"]


def test_the_plan_matches_measured_peaks_on_cpu():
    """The plan's terms (16 bytes a parameter, what a Llama block saves for backward, one layer's
    gradients in flight, the fused loss head) against the peak resident memory of the engine's own
    steps, fp32 on CPU (compute_bytes=4, eager, every token supervised), with and without activation
    checkpointing. The process's fixed cost (libraries' buffers, thread pools) is measured on a
    model a thousand times smaller and taken off."""
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
    overhead = measured_growth_mib(tiny, 1, 16, False)
    cases = [  # (shape, rows, sequence length, activation checkpointing)
        (dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4), 4, 512, False),
        (dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4), 8, 512, True),
        (dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4), 2, 512, False),
        (dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
              num_key_value_heads=2), 4, 256, True),
    ]
    report = []
    for shape, rows, seq, checkpointing in cases:
        planned = memory_per_gpu(Shape.from_config({**shape, "tie_word_embeddings": False}), "single", 1, rows * seq,
                                 checkpointing, compiled=False, compute_bytes=4)["total"] * 1024
        measured = measured_growth_mib(shape, rows, seq, checkpointing) - overhead
        report.append((shape["hidden_size"], checkpointing, round(planned), round(measured)))
    for hidden, checkpointing, planned, measured in report:
        assert planned == pytest.approx(measured, rel=0.15), report
