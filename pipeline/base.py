"""base and tokenizer: resolve the base model once, into two folders.

- `tokenizer/`: the small files (tokenizer, chat template, config.json, generation config, licence).
  Everything a pull request needs (the data contract's token lengths, `sft plan`'s model shape)
  without the weights: a gated 16 GB download has no place on a PR runner.
- `base/`: the full model folder (weights + the same small files), for training and evaluation.

Production names a Hub id pinned to a revision; the demo builds the tiny model locally.
`meta.json` records where it came from (and, in base/, the sha256 of the weights), so every
later stage (and the model card) can say exactly what was fine-tuned.

The engine trains a plain text causal LM in bf16/fp32 (`AutoModelForCausalLM`). Checkpoints that are
not one are made one here, once, with transformers' own classes, or refused by name:
- multimodal (Gemma 3 `gemma3`, Mistral Small 3.x `mistral3`): transformers maps `gemma3` to the
  whole Gemma3ForConditionalGeneration (vision tower included) and refuses `mistral3` outright. The
  language model and its text config are extracted into base/ (e.g. Gemma3ForCausalLM,
  MistralForCausalLM), tied or untied as the checkpoint actually is; the vision tower and projector
  are dropped, so the fine-tuned model is text-only.
- MXFP4-quantized (gpt-oss): dequantized to bf16 (transformers' Mxfp4Config(dequantize=True)) and
  saved without its quantization_config: full SFT needs bf16 weights and gradients.
- other quantized checkpoints (FP8, GPTQ, AWQ, bitsandbytes): refused; use the bf16 release.
`meta.json` records the conversion (`converted`), and the hash and parameter count are those of
the weights in base/, the ones trained.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from pipeline.files import atomic_dir, sha256_files, weight_files

# what a PR needs, and what the licence requires to travel with the weights (Llama: LICENSE, USE_POLICY.md)
SMALL_FILES = ["*.json", "tokenizer*", "*.jinja", "*.model", "*.txt", "LICENSE*", "USE_POLICY*", "NOTICE*"]
# transformers' weight names only: Mistral repos also carry consolidated.safetensors (the same weights
# in Mistral's own format, 48 GB for Small 3.2) and gpt-oss original/model.safetensors
WEIGHT_FILES = ["model*.safetensors", "model.safetensors.index.json"]
DEQUANTIZED = {"mxfp4"}  # quantized checkpoints made bf16 here; any other quant_method is refused


class BaseUnavailable(RuntimeError):
    """The base model cannot be resolved as params.yaml names it (the message says what to change)."""


def count_parameters(folder: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def download(cfg, out_dir: Path, patterns: list[str]) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # top-level files only: Llama repos also carry `original/` (the same weights in another format)
        snapshot_download(repo_id=cfg.model, revision=cfg.revision, local_dir=out_dir, allow_patterns=patterns)
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE=1) or the Hub unreachable, and not cached
        raise BaseUnavailable(
            f"params.yaml base: {cfg.model}@{cfg.revision} is not in the local Hugging Face cache "
            "and the Hub cannot be reached (HF_HUB_OFFLINE=1, or no network): run where the Hub is "
            "reachable, with HF_HUB_OFFLINE unset (`sft plan --model llama-3.1-8b` and the other "
            f"known shapes work offline; {str(err).strip().splitlines()[0]})"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = {
            401: "set HF_TOKEN to a token with read access (gated models: accept the licence on the Hub first)",
            403: "this token has no access to the repository (gated: request access on its Hub page)",
            404: "no such repository or revision (params.yaml base.model / base.revision)",
        }.get(status, "")
        raise BaseUnavailable(
            f"params.yaml base: downloading {cfg.model}@{cfg.revision} failed"
            f" (HTTP {status}){': ' + hint if hint else ''}"
        ) from err
    if (Path(out_dir) / ".cache").exists():
        shutil.rmtree(Path(out_dir) / ".cache")  # huggingface_hub's download bookkeeping, not model files


def check_chat_template(folder: Path, cfg) -> None:
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(folder).chat_template:
        raise BaseUnavailable(
            f"{cfg.model}@{cfg.revision}: the tokenizer has no chat template; "
            "pick an instruct tokenizer or add one before fine-tuning"
        )


def resolve_tokenizer(cfg, out_dir: Path) -> dict:
    """tokenizer/: tokenizer, chat template and model config, without the weights."""
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "demo":
            from pipeline.demo import build_demo_tokenizer

            build_demo_tokenizer(cfg.demo, tmp)
        else:
            download(cfg, tmp, SMALL_FILES)
            check_chat_template(tmp, cfg)
        info = {"source": cfg.source, "model": cfg.model, "revision": cfg.revision}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def resolve_base(cfg, out_dir: Path, log=print, check_family=None) -> dict:
    """base/: the full model folder, weights hashed. `check_family(config.json's dict)` refuses a
    base the engine cannot train (pipeline/families.py) before the weights are fetched."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "demo":
            from pipeline.demo import build_base_model

            info = build_base_model(cfg.demo, tmp, log=log)
        else:
            download(cfg, tmp, SMALL_FILES)
            check_chat_template(tmp, cfg)
            if check_family:  # before the weights: an unproven family costs no download
                check_family(json.loads((tmp / "config.json").read_text()))
            download(cfg, tmp, WEIGHT_FILES)
            if not weight_files(tmp):
                raise BaseUnavailable(
                    f"{cfg.model}@{cfg.revision}: no model*.safetensors weights (transformers' "
                    "safetensors; other formats are not loaded)"
                )
            info = to_text_causal_lm(tmp, cfg, log=log)
        weights = weight_files(tmp)
        info.update(
            source=cfg.source,
            model=cfg.model,
            revision=cfg.revision,
            params=count_parameters(tmp),
            sha256=sha256_files(weights),
        )
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def trained_model_type(config: dict) -> str:
    """The model_type the engine sees once `sft base` has made the checkpoint a text causal LM: the
    text config's for a multimodal checkpoint (gemma3 -> gemma3_text, mistral3 -> mistral), else the
    checkpoint's own. `config` is config.json as a dict (tokenizer/ carries it before any weights)."""
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("model_type"):
        return text["model_type"]
    if "model_type" not in config:
        raise BaseUnavailable("config.json names no model_type: the model's family cannot be told")
    if isinstance(text, dict):  # a sub-config left to its class's default type
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(config["model_type"], **fields).get_text_config().model_type
    return config["model_type"]


def to_text_causal_lm(folder: Path, cfg, log=print) -> dict:
    """Make the downloaded checkpoint in `folder` the plain text causal LM the engine trains (see the
    module's docstring), in place; returns what meta.json records about it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    name = f"{cfg.model}@{cfg.revision}"
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    method = getattr(method, "value", method)  # an enum in some configs
    if method and method not in DEQUANTIZED:
        raise BaseUnavailable(
            f"{name}: the weights are quantized (quant_method {method}); full SFT trains bf16 "
            "weights: set base.model to the model's bf16 release"
        )
    if method:
        return _dequantize(folder, config, name, method, log)
    if config.get_text_config() is not config:
        return _extract_language_model(folder, config, name, log)
    return {"architecture": config.architectures, "model_type": config.model_type}


def _replace_weights(folder: Path, save) -> None:
    """Swap the downloaded weights for the converted ones; `save(dir)` writes them and config.json."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        save(Path(scratch))
        for old in weight_files(folder) + [folder / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
        for new in Path(scratch).iterdir():
            shutil.move(str(new), folder / new.name)


def _dequantize(folder: Path, config, name: str, method: str, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    log(f"{name}: {method} weights, dequantizing to bf16 once (full SFT trains bf16 weights)")
    source = sha256_files(weight_files(folder))
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )
    if getattr(model.config, "quantization_config", None):
        raise BaseUnavailable(
            f"{name}: transformers kept the {method} quantization after dequantizing; "
            "this transformers version cannot make bf16 weights of it"
        )
    _replace_weights(folder, lambda out: model.save_pretrained(out, max_shard_size="5GB"))
    return {
        "architecture": model.config.architectures,
        "model_type": model.config.model_type,
        "converted": {
            "how": f"dequantized from {method} to bfloat16 (transformers Mxfp4Config(dequantize=True))",
            "source_sha256": source,
        },
    }


def _extract_language_model(folder: Path, config, name: str, log) -> dict:
    import copy

    import torch
    import transformers
    from huggingface_hub import save_torch_state_dict
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text_config = copy.deepcopy(config.get_text_config())
    causal = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_config), None)
    wrapper = getattr(transformers, (config.architectures or [""])[0], None)
    if causal is None or wrapper is None or not causal.__name__.endswith("ForCausalLM"):
        raise BaseUnavailable(
            f"{name}: a {config.model_type} checkpoint ({config.architectures}) whose text model "
            f"({text_config.model_type}) has no text-only causal LM class in transformers to "
            "extract it into; pick a text-only model"
        )
    log(
        f"{name}: {config.architectures[0]} is multimodal; extracting its language model as {causal.__name__} "
        "(the vision tower is not trained)"
    )
    source = sha256_files(weight_files(folder))
    full = wrapper.from_pretrained(folder, dtype="auto")
    decoder, head = full.get_decoder(), full.get_output_embeddings()
    # tie as the checkpoint really is: a config may default to tied while the checkpoint has its own head
    tied = head.weight is decoder.get_input_embeddings().weight
    text_config.tie_word_embeddings = tied
    text_config.architectures = [causal.__name__]
    prefix = causal.base_model_prefix
    state = {f"{prefix}.{key}": value for key, value in decoder.state_dict().items()}
    if not tied:
        state["lm_head.weight"] = head.weight
    with torch.device("meta"):
        expected = set(causal(text_config).state_dict()) - ({"lm_head.weight"} if tied else set())
    if set(state) != expected:  # the text class would load with missing or stray weights
        raise BaseUnavailable(
            f"{name}: the language model of {config.architectures[0]} does not match "
            f"{causal.__name__}: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    dropped = sum(p.numel() for p in full.parameters()) - sum(v.numel() for v in state.values())

    def save(out: Path) -> None:
        save_torch_state_dict(state, out, max_shard_size="5GB")
        text_config.save_pretrained(out)
        if full.generation_config is not None:
            full.generation_config.save_pretrained(out)

    _replace_weights(folder, save)
    return {
        "architecture": [causal.__name__],
        "model_type": text_config.model_type,
        "converted": {
            "how": f"language model extracted from {config.architectures[0]} "
            f"({config.model_type}) as {causal.__name__}; vision tower and projector dropped",
            "dropped_parameters": dropped,
            "tied_embeddings": tied,
            "source_sha256": source,
        },
    }
