"""File helpers shared by stages: strict JSONL reading, hashing, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), text: str | None = None) -> list[dict]:
    """Rows of a JSONL file (or of `text`, named `path` in errors), each checked for `required`."""
    if text is None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        raw = path.read_bytes()
        # the eval sets go to lm-eval as they are: it reads neither gzip nor a byte-order mark
        if raw.startswith(b"\x1f\x8b"):
            raise DataError(f"{path}: gzip-compressed; this file is read as plain JSONL: store it uncompressed")
        if raw.startswith(b"\xef\xbb\xbf"):
            raise DataError(
                f"{path}:1: starts with a UTF-8 byte-order mark; this file is read as plain JSONL: "
                "save it without the BOM"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [f for f in required if f not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing field(s) {missing}; each row needs {list(required)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One hash over named file hashes, order-independent (a Hub listing's LFS hashes give the same)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files (name and content), order-independent."""
    return combine_digests({Path(p).name: sha256_file(p) for p in paths})


def file_manifest(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: what a release must reproduce byte for byte."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_differences(expected: dict[str, str], present: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(missing, added, changed) file names of `present` against `expected` ({path: sha256} each)."""
    missing, added = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    changed = sorted(name for name in set(expected) & set(present) if expected[name] != present[name])
    return missing, added, changed


def weight_files(folder: str | Path) -> list[Path]:
    """A model folder's weights: one model.safetensors, or the shards transformers writes for large models."""
    return sorted(Path(folder).glob("*.safetensors"))


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds. The old
    folder is moved aside, not deleted, until the new one is in place: there is no moment when
    neither exists (a crash in between leaves `.NAME.old-PID`, which the next run clears)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def copy_project(source: Path, dest: Path, skip=lambda name: False) -> list[str]:
    """Copy the project's files as git sees them (tracked, and untracked but not ignored: no .venv, no
    outputs DVC ignores) from `source` to `dest`, leaving out the relative paths `skip` names."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    copied = []
    for name in filter(None, listed):
        if (Path(source) / name).is_file() and not skip(name):
            (Path(dest) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, Path(dest) / name)
            copied.append(name)
    return copied
