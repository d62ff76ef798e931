import json
import shutil

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.dist import Strategy, init_runtime
from pipeline.prepare import IGNORE, prepare
from pipeline.train.checkpoint import list_checkpoints, rotate, weights_sha256
from pipeline.train.loop import cosine_with_warmup, train


def tiny_packed(tokenizer, n=64):
    rows = [{"prompt": f"Repeat after me: cat dog {i % 7}", "response": f"cat dog {i % 7}"} for i in range(n)]
    packed = prepare(tokenizer, rows, [], max_len=64, replay_share=0.0, seed=0)
    return {"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids}


def test_full_finetune_updates_every_weight_and_keeps_last_checkpoints(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(
        lr=3e-3,
        epochs=4,
        keep_last=3,
        micro_batch_size=2,
        grad_accum=2,
        warmup_ratio=0.03,
        override_method_ranges=True,
        device="cpu",
    )
    result = train(model, tokenizer, tiny_packed(tokenizer), cfg, tmp_path, {"data_sha256": "abc"})

    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "full SFT: every tensor moves"
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["epoch-2", "epoch-3", "epoch-4"]
    meta = json.loads((kept[-1] / "meta.json").read_text())
    assert meta["epoch"] == 4 and meta["data_sha256"] == "abc"
    assert len(weights_sha256(kept[-1])) == 64
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folders left behind"


def test_tampered_weights_are_detected(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-3, epochs=1, micro_batch_size=4, override_method_ranges=True, device="cpu")
    train(model, tokenizer, tiny_packed(tokenizer, 16), cfg, tmp_path, {})
    (ckpt,) = list_checkpoints(tmp_path)
    with open(ckpt / "model.safetensors", "ab") as f:
        f.write(b"\0")
    try:
        weights_sha256(ckpt)
    except ValueError as err:
        assert "differs from its manifest" in str(err)
    else:
        raise AssertionError("a changed weights file must not pass")


def test_incomplete_checkpoint_is_ignored_and_rotation(tmp_path):
    for epoch in (1, 2, 3, 4):
        (tmp_path / f"epoch-{epoch}").mkdir()
        (tmp_path / f"epoch-{epoch}" / "manifest.json").write_text("{}")
    (tmp_path / "epoch-5").mkdir()  # no manifest: a write that never finished
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-1", "epoch-2", "epoch-3", "epoch-4"]
    rotate(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-3", "epoch-4"]


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=10, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.1 and lrs[9] == 1.0
    assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] < 0.01


def test_resume_state_is_ignored_for_another_run_or_an_unfinished_write(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.train.resume import fingerprint, load_train_state

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-3, epochs=1, micro_batch_size=4, override_method_ranges=True, device="cpu")
    packed = tiny_packed(tokenizer, 48)
    meta = {"data_sha256": "abc"}
    cfg = cfg.model_copy(update={"epochs": 2})
    runtime = init_runtime(Strategy.of("single"), "cpu")

    def stop_after_epoch_one(record, total):
        if record["step"] == total // 2 + 2:
            raise KeyboardInterrupt  # stopped mid-run: the last resume points stay

    train(model, tokenizer, packed, cfg, tmp_path / "ckpt", meta, state_dir=tmp_path / "state")
    assert not any((tmp_path / "state").iterdir()), "a finished run leaves no resume point behind"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = cfg.model_copy(update={"checkpoint_every_steps": 1})
    try:
        train(
            model,
            tokenizer,
            packed,
            cfg,
            tmp_path / "ckpt",
            meta,
            progress=stop_after_epoch_one,
            runtime=runtime,
            state_dir=tmp_path / "state",
        )
    except KeyboardInterrupt:
        pass
    run_id = fingerprint(cfg, meta, packed["input_ids"].shape[0])
    # a resumed run hands the steps already run to progress first (DVCLive's fresh record), then the rest
    seen = []
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    state_copy = tmp_path / "state-copy"
    shutil.copytree(tmp_path / "state", state_copy)
    result = train(
        model,
        tokenizer,
        packed,
        cfg,
        tmp_path / "ckpt2",
        meta,
        progress=lambda r, t: seen.append(r["step"]),
        runtime=runtime,
        state_dir=state_copy,
    )
    assert seen == list(range(1, result.steps + 1))
    assert load_train_state(tmp_path / "state", run_id)[1]["step"] > 0
    assert load_train_state(tmp_path / "state", fingerprint(cfg, {"data_sha256": "other"}, 4)) is None
    newest, trainer = load_train_state(tmp_path / "state", run_id)
    assert len(list((tmp_path / "state").glob("step-*"))) == 2, "the two newest complete steps are kept"
    (newest / "node-0.json").unlink()  # as if the write had been cut short: the step before it is used
    previous, earlier = load_train_state(tmp_path / "state", run_id)
    assert earlier["step"] < trainer["step"]
    # a listed file that is not all there (an upload still in flight) makes a step incomplete too
    (previous / "node-0.json").write_text(json.dumps({"trainer.pt": (previous / "trainer.pt").stat().st_size + 1}))
    assert load_train_state(tmp_path / "state", run_id) is None


def test_unpacked_batches_are_trimmed_and_loss_targets_never_cross_examples():
    import torch

    from pipeline.train.batches import loss_targets, trim_padding

    labels = torch.full((2, 64), IGNORE)
    labels[0, 5:10] = 7  # row 0 ends at 10, row 1 at 20: the batch needs 20 columns, rounded up to 24
    labels[1, 15:20] = 8
    batch = {
        "input_ids": torch.zeros(2, 64, dtype=torch.long),
        "labels": labels,
        "position_ids": torch.arange(64).repeat(2, 1),
    }
    trimmed = trim_padding(batch, torch.tensor([10, 20]), multiple=8)
    assert {k: v.shape[1] for k, v in trimmed.items()} == {"input_ids": 24, "labels": 24, "position_ids": 24}
    positions, targets = loss_targets(trimmed["labels"], trimmed["position_ids"])
    # token t predicts t + 1: row 0's supervised 5..9 are predicted from 4..8, row 1's from 24 + 14..18
    assert positions.tolist() == [4, 5, 6, 7, 8, 38, 39, 40, 41, 42]
    assert targets.tolist() == [7] * 5 + [8] * 5
    # a packed neighbour starts at position 0: the token before it predicts nothing
    position_ids = torch.cat([torch.arange(6), torch.arange(6)])[None]
    packed_labels = torch.tensor([[IGNORE, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1]])
    positions, _ = loss_targets(packed_labels, position_ids)
    assert 5 not in positions.tolist() and positions.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_step_flops_count_the_head_only_where_logits_are_computed_and_attention_per_key():
    from transformers import LlamaConfig

    from pipeline.train.metrics import StepFlops

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    params = 1000 * 64 * 2 + 2 * (64 * 64 * 4 + 3 * 64 * 128 + 2 * 64) + 64
    flops = StepFlops.of(config, params)
    # two examples of 3 and 2 tokens: keys attended 1+2+3 + 1+2 = 9; logits on the 2 supervised rows
    body = params - 2 * 1000 * 64
    assert flops.executed(5, 2, 9) == 6 * body * 5 + 6 * 1000 * 64 * 2 + 12 * 64 * 2 * 9
    assert flops.nominal(5) == 6 * params * 5
    # every row projected and one key each: only the free embedding lookup separates the two counts
    assert flops.executed(5, 5, 5) < flops.nominal(5)
    tied = StepFlops.of(config.__class__(**{**config.to_dict(), "tie_word_embeddings": True}), params - 1000 * 64)
    assert tied.embeddings == tied.head == 1000 * 64


def test_fsdp2_on_one_rank_runs_the_single_path(tiny_model_dir):
    """fsdp2 with one process shards nothing: it measured about 19% slower than the single path."""
    from transformers import AutoModelForCausalLM

    from pipeline.dist import Runtime
    from pipeline.train.strategies import shard

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sharded = shard(model, TrainConfig(strategy="fsdp2", device="cpu"), Runtime(0, 1, torch.device("cpu")))
    assert not sharded.fsdp and not any(hasattr(p, "to_local") for p in sharded.model.parameters())
    assert sharded.local_numel() == sum(p.numel() for p in model.parameters())


def test_the_caller_chooses_what_trains_and_what_each_checkpoint_exports(tiny_model_dir, tokenizer, tmp_path):
    """train() knows nothing of adapters: `trainable` limits the update to the parameters named, and
    `export` (LoRA's merge, in `sft lora`) decides each epoch's checkpoint, called once per epoch."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    calls = []

    def halved(trained, state):  # what the checkpoint holds: the caller's choice, e.g. merged adapters
        calls.append((trained is model, state))
        return trained, {k: v / 2 for k, v in trained.state_dict().items()}

    cfg = TrainConfig(
        lr=1e-2,
        epochs=2,
        keep_last=2,
        micro_batch_size=4,
        override_method_ranges=True,
        device="cpu",
        export_dtype="float32",
    )
    train(model, tokenizer, tiny_packed(tokenizer, 16), cfg, tmp_path, {}, trainable=norms, export=halved)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("norm" in k for k in moved), f"only the trainable parameters move, not {sorted(moved)[:3]}"
    assert calls == [(True, None), (True, None)], "one export per epoch, of the trained model (unsharded: no state)"
    exported = load_file(list_checkpoints(tmp_path)[-1] / "model.safetensors")
    assert torch.equal(exported["model.norm.weight"], after["model.norm.weight"] / 2)
