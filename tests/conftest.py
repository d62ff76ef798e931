import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.demo import build_tokenizer, pretraining_corpus

    return build_tokenizer(pretraining_corpus(0), 512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random-init tiny Llama with the demo tokenizer, saved like a base model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "meta.json").write_text(json.dumps({"model": "test/tiny", "revision": None, "sha256": "x"}))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hub(monkeypatch):
    """A local Hub-API server, the only "Hub" a test reaches (the Makefile runs tests offline). No Xet:
    the stand-in speaks LFS."""
    from huggingface_hub import constants

    from tests.fake_hub import FakeHub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as server:
        yield server


# An MLflow tracking server in an environment of its own (`make test` builds .venv-mlflow): the
# server's pyarrow cap conflicts with the project's pin, and a team's server runs elsewhere anyway.
MLFLOW_SERVER = Path(os.environ.get("SFT_MLFLOW_SERVER", ROOT / ".venv-mlflow/bin/mlflow"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback: sqlite backend (runs and the model registry), artifacts
    served through it (mlflow-artifacts:/). Yields its URL."""
    import socket
    import subprocess
    import time
    import urllib.request

    if not MLFLOW_SERVER.exists():
        pytest.fail(f"{MLFLOW_SERVER} is missing: `make test` builds the MLflow server's environment (.venv-mlflow)")
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(MLFLOW_SERVER),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def wandb_history(run_dir: Path) -> list[dict]:
    """The per-step history W&B wrote to an offline run's transaction log (run-<id>.wandb): a
    LevelDB-style log (32 KiB blocks; each record: crc32c, length, type) after a 7-byte W&B header,
    each record one protobuf `Record`. Returns [{"_step": n, key: value, ...}] in order."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B", f"{log}: not a W&B transaction log"
    rows, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a record header never straddles a block: the rest is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                row = {"_step": record.history.step.num}
                for item in record.history.item:  # a logged dict (a table's reference) comes as nested keys
                    *parents, key = item.nested_key or [item.key]
                    node = row
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
