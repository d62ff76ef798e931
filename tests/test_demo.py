import hashlib

from pipeline.demo import FAMILIES, make_sft_data, write_demo_data


def test_demo_data_is_byte_identical_across_runs(tmp_path):
    write_demo_data(tmp_path / "a")
    write_demo_data(tmp_path / "b")
    for name in ("train", "golden", "replay", "general", "ifeval", "refusal", "over_refusal", "bias"):
        a, b = (hashlib.sha256((tmp_path / d / f"{name}.jsonl").read_bytes()).hexdigest() for d in "ab")
        assert a == b, name


def test_demo_data_shape():
    data = make_sft_data()
    train, golden = data["train"], data["golden"]
    assert len(train) >= 10_000
    assert {r["family"] for r in train} == set(FAMILIES) | {"instruct", "safety"}
    domain = [r for r in train if r["family"] in FAMILIES]
    assert len(domain) == 12_000, "3,000 pairs a domain family, as the golden set measures"
    assert len({(r["prompt"], r["response"]) for r in train}) == len(train), "no duplicate pairs"
    assert not {r["prompt"] for r in golden} & {r["prompt"] for r in train}, "golden is held out"
    for item in data["general"]:
        assert len(item["choices"]) == 4 and 0 <= item["gold"] < 4


def test_base_pretraining_teaches_general_facts(tmp_path):
    """A few pretraining steps already lower the loss: the base model has something to forget."""
    from pipeline.config import DemoBase
    from pipeline.demo import build_base_model

    info = build_base_model(
        DemoBase(hidden_size=32, num_layers=1, num_heads=2, pretrain_steps=40, pretrain_batch_size=8),
        tmp_path,
        log=lambda *_: None,
    )
    assert info["pretrain_loss_start"] > 6.0  # random init over ~1k tokens: about ln(1024) = 6.9
    assert info["pretrain_loss"] < info["pretrain_loss_start"] - 1.0
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
