import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.prepare import IGNORE, mix_replay, pack_best_fit_decreasing, pack_examples, prepare, tokenize_pair


def test_loss_only_on_response_and_end_of_turn(tokenizer):
    ids, labels = tokenize_pair(tokenizer, "Repeat after me: cat dog", "cat dog")
    supervised = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(supervised) == "cat dog<|end|>"
    assert len(ids) == len(labels) and labels[0] == IGNORE


def test_best_fit_decreasing_packs_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=500).tolist()
    bins = pack_best_fit_decreasing(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (len(bins) * 128) > 0.97
    with pytest.raises(ValueError, match="more than the bin capacity"):
        pack_best_fit_decreasing([10, 200], 128)


def test_replay_share_is_exact_and_seeded():
    train = [{"prompt": f"t{i}", "response": "x"} for i in range(850)]
    replay = [{"prompt": f"r{i}", "response": "y", "family": "replay"} for i in range(40)]
    mixed = mix_replay(train, replay, 0.15, seed=1)
    assert len(mixed) == 1000 and sum(r["prompt"].startswith("r") for r in mixed) == 150
    assert mixed == mix_replay(train, replay, 0.15, seed=1)
    assert mix_replay(train, replay, 0.0, seed=1) == train


def test_prepare_stats(tokenizer):
    train = [{"prompt": f"Repeat after me: cat {i}", "response": f"cat {i}"} for i in range(200)]
    packed = prepare(tokenizer, train, [], max_len=64, replay_share=0.0, seed=0)
    assert packed.stats["examples"] == 200 and packed.stats["truncated"] == 0
    assert packed.input_ids.shape[1] == 64 and packed.stats["fill"] > 0.9
    # position ids restart at every example
    assert (packed.position_ids == 0).sum() >= 200


def per_example_losses(model, ids, labels, positions):
    logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=False).logits[0]
    token_loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="none")
    return token_loss


def test_packed_and_unpacked_losses_agree(tiny_model_dir, tokenizer):
    """Packing must not let an example see its neighbours: same loss as when it is alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [("Repeat after me: cat dog red", "cat dog red"), ("Give the first and last word: a b c", "a c"),
             ("Translate to Zorbish: sun moon", "ka lo")]
    examples = [tokenize_pair(tokenizer, p, r) for p, r in pairs]
    packed = pack_examples(examples, max_len=sum(len(i) for i, _ in examples) + 5, pad_id=tokenizer.pad_token_id)
    assert packed.input_ids.shape[0] == 1
    ids, labels, positions = (a[0].tolist() for a in (packed.input_ids, packed.labels, packed.position_ids))
    with torch.no_grad():
        packed_loss = per_example_losses(model, ids, labels, positions)
        cross_talk = per_example_losses(model, ids, labels, list(range(len(ids))))
        starts = [i for i, p in enumerate(positions) if p == 0][: len(examples)]
        leaked = 0.0
        for start, (ex_ids, ex_labels) in zip(starts, examples):
            alone = per_example_losses(model, ex_ids, ex_labels, list(range(len(ex_ids))))
            span = slice(start, start + len(ex_ids) - 1)
            assert torch.allclose(packed_loss[span], alone, atol=1e-5)
            leaked += (cross_talk[span] - alone).abs().sum().item()
    assert leaked > 1e-3, "control: without position resets the examples do see each other"
