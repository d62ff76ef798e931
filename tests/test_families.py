"""The family matrix: for every model family the template accepts (pipeline/families.py), the
engine (packed rows, masks per layer type, the fused output layer with the family's output
transform, the router's load-balancing loss) reproduces the model's own `forward(labels=...)` on
each example alone: the loss and every parameter's gradient, fp32 on CPU. The flex path (GPU) is
checked where torch runs it on CPU: its masks against transformers' own, its forward against the
model's. A family outside the matrix is refused by name."""

import sys

import pytest
import torch

from pipeline.families import SUPPORTED, UnsupportedModel, check_model, family_of
from pipeline.families import router as family_router
from pipeline.train.attention import flex_masks, layer_kinds
from pipeline.train.batches import loss_targets, real_tokens
from pipeline.train.loop import token_loss_sum
from pipeline.train.loss import LinearCrossEntropy, OutputTransform, fuse_loss_head
from tests.family_models import FAMILIES, examples, pack, tiny_model

MOE = [t for t, f in SUPPORTED.items() if f.moe]
WIDTH = 96  # two rows: [37 + 23 + padding], [52 + 30 + padding]


def packed_batch():
    parts = examples()
    return parts, *pack([[parts[0], parts[1]], [parts[2], parts[3]]], WIDTH)


def own_loss_and_gradients(model, parts, coef: float = 0.0):
    """The model's own forward(labels=...) on each example alone, as a sum over supervised tokens
    (its loss is a mean); with `coef`, plus the family's own load-balancing loss over the router
    logits of all examples (each run alone), as the engine adds it."""
    model.zero_grad(set_to_none=True)
    total, router_logits = 0.0, []
    for ids, labels in parts:
        out = model(input_ids=ids[None], labels=labels[None], use_cache=False, output_router_logits=bool(coef))
        supervised = int((labels[1:] != -100).sum())
        total = total + out.loss * supervised
        if coef:
            router_logits.append(out.router_logits)
    aux = None
    if coef:
        balance = sys.modules[type(model).__module__].load_balancing_loss_func
        layers = tuple(torch.cat([logits[i] for logits in router_logits]) for i in range(len(router_logits[0])))
        aux = balance(layers, model.num_experts, model.num_experts_per_tok, None)
        total = total + coef * aux
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total.detach(), aux, grads


def engine_loss_and_gradients(model, coef: float = 0.0):
    _, input_ids, labels, position_ids = packed_batch()
    head = fuse_loss_head(model)
    positions, targets = loss_targets(labels, position_ids)
    router = family_router(model, coef) if coef else None
    real = real_tokens(input_ids, labels, position_ids, pad_id=0)
    loss, aux = token_loss_sum(model, model, head, input_ids, position_ids, positions, targets, False, router, real)
    total = loss + coef * aux if router else loss
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total.detach(), aux, grads


def assert_same_gradients(engine: dict, own: dict) -> None:
    assert engine.keys() == own.keys()
    for name, grad in own.items():
        torch.testing.assert_close(engine[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_every_supported_family_is_proven():
    """The supported list is exactly the list this matrix runs, and each runs under flex attention on
    GPU (transformers' own flag, which the engine reads)."""
    assert set(SUPPORTED) == set(FAMILIES)
    assert all(tiny_model(model_type)._supports_flex_attn for model_type in FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_engine_equals_each_example_alone(model_type):
    model = tiny_model(model_type)
    parts = packed_batch()[0]
    own_total, _, own = own_loss_and_gradients(model, parts)
    total, _, grads = engine_loss_and_gradients(model)
    torch.testing.assert_close(total, own_total, rtol=1e-6, atol=0)
    assert_same_gradients(grads, own)
    assert "lm_head.weight" in grads or model.config.tie_word_embeddings


@pytest.mark.parametrize("model_type", MOE)
def test_router_load_balancing_loss_counts_real_tokens_only(model_type):
    """The family's own load-balancing loss over the examples alone (no padding routed) equals the
    engine's on padded packed rows, and so do the gradients of cross-entropy plus its weighted sum."""
    # the model's own forward adds its coefficient times each example's router loss to `loss`: 0 here,
    # the reference adds the router loss of all examples together, as the engine does
    model = tiny_model(model_type, router_aux_loss_coef=0.0)
    coef = 0.5  # far above the models' 0.001-0.02, so a wrong router loss shows in the gradients
    own_total, own_aux, own = own_loss_and_gradients(model, packed_batch()[0], coef)
    total, aux, grads = engine_loss_and_gradients(model, coef)
    torch.testing.assert_close(aux, own_aux, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, own_total, rtol=1e-6, atol=0)
    assert_same_gradients(grads, own)


def test_router_loss_defaults_to_the_models_coefficient_and_zero_turns_it_off():
    model = tiny_model("qwen3_moe", router_aux_loss_coef=0.02)
    assert family_router(model, None).coef == 0.02
    assert family_router(model, 0.0) is None
    assert family_router(tiny_model("llama"), None) is None  # dense: nothing to balance


def _own_layer_masks(model, input_ids, position_ids) -> list[torch.Tensor]:
    """The boolean mask each decoder layer receives from the model's own forward (transformers
    builds it from the packed position ids)."""
    seen = []

    def grab(module, args, kwargs):
        mask = kwargs["attention_mask"]
        seen.append(mask if mask.dtype == torch.bool else mask == 0)  # eager: additive, 0 where allowed

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_flex_masks_equal_the_models_own_per_layer(model_type):
    """The GPU path runs a micro-batch as one row under flex attention with the engine's block
    masks; per layer they must allow exactly what the model's own masks allow (its window or
    chunks included), within each example. gpt-oss builds its own masks without the position ids
    (packed examples would attend to each other), so its reference is transformers' mask
    functions given them, for each of its layer types."""
    from torch.nn.attention.flex_attention import create_mask

    model = tiny_model(model_type)
    _, input_ids, _, position_ids = packed_batch()
    if model_type == "gpt_oss":
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        embeds = torch.zeros(*input_ids.shape, model.config.hidden_size)
        build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        own = [
            build[kind](
                config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids
            )
            for kind in model.config.layer_types
        ]
        own = [mask if mask.dtype == torch.bool else mask == 0 for mask in own]
    else:
        own = _own_layer_masks(model, input_ids, position_ids)
    masks = flex_masks(model.config, position_ids, torch.device("cpu"))
    kinds = layer_kinds(model.config)
    layer_types = getattr(model.config, "layer_types", None) or []
    tokens = position_ids.numel()
    for layer, own_mask in enumerate(own):
        block = masks[layer_types[layer]] if isinstance(masks, dict) else masks
        flat = create_mask(block.mask_mod, 1, 1, tokens, tokens, device="cpu")[0, 0]
        for row in range(position_ids.shape[0]):
            span = slice(row * WIDTH, (row + 1) * WIDTH)
            assert torch.equal(flat[span, span], own_mask[row, 0]), f"layer {layer} row {row}"
        assert not flat[:WIDTH, WIDTH:].any() and not flat[WIDTH:, :WIDTH].any(), "rows attend to each other"
    # where the matrix sets a window (shorter than the examples), some layer slides: the check above saw it
    assert any(kind == "sliding" for kind, _ in kinds.values()) == ("sliding_window" in FAMILIES[model_type])


# windows by layer type with Gemma 2's attention softcap in flex's score function; one window for every layer
@pytest.mark.parametrize("model_type", ["gemma2", "mistral"])
def test_flex_forward_equals_each_example_alone(model_type):
    """The flex path's forward on CPU (flex attention has no CPU backward; the masks above are what
    it adds to the dense path, whose gradients are proven): one padding-free row."""
    model = tiny_model(model_type)
    parts, input_ids, labels, position_ids = packed_batch()
    with torch.no_grad():
        own = sum(
            model(input_ids=ids[None], labels=lab[None], use_cache=False).loss * int((lab[1:] != -100).sum())
            for ids, lab in parts
        )
        model.set_attn_implementation("flex_attention")
        head = fuse_loss_head(model)
        positions, targets = loss_targets(labels, position_ids)
        loss, _ = token_loss_sum(model, model, head, input_ids, position_ids, positions, targets, flatten=True)
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "transform", [OutputTransform(softcap=30.0), OutputTransform(scale=1 / 8), OutputTransform(scale=0.0625)]
)
def test_fused_loss_applies_the_output_transform_with_its_exact_gradient(transform):
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(300, 16, dtype=torch.float64) * 4).requires_grad_(True)  # large logits: the cap bites
    targets = torch.randint(0, 300, (40,))
    fused = LinearCrossEntropy.apply(hidden, weight, targets, torch.float64, transform)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.T) * transform.scale
    if transform.softcap:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


def test_unproven_family_is_refused_by_name():
    with pytest.raises(UnsupportedModel) as refused:
        family_of({"model_type": "falcon_h1"}, where="tokenizer/config.json")
    message = str(refused.value)
    assert "tokenizer/config.json" in message and "'falcon_h1'" in message and "state-space" in message
    assert "llama (Llama 3.x)" in message and "gpt_oss (gpt-oss)" in message  # the supported list
    with pytest.raises(UnsupportedModel, match="'bert'.*no test proves"):
        family_of({"model_type": "bert"})


def test_rows_past_the_models_positions_are_refused():
    config = {"model_type": "llama", "max_position_embeddings": 4096}
    assert check_model(config, 4096).name == "Llama 3.x"
    with pytest.raises(UnsupportedModel, match=r"prepare.max_seq_len 8192 is beyond .* 4096.*Lower"):
        check_model(config, 8192)


@pytest.mark.e2e  # the benchmark script in a process of its own
def test_gpu_family_check_dry_run(tmp_path):
    """benchmarks/gpu_families.py (the device session's family matrix) runs end to end on CPU, so
    the one device call does not meet an API change first."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "families.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks/gpu_families.py"), "--dry-run", "--only", "gemma2", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] and row["family"] == "gemma2" and row["loss_rel_error"] < 1e-6
    assert "| gemma2 | fp32 | dense |" in done.stdout


def test_attention_dropout_is_refused_by_name():
    """Flex attention (the GPU path) runs no attention dropout, and the matrix proves the engine
    without it: a checkpoint that trains with it is refused, not crashed on its first GPU step."""
    with pytest.raises(UnsupportedModel, match="attention_dropout 0.1"):
        check_model({"model_type": "starcoder2", "attention_dropout": 0.1, "max_position_embeddings": 16384}, 4096)


def test_router_loss_ignores_layers_recomputed_in_backward():
    """With activation checkpointing every MoE layer runs again in backward: the router loss is the
    forward's alone, and the gradients equal those without checkpointing."""
    model = tiny_model("qwen3_moe", router_aux_loss_coef=0.0)
    total, aux, grads = engine_loss_and_gradients(model, coef=0.5)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total_ckpt, aux_ckpt, grads_ckpt = engine_loss_and_gradients(model, coef=0.5)
    torch.testing.assert_close(aux_ckpt, aux, rtol=1e-6, atol=0)
    torch.testing.assert_close(total_ckpt, total, rtol=1e-6, atol=0)
    assert_same_gradients(grads_ckpt, grads)
