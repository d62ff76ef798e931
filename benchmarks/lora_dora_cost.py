"""What DoRA costs on the demo model: the same LoRA run (configs/demo.yaml) on an eighth of the
prepared data, with and without DoRA, wall and CPU seconds and the final loss. Needs the demo's
`base/` and `prepare/` (`make demo`). Run on an idle machine: `python benchmarks/lora_dora_cost.py`."""

import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from pipeline.config import load_params
from pipeline.dist import Strategy, init_runtime
from pipeline.lora import add_adapters, training_hooks
from pipeline.train.loop import train
from pipeline.train.strategies import load_model


def main() -> None:
    p = load_params("configs/demo.yaml")
    packed = dict(np.load("prepare/packed.npz"))
    rows = len(next(iter(packed.values())))
    packed = {name: column[: rows // 8] for name, column in packed.items()}
    tokenizer = AutoTokenizer.from_pretrained("base")
    print("| DoRA | steps | wall s | CPU s | final loss |\n| --- | ---: | ---: | ---: | ---: |")
    for dora in (True, False):
        cfg = p.lora.training(p.train).model_copy(update={"epochs": 1})
        adapters = p.lora.model_copy(update={"dora": dora})
        runtime = init_runtime(Strategy.of("single"), "cpu")
        model, weights = load_model(Path("base"), cfg, runtime)
        model = add_adapters(model, adapters)
        out = Path(tempfile.mkdtemp())
        wall, cpu = time.perf_counter(), time.process_time()
        result = train(
            model,
            tokenizer,
            packed,
            cfg,
            out / "checkpoints",
            {"adapters": adapters.model_dump()},
            lambda record, total: None,
            runtime,
            state_dir=out / "state",
            weights=weights,
            **training_hooks(model),
        )
        print(
            f"| {dora} | {result.steps} | {time.perf_counter() - wall:.1f} | {time.process_time() - cpu:.1f} | "
            f"{result.final_loss:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
