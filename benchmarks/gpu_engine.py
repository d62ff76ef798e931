"""Training speed on one GPU: this repository's engine against the plain Hugging Face Trainer, and
each of the engine's levers measured on its own.

The setting of ../shared/FACTS.md's table: random-init Llama-3.2-1B shape, bf16 autocast over fp32
master weights, sequences of 2,048, an SFT-like length mix (about 350 tokens, the first 40% of each
example a prompt without loss), about 8,192 real tokens per optimizer step for both.

Runs, in one table (engine and Trainer in the same process, on the same card):
- engine: `pipeline.train.loop.train` on best-fit-decreasing packed rows, flex attention over one
  padding-free row with the document mask built once per micro-batch, each decoder layer
  compiled, the output layer fused with the loss on the supervised rows only, clipping folded
  into fused AdamW, losses read back every 10 steps.
- engine (host sync every step): the same with `log_every_steps: 1`.
- engine (32k tokens a step): the same at 32,768 tokens per step.
- engine (fsdp2 as one rank): `train.strategy: fsdp2` on one GPU (routed to the single path).
- trainer: `transformers.Trainer`, padding-free (DataCollatorWithFlattening, position ids reset),
  flex attention + torch_compile: the best correct plain-Trainer figure in FACTS.md.
Each with two MFU figures against the card's measured bf16 matmul peak: 6N per real token, and
the FLOPs actually executed (6 per body parameter per token, the head only on the rows it
projects, causal attention within each example).

Levers on their own (time per call, peak memory), at this shape:
- loss tail: eager head + fp32 cross-entropy against the fused chunked head (train/loss.py);
- clipping: clip_grad_norm_ then fused AdamW against the clip folded into fused AdamW;
- attention mask: transformers' own from packed position ids against the engine's `flex_masks`.

`--shape llama-3.1-8b` runs the engine alone with what `sft plan` picks for one GPU of this card
(single with activation checkpointing where it fits, else zero3_offload: needs deepspeed), beside
the plan's memory figure.

    python benchmarks/gpu_engine.py                         # on a GPU
    python benchmarks/gpu_engine.py --shape llama-3.1-8b    # the 8B row
    python benchmarks/gpu_engine.py --dry-run               # a tiny shape on CPU, to check the script
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

from pipeline.plan import GPUS, SHAPES, Shape, memory_per_gpu  # noqa: E402
from pipeline.prepare import IGNORE, pack_examples  # noqa: E402
from pipeline.train.metrics import PEAK_BF16_FLOPS, StepFlops  # noqa: E402

TOKENS_PER_STEP = 8192
SEQ_LEN = 2048


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    synchronize(device)
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


def model_config(shape_name: str, dry_run: bool):
    from transformers import LlamaConfig

    shape = dict(SHAPES[shape_name])
    if dry_run:
        shape.update(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return LlamaConfig(
        **shape, max_position_embeddings=SEQ_LEN, rope_theta=500000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )


def small_tokenizer():
    """The loop saves a tokenizer with each checkpoint; ids here are random, so any will do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def card_peak_flops(device: torch.device) -> float | None:
    """The datasheet peak the loop's own MFU fields are computed against (pipeline/train/loop.py)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def run_engine(
    config,
    examples,
    device,
    steps: int,
    out: Path,
    strategy: str = "single",
    tokens_per_step: int = TOKENS_PER_STEP,
    log_every_steps: int = 10,
    checkpointing: bool = False,
) -> dict:
    from transformers import LlamaForCausalLM

    from pipeline.config import TrainConfig
    from pipeline.dist import Runtime, Strategy, close, init_runtime
    from pipeline.train.loop import train
    from pipeline.train.strategies import deepspeed_config

    rows_per_step = tokens_per_step // SEQ_LEN
    cfg = TrainConfig(
        lr=2e-5,
        warmup_ratio=0.02,
        weight_decay=0.1,
        epochs=1,
        micro_batch_size=rows_per_step,
        strategy=strategy,
        device=device.type,
        compile=device.type == "cuda",
        activation_checkpointing=checkpointing,
        log_every_steps=log_every_steps,
    )
    if Strategy.of(strategy).sharded:  # one process of a torchrun job: the path multi-GPU nodes take, on one card
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
        )
        runtime = init_runtime(Strategy.of(strategy), device.type)
    else:
        runtime = Runtime(0, 1, device)
    torch.manual_seed(0)
    if Strategy.of(strategy).deepspeed:  # partitioned (and offloaded) as it is created, as load_model does
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()
        zero_init = HfDeepSpeedConfig(deepspeed_config(cfg, runtime))  # noqa: F841 (held while the model is built)
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    else:
        with runtime.device:  # initialise on the device: a 1B model on the host takes longer than the benchmark
            model = LlamaForCausalLM(config)
    packed = pack_examples(examples, SEQ_LEN, pad_id=0)
    keep = min(len(packed.input_ids), rows_per_step * steps)
    arrays = {k: getattr(packed, k)[:keep] for k in ("input_ids", "labels", "position_ids")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(
            model,
            small_tokenizer(),
            arrays,
            cfg,
            out / f"engine-{strategy}",
            {"data_sha256": "benchmark"},
            runtime=runtime,
        )
    finally:
        close(runtime)
        if Strategy.of(strategy).sharded:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    measured = result.history[len(result.history) // 4 :]  # after compilation and warm-up

    def mean(key):
        return statistics.fmean(h[key] for h in measured) if measured[0].get(key) is not None else None

    peak = card_peak_flops(device)
    return {
        "tokens_per_s": mean("tokens_per_s"),
        "steps": len(result.history),
        "fill": packed.stats["fill"],
        # the loop's MFU fields are against the datasheet peak: back to FLOP/s
        "tflops_nominal": mean("mfu") * peak / 1e12 if peak else None,
        "tflops_executed": mean("mfu_executed") * peak / 1e12 if peak else None,
        "peak_mem_gib": max(h["peak_mem_gib"] for h in result.history),
        "final_loss": result.final_loss,
    }


def run_trainer(config, examples, device, steps: int, out: Path) -> dict:
    from transformers import DataCollatorWithFlattening, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    attention = "flex_attention" if device.type == "cuda" else "sdpa"
    model = LlamaForCausalLM._from_config(config, attn_implementation=attention)
    mean_len = sum(len(ids) for ids, _ in examples) / len(examples)
    batch = max(1, round(TOKENS_PER_STEP / mean_len))
    used = examples[: batch * steps]
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in used]
    collate = DataCollatorWithFlattening(return_position_ids=True)
    batch_tokens: list[int] = []

    def counting_collator(features):
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.02,
        weight_decay=0.1,
        bf16=device.type == "cuda",
        torch_compile=device.type == "cuda",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=device.type != "cuda",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=counting_collator, callbacks=[StepTimes()]
    ).train()
    first = len(stamps) // 4
    # batch i's tokens are consumed by step i (the collator runs just before its step)
    tokens = sum(batch_tokens[first + 1 : len(stamps)])
    tokens_per_s = tokens / (stamps[-1] - stamps[first])
    # executed FLOPs: the Trainer projects every row onto the vocabulary; attention within each example
    flops = StepFlops.of(config, Shape.from_config(config.to_dict()).params)
    keys_per_token = sum(len(ids) * (len(ids) + 1) / 2 for ids, _ in used) / sum(len(ids) for ids, _ in used)
    executed = flops.executed(tokens_per_s, tokens_per_s, keys_per_token * tokens_per_s)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {
        "tokens_per_s": tokens_per_s,
        "steps": len(stamps),
        "batch": batch,
        "tflops_nominal": flops.nominal(tokens_per_s) / 1e12,
        "tflops_executed": executed / 1e12,
        "peak_mem_gib": round(peak, 2) if peak else None,
    }


def timed(device: torch.device, fn, repeats: int = 10) -> tuple[float, float | None]:
    """(milliseconds per call, peak GiB allocated during the calls) after two warm-up calls."""
    for _ in range(2):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = (torch.cuda.max_memory_allocated(device) - base) / 1024**3 if device.type == "cuda" else None
    return seconds * 1e3, peak


def tail_rows(config, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """The loss tail on the supervised 60% of a step's tokens: eager against fused."""
    import torch.nn.functional as F

    from pipeline.train.loss import LinearCrossEntropy

    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    supervised = int(0.6 * TOKENS_PER_STEP)
    hidden = torch.randn(supervised, config.hidden_size, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.hidden_size, device=device) * 0.02)
    targets = torch.randint(0, config.vocab_size, (supervised,), device=device)

    def eager():
        with autocast:
            logits = hidden @ weight.T
        F.cross_entropy(logits.float(), targets, reduction="sum").backward()

    def fused():
        with autocast:
            loss = LinearCrossEntropy.apply(hidden, weight, targets, dtype)
        loss.backward()

    return [
        ("loss tail", "eager head + fp32 cross-entropy", *timed(device, eager)),
        ("loss tail", "fused chunked head (train/loss.py)", *timed(device, fused)),
    ]


def clip_rows(config, device: torch.device) -> list[tuple]:
    """One optimizer step over the whole model: clip then step, against the clip folded in."""
    from transformers import LlamaForCausalLM

    from pipeline.train.strategies import param_groups

    with device:
        model = LlamaForCausalLM(config)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=2e-5, betas=(0.9, 0.95), fused=True)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def folded():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.grad_scale = ((norm + 1e-6) / 1.0).clamp(min=1.0).float()
        optimizer.step()
        optimizer.grad_scale = None

    return [
        ("clipping", "clip_grad_norm_, then fused AdamW", *timed(device, clip_then_step)),
        ("clipping", "folded into fused AdamW (grad_scale)", *timed(device, folded)),
    ]


def mask_rows(config, device: torch.device, dtype: torch.dtype, examples) -> list[tuple]:
    """The attention mask of one packed micro-batch: transformers' own against `flex_masks`."""
    from transformers.masking_utils import create_causal_mask

    from pipeline.train.attention import flex_masks

    lengths = [len(ids) for ids, _ in examples]
    cut = int(np.searchsorted(np.cumsum(lengths), TOKENS_PER_STEP))
    position_ids = torch.cat([torch.arange(n) for n in lengths[:cut]])[None].to(device)
    embeds = torch.empty(1, position_ids.shape[1], config.hidden_size, device=device, dtype=dtype)
    config = config.__class__(**config.to_dict())
    config._attn_implementation = "flex_attention" if device.type == "cuda" else "sdpa"

    def transformers_mask():
        return create_causal_mask(
            config=config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids
        )

    return [
        (
            "attention mask",
            f"transformers, from position ids ({config._attn_implementation})",
            *timed(device, transformers_mask),
        ),
        (
            "attention mask",
            "flex_masks, once per micro-batch (flex)",
            *timed(device, lambda: flex_masks(config, position_ids, device)),
        ),
    ]


def lever_rows(config, device: torch.device, examples) -> list[tuple]:
    """Each lever on its own: (lever, variant, ms per call, peak GiB above what was allocated before)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return tail_rows(config, device, dtype) + clip_rows(config, device) + mask_rows(config, device, dtype, examples)


def plan_pick(shape: Shape, card: str) -> tuple[str, bool, float]:
    """What `sft plan` picks for one GPU of this card: (strategy, checkpointing, planned GiB)."""
    gpu = next((name for name in GPUS if name.split("-")[0] in card), "H200-141GB")
    for strategy, checkpointing in (("single", False), ("single", True), ("zero3_offload", True)):
        need = memory_per_gpu(shape, strategy, 1, TOKENS_PER_STEP, checkpointing, supervised_share=0.6)["total"]
        if need <= 0.9 * GPUS[gpu]:
            return strategy, checkpointing, need
    return "zero3_offload", True, need


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on CPU: check the script end to end")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument(
        "--only", default=None, help="comma-separated run names (the table's first column), and `levers`"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    steps = args.steps or (8 if args.dry_run else 40)
    config = model_config(args.shape, args.dry_run)
    shape = Shape.from_config(config.to_dict())
    examples = sft_examples(160 * steps, config.vocab_size)
    matmul_peak = matmul_peak_tflops(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"{card} | torch {torch.__version__} | {args.shape}, {shape.params / 1e9:.3f}B parameters | "
        f"bf16 matmul peak {matmul_peak and round(matmul_peak)} TFLOP/s",
        flush=True,
    )

    if args.shape == "llama-3.2-1b":
        runs = {
            "engine": lambda *a: run_engine(*a),
            "engine (host sync every step)": lambda *a: run_engine(*a, log_every_steps=1),
            "engine (32k tokens a step)": lambda *a: run_engine(*a, tokens_per_step=4 * TOKENS_PER_STEP),
            "engine (fsdp2 as one rank)": lambda *a: run_engine(*a, strategy="fsdp2"),
            "trainer": run_trainer,
        }
        pick = None
    else:  # the plan's configuration for one GPU of this card
        pick = plan_pick(shape, card)
        strategy, checkpointing, _ = pick
        runs = {
            f"engine ({strategy}{' + checkpointing' if checkpointing else ''})": lambda *a: run_engine(
                *a, strategy=strategy, checkpointing=checkpointing
            )
        }
    results, levers = {}, []
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
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if pick is None and (not args.only or "levers" in args.only.split(",")):
        try:
            levers = lever_rows(config, device, examples)
        except Exception as err:
            traceback.print_exc()
            levers = [("levers", f"failed: {type(err).__name__}: {str(err)[:200]}", float("nan"), None)]

    def mfu(tflops):
        return f"{tflops / matmul_peak:.1%}" if tflops and matmul_peak else "-"

    print("\n| run | real tokens/s | MFU, 6N | MFU, executed FLOPs | peak memory GiB | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:120]} | | | | {r['seconds']} |")
            continue
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {mfu(r['tflops_nominal'])} | {mfu(r['tflops_executed'])} | "
            f"{r['peak_mem_gib']} | {r['seconds']} |"
        )
    engine, trainer = results.get("engine", {}), results.get("trainer", {})
    if "tokens_per_s" in engine and "tokens_per_s" in trainer:
        print(f"\nengine / trainer: {engine['tokens_per_s'] / trainer['tokens_per_s']:.2f}x real tokens/s")
    if levers:
        print("\n| lever | variant | ms per call | peak GiB |")
        print("| --- | --- | ---: | ---: |")
        for lever, variant, ms, gib in levers:
            print(f"| {lever} | {variant} | {ms:.2f} | {'-' if gib is None else f'{gib:.2f}'} |")
    if pick:
        strategy, checkpointing, planned = pick
    else:
        strategy, checkpointing = "single", False
        planned = memory_per_gpu(shape, "single", 1, TOKENS_PER_STEP, False, supervised_share=0.6)["total"]
    measured = next((r.get("peak_mem_gib") for r in results.values() if "peak_mem_gib" in r), None)
    print(
        f"\nsft plan ({strategy}{' + checkpointing' if checkpointing else ''}, 1 GPU, {TOKENS_PER_STEP} tokens, "
        f"60% supervised): {planned:.1f} GiB; engine measured {measured} GiB"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "card": card,
                    "torch": torch.__version__,
                    "shape": args.shape,
                    "matmul_peak_tflops": matmul_peak,
                    "params": shape.params,
                    "results": results,
                    "levers": levers,
                    "plan_gib": planned,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
