"""`sft prepare`: mix replay, render each conversation with the chat template, tokenize, mask all
but the supervised spans and pack into fixed-length rows; only data the contract passed."""

from __future__ import annotations

import numpy as np

from pipeline.artifacts import ContractReport, PrepareStats, read, write
from pipeline.data import load_examples
from pipeline.files import DataError, sha256_files
from pipeline.paths import Paths
from pipeline.prepare import TemplateError, TemplateOptions, as_conversation, prepare_tokenized, tokenize_file
from pipeline.stages import StageError
from pipeline.stages.inputs import base_tokenizer, data_inputs, where_row


def check_contract(paths: Paths, inputs: list) -> str:
    """The sha256 of the data, when validate passed these very files."""
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:
        raise StageError(f"{', '.join(missing)}: file not found")
    if not paths.contract.is_file():
        raise StageError(f"{paths.contract}: missing; run `sft validate` first")
    contract = read(paths.contract, ContractReport)
    data_sha256 = sha256_files(inputs)
    if contract.data_sha256 != data_sha256:
        raise StageError(
            f"{paths.contract}: made for other data than {', '.join(map(str, inputs))} hold now; run `sft validate`"
        )
    if not contract.passed:
        raise StageError(
            f"{paths.contract}: the data contract did not pass; fix the data (validate/contract.md says "
            "how), then run `sft validate`"
        )
    return data_sha256


def conversations(path) -> list:
    """Each row's conversation, its tools included."""
    return [as_conversation(row) for row in load_examples(path).to_dict("records")]


def tokenize_files(tokenizer, inputs: list, options: TemplateOptions) -> list:
    """(tokenized, cache hit) per file: an unchanged file with the same tokenizer comes from the cache."""
    tokenized = []
    for path in inputs:
        try:
            tokenized.append(tokenize_file(tokenizer, path, conversations, options=options))
        except DataError as err:
            raise StageError(str(err)) from None
        except TemplateError as err:  # named as sft validate names it: file and line (Parquet: row)
            raise StageError(f"{where_row(path, load_examples(path), err.row)}: {err.reason}") from None
    return tokenized


def write_packed(packed, path) -> None:
    arrays = {"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids}
    if packed.lengths is not None:  # unpacked rows: real tokens per row, for trimming each batch
        arrays["lengths"] = packed.lengths
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("packed.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def run(params, paths: Paths) -> str:
    inputs = data_inputs(params)
    data_sha256 = check_contract(paths, inputs)
    cfg = params.prepare
    tokenizer = base_tokenizer(paths.tokenizer, params.base)
    (train, train_hit), *replay = tokenize_files(tokenizer, inputs, TemplateOptions.from_config(cfg))
    packed = prepare_tokenized(
        train,
        replay[0][0] if replay else None,
        cfg.max_seq_len,
        cfg.replay_share,
        cfg.seed,
        tokenizer.pad_token_id,
        cfg.pack,
        cfg.bucket_rows,
    )
    write_packed(packed, paths.packed)
    stats = PrepareStats.model_validate({**packed.stats, "data_sha256": data_sha256})
    write(paths.prepare_stats, stats)
    hits = [train_hit] + [hit for _, hit in replay]
    layout = "packed" if cfg.pack else "bucketed by length, one example"
    return (
        f"{layout} {stats.examples:,} examples into {stats.rows:,} rows of {cfg.max_seq_len} tokens "
        f"(fill {stats.fill:.1%}, replay {stats.replay_share:.1%}, truncated {stats.truncated}); "
        f"tokenization cache: {sum(hits)} of {len(hits)} files hit"
    )
