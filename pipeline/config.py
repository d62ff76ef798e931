"""The one schema for params.yaml.

Every stage reads its section through `load_params`. Unknown keys are errors (a typo must not
silently become a default), and the method's hyperparameter ranges are enforced unless a run
says, in params.yaml, that it knowingly leaves them (`train.override_method_ranges`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoBase(Section):
    """The embedded default: a tiny Llama built and pretrained locally (see pipeline/demo.py)."""

    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    pretrain_steps: int = Field(600, ge=0)
    pretrain_batch_size: int = Field(32, ge=1)
    pretrain_seq_len: int = Field(64, ge=16)
    pretrain_lr: float = Field(3e-3, gt=0)
    seed: int = 0


class BaseConfig(Section):
    source: Literal["demo", "hub"] = "demo"
    # production: a Hub id pinned to a revision (a commit sha), e.g. meta-llama/Llama-3.1-8B
    model: str = "demo/tiny-llama"
    revision: str | None = None
    demo: DemoBase = DemoBase()

    @model_validator(mode="after")
    def _hub_needs_revision(self):
        if self.source == "hub" and not self.revision:
            raise ValueError("base.revision: a hub base model must be pinned to a revision (commit sha)")
        return self


class DataConfig(Section):
    # JSONL or Parquet, (prompt, response) pairs or chat `messages` (see pipeline/data.py);
    # evaluation data is named by the lm-eval task YAMLs under evals/tasks, not here
    train: str = "data/train.jsonl"
    replay: str | None = "data/replay.jsonl"


class ValidateConfig(Section):
    min_rows: int = Field(10_000, ge=1)
    max_rows: int = Field(10_000_000, ge=1)
    min_chars: int = Field(1, ge=1)
    max_prompt_chars: int = Field(8_000, ge=1)
    max_response_chars: int = Field(16_000, ge=1)
    eval_sets: list[str] = ["data/golden.jsonl"]  # no training prompt may appear in these
    leak_ngram: int = Field(13, ge=3)  # a shared word n-gram of this length counts as a leak
    max_pii_share: float = Field(0.0, ge=0, le=1)  # e-mails, card and phone numbers
    # national phone formats checked besides international ones (+CC, any region), as ISO 3166 codes
    # (e.g. [US, GB]); off by default: in a national format many plain 10-digit numbers (order and
    # invoice numbers) are valid phone numbers
    phone_regions: list[str] = []
    max_secret_share: float = Field(0.0, ge=0, le=1)  # credentials detect-secrets recognises
    # fuzzy near-duplicates (MinHash LSH over word 3-grams of the normalised pair); null: off
    near_duplicate_jaccard: float | None = Field(0.8, gt=0, le=1)
    max_fuzzy_duplicate_share: float = Field(0.0, ge=0, le=1)
    max_boilerplate_share: float = Field(0.01, ge=0, le=1)  # "As an AI model...", stock refusals
    min_rows_per_source: int = Field(100, ge=1)  # when the data has a `source` field: no source too thin to learn
    # share of examples that fit prepare.max_seq_len tokens after the chat template (the rest is truncated)
    min_fit_share: float = Field(0.99, ge=0, le=1)
    # the average share of an example's tokens that carries loss (the assistant turns and their
    # end-of-turn tokens, after truncation): below the floor, training pays for prompts and template
    # and learns from almost nothing; the ceiling (1.0: off) catches prompts that are all but empty
    min_supervised_share: float = Field(0.02, ge=0, le=1)
    max_supervised_share: float = Field(1.0, ge=0, le=1)
    # the method: general replay makes 10-20% of the mixed training set (checked when prepare mixes replay)
    min_replay_share: float = Field(0.10, ge=0, le=1)
    max_replay_share: float = Field(0.20, ge=0, le=1)

    @model_validator(mode="after")
    def _replay_band(self):
        if self.min_replay_share > self.max_replay_share:
            raise ValueError(
                f"min_replay_share ({self.min_replay_share}) is above max_replay_share ({self.max_replay_share})"
            )
        if self.min_supervised_share > self.max_supervised_share:
            raise ValueError(
                f"min_supervised_share ({self.min_supervised_share}) is above "
                f"max_supervised_share ({self.max_supervised_share})"
            )
        return self


class PrepareConfig(Section):
    max_seq_len: int = Field(2048, ge=16)
    replay_share: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = 0
    # true: whole examples packed into rows of max_seq_len, each row filled as full as possible;
    # false: one example a row, rows sorted by length within seeded shuffled chunks of bucket_rows
    # (a few batches), so a batch trimmed to its longest row carries little padding
    pack: bool = True
    bucket_rows: int = Field(256, ge=1)
    # extra chat-template variables, the same for prepare, the contract and lm-eval's prompts
    # (e.g. Qwen3: {enable_thinking: false}); see pipeline/prepare.py TemplateOptions
    chat_template_kwargs: dict[str, Any] = {}
    # an assistant turn the template renders differently once later turns follow (Qwen3, gpt-oss drop
    # earlier reasoning): own_example trains it alone with the history the model sees at inference;
    # context_only keeps it as context without loss; refuse stops with the row
    history_turns: Literal["own_example", "context_only", "refuse"] = "own_example"


class TrainConfig(Section):
    # the method's ranges; a run outside them must say so with override_method_ranges
    lr: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.02, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    epochs: int = Field(2, ge=1)
    override_method_ranges: bool = False

    micro_batch_size: int = Field(8, ge=1)  # packed sequences per forward pass
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # mixture-of-experts bases: weight of the router's load-balancing loss (over real tokens), logged
    # per step as router_aux_loss; None takes the model's own router_aux_loss_coef, 0 turns it off
    router_aux_loss_coef: float | None = Field(None, ge=0)
    keep_last: int = Field(3, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)  # extra resume points inside an epoch (preemption)
    # how often the loop reads losses back from the GPU (every step still gets its record): each read
    # waits for the device, so reading every step leaves it idle while the host catches up
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    # fsdp2, zero3, zero3_offload: under torchrun, see train/strategies.py
    strategy: Literal["single", "fsdp2", "zero3", "zero3_offload"] = "single"
    activation_checkpointing: bool = False  # recompute each layer's activations in backward: less memory
    compile: bool = True  # torch.compile each decoder layer (GPU only)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # how long ranks wait in one collective before the job fails, e.g. while rank 0 writes an export
    collective_timeout_minutes: int = Field(60, ge=1)
    # epoch checkpoints (and so card/ and the Hub) in bf16, sharded as transformers shards large models
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    export_shard_size: str = "5GB"
    # experiment trackers beside DVCLive, each an extra configured by its own environment variables
    # (pipeline/trackers.py): parameters, per-step metrics, the eval table, MLflow's model registry.
    # Left out of model_dump: where a run is followed is not part of its math (resume fingerprint)
    trackers: list[Literal["mlflow", "wandb"]] = Field(default_factory=list, exclude=True)

    METHOD_RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "lr": (1e-5, 5e-5),
        "warmup_ratio": (0.01, 0.03),
        "weight_decay": (0.05, 0.1),
        "epochs": (1, 3),
    }

    @model_validator(mode="after")
    def _method_ranges(self):
        if self.override_method_ranges:
            return self
        for name, (low, high) in self.METHOD_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(
                    f"train.{name} = {value} is outside the method's range [{low}, {high}]; "
                    f"use a value in range, or set train.override_method_ranges: true and say why"
                )
        return self


class LoraConfig(Section):
    """The LoRA baseline (`sft lora`): adapters on every linear layer of the same base, trained on
    the same prepared data with train's epochs, batch, schedule and strategy, at LoRA's own LR. Full
    SFT ships only where it beats this (evals/gate.yaml `versus_lora`)."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)  # the update is scaled by alpha / rank
    dora: bool = True  # weight-decomposed LoRA: a learned magnitude per output row
    dropout: float = Field(0.0, ge=0, lt=1)
    # LoRA wants about 10x full SFT's learning rate; out of range only with override_method_ranges
    lr: float = Field(2e-4, gt=0)
    override_method_ranges: bool = False

    METHOD_RANGES: ClassVar[dict[str, tuple[float, float]]] = {"lr": (1e-4, 5e-4)}

    @model_validator(mode="after")
    def _method_ranges(self):
        low, high = self.METHOD_RANGES["lr"]
        if not self.override_method_ranges and not low <= self.lr <= high:
            raise ValueError(
                f"lora.lr = {self.lr} is outside LoRA's range [{low}, {high}] (about 10x full SFT's); "
                "use a value in range, or set lora.override_method_ranges: true and say why"
            )
        return self

    def training(self, train: TrainConfig) -> TrainConfig:
        """train's settings with LoRA's learning rate: the same data, epochs, batch and schedule. Where
        full SFT runs under ZeRO-3, the baseline runs under fsdp2 on the same GPUs: peft's adapters are
        not trained under ZeRO-3 here, and with the base frozen fsdp2 needs far less memory."""
        strategy = "fsdp2" if train.strategy in ("zero3", "zero3_offload") else train.strategy
        return train.model_copy(update={"lr": self.lr, "strategy": strategy})


class MetricSpec(Section):
    task: str  # an lm-eval task name (from evaluate.include_path or the lm-eval registry)
    metric: str  # one of that task's metrics, e.g. exact_match, acc
    chat: bool = False  # render prompts through the chat template (as training did)


class EvaluateConfig(Section):
    include_path: str = "evals/tasks"
    # the full suite: run on the base model and on the chosen checkpoint before any push
    metrics: dict[str, MetricSpec] = {
        "golden": MetricSpec(task="sft_golden", metric="exact_match", chat=True),
        "general": MetricSpec(task="sft_general", metric="acc"),
    }
    per_checkpoint: list[str] = ["golden"]  # the metrics run on every kept checkpoint
    batch_size: int = Field(64, ge=1)
    max_gen_toks: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)  # items per task; None = all
    # base-model results are kept here, keyed by the base weights' sha256 and the suite's files,
    # so each base is evaluated once (CI can keep the folder between runs); None: no cache
    base_cache: str | None = "~/.cache/sft-pipeline/base-evals"

    @model_validator(mode="after")
    def _golden_named(self):
        if "golden" not in self.metrics:
            raise ValueError("evaluate.metrics must name a 'golden' metric (it picks the checkpoint)")
        unknown = sorted(set(self.per_checkpoint) - set(self.metrics))
        if unknown:
            raise ValueError(f"evaluate.per_checkpoint names {unknown}, which evaluate.metrics does not define")
        return self


class GateConfig(Section):
    policy: str = "evals/gate.yaml"


class PlanConfig(Section):
    """Inputs of `sft plan`, the GPU memory and cost estimate posted on pull requests."""

    model: str | None = None  # a shape from pipeline/plan.py (e.g. llama-3.1-8b); None: base/config.json
    gpus_per_node: int = Field(8, ge=1)
    mfu: float = Field(0.4, gt=0, le=1)  # model FLOPs utilisation assumed for the hours
    prices: dict[str, float] = {"H100-80GB": 3.0, "H200-141GB": 4.0}  # USD per GPU-hour


class CardConfig(Section):
    repo_id: str = "your-org/your-model-sft"
    license: str = "apache-2.0"
    language: str = "en"


class Params(Section):
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    card: CardConfig = CardConfig()
    plan: PlanConfig = PlanConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ConfigError(ValueError):
    """params.yaml is malformed; the message names the file and the field."""


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {field}: {msg}" if field else f"{source}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))
