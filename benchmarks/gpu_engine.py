"""Training speed on one GPU: this repository's engine against the plain Hugging Face Trainer.

The setting of ../shared/FACTS.md's table: random-init Llama-3.2-1B shape, bf16 autocast over fp32
master weights, sequences of 2,048, an SFT-like length mix (about 350 tokens, the first 40% of each
example a prompt without loss), about 8,192 real tokens per optimizer step for both.

- engine: `pipeline.train.loop.train` on best-fit-decreasing packed rows (4 x 2048), flex attention
  over one padding-free row, each decoder layer compiled, the vocabulary projection only where a
  loss is taken, fused AdamW.
- engine-fsdp2: the same with `train.strategy: fsdp2` (fully_shard, bf16 params, fp32 reduce) as one
  rank: the code path of the multi-GPU nodes.
- trainer: `transformers.Trainer`, padding-free (DataCollatorWithFlattening, position ids reset),
  flex attention + torch_compile: the best correct plain-Trainer figure in FACTS.md (52,800 tokens/s).

Prints real tokens/s and MFU (6N FLOPs per real token, against this card's measured bf16 matmul
peak and against the 989 TFLOP/s datasheet figure) side by side, and the engine's peak memory
next to `sft plan`'s estimate for the same shape.

    python benchmarks/gpu_engine.py                 # on a GPU
    python benchmarks/gpu_engine.py --dry-run       # a tiny shape on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.plan import SHAPES, Shape, memory_per_gpu  # noqa: E402
from pipeline.prepare import IGNORE, pack_examples  # noqa: E402

TOKENS_PER_STEP = 8192
SEQ_LEN = 2048
DATASHEET_TFLOPS = 989


def matmul_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def sft_examples(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Lengths log-normal around 350 tokens (16..2048); the first 40% of each is the prompt."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.55, n), 16, SEQ_LEN).astype(int)
    examples = []
    for length in lengths:
        ids = rng.integers(3, vocab, length).tolist()
        prompt = int(0.4 * length)
        examples.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return examples


def model_config(dry_run: bool):
    from transformers import LlamaConfig

    shape = dict(SHAPES["llama-3.2-1b"])
    if dry_run:
        shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**shape, max_position_embeddings=SEQ_LEN, rope_theta=500000.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)


def small_tokenizer():
    """The loop saves a tokenizer with each checkpoint; ids here are random, so any will do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def run_engine(config, examples, device, steps: int, out: Path, strategy: str = "single") -> dict:
    from transformers import LlamaForCausalLM

    from pipeline.config import TrainConfig
    from pipeline.train.loop import train
    from pipeline.train.strategies import Runtime, close, init_runtime

    if strategy == "fsdp2":  # one process of a torchrun job: the path 8-GPU nodes take, on one card
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        runtime = init_runtime("fsdp2", device.type)
    else:
        runtime = Runtime(0, 1, device)
    torch.manual_seed(0)
    with device:  # initialise on the device: a 1B model on the host takes longer than the benchmark
        model = LlamaForCausalLM(config)
    rows_per_step = TOKENS_PER_STEP // SEQ_LEN
    packed = pack_examples(examples, SEQ_LEN, pad_id=0)
    keep = min(len(packed.input_ids), rows_per_step * steps)
    arrays = {k: getattr(packed, k)[:keep] for k in ("input_ids", "labels", "position_ids")}
    cfg = TrainConfig(lr=2e-5, warmup_ratio=0.02, weight_decay=0.1, epochs=1, micro_batch_size=rows_per_step,
                      strategy=strategy, device=device.type, compile=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(model, small_tokenizer(), arrays, cfg, out / f"engine-{strategy}", {"data_sha256": "benchmark"},
                       runtime=runtime)
    finally:
        close(runtime)
    measured = result.history[len(result.history) // 4:]  # after compilation and warm-up
    return {"tokens_per_s": sum(h["tokens_per_s"] for h in measured) / len(measured),
            "median_tokens_per_s": statistics.median(h["tokens_per_s"] for h in measured),
            "steps": len(result.history), "fill": packed.stats["fill"],
            "peak_mem_gib": result.history[-1]["peak_mem_gib"], "final_loss": result.final_loss}


def run_trainer(config, examples, device, steps: int, out: Path) -> dict:
    from transformers import DataCollatorWithFlattening, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    attention = "flex_attention" if device.type == "cuda" else "sdpa"
    model = LlamaForCausalLM._from_config(config, attn_implementation=attention)
    mean_len = sum(len(ids) for ids, _ in examples) / len(examples)
    batch = max(1, round(TOKENS_PER_STEP / mean_len))
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in examples][: batch * steps]
    collate = DataCollatorWithFlattening(return_position_ids=True)
    batch_tokens: list[int] = []

    def counting_collator(features):
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.02, weight_decay=0.1,
                             bf16=device.type == "cuda", torch_compile=device.type == "cuda", save_strategy="no",
                             logging_steps=10, report_to=[], dataloader_num_workers=0, use_cpu=device.type != "cuda",
                             remove_unused_columns=False, disable_tqdm=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator,
            callbacks=[StepTimes()]).train()
    first = len(stamps) // 4
    # batch i's tokens are consumed by step i (the collator runs just before its step)
    tokens = sum(batch_tokens[first + 1:len(stamps)])
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {"tokens_per_s": tokens / (stamps[-1] - stamps[first]), "steps": len(stamps), "batch": batch,
            "peak_mem_gib": round(peak, 2) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on CPU: check the script end to end")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--only", default=None, help="comma-separated: engine, engine-fsdp2, trainer")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    steps = args.steps or (8 if args.dry_run else 40)
    config = model_config(args.dry_run)
    params = Shape.from_config(config.to_dict()).params
    examples = sft_examples(40 * steps, config.vocab_size)
    peak = matmul_peak_tflops(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{card} | torch {torch.__version__} | {params / 1e9:.3f}B parameters | bf16 matmul peak "
          f"{peak and round(peak)} TFLOP/s", flush=True)

    results = {}
    runs = {"engine": run_engine, "engine-fsdp2": lambda *a: run_engine(*a, strategy="fsdp2"), "trainer": run_trainer}
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None  # checkpoints of a 1B model: keep them off disk
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for name, run in runs.items():
            if args.only and name not in args.only.split(","):
                continue
            started = time.perf_counter()
            try:
                results[name] = run(config, examples, device, steps, Path(tmp))
            except Exception as err:  # one failing side must not hide the other's figure
                traceback.print_exc()
                results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(results[name]), flush=True)

    plan = memory_per_gpu(Shape.from_config(config.to_dict()), "single", 1, TOKENS_PER_STEP, checkpointing=False)
    print("\n| run | real tokens/s | MFU (measured peak) | MFU (989 TFLOP/s) | peak memory GiB | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:120]} | | | | {r['seconds']} |")
            continue
        flops = 6 * params * r["tokens_per_s"] / 1e12
        mfu = f"{flops / peak:.1%}" if peak else "-"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {flops / DATASHEET_TFLOPS:.1%} | "
              f"{r['peak_mem_gib']} | {r['seconds']} |")
    if "engine" in results and "error" not in results["engine"] and "error" not in results.get("trainer", {"error": 1}):
        print(f"\nengine / trainer: {results['engine']['tokens_per_s'] / results['trainer']['tokens_per_s']:.2f}x")
    print(f"sft plan (single, 1 GPU, {TOKENS_PER_STEP} tokens, no checkpointing): {plan['total']:.1f} GiB "
          f"estimated; engine measured {results.get('engine', {}).get('peak_mem_gib')} GiB")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "matmul_peak_tflops": peak,
                                         "params": params, "results": results, "plan_gib": plan}, indent=2))


if __name__ == "__main__":
    main()
