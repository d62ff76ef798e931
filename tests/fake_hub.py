"""A local stand-in for the Hugging Face Hub API: just the endpoints huggingface_hub 2.4 calls for
create_repo, upload_folder (preupload, LFS batch + PUT, NDJSON commit), create_tag,
list_repo_refs, repo_info, get_paths_info and snapshot_download (repo info with its files, then
HEAD + GET on /{repo}/resolve/{revision}/{path}), and for data sets the same under /api/datasets and
/datasets, with folder listings (what `datasets.load_dataset` reads through HfFileSystem). State lives in memory;
every request is logged so a test can assert what reached the "Hub" (nothing, one commit, a tag) and what was
downloaded. Every route, downloads included, wants the token, as a gated repository does.

The client must not use Xet (HF_HUB_DISABLE_XET) and must not be offline (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlparse

from tests.local_server import JSONHandler, LocalServer

LFS_SUFFIXES = (".safetensors", ".bin", ".png")  # as the Hub's default .gitattributes


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[dict] = field(default_factory=list)  # {"oid", "message", "files": {path: entry}}
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> dict:
        return self.commits[-1]

    def resolve(self, revision: str) -> dict | None:
        revision = unquote(revision)
        if revision == "main":
            return self.head
        if revision in self.tags:
            revision = self.tags[revision]
        return next((c for c in self.commits if c["oid"] == revision), None)


class FakeHub(LocalServer):
    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        super().__init__(self._handler())
        self.endpoint = self.url

    def seed(
        self, repo_id: str, folder, message: str = "upload model", oid: str | None = None, repo_type: str = "model"
    ) -> str:
        """A model (or data set) repository holding `folder`'s files (weights as LFS objects); returns
        the commit id, the revision a team pins. Data sets are kept as "datasets/<repo_id>"."""
        repo_id = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        from pathlib import Path

        files = {}
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                content = path.read_bytes()
                name = path.relative_to(folder).as_posix()
                if name.endswith(LFS_SUFFIXES):
                    digest = hashlib.sha256(content).hexdigest()
                    self.lfs[digest] = content
                    files[name] = {"lfs": digest, "size": len(content)}
                else:
                    files[name] = {"content": content}
        repo = self.repos.setdefault(repo_id, Repo(private=True))
        oid = oid or hashlib.sha1(f"{repo_id}{message}{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "message": message, "files": files})
        return oid

    def downloaded(self, repo_id: str) -> list[str]:
        """The files of `repo_id` fetched with GET (what reached the client), in order."""
        prefix = f"/{repo_id}/resolve/"
        return [
            path[len(prefix) :].split("/", 1)[1]
            for method, path in self.requests
            if method == "GET" and path.startswith(prefix)
        ]

    def pushed_commits(self, repo_id: str) -> list[dict]:
        """Commits made through the API (the Hub's own initial commit excluded)."""
        return self.repos[repo_id].commits[1:] if repo_id in self.repos else []

    # ------------------------------------------------------------------ request handling
    def _handler(hub):  # noqa: N805 (the handler class closes over the hub)
        class Handler(JSONHandler):
            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _route(self, method: str):
                url = urlparse(self.path)
                hub.requests.append((method, url.path))
                if url.path.startswith("/lfs-upload/"):  # pre-signed-URL style: no auth header
                    return hub._lfs_put(self, url.path.rsplit("/", 1)[1], self._body())
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                body = self._body()
                try:
                    return hub._dispatch(self, method, url.path, parse_qs(url.query), body)
                except KeyError as err:
                    return self._reply(404, {"error": f"not found: {err}"})

            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

        return Handler

    def _dispatch(self, h, method: str, path: str, query: dict, body: bytes):
        parts = path.strip("/").split("/")
        if (method, path) == ("POST", "/api/repos/create"):
            return self._create_repo(h, json.loads(body))
        if (method, path) == ("POST", "/api/validate-yaml"):
            return h._reply(200, {"errors": [], "warnings": []})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(h, json.loads(body))
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(h, method, "/".join(parts[:3]), parts[4], "/".join(parts[5:]))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(h, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if parts[:2] in (["api", "models"], ["api", "datasets"]) and len(parts) >= 5:
            action, revision = parts[4], "/".join(parts[5:])
            repo_id = "/".join(parts[2:4]) if parts[1] == "models" else "datasets/" + "/".join(parts[2:4])
            repo = self.repos[repo_id]
            if method == "GET" and action == "tree" and "/" in unquote(revision):  # a folder of the revision
                revision, folder = unquote(revision).split("/", 1)
                return self._tree(h, repo, revision, folder, query)
            if method == "GET" and action == "refs":
                return h._reply(
                    200,
                    {
                        "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head["oid"]}],
                        "converts": [],
                        "pullRequests": [],
                        "tags": [
                            {"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid} for t, oid in repo.tags.items()
                        ],
                    },
                )
            if method == "GET" and action == "revision":
                commit = repo.resolve(revision)
                if commit is None:
                    return h._reply(404, {"error": f"Invalid rev id: {unquote(revision)}"})
                return h._reply(
                    200,
                    {
                        "id": repo_id,
                        "sha": commit["oid"],
                        "private": repo.private,
                        "gated": "manual",
                        "siblings": [{"rfilename": path} for path in commit["files"]],
                    },
                )
            if method == "POST" and action == "preupload":
                return self._preupload(h, repo, revision, json.loads(body))
            if method == "POST" and action == "commit":
                return self._commit(h, repo_id, repo, revision, body)
            if method == "POST" and action == "tag":
                return self._tag(h, repo, revision, json.loads(body))
            if method == "POST" and action == "paths-info":
                return self._paths_info(h, repo, revision, parse_qs(body.decode()))
            if method == "GET" and action == "tree":  # snapshot_download and HfFileSystem list the revision
                return self._tree(h, repo, revision, "", query)
        return h._reply(404, {"error": f"no route for {method} {path}"})

    def _create_repo(self, h, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return h._reply(409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.repos[repo_id].commits.append(
            {
                "oid": hashlib.sha1(repo_id.encode()).hexdigest(),
                "message": "initial commit",
                "files": {".gitattributes": {"content": attributes}},
            }
        )
        return h._reply(200, {"url": url})

    def _preupload(self, h, repo: Repo, revision: str, payload: dict):
        files = repo.resolve(revision)["files"]
        answer = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 1024 * 1024
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = files.get(f["path"])
            if existing:  # what the client compares with its local oid to skip unchanged files
                entry["oid"] = existing["lfs"] if "lfs" in existing else git_blob_oid(existing["content"])
            answer.append(entry)
        return h._reply(200, {"files": answer})

    def _lfs_batch(self, h, payload: dict):
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # no actions: the Hub already has the object
                item["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        return h._reply(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, oid: str, content: bytes):
        if hashlib.sha256(content).hexdigest() != oid:
            return h._reply(400, {"error": "sha256 mismatch"})
        self.lfs[oid] = content
        return h._reply(200, {})

    def _commit(self, h, repo_id: str, repo: Repo, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        files = dict(repo.resolve(revision)["files"])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = {"content": base64.b64decode(value["content"])}
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return h._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = {"lfs": value["oid"], "size": value["size"]}
            else:
                return h._reply(400, {"error": f"unsupported operation {line['key']}"})
        oid = hashlib.sha1(f"{repo.head['oid']}{header['summary']}{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "message": header["summary"], "files": files})
        return h._reply(
            200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _tag(self, h, repo: Repo, revision: str, payload: dict):
        if payload["tag"] in repo.tags:
            return h._reply(409, {"error": f"Tag {payload['tag']} already exists"})
        repo.tags[payload["tag"]] = repo.resolve(revision)["oid"]
        return h._reply(200, {})

    def _resolve(self, h, method: str, repo_id: str, revision: str, path: str):
        commit = self.repos[repo_id].resolve(revision) if repo_id in self.repos else None
        if commit is None or unquote(path) not in commit["files"]:
            return h._reply(404, {"error": f"{repo_id}@{unquote(revision)}: no file {unquote(path)}"})
        entry = commit["files"][unquote(path)]
        content = self.lfs[entry["lfs"]] if "lfs" in entry else entry["content"]
        h.send_response(200)
        h.send_header("Content-Length", str(len(content)))
        h.send_header("X-Repo-Commit", commit["oid"])
        h.send_header("ETag", f'"{entry.get("lfs") or git_blob_oid(content)}"')
        h.end_headers()
        if method == "GET":
            h.wfile.write(content)

    def _tree(self, h, repo: Repo, revision: str, folder: str, query: dict):
        """The files under `folder`, all of them with `recursive`, else its files and sub-folders."""
        commit = repo.resolve(revision)
        if commit is None:
            return h._reply(404, {"error": f"Invalid rev id: {unquote(revision)}"})
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        below = [path for path in commit["files"] if path.startswith(prefix)]
        if query.get("recursive", ["false"])[0].lower() == "true":
            return h._reply(200, self._entries(commit["files"], below))
        files = [path for path in below if "/" not in path[len(prefix) :]]
        folders = sorted({prefix + path[len(prefix) :].split("/", 1)[0] for path in below if path not in files})
        return h._reply(
            200,
            [{"type": "directory", "path": f, "oid": git_blob_oid(f.encode()), "size": 0} for f in folders]
            + self._entries(commit["files"], files),
        )

    def _paths_info(self, h, repo: Repo, revision: str, form: dict):
        return h._reply(200, self._entries(repo.resolve(revision)["files"], form.get("paths", [])))

    @staticmethod
    def _entries(files: dict, paths: list[str]) -> list[dict]:
        answer = []
        for path in paths:
            if path not in files:
                continue
            entry = files[path]
            if "lfs" in entry:
                answer.append(
                    {
                        "type": "file",
                        "path": path,
                        "size": entry["size"],
                        "oid": git_blob_oid(b"pointer"),
                        "lfs": {"oid": entry["lfs"], "size": entry["size"], "pointerSize": 134},
                    }
                )
            else:
                answer.append(
                    {"type": "file", "path": path, "size": len(entry["content"]), "oid": git_blob_oid(entry["content"])}
                )
        return answer
