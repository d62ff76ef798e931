"""The production presets (configs/*.yaml) and the bases they name.

Every preset parses through the schema and plans: `sft plan`'s figures fit its GPUs and equal the
figures its header quotes, so a header cannot go stale. The presets' bases that are not a plain text
causal LM (Gemma 3 and Mistral Small 3.2 are multimodal, gpt-oss ships MXFP4 weights) are made one by
`sft base` (pipeline/base.py): checked here on tiny checkpoints of the same classes, offline.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.base import BaseUnavailable, resolve_base, trained_model_type
from pipeline.config import BaseConfig
from pipeline.plan import Shape

TEXT = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)


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


# transformers 5 saves `model.language_model.*`; the Hub checkpoints (written by transformers 4.50) name
# the same tensors `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`, which
# transformers renames as it loads them (its llava conversion mapping)
HUB_NAMES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def as_published_on_the_hub(weights: Path) -> None:
    from safetensors.torch import load_file, save_file

    renamed = {}
    for name, tensor in load_file(weights).items():
        old, new = next(((old, new) for old, new in HUB_NAMES if name.startswith(old)), ("", ""))
        renamed[new + name.removeprefix(old)] = tensor
    assert not [name for name in renamed if name.startswith("model.")], "every tensor renamed"
    save_file(renamed, weights, metadata={"format": "pt"})


MULTIMODAL = {  # model_type: (Hub id of the preset, extra config, the text class the engine gets)
    "gemma3": (
        "google/gemma-3-27b-it",
        dict(
            text_config=dict(TEXT, model_type="gemma3_text", sliding_window=8),
            vision_config=VISION,
            mm_tokens_per_image=4,
        ),
        "Gemma3ForCausalLM",
    ),
    # Mistral Small 3.x has its own output layer beside the embeddings, while its config.json leaves out
    # tie_word_embeddings, whose Mistral3Config default is tied (published_repo drops the key as they do)
    "mistral3": (
        "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        dict(
            text_config=dict(TEXT, model_type="mistral"),
            vision_config=dict(VISION, head_dim=16),
            tie_word_embeddings=False,
        ),
        "MistralForCausalLM",
    ),
}


@pytest.mark.parametrize("model_type", MULTIMODAL)
def test_sft_base_extracts_the_language_model_of_a_multimodal_checkpoint(model_type, tokenizer, tmp_path, monkeypatch):
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
    as_published_on_the_hub(repo / "model.safetensors")
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
        torch.testing.assert_close(
            text(input_ids=input_ids).logits, multimodal(input_ids=input_ids).logits, rtol=0, atol=1e-6
        )
    language = sum(p.numel() for p in text.parameters())
    assert info["params"] == language == Shape.from_config(multimodal.config.to_dict()).params
    assert info["converted"]["dropped_parameters"] == sum(p.numel() for p in multimodal.parameters()) - language
    assert info["converted"]["tied_embeddings"] is (model_type == "gemma3")
    assert json.loads((tmp_path / "base/meta.json").read_text())["converted"] == info["converted"]


# MXFP4 (OCP Microscaling spec v1.0): blocks of 32 FP4 E2M1 values sharing one E8M0 scale 2^(s - 127), two
# values a byte, the low nibble first; gpt-oss stores each expert matrix as [experts, out, in / 32, 16]
# bytes and [experts, out, in / 32] scales (the layout OpenAI's checkpoints and transformers use)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode, element by element from the spec, to the [experts, in, out] matrix GptOssExperts holds."""
    experts, out, groups, _ = blocks.shape
    weight = torch.zeros(experts, groups * 32, out, dtype=torch.float64)
    for e in range(experts):
        for o in range(out):
            for g in range(groups):
                scale = 2.0 ** (int(scales[e, o, g]) - 127)
                for j, byte in enumerate(blocks[e, o, g].tolist()):
                    for half, nibble in enumerate((byte & 0x0F, byte >> 4)):
                        value = E2M1[nibble & 0x7] * (-1 if nibble & 0x8 else 1)
                        weight[e, g * 32 + 2 * j + half, o] = value * scale
    return weight


def test_sft_base_dequantizes_gpt_oss_mxfp4_experts_to_bf16(tokenizer, tmp_path, monkeypatch):
    """gpt-oss ships its experts in MXFP4: `sft base` saves them once as bf16 (transformers' Mxfp4Config
    with dequantize=True), without the quantization_config, every expert value equal to the spec's
    decoding and every other weight as published."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_oss",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
    )
    repo = published_repo(tmp_path / "hub", AutoModelForCausalLM.from_config(config).to(torch.bfloat16), tokenizer)
    published = load_file(repo / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in published if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, fan_in, fan_out = published.pop(name).shape
        published[f"{name}_blocks"] = torch.randint(
            0, 256, (experts, fan_out, fan_in // 32, 16), dtype=torch.uint8, generator=generator
        )
        published[f"{name}_scales"] = torch.randint(
            122, 131, (experts, fan_out, fan_in // 32), dtype=torch.uint8, generator=generator
        )
    save_file(published, repo / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((repo / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (repo / "config.json").write_text(json.dumps(raw))
    fetch_from(repo, monkeypatch)

    info = resolve_base(hub_base("openai/gpt-oss-20b"), tmp_path / "base", log=lambda _: None)
    assert "quantization_config" not in json.loads((tmp_path / "base/config.json").read_text())
    assert info["model_type"] == "gpt_oss" and "mxfp4" in info["converted"]["how"]
    saved = load_file(tmp_path / "base/model.safetensors")
    for name, tensor in published.items():
        if name.endswith("_blocks"):
            matrix = name.removesuffix("_blocks")
            assert saved[matrix].dtype == torch.bfloat16
            expected = mxfp4_reference(tensor, published[f"{matrix}_scales"])
            assert torch.equal(saved[matrix].double(), expected), matrix  # E2M1 x 2^k is exact in bf16
        elif not name.endswith("_scales"):
            assert torch.equal(saved[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert type(model).__name__ == "GptOssForCausalLM" and info["params"] == Shape.from_config(raw).params
    assert torch.isfinite(model(input_ids=torch.randint(0, len(tokenizer), (1, 16))).logits).all()


def test_sft_base_refuses_other_quantized_checkpoints_by_name(tiny_model_dir, tmp_path, monkeypatch):
    repo = shutil.copytree(tiny_model_dir, tmp_path / "hub")
    raw = json.loads((repo / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (repo / "config.json").write_text(json.dumps(raw))
    fetch_from(repo, monkeypatch)
    with pytest.raises(
        BaseUnavailable,
        match=r"acme/model-FP8@0{40}: the weights are quantized \(quant_method fp8\)"
        r".*bf16 release",
    ):
        resolve_base(hub_base("acme/model-FP8"), tmp_path / "base", log=lambda _: None)
    assert not (tmp_path / "base").exists()


# ---- the presets ----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("demo"))
QUOTED_COMMAND = re.compile(r"`sft plan --model ([\w.-]+) --tokens (\d+)` with this file as params.yaml")
QUOTED_ROW = re.compile(
    r"^#\s+(\w+) on ([\w-]+): (\d+) nodes? of (\d+) GPUs, ([\d.]+) GiB per GPU, ([\d.]+) h, "
    r"([\d,.]+) USD$",
    re.M,
)
ENGINE_SEES = re.compile(r"engine sees model_type (\w+)")


def quoted_plan(text: str) -> dict:
    return {
        (strategy, gpu): (int(nodes), int(per_node), float(gib), float(hours), float(cost.replace(",", "")))
        for strategy, gpu, nodes, per_node, gib, hours, cost in QUOTED_ROW.findall(text)
    }


def planned_by_sft_plan(preset: Path, model: str, tokens: str, folder: Path, monkeypatch) -> dict:
    """`sft plan` as a team runs it, with the preset as params.yaml."""
    from typer.testing import CliRunner

    from pipeline import cli

    monkeypatch.chdir(folder)
    shutil.copy(preset, folder / "params.yaml")
    result = CliRunner().invoke(cli.app, ["plan", "--model", model, "--tokens", tokens])
    assert result.exit_code == 0, result.output
    return json.loads((folder / "plan/plan.json").read_text())


def test_the_presets_a_team_would_pick_are_all_there():
    names = {p.stem for p in PRESETS}
    assert {
        "llama3-8b-8xh100",
        "qwen3-8b-8xh100",
        "qwen3-8b-16k-8xh100",
        "qwen3-30b-a3b-8xh100",
        "gemma3-27b-8xh100",
        "gpt-oss-20b-8xh100",
        "llama3.3-70b-32xh100",
        "mistral-small-3.2-24b-8xh100",
    } <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_plans_on_its_gpus_and_its_header_quotes_the_plan(preset, tmp_path, monkeypatch):
    """The schema takes the preset; `sft plan` for its model and run fits the GPUs its name gives; every
    figure its header quotes (nodes, GiB per GPU, hours, cost, for each card) is what `sft plan` prints
    for it now, so neither the planner nor the preset can change without the header."""
    from transformers import AutoConfig

    from pipeline.config import load_params
    from pipeline.plan import HUB_IDS, PUBLISHED

    params = load_params(preset)
    text = preset.read_text()
    assert params.base.source == "hub" and re.fullmatch(r"[0-9a-f]{40}", params.base.revision), "pinned to a commit"
    model, tokens = QUOTED_COMMAND.search(text).groups()
    assert params.base.model in HUB_IDS[model], f"{preset.name}: the header plans {model}, not {params.base.model}"
    plan = planned_by_sft_plan(preset, model, tokens, tmp_path, monkeypatch)
    planned = {
        (r["strategy"], r["gpu"]): (r["nodes"], params.plan.gpus_per_node, r["gib_per_gpu"], r["hours"], r["cost"])
        for r in plan["rows"]
        if r["strategy"] == params.train.strategy and r["nodes"]
    }
    assert quoted_plan(text) == planned
    gpus = int(re.search(r"(\d+)xh100", preset.stem).group(1))
    assert planned[(params.train.strategy, "H100-80GB")][0] * params.plan.gpus_per_node == gpus
    # the model type the engine trains after `sft base`, and rows within the positions the model saw
    published = PUBLISHED[model]
    assert ENGINE_SEES.search(text).group(1) == trained_model_type(published)
    fields = {k: v for k, v in published.items() if k != "model_type"}
    positions = AutoConfig.for_model(published["model_type"], **fields).get_text_config().max_position_embeddings
    assert params.prepare.max_seq_len <= positions


def test_multi_node_presets_say_how_the_cluster_gets_its_nodes():
    """sky/train.yaml fixes num_nodes (the launch workflow runs the file as it is): a preset needing more
    nodes than it sets says, with the planner's node count, what to change there."""
    import yaml

    shipped = yaml.safe_load((ROOT / "sky/train.yaml").read_text())["num_nodes"]
    for preset in PRESETS:
        nodes = int(re.search(r"(\d+)xh100", preset.stem).group(1)) // 8
        if nodes != shipped:
            assert f"`num_nodes: {nodes}` in\n# sky/train.yaml" in preset.read_text(), preset.name


def test_readme_table_lists_every_preset_with_its_header_figures():
    """README's preset table: each preset once, its base, the model_type trained, and the H100 figures its
    header quotes (which the test above ties to `sft plan`)."""
    import yaml

    section = (ROOT / "README.md").read_text().split("## Presets", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `([\w.-]+\.yaml)` \| ([^|]+) \| `(\w+)` \| (\d+) x (\d+) \| ([\d.]+) \| ([\d.]+) \| "
        r"([\d,.]+) \|",
        section,
        re.M,
    )
    assert sorted(row[0] for row in rows) == sorted(p.name for p in PRESETS)
    for name, base, model_type, nodes, per_node, gib, hours, cost in rows:
        text = (ROOT / "configs" / name).read_text()
        assert base.strip() == yaml.safe_load(text)["base"]["model"]
        assert model_type == ENGINE_SEES.search(text).group(1)
        assert quoted_plan(text)[("fsdp2", "H100-80GB")] == (
            int(nodes),
            int(per_node),
            float(gib),
            float(hours),
            float(cost.replace(",", "")),
        )


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "gemma3_text"),
        ({"model_type": "mistral3", "text_config": {"hidden_size": 64}}, "mistral"),  # the class's default text type
        ({"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}, "gpt_oss"),
        ({"model_type": "qwen3_moe"}, "qwen3_moe"),
    ],
)
def test_trained_model_type_is_what_sft_base_leaves(config, expected):
    assert trained_model_type(config) == expected


def test_every_named_shape_is_a_family_the_matrix_proves():
    from pipeline.families import check_model, family_of
    from pipeline.plan import PUBLISHED, SHAPES

    for name, shape in SHAPES.items():
        family_of(shape, where=name)
    # the multimodal checkpoints are judged by the text model sft base extracts
    assert check_model(PUBLISHED["gemma-3-27b"], 8192).name == "Gemma 3"
    assert check_model(PUBLISHED["mistral-small-3.2-24b"], 8192).name == "Mistral"


def test_sft_base_refuses_an_unproven_family_before_fetching_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    from pipeline.families import UnsupportedModel, check_model

    repo = shutil.copytree(tiny_model_dir, tmp_path / "hub")
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, "model_type": "falcon_h1"}))
    fetched = fetch_from(repo, monkeypatch)
    with pytest.raises(UnsupportedModel, match="'falcon_h1' is not supported"):
        resolve_base(
            hub_base("tiiuae/Falcon-H1-7B"),
            tmp_path / "base",
            log=lambda _: None,
            check_family=lambda c: check_model(c, 2048),
        )
    assert "config.json" in fetched and not any(name.endswith(".safetensors") for name in fetched)
    assert not (tmp_path / "base").exists()
