from typer.testing import CliRunner

from pipeline import cli

runner = CliRunner()
STAGES = ("tokenizer", "base", "validate", "prepare", "train", "lora", "evaluate", "gate", "card")


def test_help_lists_every_stage():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES + ("demo",):
        assert stage in result.output


def test_out_of_range_lr_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.01\n")
    result = runner.invoke(cli.app, ["validate"])
    assert result.exit_code == 1
    assert "train.lr" in result.output and "[1e-05, 5e-05]" in result.output


def test_validate_stops_on_duplicates_and_writes_the_report(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # token lengths are counted with the base's chat template
    (tmp_path / "data").mkdir()
    rows = [f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(12)] + ['{"prompt": "q3", "response": "a3"}\n']
    (tmp_path / "data/train.jsonl").write_text("".join(rows))
    (tmp_path / "params.yaml").write_text(
        "data:\n  replay: null\nvalidate:\n  min_rows: 10\n  eval_sets: []\n  min_replay_share: 0\n"
    )
    result = runner.invoke(cli.app, ["validate"])
    assert result.exit_code == 1
    assert "data/train.jsonl" in result.output and "expect_compound_columns_to_be_unique" in result.output
    assert "4, 13" in result.output
    assert "FAILED" in (tmp_path / "validate/contract.md").read_text()


def test_malformed_data_is_refused_with_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text('{"prompt": "q", "response": "a"}\n{oops\n')
    (tmp_path / "params.yaml").write_text("{}\n")
    result = runner.invoke(cli.app, ["validate"])
    assert result.exit_code == 1 and "data/train.jsonl:2: malformed JSON" in result.output
    assert not (tmp_path / "validate").exists(), "nothing is written for unreadable data"


def test_plan_for_a_production_preset(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parents[1] / "configs/llama3-8b-8xh100.yaml", tmp_path / "params.yaml")
    result = runner.invoke(cli.app, ["plan", "--model", "llama-3.1-8b", "--tokens", "500000000"])
    assert result.exit_code == 0, result.output
    assert "8.03B parameters" in result.output and "| fsdp2 | H100-80GB | 1 |" in result.output
    assert (tmp_path / "plan/plan.md").exists()
    bad = runner.invoke(cli.app, ["plan", "--model", "gpt-9", "--tokens", "1"])
    assert bad.exit_code == 1 and "neither a known shape" in bad.output


def test_a_tokenizer_made_for_another_base_is_refused(tmp_path, monkeypatch, tokenizer):
    """Switching params.yaml to a preset and running `sft validate` or `sft plan` by hand must not count
    tokens, or plan, with the demo's tokenizer and config."""
    monkeypatch.chdir(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tokenizer/config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "tokenizer/meta.json").write_text('{"source": "demo", "model": "demo/tiny-llama", "revision": null}')
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text(
        "".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(12))
    )
    (tmp_path / "params.yaml").write_text(
        "base:\n  source: hub\n  model: org/model-8b\n  revision: abc123\n"
        "data:\n  replay: null\nvalidate:\n  eval_sets: []\n  min_replay_share: 0\n"
    )
    for command in (["validate"], ["plan"], ["data", "stats"]):
        result = runner.invoke(cli.app, command)
        assert result.exit_code == 1, (command, result.output)
        assert (
            "tokenizer: made for demo/tiny-llama@None, but params.yaml base is org/model-8b@abc123" in result.output
        ), (command, result.output)


def test_an_unreachable_hub_is_named_without_a_traceback(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**_):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    (tmp_path / "params.yaml").write_text("base:\n  source: hub\n  model: org/model-8b\n  revision: abc123\n")
    result = runner.invoke(cli.app, ["tokenizer"])
    assert result.exit_code == 1
    assert "org/model-8b@abc123 is not in the local Hugging Face cache and the Hub cannot be reached" in result.output
    assert not (tmp_path / "tokenizer").exists()


def test_training_without_replay_is_a_choice_params_yaml_states(tmp_path, monkeypatch):
    """The method mixes 10-20% general data in; turning the mix off passes only where validate's band
    says so, instead of the contract silently skipping its replay check."""
    monkeypatch.chdir(tmp_path)
    for off in ("data:\n  replay: null\n", "prepare:\n  replay_share: 0\n"):
        (tmp_path / "params.yaml").write_text(off)
        result = runner.invoke(cli.app, ["validate"])
        assert result.exit_code == 1
        assert "params.yaml: no replay mix" in result.output and "validate.min_replay_share: 0" in result.output


def test_an_unproven_family_or_rows_past_its_positions_are_refused_before_training(tmp_path, monkeypatch, tokenizer):
    """`sft validate`, `sft plan` and `sft train` read the config.json `sft tokenizer` fetched (no
    weights yet) and refuse a model_type the family matrix does not prove, or prepare.max_seq_len
    past the model's positions, by name, before any weights or GPU hour."""
    monkeypatch.chdir(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text(
        "".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(12))
    )
    (tmp_path / "params.yaml").write_text(
        "data:\n  replay: null\nvalidate:\n  min_rows: 10\n  eval_sets: []\n"
        "  min_replay_share: 0\nprepare:\n  max_seq_len: 8192\n"
    )
    for config, expected in (
        ('{"model_type": "falcon_h1", "max_position_embeddings": 131072}', "'falcon_h1' is not supported"),
        ('{"model_type": "llama", "max_position_embeddings": 4096}', "max_seq_len 8192 is beyond"),
    ):
        (tmp_path / "tokenizer/config.json").write_text(config)
        for command in (["validate"], ["plan", "--tokens", "1000"]):
            result = runner.invoke(cli.app, command)
            assert result.exit_code == 1 and expected in result.output, (command, result.output)
            assert "tokenizer/config.json" in result.output
        (tmp_path / "base").mkdir(exist_ok=True)
        (tmp_path / "base/config.json").write_text(config)
        result = runner.invoke(cli.app, ["train"])
        assert result.exit_code == 1 and expected in result.output and "base/config.json" in result.output, (
            result.output
        )
    assert not (tmp_path / "validate").exists() and not (tmp_path / "train").exists()
