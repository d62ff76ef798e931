"""base and tokenizer: resolve the base model once, into two folders.

- `tokenizer/`: the small files (tokenizer, chat template, config.json, generation config, licence).
  Everything a pull request needs (the data contract's token lengths, `sft plan`'s model shape)
  without the weights: a gated 16 GB download has no place on a PR runner.
- `base/`: the full model folder (weights + the same small files), for training and evaluation.

Production names a Hub id pinned to a revision; the demo builds the tiny model locally.
`meta.json` records where it came from (and, in base/, the sha256 of the weights), so every
later stage (and the model card) can say exactly what was fine-tuned.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from pipeline.files import atomic_dir, sha256_files, weight_files

# what a PR needs, and what the licence requires to travel with the weights (Llama: LICENSE, USE_POLICY.md)
SMALL_FILES = ["*.json", "tokenizer*", "*.jinja", "*.model", "*.txt", "LICENSE*", "USE_POLICY*", "NOTICE*"]
WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]


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
        raise BaseUnavailable(f"params.yaml base: {cfg.model}@{cfg.revision} is not in the local Hugging Face cache "
                              "and the Hub cannot be reached (HF_HUB_OFFLINE=1, or no network): run where the Hub is "
                              "reachable, with HF_HUB_OFFLINE unset (`sft plan --model llama-3.1-8b` and the other "
                              f"known shapes work offline; {str(err).strip().splitlines()[0]})") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = {401: "set HF_TOKEN to a token with read access (gated models: accept the licence on the Hub first)",
                403: "this token has no access to the repository (gated: request access on its Hub page)",
                404: "no such repository or revision (params.yaml base.model / base.revision)"}.get(status, "")
        raise BaseUnavailable(f"params.yaml base: downloading {cfg.model}@{cfg.revision} failed"
                           f" (HTTP {status}){': ' + hint if hint else ''}") from err
    if (Path(out_dir) / ".cache").exists():
        shutil.rmtree(Path(out_dir) / ".cache")  # huggingface_hub's download bookkeeping, not model files


def check_chat_template(folder: Path, cfg) -> None:
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(folder).chat_template:
        raise BaseUnavailable(f"{cfg.model}@{cfg.revision}: the tokenizer has no chat template; "
                         "pick an instruct tokenizer or add one before fine-tuning")


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


def resolve_base(cfg, out_dir: Path, log=print) -> dict:
    """base/: the full model folder, weights hashed."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "demo":
            from pipeline.demo import build_base_model

            info = build_base_model(cfg.demo, tmp, log=log)
        else:
            download(cfg, tmp, SMALL_FILES + WEIGHT_FILES)
            check_chat_template(tmp, cfg)
            from transformers import AutoConfig

            info = {"architecture": AutoConfig.from_pretrained(tmp).architectures}
        weights = weight_files(tmp)
        if not weights:
            raise BaseUnavailable(f"{cfg.model}@{cfg.revision}: no *.safetensors weights (other formats are not loaded)")
        info.update(source=cfg.source, model=cfg.model, revision=cfg.revision, params=count_parameters(tmp),
                    sha256=sha256_files(weights))
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
