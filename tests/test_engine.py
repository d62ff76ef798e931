"""The engine's speed levers keep the math: the fused loss head, the clip folded into fused AdamW,
deferred logging and the per-micro-batch document mask each equal the plain computation."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.train import loss as loss_module
from pipeline.train.loss import LinearCrossEntropy, LossHead, fuse_loss_head


def eager_loss(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1000, 7])  # one chunk, and several with a ragged last one
def test_fused_loss_and_gradients_equal_eager_cross_entropy(monkeypatch, chunk_rows):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_rows * 300)
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    fused = LinearCrossEntropy.apply(hidden, weight, targets, torch.float64)
    (fused * 0.5).backward()  # a scale after the loss, as the loop's normalisation
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = eager_loss(hidden, weight, targets)
    (expected * 0.5).backward()
    # the softmax is in fp32 on both sides
    torch.testing.assert_close(fused, expected.float())
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


def test_fused_loss_under_bf16_autocast_matches_eager_and_skips_a_frozen_weight():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(500, 32) * 0.1, requires_grad=False)  # a frozen head (LoRA)
    targets = torch.randint(0, 500, (64,))
    head = LossHead.replacing(torch.nn.Linear(32, 500, bias=False))
    head.weight = weight
    positions = torch.arange(64)
    with torch.autocast("cpu", dtype=torch.bfloat16), head.supervising(positions, targets):
        fused = head(hidden)
    fused.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)  # outside `supervising`: the plain linear layer
    assert logits.shape == (64, 500)
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((reference_hidden @ weight.T).float(), targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(fused, expected, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=2e-2, atol=2e-3)
    assert weight.grad is None


def test_fused_head_keeps_the_tied_weight_and_the_checkpoint_keys(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    keys = set(model.state_dict())
    head = fuse_loss_head(model)
    assert fuse_loss_head(model) is head and isinstance(model.lm_head, LossHead)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(model.state_dict()) == keys
    ids = torch.randint(3, 100, (2, 12))
    positions = torch.tensor([3, 4, 15, 20])  # flat indices into the 2 x 12 tokens
    targets = ids.flatten()[positions + 1]
    with head.supervising(positions, targets):
        fused = model(input_ids=ids, use_cache=False).logits
    logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(fused, F.cross_entropy(logits.flatten(0, 1)[positions], targets, reduction="sum"))


def test_clip_folded_into_fused_adamw_equals_clip_then_step(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.dist import Runtime
    from pipeline.train.strategies import shard

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.05, device="cpu", override_method_ranges=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sharded = shard(model, cfg, Runtime(0, 1, torch.device("cpu")))
    from pipeline.train.strategies import param_groups

    optimizer = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    ids = torch.randint(3, 100, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        norm = sharded.step(cfg.max_grad_norm)
        reference(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        assert expected_norm > 10 * cfg.max_grad_norm, "the clip must be active for the test to mean anything"
        torch.testing.assert_close(norm, expected_norm)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_deferred_logging_records_every_step_with_the_same_figures(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.train.loop import train
    from tests.test_train import tiny_packed

    packed = tiny_packed(tokenizer, 48)
    runs = {}
    for every in (1, 5):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = TrainConfig(
            lr=3e-3, epochs=2, micro_batch_size=2, log_every_steps=every, device="cpu", override_method_ranges=True
        )
        reported: list[int] = []
        result = train(
            model,
            tokenizer,
            packed,
            cfg,
            tmp_path / str(every),
            {},
            progress=lambda record, total, reported=reported: reported.append(record["step"]),
        )
        runs[every] = result
        assert reported == list(range(1, result.steps + 1)), "every step reported once, in order"
    one, four = runs[1], runs[5]
    assert one.steps == four.steps and (one.steps // 2) % 5 != 0, "a window cut short by the epoch end is flushed"
    for key in ("step", "epoch", "lr", "loss", "grad_norm"):
        assert [h[key] for h in one.history] == [h[key] for h in four.history], key
    assert one.tokens == four.tokens > 0


def test_flex_mask_is_causal_within_each_packed_example(tiny_model_dir):
    from torch.nn.attention.flex_attention import create_mask
    from transformers import AutoConfig

    from pipeline.train.attention import flex_masks

    config = AutoConfig.from_pretrained(tiny_model_dir)
    position_ids = torch.cat([torch.arange(5), torch.arange(3), torch.arange(4)])[None]  # 3 examples, 12 tokens
    mask = create_mask(flex_masks(config, position_ids, torch.device("cpu")).mask_mod, 1, 1, 12, 12, device="cpu")[0, 0]
    documents = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    expected = (documents[:, None] == documents[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


@pytest.mark.e2e  # the benchmark script in a process of its own
def test_gpu_benchmark_dry_run_reports_the_engine_and_every_lever(tmp_path):
    """benchmarks/gpu_engine.py end to end on a tiny shape on CPU: the script a device session runs
    once, so it must not be the first to meet an API change."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks/gpu_engine.py"),
            "--dry-run",
            "--steps",
            "4",
            "--only",
            "engine (host sync every step),levers",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    (run,) = figures["results"].values()
    assert "error" not in run and run["steps"] == 4 and run["tokens_per_s"] > 0
    assert [(lever, variant.split(" ")[0]) for lever, variant, *_ in figures["levers"]] == [
        ("loss tail", "eager"),
        ("loss tail", "fused"),
        ("clipping", "clip_grad_norm_,"),
        ("clipping", "folded"),
        ("attention mask", "transformers,"),
        ("attention mask", "flex_masks,"),
    ]
    assert all(ms > 0 for _, _, ms, _ in figures["levers"])
    assert "| engine (host sync every step) |" in done.stdout and "| loss tail | fused" in done.stdout
