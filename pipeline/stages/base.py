"""`sft base`: the base model, built locally (the demo) or downloaded at a pinned Hub revision; a
family the engine cannot train is refused from its config.json, before the weights."""

from __future__ import annotations

from pipeline.base import BaseUnavailable, resolve_base
from pipeline.families import UnsupportedModel, check_model
from pipeline.paths import Paths
from pipeline.stages import StageError


def run(params, paths: Paths, log=print) -> str:
    where = f"{params.base.model}@{params.base.revision} config.json"
    try:
        info = resolve_base(
            params.base,
            paths.base,
            log=log,
            check_family=lambda config: check_model(config, params.prepare.max_seq_len, where),
        )
    except (BaseUnavailable, UnsupportedModel) as err:
        raise StageError(str(err)) from None
    return f"base model ready in {paths.base}/ ({info['params']:,} parameters, sha256 {info['sha256'][:12]})"
