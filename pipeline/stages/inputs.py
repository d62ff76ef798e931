"""What several stages read and check before they start: the base's tokenizer and family, the data
files and prepare's statistics of them."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import ArtifactError, PrepareStats, read
from pipeline.files import sha256_files
from pipeline.paths import Paths
from pipeline.stages import StageError


def base_tokenizer(folder: Path, base):
    """The base model's tokenizer: token counts go through its chat template, as training's do."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").exists():
        raise StageError(
            f"{folder}: no tokenizer; run `sft tokenizer` (token lengths use the base model's chat template)"
        )
    check_built_for_base(folder, base)
    return AutoTokenizer.from_pretrained(folder)


def check_built_for_base(folder: Path, base) -> None:
    """Refuse a tokenizer/ (or base/) made for another base than params.yaml names: `sft <stage>` by
    hand after switching presets would otherwise count tokens, and plan, with the old model's."""
    made = folder / "meta.json"
    if not made.is_file():
        return
    info = json.loads(made.read_text())
    if (info.get("source"), info.get("model"), info.get("revision")) != (base.source, base.model, base.revision):
        raise StageError(
            f"{folder}: made for {info.get('model')}@{info.get('revision')}, but params.yaml base is "
            f"{base.model}@{base.revision}; rebuild it (`dvc repro`, or `sft tokenizer` / `sft base`)"
        )


def check_family(folder: Path, max_seq_len: int) -> None:
    """Refuse a base the engine cannot train exactly (pipeline/families.py), from the config.json
    `sft tokenizer` fetches without the weights: before any download of weights or GPU hour."""
    from pipeline.families import UnsupportedModel, check_model

    config = folder / "config.json"
    if config.is_file():
        try:
            check_model(json.loads(config.read_text()), max_seq_len, where=str(config))
        except UnsupportedModel as err:
            raise StageError(str(err)) from None


def data_inputs(params) -> list[Path]:
    """The files prepare packs: train, and replay when there is one."""
    return [Path(params.data.train)] + ([Path(params.data.replay)] if params.data.replay else [])


def prepared_stats(params, paths: Paths) -> PrepareStats | None:
    """prepare/stats.json when prepare made it from this branch's very files; never another data set's."""
    inputs = data_inputs(params)
    if paths.prepare_stats.is_file() and all(f.is_file() for f in inputs):
        try:
            stats = read(paths.prepare_stats, PrepareStats)
        except ArtifactError:  # an older or damaged file is not this data's: count the tokens afresh
            return None
        if stats.data_sha256 == sha256_files(inputs):
            return stats
    return None


def where_row(path, frame, row_position: int) -> str:
    """A row as the user finds it: `file:line` for JSONL, `file row N` for Parquet."""
    row = frame.index[row_position]
    return f"{path} row {row}" if frame.attrs.get("parquet") else f"{path}:{row}"
