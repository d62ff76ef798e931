"""The family matrix on the GPU path: for every supported family (pipeline/families.py), a tiny
model's packed rows through the engine as training runs them on a GPU (one padding-free row,
flex attention with the engine's masks, each decoder layer compiled, the fused loss head), against
the model's own forward(labels=...) on each example alone (its own attention implementation):
the loss and every gradient, in fp32 (tight) and under bf16 autocast (as training computes).

    python benchmarks/gpu_families.py [--only gemma2,qwen3_moe] [--json out.json]
    python benchmarks/gpu_families.py --dry-run   # CPU: the dense path, fp32 (what tests prove)

Prints one table row per family and precision: relative loss error, the worst parameter's relative
gradient error (norm of the difference over the norm of the gradient) and the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train.batches import loss_targets  # noqa: E402
from pipeline.train.loop import token_loss_sum  # noqa: E402
from pipeline.train.loss import fuse_loss_head  # noqa: E402
from tests.family_models import FAMILIES, examples, pack, tiny_model  # noqa: E402

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # relative; bf16 differs from bf16 by its own rounding


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def own(model, parts, device, dtype):
    total = torch.zeros((), device=device)
    for ids, labels in parts:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids[None].to(device), labels=labels[None].to(device), use_cache=False)
        total = total + out.loss.float() * int((labels[1:] != -100).sum())
    total.backward()
    return total.item(), gradients(model)


def engine(model, batch, device, dtype, flatten: bool):
    input_ids, labels, position_ids = batch
    head = fuse_loss_head(model)
    positions, targets = loss_targets(labels, position_ids)
    moved = [t.to(device) for t in (input_ids, position_ids, positions, targets)]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = token_loss_sum(model, model, head, *moved, flatten=flatten)
    loss.backward()
    return loss.item(), gradients(model)


def compare(model_type: str, device: torch.device, precision: str, dry_run: bool) -> dict:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    parts = examples(lengths=(137, 93, 212, 60), prompts=(40, 8, 100, 6))
    batch = pack([[parts[0], parts[1]], [parts[2], parts[3]]], width=288)
    model = tiny_model(model_type).to(device).train()
    own_loss, own_grads = own(model, parts, device, dtype)
    flatten = not dry_run
    if flatten:
        model.set_attn_implementation("flex_attention")
        for layer in model.model.layers:
            layer.compile()
    started = time.perf_counter()
    loss, grads = engine(model, batch, device, dtype, flatten)
    seconds = time.perf_counter() - started
    worst_name, worst = max(
        ((name, float((grads[name] - g).norm() / g.norm().clamp(min=1e-12))) for name, g in own_grads.items()),
        key=lambda item: item[1],
    )
    loss_error = abs(loss - own_loss) / abs(own_loss)
    missing = sorted(set(own_grads) ^ set(grads))
    ok = loss_error <= TOLERANCE[precision] and worst <= TOLERANCE[precision] and not missing
    return {
        "family": model_type,
        "precision": precision,
        "path": "flex + compile" if flatten else "dense",
        "loss_rel_error": loss_error,
        "worst_grad_rel_error": worst,
        "worst_param": worst_name,
        "missing_grads": missing,
        "engine_seconds": round(seconds, 2),
        "ok": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="CPU, dense path, fp32 only")
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    families = args.only.split(",") if args.only else sorted(FAMILIES)
    precisions = ["fp32"] if args.dry_run else ["fp32", "bf16"]
    rows = []
    print("| family | precision | path | loss rel. error | worst grad rel. error (param) | engine s | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_type in families:
        for precision in precisions:
            try:
                row = compare(model_type, device, precision, args.dry_run)
                print(
                    f"| {model_type} | {precision} | {row['path']} | {row['loss_rel_error']:.2e} | "
                    f"{row['worst_grad_rel_error']:.2e} ({row['worst_param']}) | {row['engine_seconds']} | "
                    f"{'ok' if row['ok'] else 'DIFFERS'} |",
                    flush=True,
                )
            except Exception as err:  # one family's failure must not hide the others' figures
                row = {"family": model_type, "precision": precision, "ok": False, "error": repr(err)[:300]}
                print(f"| {model_type} | {precision} | error | {row['error']} | | | FAILED |", flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
