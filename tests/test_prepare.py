import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.prepare import (
    IGNORE,
    ChatRenderer,
    bucket_examples,
    bucket_order,
    mix_replay,
    pack_bins,
    pack_examples,
    prepare,
    render_prompt,
    token_lengths,
    tokenize_conversations,
    tokenize_file,
    tokenize_pair,
)

# A Llama-3-like template (trims contents, ends a turn with its own token) and one that looks at
# the contents (so the renderer must fall back to jinja): prepare must match both exactly.
TRIMMING = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n\n' + m['content'] | trim }}"
    "{{ '<|end|>' }}{% endfor %}"
)
CONTENT_AWARE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['content'] | length > 5 %}{{ '\n' }}"
    "{% endif %}{{ m['content'] + '<|end|>\n' }}{% endfor %}"
)


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn, optional system turn, awkward contents: blanks, edge whitespace, special-token text."""
    rng = random.Random(seed)
    pieces = ["cat", " dog", "\n", "  ", "<|end|>", "é", "assistant", "\n\n", " x", "42", "user"]
    conversations = []
    for _ in range(n):
        turns = [{"role": "system", "content": "".join(rng.choices(pieces, k=4))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [
                {"role": role, "content": "".join(rng.choices(pieces, k=rng.randint(0, 8)))}
                for role in ("user", "assistant")
            ]
        conversations.append(turns)
    return conversations


def chat_template_ids(tokenizer, conversation) -> list[int]:
    """apply_chat_template's ids, special-token strings in the contents encoded as text (prepare's rule)."""
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, sanitize_control_tokens=True)[
        "input_ids"
    ]


@pytest.mark.parametrize("template", [None, TRIMMING, CONTENT_AWARE], ids=["demo", "trimming", "content-aware"])
def test_ids_are_exactly_the_chat_templates(tokenizer, template):
    if template:
        tokenizer = type(tokenizer)(
            tokenizer_object=tokenizer.backend_tokenizer,
            bos_token="<|bos|>",
            eos_token="<|end|>",
            pad_token="<|pad|>",
            chat_template=template,
        )
    conversations = random_conversations(150)
    tokenized = tokenize_conversations(tokenizer, conversations)
    for i, conversation in enumerate(conversations):
        assert tokenized.example(i)[0] == chat_template_ids(tokenizer, conversation), conversation
    assert token_lengths(tokenizer, conversations).tolist() == [
        len(chat_template_ids(tokenizer, c)) for c in conversations
    ]


def test_every_assistant_turn_and_its_end_token_carry_loss_nothing_else(tokenizer):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Repeat: cat"},
        {"role": "assistant", "content": "cat"},
        {"role": "user", "content": "Now: red dog"},
        {"role": "assistant", "content": "red dog"},
    ]
    ids, labels = tokenize_conversations(tokenizer, [conversation]).example(0)
    supervised = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert supervised == [label for label in labels if label != IGNORE]  # a label is its own id
    assert tokenizer.decode(supervised) == "cat<|end|>red dog<|end|>"
    # two separate runs of supervised tokens: the second user turn between them is masked
    runs = np.flatnonzero(np.diff(np.array(labels) != IGNORE).astype(int))
    assert len(runs) == 4


def test_loss_only_on_response_and_end_of_turn(tokenizer):
    ids, labels = tokenize_pair(tokenizer, "Repeat after me: cat dog", "cat dog")
    supervised = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(supervised) == "cat dog<|end|>"
    assert len(ids) == len(labels) and labels[0] == IGNORE
    # evaluation renders prompts through render_prompt: training's prompt is that text, token for token
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    prompt_text = render_prompt(tokenizer, "Repeat after me: cat dog")
    assert ids[:first] == tokenizer.encode(prompt_text, add_special_tokens=False)


def test_renderer_joins_segments_and_falls_back_to_jinja(tokenizer):
    renderer = ChatRenderer(tokenizer)
    conversation = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b\n"}]
    [example] = renderer.examples(conversation)
    assert example.text == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert [example.text[s:e] for s, e in example.spans] == ["b\n<|end|>"]
    assert renderer._layout(conversation, False) is not None  # the fast path
    aware = type(tokenizer)(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>", chat_template=CONTENT_AWARE
    )
    renderer = ChatRenderer(aware)
    for content in ("ab", "abcdefgh"):
        [example] = renderer.examples([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}])
        assert example.text == aware.apply_chat_template(
            [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}], tokenize=False
        )
    assert renderer._layout(conversation, False) is None  # a template that reads contents: jinja only


DEMO_PIN = "08a4cb4a8fcb3c5e55a54299f952bf7b54baba69c162129c4fadabaf92e46bb1"


def test_demo_tokens_and_labels_unchanged(tokenizer):
    """The demo's figures rest on these arrays: ids, labels and offsets of 400 demo rows and 100
    multi-turn conversations hash as they did before the span was defined from the renderings
    (DEMO_PIN was computed with the previous prepare, on main, before any change)."""
    import hashlib

    from pipeline.demo import make_sft_data
    from pipeline.prepare import as_conversation

    data = make_sft_data(0, train_rows=2000)
    rows = data["train"][:300] + data["replay"][:100]
    conversations = [as_conversation(r) for r in rows]
    for k in range(100):
        turns = [{"role": "system", "content": "Be brief."}] if k % 3 == 0 else []
        for j in range(1 + k % 3):
            row = rows[(k + j) % 300]
            turns += [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        conversations.append(turns)
    tokenized = tokenize_conversations(tokenizer, conversations, workers=1)
    digest = hashlib.sha256()
    for array in (
        tokenized.ids.astype(np.int32),
        tokenized.labels.astype(np.int32),
        tokenized.offsets.astype(np.int64),
    ):
        digest.update(array.tobytes())
    assert len(tokenized) == 500 and digest.hexdigest() == DEMO_PIN


def test_cache_hit_is_identical_and_a_changed_file_misses(tokenizer, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "train.jsonl"
    conversations = random_conversations(40, seed=1)
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    loads = []

    def load(p):
        loads.append(p)
        return [json.loads(line)["messages"] for line in p.read_text().splitlines()]

    first, hit = tokenize_file(tokenizer, path, load)
    assert not hit and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again, hit = tokenize_file(tokenizer, path, load)
    assert hit and len(loads) == 1
    for name in ("ids", "labels", "offsets"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    path.write_text(path.read_text().replace("cat", "cow", 1))
    _, hit = tokenize_file(tokenizer, path, load)
    assert not hit and len(loads) == 2


def test_bins_hold_every_example_once_and_fill_nearly_full():
    rng = np.random.default_rng(0)
    for lengths, capacity in [
        (rng.integers(5, 60, size=500), 128),  # many short examples a bin
        (rng.integers(22, 55, size=3000), 128),  # the demo's mix: 2-5 a bin
        (rng.normal(390, 40, size=3000).astype(int), 2048),
    ]:  # production-like
        bins = pack_bins(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert lengths.sum() / (len(bins) * capacity) > 0.985
    assert pack_bins([30, 30, 30, 25, 25, 40], 100) == [[0, 1, 5], [3, 4, 2]]  # 40 + 30 + 30 fills a bin exactly
    with pytest.raises(ValueError, match="more than the bin capacity"):
        pack_bins([10, 200], 128)


def test_length_buckets_cut_padding_and_are_deterministic(tokenizer):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=2000)
    batch = 8

    def padding(order):  # what trimming each batch to its longest row leaves as padding
        rows = lengths[order][: len(order) // batch * batch].reshape(-1, batch)
        return 1 - rows.sum() / (rows.max(axis=1) * batch).sum()

    bucketed = bucket_order(lengths, bucket_rows=256, seed=3)
    assert sorted(bucketed.tolist()) == list(range(2000))
    assert padding(bucketed) < padding(rng.permutation(2000)) / 5
    assert np.array_equal(bucketed, bucket_order(lengths, 256, seed=3))
    assert not np.array_equal(bucketed, bucket_order(lengths, 256, seed=4))

    examples = [tokenize_pair(tokenizer, f"Repeat after me: {'cat ' * (i % 9)}", "dog " * (i % 5)) for i in range(60)]
    rows = bucket_examples(examples, max_len=64, pad_id=tokenizer.pad_token_id, bucket_rows=16, seed=0)
    assert rows.input_ids.shape == (60, 64)
    assert rows.lengths.tolist() == (rows.input_ids != tokenizer.pad_token_id).sum(1).tolist()
    by_ids = {tuple(ids): labels for ids, labels in examples}
    for r in range(60):
        n = rows.lengths[r]
        assert rows.labels[r, :n].tolist() == by_ids[tuple(rows.input_ids[r, :n].tolist())]
        assert rows.position_ids[r, :n].tolist() == list(range(n))


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
    # messages rows and prompt/response rows are the same examples
    as_messages = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in train
    ]
    again = prepare(tokenizer, as_messages, [], max_len=64, replay_share=0.0, seed=0)
    assert np.array_equal(again.input_ids, packed.input_ids) and np.array_equal(again.labels, packed.labels)


def test_packing_keeps_every_example_whole_and_in_place(tokenizer):
    examples = [
        tokenize_pair(tokenizer, f"Give the first and last word: {'a b ' * (i % 7)}", "x " * (i % 4))
        for i in range(120)
    ]
    packed = pack_examples(examples, max_len=96, pad_id=tokenizer.pad_token_id)
    found = []
    for row_ids, row_labels, row_positions in zip(packed.input_ids, packed.labels, packed.position_ids, strict=True):
        starts = np.flatnonzero(row_positions == 0).tolist() + [96]
        for a, b in itertools.pairwise(starts):
            found.append((row_ids[a:b].tolist(), row_labels[a:b].tolist()))
    real = [(ids, labels) for ids, labels in found if ids[0] != tokenizer.pad_token_id]
    assert sorted(real) == sorted(examples)


def per_example_losses(model, ids, labels, positions):
    logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=False).logits[0]
    token_loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="none")
    return token_loss


def test_packed_and_unpacked_losses_agree(tiny_model_dir, tokenizer):
    """Packing must not let an example see its neighbours: same loss as when it is alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [
        ("Repeat after me: cat dog red", "cat dog red"),
        ("Give the first and last word: a b c", "a c"),
        ("Translate to Zorbish: sun moon", "ka lo"),
    ]
    examples = [tokenize_pair(tokenizer, p, r) for p, r in pairs]
    packed = pack_examples(examples, max_len=sum(len(i) for i, _ in examples) + 5, pad_id=tokenizer.pad_token_id)
    assert packed.input_ids.shape[0] == 1
    ids, labels, positions = (a[0].tolist() for a in (packed.input_ids, packed.labels, packed.position_ids))
    with torch.no_grad():
        packed_loss = per_example_losses(model, ids, labels, positions)
        cross_talk = per_example_losses(model, ids, labels, list(range(len(ids))))
        starts = [i for i, p in enumerate(positions) if p == 0][: len(examples)]
        leaked = 0.0
        for start, (ex_ids, ex_labels) in zip(starts, examples, strict=True):
            alone = per_example_losses(model, ex_ids, ex_labels, list(range(len(ex_ids))))
            span = slice(start, start + len(ex_ids) - 1)
            assert torch.allclose(packed_loss[span], alone, atol=1e-5)
            leaked += (cross_talk[span] - alone).abs().sum().item()
    assert leaked > 1e-3, "control: without position resets the examples do see each other"


def test_forked_workers_give_the_same_arrays(tokenizer, monkeypatch):
    import pipeline.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "ENCODE_CHUNK", 40)  # several chunks from a small set
    conversations = random_conversations(130, seed=2)
    alone, forked = (tokenize_conversations(tokenizer, conversations, workers=w) for w in (1, 2))
    for name in ("ids", "labels", "offsets"):
        assert np.array_equal(getattr(alone, name), getattr(forked, name))


def test_a_rows_tools_travel_with_its_messages():
    """pandas fills a row without tools with None (or NaN): such a row is its plain messages."""
    from pipeline.prepare import as_conversation

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert as_conversation({"messages": messages, "tools": tools}) == {"messages": messages, "tools": tools}
    for absent in (None, float("nan"), []):
        assert as_conversation({"messages": messages, "tools": absent}) == messages
    assert as_conversation({"prompt": "Hi", "response": "Hello."}) == messages
