"""A local stand-in for the GitHub REST endpoints pipeline/github.py uses: commit statuses (create,
combined, list with each status's creator), issue comments (list with pages, create, update). It
checks what GitHub checks (token, state, the 140-character description) and keeps every status ever
set. Each token belongs to an account (`token` to github-actions[bot]; `add_account` for others)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from urllib.parse import parse_qs, urlparse

from tests.local_server import JSONHandler, LocalServer


class FakeGitHub(LocalServer):
    def __init__(self, repository: str = "acme/sft", token: str = "ghs_test"):
        self.repository, self.token = repository, token
        self.accounts = {token: "github-actions[bot]"}  # token -> login, as the API reports a creator
        self.statuses: dict[str, list[dict]] = {}  # sha -> every status, oldest first
        self.comments: dict[int, list[dict]] = {}  # issue number -> comments
        # Git Data: commit sha -> {"tree": {path: text}, "parents": [...]}; refs "heads/x" -> sha
        self.commits: dict[str, dict] = {}
        self.trees: dict[str, dict[str, str]] = {}
        self.refs: dict[str, str] = {}
        self.blobs: dict[str, str | bytes] = {}  # blob sha -> text (or bytes)
        self._next_id = 1000
        super().__init__(self._handler())
        self.api_url = self.url

    def add_commit(self, files: dict[str, str], parents=(), message: str = "", sha: str | None = None) -> str:
        """A commit of `files`; `sha` registers a commit of a real local repository under its own id."""
        tree = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.trees[tree] = dict(files)
        sha = sha or hashlib.sha1(f"{tree}{parents}{message}".encode()).hexdigest()
        self.commits[sha] = {"tree": tree, "parents": list(parents), "message": message}
        return sha

    def add_account(self, login: str) -> str:
        """A token of another account (a bot's fine-grained token, or an intruder's)."""
        token = f"ghp_{hashlib.sha1(login.encode()).hexdigest()[:20]}"
        self.accounts[token] = login
        return token

    def add_comment(self, number: int, body: str) -> int:
        self._next_id += 1
        self.comments.setdefault(number, []).append({"id": self._next_id, "body": body})
        return self._next_id

    def _handler(gh):  # noqa: N805
        class Handler(JSONHandler):
            def _handle(self, method: str):
                login = gh.accounts.get(self.headers.get("Authorization", "").removeprefix("Bearer "))
                if login is None:
                    return self._reply(401, {"message": "Bad credentials"})
                url = urlparse(self.path)
                prefix = f"/repos/{gh.repository}"
                if not url.path.startswith(prefix):
                    return self._reply(404, {"message": "Not Found"})
                path, query = url.path[len(prefix) :], parse_qs(url.query)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, answer = gh._route(method, path, query, body, login)
                self._reply(status, answer)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

        return Handler

    def _route(self, method, path, query, body, login):
        if m := re.fullmatch(r"/statuses/(\w+)", path):
            if method != "POST":
                return 404, {"message": "Not Found"}
            if body.get("state") not in ("pending", "success", "failure", "error"):
                return 422, {"message": "Validation Failed", "errors": [{"field": "state"}]}
            if len(body.get("description") or "") > 140:
                return 422, {"message": "Validation Failed", "errors": [{"field": "description", "code": "custom"}]}
            self.statuses.setdefault(m.group(1), []).append({**body, "creator": {"login": login}})
            return 201, {"id": len(self.statuses[m.group(1)]), **self.statuses[m.group(1)][-1]}
        if (m := re.fullmatch(r"/commits/(\w+)/statuses", path)) and method == "GET":
            return 200, self.statuses.get(m.group(1), [])[::-1]  # newest first, each with its creator
        if (m := re.fullmatch(r"/commits/(\w+)/status", path)) and method == "GET":
            latest = {}
            for status in self.statuses.get(m.group(1), []):
                latest[status["context"]] = status
            statuses = [{k: v for k, v in s.items() if k != "creator"} for s in list(latest.values())[::-1]]
            states = {s["state"] for s in statuses}
            state = (
                "failure"
                if states & {"failure", "error"}
                else "pending"
                if "pending" in states or not states
                else "success"
            )
            return 200, {"state": state, "sha": m.group(1), "statuses": statuses, "total_count": len(statuses)}
        if m := re.fullmatch(r"/issues/(\d+)/comments", path):
            number = int(m.group(1))
            if method == "GET":
                per_page, page = int(query.get("per_page", ["30"])[0]), int(query.get("page", ["1"])[0])
                return 200, self.comments.get(number, [])[(page - 1) * per_page : page * per_page]
            if method == "POST":
                return 201, {"id": self.add_comment(number, body["body"]), "body": body["body"]}
        if (m := re.fullmatch(r"/git/commits/(\w+)", path)) and method == "GET" and m.group(1) in self.commits:
            return 200, {"sha": m.group(1), "tree": {"sha": self.commits[m.group(1)]["tree"]}}
        if path == "/git/blobs" and method == "POST":
            data = base64.b64decode(body["content"]) if body.get("encoding") == "base64" else body["content"].encode()
            sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            try:
                self.blobs[sha] = data.decode()  # text files read back as text, as the tests compare them
            except UnicodeDecodeError:
                self.blobs[sha] = data
            return 201, {"sha": sha}
        if path == "/git/trees" and method == "POST":
            files = dict(self.trees[body["base_tree"]])
            files.update({e["path"]: self.blobs[e["sha"]] if "sha" in e else e["content"] for e in body["tree"]})
            sha = self.add_commit(files)  # registers the tree; the throwaway commit is harmless
            return 201, {"sha": self.commits[sha]["tree"]}
        if path == "/git/commits" and method == "POST":
            sha = self.add_commit(self.trees[body["tree"]], tuple(body["parents"]), body["message"])
            return 201, {"sha": sha}
        if path == "/git/refs" and method == "POST":
            name = body["ref"].removeprefix("refs/")
            if name in self.refs:
                return 422, {"message": "Reference already exists"}
            self.refs[name] = body["sha"]
            return 201, {"ref": body["ref"], "object": {"sha": body["sha"]}}
        if (m := re.fullmatch(r"/git/refs/(.+)", path)) and method == "PATCH":
            if m.group(1) not in self.refs:
                return 422, {"message": "Reference does not exist"}
            self.refs[m.group(1)] = body["sha"]
            return 200, {"ref": f"refs/{m.group(1)}", "object": {"sha": body["sha"]}}
        if (m := re.fullmatch(r"/issues/comments/(\d+)", path)) and method == "PATCH":
            for comments in self.comments.values():
                for comment in comments:
                    if comment["id"] == int(m.group(1)):
                        comment["body"] = body["body"]
                        return 200, comment
        return 404, {"message": "Not Found"}
