"""A team's run from pull request to release, on CPU, with the three workflow files run unchanged by
the real runner (act, tests/lifecycle/act.py). Stand-ins at the edges only: the GitHub API
(statuses, comments, git refs), the Hub (the base model served by revision and token, and the
release target), the DVC remote (S3 protocol, moto on loopback), and SkyPilot (train.yml's
`sky jobs launch` reaches tests/lifecycle/local_sky.py: sky/train.yaml's `run:` on 2 local nodes
with a folder of their own each, the bucket a local folder).

The fork: the production preset's shape at CPU size (base.source hub with a pinned revision, fsdp2
over 2 nodes, bf16 sharded export, resume state and base-eval cache in the bucket), the team's own
data in the remote. Scenarios, in order (each builds on the last):
- a PR that adopts the preset word for word (`cp configs/llama3-8b-8xh100.yaml params.yaml`) with
  new data: one comment with the contract, the data diff, the params diff and the 8B plan; no
  weights downloaded;
- the merge: train.yml launches, the job trains and ends with eval-gate success and results/<sha>;
- a preemption mid-epoch: the recovered job resumes and ends with the unbroken run's weights;
- a failing gate: failure, a single attempt (no relaunch), and release.yml refuses the tag;
- the tag: release.yml publishes exactly the gated weights to the Hub.
`make lifecycle` runs this file (`SFT_ACT_ACTIONS=../shared/actions` where GitHub is out of reach).
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

from pipeline.files import copy_project
from pipeline.signing import generate_keypair
from tests.fake_github import FakeGitHub
from tests.fake_hub import FakeHub
from tests.lifecycle.act import run_workflow, step_failed
from tests.lifecycle.local_sky import ROOT, ManagedJob

pytestmark = pytest.mark.lifecycle
BIN = Path(sys.executable).parent
REPO = "acme/sft"
BASE_REPO = "acme-base/tiny-instruct"
PRESET = yaml.safe_load((ROOT / "configs/llama3-8b-8xh100.yaml").read_text())
BUCKET = "acme-sft-checkpoints"
DASHBOARD = "https://sky.acme.example/dashboard/jobs"  # repository variable SKYPILOT_DASHBOARD_URL
BOT = "acme-sft-bot"  # the account of EVAL_GATE_TOKEN (repository variable EVAL_GATE_ACCOUNT)
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def sh(args, cwd, env=None, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **AWS, **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def git(project, *args) -> str:
    return sh(["git", *args], project).stdout.strip()


def team_params(revision: str) -> dict:
    """Production code paths at CPU size: a Hub base at a pinned revision, fsdp2 over the nodes, bf16
    export in several shards, and the preset's general-knowledge metric word for word (lm-eval's
    registry group mmlu_pro, its data set downloaded from the Hub)."""
    params = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    params["base"].update(source="hub", model=BASE_REPO, revision=revision)
    params["evaluate"]["metrics"]["general"] = PRESET["evaluate"]["metrics"]["general"]
    params["validate"]["min_rows"] = 1500
    params["prepare"]["max_seq_len"] = 256  # Llama 3's template adds a ~30-token system header to every row
    params["train"].update(
        strategy="fsdp2",
        epochs=2,
        micro_batch_size=4,
        export_dtype="bfloat16",
        export_shard_size="40KB",
        checkpoint_every_steps=20,
    )
    params["evaluate"].update(limit=16, batch_size=16, max_gen_toks=8)
    params["card"]["repo_id"] = "acme/team-model"
    params["gate"]["policy"] = "evals/gate.yaml"  # the team's policy, as in the preset
    return params


def tiny_base(folder: Path) -> Path:
    """The base the team fine-tunes, as its Hub repository holds it: weights, a Llama 3.x Instruct
    tokenizer and chat template (<|eot_id|> ends each turn; the template prints today's date), licence."""
    from pipeline.config import DemoBase
    from pipeline.demo import build_base_model
    from tests.chat_families import convert_base_to_llama3

    build_base_model(
        DemoBase(hidden_size=32, num_layers=2, num_heads=2, pretrain_steps=20, pretrain_batch_size=8),
        folder,
        log=lambda *_: None,
    )
    (folder / "meta.json").unlink(missing_ok=True)
    convert_base_to_llama3(folder)
    (folder / "LICENSE").write_text("Tiny base licence\n")
    return folder


def llama_8b_shaped(folder: Path) -> Path:
    """The preset's base as the PR runner sees it: Llama-3.1-8B's config.json and a tokenizer with the
    family's chat template; weight files exist but must never be fetched on a PR."""
    from transformers import LlamaConfig

    from pipeline.config import DemoBase
    from pipeline.demo import build_demo_tokenizer
    from tests.chat_families import as_llama3

    as_llama3(build_demo_tokenizer(DemoBase(), folder)).save_pretrained(folder)
    LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    for shard in range(1, 5):
        (folder / f"model-{shard:05d}-of-00004.safetensors").write_bytes(b"gated weights")
    (folder / "LICENSE").write_text("LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n")
    (folder / "USE_POLICY.md").write_text("Acceptable use policy\n")
    return folder


def mmlu_pro_stand_in(folder: Path) -> Path:
    """TIGER-Lab/MMLU-Pro as the registry task reads it (its columns, test and validation splits as
    parquet files, every category), at a few questions a category."""
    import pandas as pd

    categories = [
        "biology",
        "business",
        "chemistry",
        "computer science",
        "economics",
        "engineering",
        "health",
        "history",
        "law",
        "math",
        "other",
        "philosophy",
        "physics",
        "psychology",
    ]
    (folder / "data").mkdir(parents=True)
    for split, per_category in (("test", 2), ("validation", 5)):
        rows = [
            {
                "question_id": n,
                "question": f"Which letter comes {n % 3 + 1} after A in {category}?",
                "options": ["A", "B", "C", "D"],
                "answer": "BCD"[n % 3],
                "answer_index": n % 3 + 1,
                "cot_content": f"A: Let's think step by step. The answer is ({'BCD'[n % 3]}).",
                "category": category,
                "src": "stand-in",
            }
            for c, category in enumerate(categories)
            for n in range(c * per_category, (c + 1) * per_category)
        ]
        pd.DataFrame(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", index=False)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
        "    path: data/test-*\n  - split: validation\n    path: data/validation-*\n"
        "---\n# MMLU-Pro (stand-in)\n"
    )
    return folder


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.test_dvc_remote import free_port

    boto3 = pytest.importorskip("boto3")
    port = free_port()
    os.environ.update(AWS)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """The team's fork on main (its own params, data in the S3 remote, 2 nodes in sky/train.yaml), the
    GitHub and Hub stand-ins, and the environment every workflow run gets."""
    scratch = tmp_path_factory.mktemp("world")
    project = scratch / "project"
    project.mkdir()
    copy_project(ROOT, project, skip=lambda name: name == "data.dvc")  # the demo's outputs come along, as in a fork
    with FakeGitHub(REPO) as github, FakeHub() as hub:
        revision = hub.seed(BASE_REPO, tiny_base(scratch / "tiny-base"))
        hub.seed(PRESET["base"]["model"], llama_8b_shaped(scratch / "llama-8b"), oid=PRESET["base"]["revision"])
        hub.seed("TIGER-Lab/MMLU-Pro", mmlu_pro_stand_in(scratch / "mmlu-pro"), repo_type="dataset")
        (project / "params.yaml").write_text(yaml.safe_dump(team_params(revision), sort_keys=False))
        (project / "evals/gate.yaml").write_text(
            "select_by: golden\nrules:\n  - metric: golden\n    min: 0.0\n  - metric: general\n    max_drop: 1.0\n"
        )
        task = project / "sky/train.yaml"
        task.write_text(task.read_text().replace("num_nodes: 1 ", "num_nodes: 2 "))
        # docs/ci.md, "Signed verdicts": the job's key is a secret, its public half committed
        signing_key, signer = generate_keypair(scratch)
        (project / ".github/release-signers").write_text(signer + "\n")
        git(project, "init", "-q", "-b", "main")
        git(project, "remote", "add", "origin", f"https://github.com/{REPO}.git")
        sh(
            ["sft", "demo", "--out", "data", "--rows", "2000", "--seed", "7"], project
        )  # the team's data, not the demo's
        sh(["dvc", "add", "-q", "data"], project)
        sh(["dvc", "remote", "add", "-d", "team", "s3://sft-dvc/team"], project)
        sh(["dvc", "remote", "modify", "team", "endpointurl", s3], project)
        sh(["dvc", "push", "-q", "data.dvc"], project)
        git(project, "add", "-A")
        git(project, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "the team's fork")
        git(project, "update-ref", "refs/remotes/origin/main", "HEAD")
        shutil.rmtree(project / "data")  # what a fresh runner has: the data only in the remote
        shutil.rmtree(project / ".dvc/cache")
        sky_root = scratch / "sky"
        # online, as a cluster is: registry tasks download their data sets from the Hub (stand-in) with HF_TOKEN
        machine = {
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(scratch / "hf-home"),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        env = {
            "GITHUB_API_URL": github.api_url,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "LOCAL_SKY_ROOT": str(sky_root),
            "LOCAL_SKY_MACHINE_ENV": json.dumps(machine),
            **AWS,
        }
        # the workflows' own token is github-actions[bot]'s; the job reports with a bot account's token
        secrets = {
            "GITHUB_TOKEN": github.token,
            "EVAL_GATE_TOKEN": github.add_account(BOT),
            "HF_TOKEN": hub.token,
            "RELEASE_SIGNING_KEY": signing_key,
            "DVC_AWS_ACCESS_KEY_ID": "testing",
            "DVC_AWS_SECRET_ACCESS_KEY": "testing",
            "SKYPILOT_API_URL": "http://127.0.0.1:1",
            "SKYPILOT_API_TOKEN": "sky_test",
        }
        yield {
            "project": project,
            "github": github,
            "hub": hub,
            "env": env,
            "secrets": secrets,
            "sky": sky_root,
            "scratch": scratch,
        }


def commit(world, message: str, change=None) -> str:
    """A commit on main (a merge); `merge` registers it with the GitHub stand-in."""
    project = world["project"]
    if change:
        change(project)
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "--allow-empty", "-m", message)
    git(project, "update-ref", "refs/remotes/origin/main", "HEAD")  # merged: main on GitHub moved too
    return git(project, "rev-parse", "HEAD")


def merge(world, sha: str, tmp_path: Path) -> ManagedJob:
    """train.yml on the push to main, under act; the managed job it launched."""
    world["github"].add_commit({}, sha=sha)
    result = run_workflow(
        world["project"],
        "train.yml",
        "push",
        {"ref": "refs/heads/main"},
        tmp_path,
        secrets=world["secrets"],
        env=world["env"],
        variables={"CHECKPOINT_BUCKET": BUCKET, "SKYPILOT_DASHBOARD_URL": DASHBOARD},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert [s["state"] for s in world["github"].statuses[sha]][0] == "pending"
    return ManagedJob(world["sky"] / "jobs" / f"sft-train-{sha[:12]}")


def release(world, sha: str, tag: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """release.yml on the tag, under act, with results/<sha> as the job pushed it to the GitHub stand-in
    materialised as a branch of the project (where actions/checkout fetches it from)."""
    project, github = world["project"], world["github"]
    if f"heads/results/{sha}" in github.refs:
        tree = github.trees[github.commits[github.refs[f"heads/results/{sha}"]]["tree"]]
        worktree = tmp_path / "results-worktree"
        git(project, "worktree", "add", "-q", "--detach", str(worktree), sha)
        for name, content in tree.items():
            (worktree / name).parent.mkdir(parents=True, exist_ok=True)
            (worktree / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        git(worktree, "add", "-A")
        git(worktree, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", f"Training results for {sha}")
        git(project, "branch", "-f", f"results/{sha}", git(worktree, "rev-parse", "HEAD"))
        git(project, "worktree", "remove", "--force", str(worktree))
    git(project, "checkout", "-q", sha)
    git(project, "tag", "-f", tag, sha)
    try:
        return run_workflow(
            project,
            "release.yml",
            "push",
            {"ref": f"refs/tags/{tag}"},
            tmp_path,
            secrets=world["secrets"],
            variables={"EVAL_GATE_ACCOUNT": BOT},
            env=world["env"],
        )
    finally:
        git(project, "checkout", "-q", "main")


def last_status(github, sha: str) -> dict:
    return [s for s in github.statuses[sha] if s["context"] == "eval-gate"][-1]


def results(github, sha: str) -> dict:
    return github.trees[github.commits[github.refs[f"heads/results/{sha}"]]["tree"]]


def test_pull_request_adopting_the_preset_gets_one_comment_and_downloads_no_weights(world, tmp_path):
    github, hub = world["github"], world["hub"]
    clone = tmp_path / "clone"  # the team member's clone, on a branch
    sh(["git", "clone", "-q", str(world["project"]), str(clone)], tmp_path)
    git(clone, "remote", "set-url", "origin", f"https://github.com/{REPO}.git")
    git(clone, "checkout", "-qb", "adopt-preset")
    shutil.copy(ROOT / "configs/llama3-8b-8xh100.yaml", clone / "params.yaml")  # README: word for word
    sh(["sft", "demo", "--out", "data", "--rows", "10500", "--seed", "8"], clone)  # new data: 10.5k rows
    sh(["dvc", "add", "-q", "data"], clone)
    sh(["dvc", "push", "-q", "data.dvc"], clone)
    git(clone, "add", "-A")
    git(clone, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "adopt the 8B preset, new data")
    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / ".dvc/cache")
    head = git(clone, "rev-parse", "HEAD")
    event = {
        "pull_request": {
            "number": 7,
            "head": {"sha": head, "ref": "adopt-preset", "repo": {"full_name": REPO}},
            "base": {"ref": "main", "repo": {"full_name": REPO}},
        },
        "repository": {"full_name": REPO},
    }
    # the PR's `make test` runs one file here: the whole suite is .ci/run's job, not this scenario's
    result = run_workflow(
        clone,
        "pr.yml",
        "pull_request",
        event,
        tmp_path,
        secrets=world["secrets"],
        env={**world["env"], "PYTEST_ADDOPTS": "tests/test_config.py"},
    )
    assert result.returncode == 0 and not step_failed(result), result.stdout[-8000:]
    (comment,) = github.comments[7]
    body = comment["body"]
    if os.environ.get("SFT_PR_COMMENT_SAMPLE"):  # docs/pr-comment.md is this comment, written here
        Path(os.environ["SFT_PR_COMMENT_SAMPLE"]).write_text(body)
    contract, params_diff, plan, stats, smoke = (
        body.split(f"<summary>{title}</summary>", 1)[1].split("</details>")[0]
        for title in (
            "Data contract",
            "Params and metrics vs the base branch",
            "GPU plan",
            "Training data statistics",
            "Eval gate of the CPU smoke run (the demo)",
        )
    )
    assert "was not produced" not in body, body
    # new golden and safety sets come with the new data: flagged for the reviewer of evals/, in bold, first
    flag = body.split("\n\n")[1]
    assert flag.startswith("**This pull request changes what decides") and "`data/golden.jsonl`" in flag, body[:2000]
    assert "10,500" in contract or "10500" in contract
    assert "meta-llama/Llama-3.1-8B-Instruct" in params_diff and BASE_REPO in params_diff
    assert "2,000" in stats and "10,500" in stats, stats  # the base branch's data against this branch's
    assert "8.0" in plan and "H100" in plan, plan  # the preset's 8B shape, from tokenizer/config.json
    assert "passed" in smoke.lower() or "PASS" in smoke
    fetched = hub.downloaded(PRESET["base"]["model"])
    assert "tokenizer.json" in fetched and "config.json" in fetched
    assert not [name for name in fetched if name.endswith(".safetensors")], "no weights on a PR runner"


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    sha = git(world["project"], "rev-parse", "HEAD")
    job = merge(world, sha, tmp_path_factory.mktemp("merge"))
    attempts = job.wait()
    assert attempts == [{"codes": [0, 0]}], job.log(0)[-4000:] + job.log(1)[-2000:]
    return sha, job


def test_merge_trains_on_two_nodes_and_reports_success(world, merged):
    github, hub = world["github"], world["hub"]
    sha, job = merged
    status = last_status(github, sha)
    assert status["state"] == "success" and status["creator"]["login"] == BOT
    # the verdict links to the job's own page on the SkyPilot dashboard (its logs), the pending status to the launch
    assert status["target_url"] == f"{DASHBOARD}/{job.request['job_id']}"
    assert github.statuses[sha][0]["target_url"].startswith(f"https://github.com/{REPO}/actions/runs/")
    tree = results(github, sha)
    gate = json.loads(tree["gate/gate.json"])
    metrics = json.loads(tree["train/metrics.json"])
    manifest = json.loads(tree["release/manifest.json"])  # every file of card/, attested for this commit, signed
    assert "release/attestation.json.sig" in tree and manifest["sha256"] == gate["sha256"]
    assert json.loads(tree["release/attestation.json"])["commit"] == sha
    assert {"chat_template.jinja", "tokenizer.json", "config.json", "README.md"} <= set(manifest["files"])
    assert gate["passed"] and metrics["world_size"] == 2 and metrics["strategy"] == "fsdp2"
    lock = yaml.safe_load(tree["dvc.lock"])
    assert {"tokenizer", "base", "validate", "prepare", "train", "gate", "card"} <= set(lock["stages"])
    # the base came from the Hub at the pinned revision, with the token
    base_meta = json.loads((job.node_dirs()[0] / "base/meta.json").read_text())
    assert base_meta["source"] == "hub" and base_meta["revision"] == hub.repos[BASE_REPO].commits[0]["oid"]
    assert "model.safetensors" in hub.downloaded(BASE_REPO)
    # the preset's registry group ran on every subject, its data set fetched from the Hub with the token
    assert any(path.endswith(".parquet") for path in hub.downloaded("datasets/TIGER-Lab/MMLU-Pro"))
    for evaluated in ("base", "suite"):
        for model in json.loads((job.node_dirs()[0] / f"evaluate/{evaluated}-items.json").read_text()).values():
            assert model["general"]["task"] == "mmlu_pro" and model["general"]["n"] == 28, "2 questions x 14 subjects"
    # bf16, sharded, every shard hashed; the gate's hash is the chosen checkpoint's in the bucket
    from pipeline.train.checkpoint import weights_sha256

    bucket = world["sky"] / "buckets" / BUCKET
    chosen = bucket / sha / "train" / "checkpoints" / gate["chosen"]
    assert len(list(chosen.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((chosen / "config.json").read_text())["dtype"] == "bfloat16"
    # the family's own turn end and template came through: eos <|eot_id|>, the date fixed, not the day's
    from transformers import AutoTokenizer

    from pipeline.prepare import render_prompt

    shipped = AutoTokenizer.from_pretrained(chosen)
    assert shipped.eos_token == "<|eot_id|>" and "<|start_header_id|>" in shipped.chat_template
    assert "Today Date: 01 Jan 2026" in render_prompt(shipped, "hi")
    assert weights_sha256(chosen) == gate["sha256"]
    assert list((bucket / sha / "train" / "state").iterdir()) == [], "a finished run leaves no resume state"
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


def test_preempted_job_resumes_and_ends_with_the_same_weights(world, merged, tmp_path):
    github = world["github"]
    reference_sha, _ = merged
    sha = commit(world, "preemption: the same inputs, a new commit")
    job = merge(world, sha, tmp_path)
    state = world["sky"] / "buckets" / BUCKET / sha / "train" / "state"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:  # wait for a resume point both nodes have listed, then pull the plug
        if any((step / "node-1.json").exists() and (step / "node-0.json").exists() for step in state.glob("step-*")):
            break
        assert job.controller_running(), job.log(0)[-3000:]
        time.sleep(0.5)
    job.preempt()
    time.sleep(2)  # nothing of the killed job may still be running and writing to the bucket
    assert not (state.parent / "checkpoints" / "epoch-2").exists(), "killed mid-run, before the end"
    assert last_status(github, sha)["state"] == "pending", "a preempted job reports nothing"

    job.recover()  # SkyPilot's recovery: new nodes, same bucket
    assert job.wait()[-1] == {"codes": [0, 0]}, job.log(0)[-4000:]
    assert last_status(github, sha)["state"] == "success"
    metrics = json.loads(results(github, sha)["train/metrics.json"])
    assert metrics["resumed_from_step"] > 0
    gate, reference = (json.loads(results(github, s)["gate/gate.json"]) for s in (sha, reference_sha))
    assert gate["sha256"] == reference["sha256"], "the resumed run's weights equal the unbroken run's"


def test_failing_gate_reports_failure_without_a_relaunch_and_the_release_refuses(world, tmp_path):
    github, hub = world["github"], world["hub"]

    def impossible_policy(project):
        gate = project / "evals/gate.yaml"
        gate.write_text(gate.read_text().replace("min: 0.0", "min: 1.01"))  # no model can pass

    sha = commit(world, "a policy no model passes", impossible_policy)
    try:
        job = merge(world, sha, tmp_path / "merge")
        assert job.wait() == [{"codes": [0, 0]}], "a known verdict ends the job 0: one attempt, no relaunch"
    finally:
        git(world["project"], "-c", "user.name=t", "-c", "user.email=t@x", "revert", "--no-edit", "HEAD")
        git(world["project"], "update-ref", "refs/remotes/origin/main", "HEAD")
    status = last_status(github, sha)
    assert status["state"] == "failure" and "golden" in status["description"]
    assert json.loads(results(github, sha)["gate/gate.json"])["passed"] is False
    assert "release/attestation.json.sig" not in results(github, sha), "a failed gate has nothing signed"
    commits_before = len(hub.pushed_commits("acme/team-model"))
    refused = release(world, sha, "v0.9.0", tmp_path / "release")
    assert refused.returncode != 0
    assert step_failed(refused)[0] == "Refuse unless the tagged commit's eval-gate is success", refused.stdout[-4000:]
    assert len(hub.pushed_commits("acme/team-model")) == commits_before, "nothing reached the Hub"


def test_tag_publishes_exactly_the_gated_weights(world, merged, tmp_path):
    from pipeline.files import combine_digests

    github, hub = world["github"], world["hub"]
    sha, _ = merged
    published = release(world, sha, "v1.0.0", tmp_path)
    assert published.returncode == 0 and not step_failed(published), published.stdout[-6000:]
    commits = hub.pushed_commits("acme/team-model")
    assert len(commits) == 1
    gate = json.loads(results(github, sha)["gate/gate.json"])
    shards = {path: entry["lfs"] for path, entry in commits[0]["files"].items() if path.endswith(".safetensors")}
    assert len(shards) > 1 and combine_digests(shards) == gate["sha256"]
    assert hub.repos["acme/team-model"].tags["v1.0.0"] == commits[0]["oid"]
    # byte for byte what the job signed: every file of the manifest, nothing else
    import hashlib

    manifest = json.loads(results(github, sha)["release/manifest.json"])
    pushed = {
        path: entry["lfs"] if "lfs" in entry else hashlib.sha256(entry["content"]).hexdigest()
        for path, entry in commits[0]["files"].items()
        if path != ".gitattributes"
    }
    assert pushed == manifest["files"]
