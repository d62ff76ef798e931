"""dvc push / pull of data and a checkpoint against real remotes: a local directory, and an
S3-protocol remote served by moto on loopback (the path CI and the SkyPilot job take).
Each test builds a tiny DVC repository in tmp_path."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def tiny_repo(path: Path, remote_name: str, remote_url: str, endpoint: str | None = None):
    """A git + DVC repository tracking data/ and a checkpoint folder, like the template's (DVC in-process:
    the same code as the `dvc` command, without a second or two of start-up per call)."""
    from dvc.repo import Repo

    path.mkdir()
    os.chdir(path)  # DVC resolves targets against the working directory (restored by the fixture)
    git("init", "-q", cwd=path)
    repo = Repo.init(str(path))
    files = {
        "data/train.jsonl": b'{"prompt": "2+2?", "response": "4"}\n' * 500,
        "train/checkpoints/epoch-1/model.safetensors": os.urandom(64 * 1024),
        "train/checkpoints/epoch-1/manifest.json": b'{"epoch": 1}\n',
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    with repo.config.edit() as config:  # what `dvc remote add -d` (and `remote modify endpointurl`) write
        config["remote"][remote_name] = {"url": remote_url, **({"endpointurl": endpoint} if endpoint else {})}
        config["core"]["remote"] = remote_name
    repo.add(["data", "train/checkpoints"])
    return repo, files


def push_clone_pull(repo, files: dict[str, bytes], tmp_path: Path) -> None:
    from dvc.repo import Repo

    pushed = repo.push()
    assert pushed == 5, pushed  # 3 files + a .dir listing for each of the 2 folders
    assert repo.status(cloud=True) == {}  # cache and remote in sync
    root = Path(repo.root_dir)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "track data and checkpoint", cwd=root)
    clone = tmp_path / "clone"  # a fresh checkout, as a CI runner or the release job has it
    git("clone", "-q", str(root), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists()
    os.chdir(clone)
    Repo(str(clone)).pull()
    for name, content in files.items():
        assert (clone / name).read_bytes() == content, name


@pytest.fixture(autouse=True)
def dvc_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(tmp_path)  # and back to the original directory after the test


def test_push_and_pull_through_a_local_directory_remote(tmp_path):
    repo, files = tiny_repo(tmp_path / "repo", "store", str(tmp_path / "remote"))
    push_clone_pull(repo, files, tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    pytest.importorskip("moto", reason="moto[server] is in the test extra; without it the S3 remote test is skipped")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):  # the server takes a moment to listen
            try:
                client.create_bucket(Bucket="sft-dvc")
                break
            except Exception:  # connection refused until it is up
                time.sleep(0.1)
        else:
            pytest.fail(f"moto server did not start on {endpoint}")
        yield endpoint, client
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_push_and_pull_through_an_s3_remote(tmp_path, s3_server):
    endpoint, client = s3_server
    repo, files = tiny_repo(tmp_path / "repo", "s3", "s3://sft-dvc/store", endpoint)
    push_clone_pull(repo, files, tmp_path)
    stored = client.list_objects_v2(Bucket="sft-dvc", Prefix="store/")["KeyCount"]
    assert stored >= 4  # the data file, the weights, the manifest, the checkpoint folder's .dir listing
