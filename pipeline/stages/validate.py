"""`sft validate`: the training and replay data against the data contract (great-expectations),
tokenized as prepare will tokenize them; writes contract.json, contract.md and the Data Docs."""

from __future__ import annotations

from pipeline.artifacts import ContractReport, write
from pipeline.contract import (
    add_replay_columns,
    contract_columns,
    eval_prompts,
    failure_message,
    render_markdown,
    run_suite,
)
from pipeline.data import load_examples
from pipeline.files import DataError, atomic_dir, sha256_files, write_text
from pipeline.paths import Paths
from pipeline.prepare import TemplateError, TemplateOptions
from pipeline.stages import StageError
from pipeline.stages.inputs import base_tokenizer, check_family, data_inputs, where_row


def check_replay_mix(params) -> None:
    """Training without replay data must be asked for: the method limits forgetting with it."""
    data, prepare, validate = params.data, params.prepare, params.validate_
    if (not data.replay or prepare.replay_share == 0) and validate.min_replay_share > 0:
        raise StageError(
            f"params.yaml: no replay mix (data.replay: {data.replay}, prepare.replay_share: {prepare.replay_share}) "
            f"but validate.min_replay_share is {validate.min_replay_share}: the method mixes 10-20% general data "
            "into training to limit forgetting; set data.replay and prepare.replay_share, or "
            "validate.min_replay_share: "
            "0 to train without it"
        )


def contract_frames(params, tokenizer, held_out, files: dict, frame, replay):
    """The train rows (and the replay rows prepare will mix in) with the contract's columns; a row the
    chat template cannot render is named before any report."""
    options = TemplateOptions.from_config(params.prepare)
    checked = {}
    for name, data in (("train", frame), ("replay", replay)):
        if data is None:
            continue
        try:  # the replay file is trained on too: the same contract
            checked[name] = contract_columns(
                data,
                tokenizer,
                held_out,
                params.validate_,
                params.prepare.max_seq_len,
                replay=name == "replay",
                options=options,
            )
        except TemplateError as err:
            raise StageError(f"{where_row(files[name], data, err.row)}: field 'messages': {err.reason}") from None
    replay = checked.get("replay")
    if replay is not None:
        replay = add_replay_columns(replay, len(checked["train"]), params.prepare.replay_share, params.prepare.seed)
    return checked["train"], replay


def run(params, paths: Paths) -> str:
    check_replay_mix(params)
    files = {"train": params.data.train, "replay": params.data.replay}
    try:  # a malformed file is named before anything else is asked for
        frame = load_examples(params.data.train)
        replay = None
        if params.data.replay and params.prepare.replay_share > 0:  # the mix prepare will make, checked here
            replay = load_examples(params.data.replay)
        held_out = eval_prompts(params.validate_.eval_sets)
    except DataError as err:
        raise StageError(str(err)) from None
    tokenizer = base_tokenizer(paths.tokenizer, params.base)
    check_family(paths.tokenizer, params.prepare.max_seq_len)
    frame, replay = contract_frames(params, tokenizer, held_out, files, frame, replay)
    with atomic_dir(paths.validate / "data-docs") as docs:  # great-expectations Data Docs, for CI to upload
        checks = run_suite(frame, params.validate_, params.prepare.max_seq_len, replay, docs)
    passed = all(c["passed"] for c in checks)
    # prepare packs only the very files that passed
    write(
        paths.contract,
        ContractReport(
            file=params.data.train,
            replay=params.data.replay if replay is not None else None,
            rows=len(frame),
            data_sha256=sha256_files(data_inputs(params)),
            passed=passed,
            checks=checks,
        ),
    )
    write_text(paths.validate / "contract.md", render_markdown(files, checks))
    if not passed:
        raise StageError(failure_message(files, checks))
    return (
        f"data contract passed: {len(frame):,} rows, {len(checks)} expectations ({params.data.train}); "
        f"Data Docs in {paths.validate}/data-docs/index.html"
    )
