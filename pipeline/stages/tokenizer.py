"""`sft tokenizer`: the base model's small files (tokenizer, chat template, config.json; no weights),
all a pull request's contract and plan need."""

from __future__ import annotations

from pipeline.base import BaseUnavailable, resolve_tokenizer
from pipeline.paths import Paths
from pipeline.stages import StageError


def run(params, paths: Paths) -> str:
    try:
        resolve_tokenizer(params.base, paths.tokenizer)
    except BaseUnavailable as err:
        raise StageError(str(err)) from None
    return (
        f"tokenizer, chat template and config of {params.base.model}@{params.base.revision or 'built locally'} "
        f"in {paths.tokenizer}/"
    )
