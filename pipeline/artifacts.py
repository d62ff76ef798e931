"""artifacts: the JSON files stages hand each other, as typed models.

`read(path, Model)` refuses a missing, malformed or wrong file with one line naming the file and the
field; `write(path, model)` writes exactly what `pipeline.files.write_json` wrote for the same content
(the keys in the order the stage made them, Python's float repr, indent 2, a trailing newline), so a
file read and written again is the same bytes.

A key the stage leaves out (an optional one: `problem`, `trackers`, the gate's `plot`) stays out:
only the fields a file held, or the code set, are written (`exclude_unset`); a field set to None is
written as null, as before. Numbers keep their JSON type: 15000 stays an int, 0.5 a float.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)

from pipeline.files import write_text
from pipeline.stages import StageError

# strict: an int stays an int and a float a float (json.dumps writes 15000 and 0.5 back), a bool or a
# string is no number
Number = StrictInt | StrictFloat
Score = Number | None  # a metric's score; None where a model has no result for it


class ArtifactError(StageError, ValueError):
    """A stage's file is missing, not JSON, or not the shape its model expects; the message names
    the file and the field."""


class Artifact(BaseModel):
    """A file one stage writes and another reads. The shape is closed: a key the model does not know
    means a wrong file (or an old one), and is refused by name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def parse(cls, data, where: str | Path):
        """`data` (parsed JSON) as this model; errors are named `where: field: problem`."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ArtifactError(f"{where}: {describe(err, cls)}") from None

    def dumps(self) -> str:
        """The file's text, as pipeline.files.write_json writes the same content."""
        return json.dumps(self.model_dump(mode="python", exclude_unset=True), indent=2, sort_keys=False) + "\n"


A = TypeVar("A", bound=Artifact)


def read(path: str | Path, model: type[A]) -> A:
    """The file at `path` as `model`; ArtifactError naming the file (and the field) if it is missing,
    not JSON, or not that shape."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    return model.parse(data, path)


def write(path: str | Path, artifact: Artifact) -> None:
    """`artifact` at `path`, atomically, byte for byte what write_json wrote for the same content."""
    write_text(path, artifact.dumps())


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """The first field at fault as `field.path: problem` and how many more are, the union members'
    tags (int, float, a rule's kind) left out of the path and their messages joined."""
    problems: dict[str, list[str]] = {}
    for error in err.errors():
        loc = ".".join(str(p) for p in error["loc"] if p not in UNION_TAGS)
        if error["type"] == "extra_forbidden":
            message = f"unknown field (not part of {model.__name__}; a file of another stage or version?)"
        else:
            message = error["msg"].removeprefix("Value error, ")
        if message not in problems.setdefault(loc, []):
            problems[loc].append(message)
    loc, messages = next(iter(problems.items()))
    message = messages[0] + "".join(f", or {m.removeprefix('Input should be ')}" for m in messages[1:])
    more = len(problems) - 1
    return f"{loc + ': ' if loc else ''}{message}" + (
        f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    )


# ------------------------------------------------------------------ validate/contract.json
class ContractCheck(Artifact):
    """One expectation of the data contract, on one file (train or replay)."""

    data: StrictStr  # which file: "train" or "replay"
    expectation: StrictStr  # the great-expectations expectation type
    check: StrictStr  # what it checks, in words
    field: StrictStr | None
    threshold: dict[str, Number]
    observed: Score
    observed_text: StrictStr
    failing_share: Number | None
    passed: StrictBool
    rows: list[StrictInt]  # the first failing rows (file lines or Parquet rows)
    failing_rows: StrictInt
    how_to_fix: StrictStr


class ContractReport(Artifact):
    """`sft validate`'s report; prepare packs only the very data a passing report hashed."""

    file: StrictStr
    replay: StrictStr | None = None  # absent in reports made before replay data existed
    rows: StrictInt
    data_sha256: StrictStr | None = None  # absent in old reports: prepare then refuses them
    passed: StrictBool
    checks: list[ContractCheck]


# ------------------------------------------------------------------ prepare/stats.json
class PrepareStats(Artifact):
    examples: StrictInt
    rows: StrictInt
    tokens: StrictInt  # real (non-padding) tokens an epoch trains on
    supervised_tokens: StrictInt | None = None  # absent before prepare counted them (the plan then assumes all)
    fill: Number
    truncated: StrictInt
    packed: StrictBool = True  # absent before prepare could bucket instead of pack
    replay_rows: StrictInt
    replay_share: Number
    data_sha256: StrictStr


# ------------------------------------------------------------------ train/metrics.json, lora/metrics.json
class TrainingMetrics(Artifact):
    steps: StrictInt
    final_loss: Number
    tokens: StrictInt
    tokens_per_second: StrictInt
    seconds: Number
    strategy: StrictStr
    world_size: StrictInt = 1
    device: StrictStr = "cpu"  # absent in runs recorded before the cost was priced
    resumed_from_step: StrictInt = 0
    trackers: dict[str, StrictStr] | None = None  # {tracker: run id}; absent when no tracker ran


# ------------------------------------------------------------------ gate/gate.json
class Interval(Artifact):
    """A paired change (candidate minus base, or full minus LoRA) with its 95% bootstrap interval."""

    delta: Number
    low: Number
    high: Number
    n: StrictInt
    detectable: Number  # the smallest change the n items detect (80% power)


class HardRuleResult(Artifact):
    """A `min` / `max` rule: the candidate's score against a bound."""

    metric: StrictStr
    observed: Score
    base: Score
    why: StrictStr | None
    rule: StrictStr
    threshold: Number
    passed: StrictBool
    problem: StrictStr | None = None  # why it failed when the score could not be judged

    versus = read = detectable = n = ci = underpowered = allowed_because = property(lambda self: None)


class RegressionRuleResult(Artifact):
    """A `max_drop` / `max_rise` rule: the change against the base, read at one end of its interval."""

    metric: StrictStr
    observed: Score
    base: Score
    why: StrictStr | None
    rule: StrictStr
    threshold: Number
    reads: Literal["unfavourable", "favourable"]
    drop: Number | None = None  # one of drop / rise, absent when a score is missing
    rise: Number | None = None
    drop_ci: list[Number] | None = None  # absent without per-item scores
    rise_ci: list[Number] | None = None
    read: Number | None = None
    detectable: Number | None = None
    n: StrictInt | None = None
    passed: StrictBool
    underpowered: StrictStr | None = None
    allowed_because: StrictStr | None = None
    problem: StrictStr | None = None

    versus = property(lambda self: None)

    @property
    def ci(self) -> list | None:
        return self.drop_ci if self.drop_ci is not None else self.rise_ci


class VersusLoraRuleResult(Artifact):
    """Full SFT against the LoRA baseline (`versus_lora`): `base` holds LoRA's score."""

    metric: StrictStr
    rule: StrictStr
    threshold: Number
    observed: Score
    base: Score
    versus: Literal["lora"]
    against: StrictStr | None  # the LoRA checkpoint; None when there was no baseline
    reads: Literal["unfavourable"]
    why: StrictStr | None
    gain_ci: list[Number] | None = None
    gain: Number | None = None
    drop_ci: list[Number] | None = None
    drop: Number | None = None
    read: Number | None = None
    detectable: Number | None = None
    n: StrictInt | None = None
    passed: StrictBool
    problem: StrictStr | None = None

    underpowered = allowed_because = property(lambda self: None)

    @property
    def ci(self) -> list | None:
        return self.gain_ci if self.gain_ci is not None else self.drop_ci


RULE_KINDS = ("hard", "regression", "versus_lora")
UNION_TAGS = (*RULE_KINDS, "int", "float", "str", "bool")  # where pydantic names the member a value failed as


def _rule_kind(value) -> str:
    """Which result a rule is, by its keys: versus_lora rules name `versus`, regression rules `reads`."""
    if isinstance(value, BaseModel):
        return {HardRuleResult: "hard", RegressionRuleResult: "regression"}.get(type(value), "versus_lora")
    if not isinstance(value, dict):
        return "hard"  # and fails there, named
    return "versus_lora" if "versus" in value else "regression" if "reads" in value else "hard"


RuleResult = Annotated[
    Annotated[HardRuleResult, Tag("hard")]
    | Annotated[RegressionRuleResult, Tag("regression")]
    | Annotated[VersusLoraRuleResult, Tag("versus_lora")],
    Discriminator(_rule_kind),
]


class Candidate(Artifact):
    scores: dict[str, Score]
    kind: Literal["full", "lora"]
    passed: StrictBool
    full_suite: StrictBool  # False: golden only, neither passed nor chosen


class Verdict(Artifact):
    """The gate's verdict: the chosen checkpoint, its rule results and its weights' hash. `decide`
    makes the first eleven fields; the gate stage adds where the checkpoint is, the sha256 of each of
    its files, the plot and the full-vs-LoRA decision in words."""

    passed: StrictBool
    chosen: StrictStr
    kind: Literal["full", "lora"]
    sha256: StrictStr  # of the chosen weights; publish refuses any other bytes
    select_by: StrictStr
    rules: list[RuleResult] = Field(min_length=1)
    failed_rules: list[StrictStr]
    change_vs_base: dict[str, Interval]
    base: dict[str, Score]
    lora_baseline: StrictStr | None
    candidates: dict[str, Candidate]
    path: StrictStr | None = None
    files: dict[str, StrictStr] | None = None  # {file in the checkpoint: sha256}
    plot: StrictStr | None = None
    decision: StrictStr | None = None

    @model_validator(mode="after")
    def _chosen_is_a_candidate(self):
        if self.chosen not in self.candidates:
            raise ValueError(f"chosen {self.chosen!r} is not one of the candidates ({', '.join(self.candidates)})")
        return self

    @property
    def chosen_scores(self) -> dict[str, Score]:
        return self.candidates[self.chosen].scores


# ------------------------------------------------------------------ gate/decision.json
class RunCost(Artifact):
    device: StrictStr
    world_size: StrictInt
    seconds: Number
    tokens: StrictInt
    device_hours: Number
    usd: Number | None  # None: no price for the device (or a CPU run)


class Decision(Artifact):
    """Whether full SFT earned its cost over LoRA: learning against forgetting for every model, full
    minus LoRA per metric, each run's measured cost, and the verdict in words."""

    select_by: StrictStr
    forgetting: StrictStr | None
    full: StrictStr | None
    lora: StrictStr | None
    shipped: StrictStr | None
    kind: Literal["full", "lora"]
    full_minus_lora: dict[str, Interval]
    # {"model", "kind", <select_by>: score, "forgetting": score}: one key is the metric's own name
    models: list[dict[str, StrictStr | Score]]
    cost: dict[str, RunCost]
    verdict: StrictStr
    plot: StrictStr | None = None

    @model_validator(mode="after")
    def _models_have_both_axes(self):
        for i, model in enumerate(self.models):
            missing = [key for key in ("model", "kind", self.select_by, "forgetting") if key not in model]
            if missing:
                raise ValueError(f"models.{i}: missing {', '.join(missing)}")
        return self
