"""Where each stage reads and writes: the one place that knows the folders dvc.yaml declares.

A stage takes a `Paths` and reads the files of the stages before it from there; `sft <stage>`
options override single folders (`--out`), and tests point a whole `Paths` at a scratch root.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    tokenizer: Path = Path("tokenizer")  # the base's small files: tokenizer, chat template, config.json
    base: Path = Path("base")  # the base model's weights and meta.json
    validate: Path = Path("validate")  # contract.json, contract.md, data-docs/
    prepare: Path = Path("prepare")  # packed.npz, stats.json
    train: Path = Path("train")  # checkpoints/, state/, live/, metrics.json
    lora: Path = Path("lora")  # the same layout as train/
    evaluate: Path = Path("evaluate")  # <run>.json and <run>-items.json
    gate: Path = Path("gate")  # gate.json, gate.md, decision.json and the plots
    card: Path = Path("card")  # the publishable folder
    release: Path = Path("release")  # manifest.json, attestation.json and its signature
    plan: Path = Path("plan")
    data_report: Path = Path("data-report")

    def under(self, root: Path) -> Paths:
        """Every folder below `root` (a scratch project, a test's tmp_path)."""
        return replace(self, **{name: Path(root) / getattr(self, name) for name in self.__dataclass_fields__})

    def with_(self, **folders: Path | None) -> Paths:
        """These folders replaced where given (a command's options); None keeps the default."""
        return replace(self, **{name: Path(value) for name, value in folders.items() if value is not None})

    @property
    def contract(self) -> Path:
        return self.validate / "contract.json"

    @property
    def packed(self) -> Path:
        return self.prepare / "packed.npz"

    @property
    def prepare_stats(self) -> Path:
        return self.prepare / "stats.json"

    def checkpoints(self, run: str = "train") -> Path:
        return getattr(self, run) / "checkpoints"

    def metrics(self, run: str = "train") -> Path:
        return getattr(self, run) / "metrics.json"

    @property
    def verdict(self) -> Path:
        return self.gate / "gate.json"

    @property
    def manifest(self) -> Path:
        return self.release / "manifest.json"


PATHS = Paths()
