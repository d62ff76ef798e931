"""base: resolve the base model once (weights + tokenizer + chat template) into one folder.

Production names a Hub id pinned to a revision; the demo builds the tiny model locally.
`base/meta.json` records where it came from and the sha256 of its weights, so every later
stage (and the model card) can say exactly what was fine-tuned.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.files import atomic_dir, sha256_files


def download_hub_base(cfg, out_dir: Path) -> dict:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=cfg.model, revision=cfg.revision, local_dir=out_dir,
                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"])
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}@{cfg.revision}: the tokenizer has no chat template; "
                         "pick an instruct tokenizer or add one before fine-tuning")
    config = AutoConfig.from_pretrained(out_dir)
    return {"params": None, "architecture": config.architectures}


def resolve_base(cfg, out_dir: Path, log=print) -> dict:
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "demo":
            from pipeline.demo import build_base_model

            info = build_base_model(cfg.demo, tmp, log=log)
        else:
            info = download_hub_base(cfg, tmp)
        info.update(source=cfg.source, model=cfg.model, revision=cfg.revision,
                    sha256=sha256_files(sorted(tmp.glob("*.safetensors"))))
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
