"""FSDP2 and DeepSpeed ZeRO-3 on CPU with 2 processes (gloo): sharding really happens and the math
matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # the same global batch as 2 ranks x 2 rows x 2 micro-batches: 1 process x 2 rows x 4 micro-batches
    (single,) = launch([sys.executable, str(WORKER), str(tiny_model_dir), str(out), "single", "4"], out)
    return single, out


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3", "zero3_offload"])
def test_two_processes_shard_and_match_single(strategy, single_run, tiny_model_dir, tmp_path):
    if strategy.startswith("zero3"):
        pytest.importorskip("deepspeed")
    single, single_out = single_run
    ranks = launch(torchrun(tiny_model_dir, tmp_path, strategy, 2), tmp_path)

    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:  # each rank holds about half of every tensor, not the whole model
        assert r["local_numel"] <= 0.55 * r["full_numel"], r
    assert sum(r["local_numel"] for r in ranks) >= r["full_numel"]
    assert len(single["losses"]) == len(ranks[0]["losses"]) > 3
    for a, b in zip(single["losses"], ranks[0]["losses"]):
        assert abs(a - b) < 1e-4, (single["losses"], ranks[0]["losses"])

    # rank 0 gathered the full weights into an ordinary checkpoint, equal to the single-process one
    one = load_file(single_out / "checkpoints/epoch-1/model.safetensors")
    two = load_file(tmp_path / "checkpoints/epoch-1/model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4), key


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(strategy, tiny_model_dir, tmp_path):
    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    unbroken.mkdir()
    broken.mkdir()
    (reference, _) = launch(torchrun(tiny_model_dir, unbroken, strategy, 2, 2), unbroken)
    steps_per_epoch = len(reference["steps"]) // 2
    kill_at = steps_per_epoch + 3  # mid second epoch, one step after the last resume point
    assert kill_at % 2 == 1 and kill_at < 2 * steps_per_epoch
    assert launch(torchrun(tiny_model_dir, broken, strategy, 2, 2, kill_at), broken, expect_ok=False) == []
    (resumed, _) = launch(torchrun(tiny_model_dir, broken, strategy, 2, 2), broken)

    assert resumed["ran_steps"][0] == kill_at, "the second launch resumed from the last resume point"
    # every step exactly once, in order, with the same losses: nothing skipped, nothing repeated
    assert resumed["steps"] == reference["steps"] == list(range(1, 2 * steps_per_epoch + 1))
    for a, b in zip(reference["losses"], resumed["losses"]):
        assert abs(a - b) < 1e-4, (reference["losses"], resumed["losses"])
    one = load_file(unbroken / "checkpoints/epoch-2/model.safetensors")
    two = load_file(broken / "checkpoints/epoch-2/model.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4), key
