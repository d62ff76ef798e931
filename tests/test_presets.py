"""The production presets (configs/*.yaml) and the bases they name.

Every preset parses through the schema and plans: `sft plan`'s figures fit its GPUs and equal the
figures its header quotes, so a header cannot go stale. The presets' bases that are not a plain text
causal LM (Gemma 3 and Mistral Small 3.2 are multimodal, gpt-oss ships MXFP4 weights) are made one by
`sft base` (pipeline/base.py): checked here on tiny checkpoints of the same classes, offline.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.base import BaseUnavailable, resolve_base, trained_model_type
from pipeline.config import BaseConfig
from pipeline.plan import Shape

TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def published_repo(folder: Path, model, tokenizer) -> Path:
    """A Hub repository as such a model is published: transformers' weights and config, the tokenizer,
    and the extra weight files real repos carry beside them (Mistral's consolidated.safetensors, gpt-oss's
    original/), which `sft base` must not fetch."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "consolidated.safetensors").write_bytes(b"the same weights in Mistral's format")
    (folder / "original").mkdir()
    (folder / "original/model.safetensors").write_bytes(b"the same weights in the original format")
    return folder


def fetch_from(repo: Path, monkeypatch) -> list[str]:
    """snapshot_download over a local folder, filtered by huggingface_hub's own pattern matching."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    fetched = []

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, Path(local_dir) / name)
            fetched.append(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def hub_base(model_id: str) -> BaseConfig:
    return BaseConfig(source="hub", model=model_id, revision="0" * 40)


MULTIMODAL = {  # model_type: (Hub id of the preset, extra config, the text class the engine gets)
    "gemma3": ("google/gemma-3-27b-it", dict(text_config=dict(TEXT, model_type="gemma3_text", sliding_window=8),
                                            vision_config=VISION, mm_tokens_per_image=4), "Gemma3ForCausalLM"),
    # Mistral Small 3.x has its own output layer beside the embeddings, while its config.json leaves out
    # tie_word_embeddings, whose Mistral3Config default is tied (published_repo drops the key as they do)
    "mistral3": ("mistralai/Mistral-Small-3.2-24B-Instruct-2506",
                 dict(text_config=dict(TEXT, model_type="mistral"), vision_config=dict(VISION, head_dim=16),
                      tie_word_embeddings=False), "MistralForCausalLM"),
}


@pytest.mark.parametrize("model_type", MULTIMODAL)
def test_sft_base_extracts_the_language_model_of_a_multimodal_checkpoint(model_type, tokenizer, tmp_path,
                                                                         monkeypatch):
    """AutoModelForCausalLM gives the whole Gemma3ForConditionalGeneration for `gemma3` and refuses
    `mistral3`: `sft base` keeps the language model as its text causal LM class, whose logits on text
    equal the multimodal model's, with no stray weights fetched and the vision tower counted as dropped."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    model_id, extra, text_class = MULTIMODAL[model_type]
    extra = json.loads(json.dumps(extra))
    extra["text_config"]["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    multimodal = AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **extra)).eval()
    repo = published_repo(tmp_path / "hub", multimodal, tokenizer)
    config = json.loads((repo / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (repo / "config.json").write_text(json.dumps(config))
    fetched = fetch_from(repo, monkeypatch)
    info = resolve_base(hub_base(model_id), tmp_path / "base", log=lambda _: None)

    assert "consolidated.safetensors" not in fetched and not [f for f in fetched if f.startswith("original/")]
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert type(text).__name__ == text_class == info["architecture"][0]
    assert text.config.model_type == info["model_type"] == trained_model_type(multimodal.config.to_dict())
    input_ids = torch.randint(11, len(tokenizer), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=input_ids).logits, multimodal(input_ids=input_ids).logits,
                                   rtol=0, atol=1e-6)
    language = sum(p.numel() for p in text.parameters())
    assert info["params"] == language == Shape.from_config(multimodal.config.to_dict()).params
    assert info["converted"]["dropped_parameters"] == sum(p.numel() for p in multimodal.parameters()) - language
    assert info["converted"]["tied_embeddings"] is (model_type == "gemma3")
    assert json.loads((tmp_path / "base/meta.json").read_text())["converted"] == info["converted"]
