"""FSDP2 on CPU with 2 processes (gloo): sharding really happens and the math matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def launch(args, out: Path, expect_ok: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode == 0) == expect_ok, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
            *map(str, args)]


def test_fsdp2_two_processes_shard_and_match_single(tiny_model_dir, tmp_path):
    single_out, fsdp_out = tmp_path / "single", tmp_path / "fsdp2"
    single_out.mkdir()
    fsdp_out.mkdir()
    # the same global batch: 1 process x 2 rows x 4 micro-batches == 2 ranks x 2 rows x 2 micro-batches
    (single,) = launch([sys.executable, str(WORKER), str(tiny_model_dir), str(single_out), "single", "4"], single_out)
    ranks = launch(torchrun(tiny_model_dir, fsdp_out, "fsdp2", 2), fsdp_out)

    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:  # each rank holds about half of every tensor, not the whole model
        assert r["local_numel"] <= 0.55 * r["full_numel"], r
    assert sum(r["local_numel"] for r in ranks) >= r["full_numel"]
    assert len(single["losses"]) == len(ranks[0]["losses"]) > 3
    for a, b in zip(single["losses"], ranks[0]["losses"]):
        assert abs(a - b) < 1e-4, (single["losses"], ranks[0]["losses"])

    # rank 0 gathered the full weights into an ordinary checkpoint, equal to the single-process one
    one = load_file(single_out / "checkpoints/epoch-1/model.safetensors")
    two = load_file(fsdp_out / "checkpoints/epoch-1/model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4), key


def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(tiny_model_dir, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    unbroken.mkdir()
    broken.mkdir()
    (reference, _) = launch(torchrun(tiny_model_dir, unbroken, "fsdp2", 2, 2), unbroken)
    steps_per_epoch = len(reference["steps"]) // 2
    kill_at = steps_per_epoch + 3  # mid second epoch, one step after the last resume point
    assert kill_at % 2 == 1 and kill_at < 2 * steps_per_epoch
    assert launch(torchrun(tiny_model_dir, broken, "fsdp2", 2, 2, kill_at), broken, expect_ok=False) == []
    (resumed, _) = launch(torchrun(tiny_model_dir, broken, "fsdp2", 2, 2), broken)

    assert resumed["ran_steps"][0] == kill_at, "the second launch resumed from the last resume point"
    # every step exactly once, in order, with the same losses: nothing skipped, nothing repeated
    assert resumed["steps"] == reference["steps"] == list(range(1, 2 * steps_per_epoch + 1))
    for a, b in zip(reference["losses"], resumed["losses"]):
        assert abs(a - b) < 1e-4, (reference["losses"], resumed["losses"])
    one = load_file(unbroken / "checkpoints/epoch-2/model.safetensors")
    two = load_file(broken / "checkpoints/epoch-2/model.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4), key
