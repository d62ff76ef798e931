"""A team's run from merge to release, on CPU: sky/train.yaml's `run:` on 2 local nodes without a
shared filesystem (tests/lifecycle/local_sky.py), the team's data in a DVC remote over the S3
protocol (moto on loopback), the GitHub API and the Hub as local stand-ins. The configuration takes
the production code paths at tiny size: fsdp2 across nodes, bf16 sharded export, the bucket for
resume state and base-eval cache, team data that is not the demo's.

Scenarios, in order (each builds on the last): merge -> success; preemption mid-epoch -> the
relaunch resumes and ends with the same weights; failing gate -> failure, exit 0 (no relaunch),
release refused; tag -> exactly the gated weights on the Hub. `make lifecycle` runs this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fake_github import FakeGitHub
from tests.lifecycle.local_sky import ROOT, launch

pytestmark = pytest.mark.lifecycle
BIN = Path(sys.executable).parent
REPO = "acme/sft"


def sh(args, cwd, env=None, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def team_params() -> dict:
    """Production code paths at CPU size: fsdp2 over the nodes, bf16 export in several shards."""
    params = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    params["base"]["demo"].update(hidden_size=32, num_layers=2, num_heads=2, pretrain_steps=20, pretrain_batch_size=8)
    params["validate"]["min_rows"] = 1500
    params["train"].update(strategy="fsdp2", epochs=2, micro_batch_size=4, export_dtype="bfloat16",
                           export_shard_size="40KB", checkpoint_every_steps=20)
    params["evaluate"].update(limit=16, batch_size=16, max_gen_toks=8)
    params["card"]["repo_id"] = "acme/team-model"
    return params


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """The team's fork: a project with its own data pushed to the S3 remote, and the GitHub stand-in."""
    project = tmp_path_factory.mktemp("project")
    files = sh(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "data.dvc":  # the demo's outputs and dvc.lock come along, as in a fork
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    (project / "params.yaml").write_text(yaml.safe_dump(team_params(), sort_keys=False))
    (project / "evals/gate.yaml").write_text(
        "select_by: golden\nrules:\n  - metric: golden\n    min: 0.0\n  - metric: general\n    max_drop: 1.0\n")
    sh(["git", "init", "-q"], project)
    sh(["sft", "demo", "--out", "data", "--rows", "2000", "--seed", "7"], project)  # the team's data, not the demo's
    sh(["dvc", "add", "-q", "data"], project)
    sh(["dvc", "remote", "add", "-d", "team", "s3://sft-dvc/team"], project)
    sh(["dvc", "remote", "modify", "team", "endpointurl", s3], project)
    sh(["dvc", "push", "-q", "data.dvc"], project)
    with FakeGitHub(REPO) as github:
        yield project, github


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.test_dvc_remote import free_port

    boto3 = pytest.importorskip("boto3")
    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="sft-dvc")
            break
        except Exception:  # refused until the server listens
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


def merged_commit(world, scenario: str) -> str:
    """The merge: the project as it stands becomes a commit (one per scenario) the job trains and reports on."""
    project, github = world
    files = {name: (project / name).read_text() for name in ("params.yaml", "dvc.yaml", "data.dvc", "evals/gate.yaml")}
    return github.add_commit({**files, "MERGED": scenario}, message=f"merge: {scenario}")


def job_env(world, sha: str) -> dict[str, str]:
    _, github = world
    return {"GIT_SHA": sha, "GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": github.api_url,
            "GITHUB_TOKEN": github.token, "RUN_URL": "https://ci.example/run/1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def last_status(github, sha: str) -> dict:
    return [s for s in github.statuses[sha] if s["context"] == "eval-gate"][-1]


def results(github, sha: str) -> dict:
    return github.trees[github.commits[github.refs[f"heads/results/{sha}"]]["tree"]]


@pytest.fixture(scope="module")
def merge(world, tmp_path_factory):
    project, github = world
    sha = merged_commit(world, "merge")
    bucket = tmp_path_factory.mktemp("bucket")
    job = launch(project, tmp_path_factory.mktemp("cluster"), bucket, job_env(world, sha))
    codes = job.wait()
    assert codes == [0, 0], job.log(0)[-4000:] + job.log(1)[-2000:]
    return sha, bucket, job


def test_merge_trains_on_two_nodes_and_reports_success(world, merge):
    project, github = world
    sha, bucket, job = merge
    assert last_status(github, sha)["state"] == "success"
    tree = results(github, sha)
    gate = json.loads(tree["gate/gate.json"])
    metrics = json.loads(tree["train/metrics.json"])
    assert gate["passed"] and metrics["world_size"] == 2 and metrics["strategy"] == "fsdp2"
    lock = yaml.safe_load(tree["dvc.lock"])
    assert {"tokenizer", "base", "validate", "prepare", "train", "gate", "card"} <= set(lock["stages"])
    # bf16, sharded, every shard hashed; the gate's hash is the chosen checkpoint's in the bucket
    from pipeline.train.checkpoint import weights_sha256

    chosen = bucket / sha / "checkpoints" / gate["chosen"]
    assert len(list(chosen.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((chosen / "config.json").read_text())["dtype"] == "bfloat16"
    assert weights_sha256(chosen) == gate["sha256"]
    assert list((bucket / sha / "state").iterdir()) == [], "a finished run leaves no resume state"
    assert any((bucket / "base-evals").iterdir()), "the base's eval results are cached in the bucket"
    # nothing from the demo leaks into the team's run
    data_sha = json.loads(tree["prepare/stats.json"])["data_sha256"]
    assert data_sha != json.loads((ROOT / "prepare/stats.json").read_text())["data_sha256"]
    assert tree["gate/gate.json"] != (ROOT / "gate/gate.json").read_text()
    loss = tree["train/live/plots/metrics/train/loss.tsv"].splitlines()
    assert len(loss) == metrics["steps"] + 1
    # node 1 built its own inputs through DVC, then joined node 0's torchrun (no stage after that)
    inputs, launched = job.log(1).split("train.strategy=fsdp2:", 1)
    assert "Running stage 'prepare'" in inputs and "--node-rank 1" in launched and "Running stage" not in launched


def test_preempted_job_resumes_and_ends_with_the_same_weights(world, merge, tmp_path_factory):
    project, github = world
    reference_sha, _, _ = merge
    sha = merged_commit(world, "preemption")
    bucket = tmp_path_factory.mktemp("bucket")
    cluster = tmp_path_factory.mktemp("cluster")
    job = launch(project, cluster, bucket, job_env(world, sha))
    state = bucket / sha / "state"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:  # wait for a resume point both nodes have listed, then pull the plug
        if any((step / "node-1.json").exists() and (step / "node-0.json").exists() for step in state.glob("step-*")):
            break
        assert all(node.poll() is None for node in job.nodes), job.log(0)[-3000:]
        time.sleep(0.5)
    job.preempt()
    time.sleep(2)  # nothing of the killed job may still be running and writing to the bucket
    assert not (bucket / sha / "checkpoints" / "epoch-2").exists(), "killed mid-run, before the end"
    assert sha not in github.statuses, "a preempted job reports nothing"

    relaunch = launch(project, cluster, bucket, job_env(world, sha))  # SkyPilot's recovery: new nodes, same bucket
    assert relaunch.wait() == [0, 0], relaunch.log(0)[-4000:]
    assert last_status(github, sha)["state"] == "success"
    metrics = json.loads(results(github, sha)["train/metrics.json"])
    assert metrics["resumed_from_step"] > 0
    gate, reference = (json.loads(results(github, s)["gate/gate.json"]) for s in (sha, reference_sha))
    assert gate["sha256"] == reference["sha256"], "the resumed run's weights equal the unbroken run's"


def test_failing_gate_reports_failure_without_a_relaunch_and_the_release_refuses(world, tmp_path_factory):
    project, github = world
    gate_file = project / "evals/gate.yaml"
    policy = gate_file.read_text()
    gate_file.write_text(policy.replace("min: 0.0", "min: 1.01"))  # no model can pass
    try:
        sha = merged_commit(world, "failing gate")
        job = launch(project, tmp_path_factory.mktemp("cluster"), tmp_path_factory.mktemp("bucket"),
                     job_env(world, sha))
        assert job.wait() == [0, 0], "a known verdict ends the job 0: job_recovery must not relaunch it"
    finally:
        gate_file.write_text(policy)
    status = last_status(github, sha)
    assert status["state"] == "failure" and "golden" in status["description"]
    assert json.loads(results(github, sha)["gate/gate.json"])["passed"] is False
    env = {"GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": github.api_url, "GITHUB_TOKEN": github.token}
    refused = sh(["sft", "status", "require", "--sha", sha], project, env, check=False)
    assert refused.returncode == 1


def test_tag_publishes_exactly_the_gated_weights(world, merge, tmp_path):
    from tests.fake_hub import FakeHub

    project, github = world
    sha, _, _ = merge
    env = {"GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": github.api_url, "GITHUB_TOKEN": github.token}
    sh(["sft", "status", "require", "--sha", sha], project, env)
    release = tmp_path / "release"  # release.yml: the tagged commit plus the files of results/<sha>
    shutil.copytree(project, release, ignore=shutil.ignore_patterns(".git", "data", ".dvc/cache"))
    for name, content in results(github, sha).items():
        path = release / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    sh(["git", "init", "-q"], release)
    sh(["dvc", "pull", "-q", "card"], release)
    with FakeHub() as hub:
        published = sh(["sft", "publish", "--tag", "v1.0.0"], release,
                       {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"})
        commits = hub.pushed_commits("acme/team-model")
        tags = hub.repos["acme/team-model"].tags
    gate = json.loads(results(github, sha)["gate/gate.json"])
    assert len(commits) == 1, published.stdout + published.stderr
    from pipeline.files import combine_digests

    shards = {path: entry["lfs"] for path, entry in commits[0]["files"].items() if path.endswith(".safetensors")}
    assert len(shards) > 1 and combine_digests(shards) == gate["sha256"]
    assert tags["v1.0.0"] == commits[0]["oid"]
