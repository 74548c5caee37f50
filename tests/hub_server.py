"""A small Hugging Face Hub look-alike for tests: real HTTP on 127.0.0.1, standard library only.

It speaks the subset of the Hub API that the unmodified ``huggingface_hub`` client (2.4) and ``transformers`` use to
create repos, commit files, and download them again::

    POST   /api/repos/create                              create a repo (409 if it exists; initial commit .gitattributes)
    DELETE /api/repos/delete                              delete a repo
    GET    /api/whoami-v2                                 the (fake) user behind any Bearer token
    POST   /api/validate-yaml                             README.md metadata check (always valid)
    GET    /api/{type}s/{repo}[/revision/{rev}]           repo info: id, sha, siblings (sizes/blobIds with ?blobs=1)
    GET    /api/{type}s/{repo}/tree/{rev}[/{path}]        tree listing, ?recursive=, paginated through a Link header
    POST   /api/{type}s/{repo}/paths-info/{rev}           info on given paths (form field ``paths``)
    GET    /api/{type}s/{repo}/refs                       branches (and pull-request refs with ?include_prs=1)
    GET    /api/{type}s/{repo}/commits/{rev}              commit history, newest first
    POST   /api/{type}s/{repo}/preupload/{rev}            upload modes: every file is "regular"
    POST   /api/{type}s/{repo}/commit/{rev}               NDJSON commit: header / file (base64) / deletedFile / deletedFolder
    POST   /api/{type}s/{repo}/branch/{branch}            create a branch (409 if it exists); DELETE removes it
    HEAD   /[{type}s/]{repo}/resolve/{rev}/{path}         file metadata: X-Repo-Commit, ETag, Content-Length
    GET    /[{type}s/]{repo}/resolve/{rev}/{path}         file content (single byte ranges honoured)

Errors carry the ``X-Error-Code`` header the client maps to its exceptions: ``RepoNotFound``
(-> ``RepositoryNotFoundError``), ``RevisionNotFound`` (-> ``RevisionNotFoundError``) and ``EntryNotFound``
(-> ``RemoteEntryNotFoundError``, a subclass of ``EntryNotFoundError``).  A missing file's 404 still carries
``X-Repo-Commit`` so the client can cache the file's absence.

Every file travels inside the commit, base64-encoded: the preupload answer marks all files ``"regular"``, and the
client only goes to LFS or Xet for files the server marks ``"lfs"``.  So there is no LFS batch API and no Xet here, and
no response ever carries Xet headers (``X-Xet-Hash``) or LFS ones (``X-Linked-Etag``/``X-Linked-Size``), so
downloads are plain HTTP GETs on ``/resolve``.  A commit line of kind ``lfsFile`` is refused with 400.

Any ``Authorization: Bearer ...`` header counts as authenticated (as the user ``HubServer.username``); writes need
one (401 otherwise, unless ``require_auth_for_writes=False``), reads need one only for private repos.  Tokens are never
stored or logged: the request log keeps method, path, status and whether a token was present.

Blob contents live on disk under ``root`` (keyed by their git blob id); repo metadata lives in memory.  The server
binds only to 127.0.0.1 on a free port and runs in daemon threads; ``stop()`` (or leaving the ``with`` block) shuts it
down and closes the open keep-alive connections.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

__all__ = ["HubServer", "HubError", "start_hub_server", "git_blob_oid"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_SUBROUTES = {"revision", "tree", "paths-info", "refs", "commits", "preupload", "commit", "branch"}
HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's ``oid``/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


class HubError(Exception):
    """An HTTP error answer: status, optional ``X-Error-Code``, message (sent as ``X-Error-Message`` and as the JSON
    body's ``error``, next to ``body``'s keys; e.g. a 409 on repo creation carries the existing repo's ``url``, which
    ``create_repo(exist_ok=True)`` reads)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body or {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> blob oid
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid ("refs/pr/N" included)
    pr_count: int = 0
    last_modified: str = ""


class _Store:
    """Repos, commits and on-disk blobs; all access under one lock."""

    def __init__(self, root: Path, username: str):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = 0

    # -- blobs
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self.blob_dir / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return oid

    def blob_path(self, oid: str) -> Path:
        return self.blob_dir / oid

    def blob_size(self, oid: str) -> int:
        return self.blob_path(oid).stat().st_size

    # -- repos
    def get_repo(self, repo_type: str, repo_id: str, authenticated: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authenticated):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, str], title: str, message: str) -> str:
        self._counter += 1
        material = json.dumps([repo.repo_type, repo.repo_id, parent, sorted(files.items()), title, message, self._counter])
        oid = hashlib.sha1(material.encode()).hexdigest()
        date = _now_iso()
        repo.commits[oid] = Commit(oid, parent, dict(files), title, message, date)
        repo.last_modified = date
        return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private, created_at=_now_iso())
        oid = self.put_blob(DEFAULT_GITATTRIBUTES)
        repo.branches["main"] = self.new_commit(repo, None, {".gitattributes": oid}, "initial commit", "")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    @staticmethod
    def resolve(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        rev = revision.lower()
        if HEX40.match(rev) and rev in repo.commits:
            return rev
        if HEX_PREFIX.match(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _tree_entries(store: _Store, files: dict[str, str], path: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries (files and directories) under ``path`` ("" = root), like ``/api/.../tree``."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
    entries: dict[str, dict[str, Any]] = {}
    for file_path, oid in files.items():
        if not file_path.startswith(prefix):
            continue
        rel_parts = file_path[len(prefix):].split("/")
        # directories on the way to the file
        for depth in range(1, len(rel_parts)):
            if not recursive and depth > 1:
                break
            dir_path = prefix + "/".join(rel_parts[:depth])
            if dir_path not in entries:
                listing = sorted((p, o) for p, o in files.items() if p.startswith(dir_path + "/"))
                tree_oid = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
                entries[dir_path] = {"type": "directory", "oid": tree_oid, "size": 0, "path": dir_path}
        if recursive or len(rel_parts) == 1:
            entries[file_path] = {"type": "file", "oid": oid, "size": store.blob_size(oid), "path": file_path}
    return [entries[k] for k in sorted(entries)]


def _file_entry(store: _Store, files: dict[str, str], path: str) -> dict[str, Any] | None:
    path = path.strip("/")
    if path in files:
        return {"type": "file", "oid": files[path], "size": store.blob_size(files[path]), "path": path}
    listing = sorted((p, o) for p, o in files.items() if p.startswith(path + "/"))
    if listing:
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(), "size": 0, "path": path}
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "hf-rlprune-test-hub/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this many seconds
    server: "_HTTPServer"

    # -- plumbing
    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr access log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.hub.max_body_bytes:
            self.close_connection = True
            raise HubError(413, "Request body too large for the test Hub")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        self.method = method
        raw_path, _, raw_query = self.path.partition("?")
        self.query = parse_qs(raw_query, keep_blank_values=True)
        self.authenticated = self.headers.get("Authorization", "").lower().startswith("bearer ")
        status = 500
        try:
            self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            status = self._route(method, raw_path)
        except HubError as e:
            status = self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-answer
            self.close_connection = True
            status = 499
        except Exception as e:  # a bug here must surface as a clean 500, not a hung client
            status = self._send_error(HubError(500, f"test hub internal error: {type(e).__name__}: {e}"))
        finally:
            self.server.hub._log(method, raw_path, status, self.authenticated)

    # -- responses
    def _send(
        self, status: int, body: bytes = b"", content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.method != "HEAD" and body:
            self.wfile.write(body)
        return status

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> int:
        return self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, e: HubError) -> int:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        headers["X-Error-Message"] = e.message.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")
        return self._json({"error": e.message, **e.body}, e.status, headers)

    # -- routing
    def _route(self, method: str, raw_path: str) -> int:
        segs = [s for s in raw_path.split("/") if s != ""]
        hub = self.server.hub
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                if not self.authenticated:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return self._json(hub.whoami())
            if rest == ["validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest and rest[0] in REPO_TYPES and len(rest) >= 2:
                return self._repo_api(method, REPO_TYPES[rest[0]], rest[1:])
            raise HubError(404, f"Not implemented by the test Hub: {method} {raw_path}")
        # /[datasets|spaces/]{repo_id}/resolve/{rev}/{path}
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if method in ("GET", "HEAD"):
            for n in (2, 1):
                if len(segs) > n + 2 and segs[n] == "resolve":
                    repo_id = "/".join(unquote(s) for s in segs[:n])
                    rev, path_segs = self._take_revision(segs[n + 1:])
                    return self._resolve(repo_type, repo_id, rev, "/".join(unquote(s) for s in path_segs))
        raise HubError(404, f"Not implemented by the test Hub: {method} {raw_path}")

    @staticmethod
    def _take_revision(segs: list[str]) -> tuple[str, list[str]]:
        """First revision in ``segs``: one (%-encoded) segment, or an unencoded ``refs/pr/N`` / ``refs/convert/X``."""
        if segs[0] == "refs" and len(segs) >= 3 and segs[1] in ("pr", "convert"):
            return "/".join(unquote(s) for s in segs[:3]), segs[3:]
        return unquote(segs[0]), segs[1:]

    def _repo_api(self, method: str, repo_type: str, segs: list[str]) -> int:
        # repo ids are "name" or "namespace/name"; the sub-route keyword tells them apart
        if len(segs) >= 3 and segs[2] in API_SUBROUTES:
            repo_id, sub = f"{unquote(segs[0])}/{unquote(segs[1])}", segs[2:]
        elif len(segs) == 2:
            repo_id, sub = f"{unquote(segs[0])}/{unquote(segs[1])}", []
        elif len(segs) >= 2 and segs[1] in API_SUBROUTES:
            repo_id, sub = unquote(segs[0]), segs[1:]
        elif len(segs) == 1:
            repo_id, sub = unquote(segs[0]), []
        else:
            raise HubError(404, "Not implemented by the test Hub")
        hub = self.server.hub
        with hub.store.lock:
            repo = hub.store.get_repo(repo_type, repo_id, self.authenticated)
            if not sub and method == "GET":
                return self._repo_info(repo, None)
            kind, args = sub[0], sub[1:]
            if kind == "revision" and method == "GET" and args:
                rev, _ = self._take_revision(args)
                return self._repo_info(repo, rev)
            if kind == "tree" and method == "GET" and args:
                rev, path_segs = self._take_revision(args)
                return self._tree(repo, rev, "/".join(unquote(s) for s in path_segs))
            if kind == "paths-info" and method == "POST" and args:
                rev, _ = self._take_revision(args)
                return self._paths_info(repo, rev)
            if kind == "refs" and method == "GET":
                return self._refs(repo)
            if kind == "commits" and method == "GET" and args:
                rev, _ = self._take_revision(args)
                return self._commits(repo, rev)
            if kind in ("preupload", "commit", "branch") and method in ("POST", "DELETE"):
                if not self.authenticated and hub.require_auth_for_writes:
                    raise HubError(401, "You must be authenticated to write to a repository")
                rev, _ = self._take_revision(args) if args else ("main", [])
                if kind == "preupload" and method == "POST":
                    return self._preupload(repo, rev)
                if kind == "commit" and method == "POST":
                    return self._commit(repo, rev)
                if kind == "branch" and method == "POST":
                    return self._create_branch(repo, rev)
                if kind == "branch" and method == "DELETE":
                    return self._delete_branch(repo, rev)
        raise HubError(404, f"Not implemented by the test Hub: {method} /api/{repo_type}s/{repo_id}/{'/'.join(sub)}")

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    # -- repo management
    def _create_repo(self) -> int:
        hub = self.server.hub
        if not self.authenticated and hub.require_auth_for_writes:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = self._json_body()
        name, org = payload.get("name"), payload.get("organization") or hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not name or not NAME_RE.match(name) or not NAME_RE.match(org) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        with hub.store.lock:
            if (repo_type, repo_id) in hub.store.repos:
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            hub.store.create_repo(repo_type, repo_id, private)
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> int:
        hub = self.server.hub
        if not self.authenticated and hub.require_auth_for_writes:
            raise HubError(401, "You must be authenticated to delete a repository")
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or hub.username}/{payload.get('name')}"
        with hub.store.lock:
            if hub.store.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return self._json({})

    def _repo_info(self, repo: Repo, revision: str | None) -> int:
        store = self.server.hub.store
        sha = store.resolve(repo, revision or "main")
        files = repo.commits[sha].files
        with_blobs = self.query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            entry: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry.update(size=store.blob_size(files[path]), blobId=files[path])
            siblings.append(entry)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": repo.last_modified,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            if "config.json" in files:
                try:
                    config = json.loads(store.blob_path(files["config.json"]).read_bytes())
                    info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
                except (ValueError, TypeError):
                    pass
        return self._json(info)

    def _tree(self, repo: Repo, revision: str, path: str) -> int:
        hub = self.server.hub
        sha = hub.store.resolve(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = _tree_entries(hub.store, repo.commits[sha].files, path, recursive)
        try:
            cursor = int(self.query.get("cursor", ["0"])[0])
        except ValueError as e:
            raise HubError(400, "Invalid cursor") from e
        page = entries[cursor: cursor + hub.tree_page_size]
        headers = {"X-Repo-Commit": sha}
        if cursor + hub.tree_page_size < len(entries):
            query = {k: v[0] for k, v in self.query.items() if k != "cursor"}
            query["cursor"] = str(cursor + hub.tree_page_size)
            next_url = f"{hub.url}{self.path.partition('?')[0]}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return self._json(page, headers=headers)

    def _paths_info(self, repo: Repo, revision: str) -> int:
        store = self.server.hub.store
        sha = store.resolve(repo, revision)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            paths = self._json_body().get("paths", [])
        else:
            paths = parse_qs(self.body.decode(), keep_blank_values=True).get("paths", [])
        files = repo.commits[sha].files
        out = [e for e in (_file_entry(store, files, p) for p in paths) if e is not None]
        return self._json(out)

    def _refs(self, repo: Repo) -> int:
        def ref(name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}", "targetCommit": oid}

        include_prs = self.query.get("include_prs", ["0"])[0].lower() in ("1", "true")
        branches = [ref(n, o) for n, o in sorted(repo.branches.items()) if not n.startswith("refs/pr/")]
        prs = [ref(n, o) for n, o in sorted(repo.branches.items()) if n.startswith("refs/pr/")]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if include_prs:
            out["pullRequests"] = prs
        return self._json(out)

    def _commits(self, repo: Repo, revision: str) -> int:
        user = self.server.hub.username
        oid: str | None = self.server.hub.store.resolve(repo, revision)
        out = []
        while oid is not None:
            c = repo.commits[oid]
            out.append({"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": user}], "date": c.date})
            oid = c.parent
        return self._json(out)

    def _create_branch(self, repo: Repo, branch: str) -> int:
        store = self.server.hub.store
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = store.resolve(repo, start)
        return self._json({})

    def _delete_branch(self, repo: Repo, branch: str) -> int:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        return self._json({})

    # -- uploads
    def _preupload(self, repo: Repo, revision: str) -> int:
        store = self.server.hub.store
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.branches[revision]
        files = repo.commits[head].files
        payload = self._json_body()
        out = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in payload.get("files", [])
        ]
        return self._json({"files": out, "commitOid": head})

    def _commit(self, repo: Repo, revision: str) -> int:
        hub = self.server.hub
        store = hub.store
        if revision not in repo.branches:
            if HEX_PREFIX.match(revision.lower()):
                raise HubError(400, f"Cannot commit to a commit id, only to a branch: {revision}")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        header: dict[str, Any] = {}
        ops: list[tuple[str, dict[str, Any]]] = []
        if self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            for line in self.body.splitlines():
                if line.strip():
                    try:
                        item = json.loads(line)
                    except ValueError as e:
                        raise HubError(400, f"Invalid NDJSON line: {e}") from e
                    if item.get("key") == "header":
                        header = item.get("value") or {}
                    else:
                        ops.append((item.get("key"), item.get("value") or {}))
        else:  # legacy JSON commit payload
            payload = self._json_body()
            header = {k: payload.get(k) for k in ("summary", "description", "parentCommit")}
            ops = [("file", f) for f in payload.get("files", [])] + [("lfsFile", f) for f in payload.get("lfsFiles", [])]
            ops += [("deletedFile", f) for f in payload.get("deletedFiles", [])]
            ops += [("deletedFolder", f) for f in payload.get("deletedFolders", [])]
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary (message) is required")
        head = repo.branches[revision]
        parent_commit = header.get("parentCommit")
        if parent_commit and store.resolve(repo, parent_commit) != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for key, value in ops:
            path = str(value.get("path", "")).strip("/")
            if not path or path.startswith(".git/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: {value.get('path')!r}")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise HubError(400, f"Invalid base64 content for {path}") from e
                else:
                    data = content.encode()
                files[path] = store.put_blob(data)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, "The test Hub takes no LFS files: every preupload answer is 'regular'")
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        create_pr = self.query.get("create_pr", ["0"])[0].lower() in ("1", "true")
        oid = store.new_commit(repo, head, files, summary, header.get("description") or "")
        prefix = f"{hub.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
        out: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{prefix}/commit/{oid}",
            "commitMessage": summary,
            "hookOutput": "",
        }
        if create_pr:
            repo.pr_count += 1
            repo.branches[f"refs/pr/{repo.pr_count}"] = oid
            out["pullRequestUrl"] = f"{prefix}/discussions/{repo.pr_count}"
        else:
            repo.branches[revision] = oid
        return self._json(out)

    # -- downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        hub = self.server.hub
        with hub.store.lock:
            repo = hub.store.get_repo(repo_type, repo_id, self.authenticated)
            sha = hub.store.resolve(repo, revision)
            oid = repo.commits[sha].files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        blob = hub.store.blob_path(oid)
        size = blob.stat().st_size
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, size - 1
        range_header = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip()) if range_header else None
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            else:
                start = max(size - int(m.group(2)), 0)
            if start >= size or start > end:
                headers = {"Content-Range": f"bytes */{size}", "X-Repo-Commit": sha}
                raise HubError(416, "Requested range not satisfiable", headers=headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.method == "GET" and length:
            with open(blob, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        return status


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: "HubServer"):
        self.hub = hub
        self.conns: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return client_address[0] == "127.0.0.1"  # loopback only


class HubServer:
    """The test Hub. ``with HubServer(tmp_path) as hub: ...`` or ``hub = HubServer(root).start(); ...; hub.stop()``.

    Attributes after ``start()``: ``url`` (``http://127.0.0.1:PORT``), ``requests`` (list of
    ``(method, path, status, authenticated)``), ``username`` (namespace for repo ids given without one).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        username: str = "user",
        require_auth_for_writes: bool = True,
        tree_page_size: int = 1000,
        max_body_bytes: int = 1 << 30,
    ):
        self.store = _Store(Path(root), username)
        self.username = username
        self.require_auth_for_writes = require_auth_for_writes
        self.tree_page_size = tree_page_size
        self.max_body_bytes = max_body_bytes
        self.requests: list[tuple[str, str, int, bool]] = []
        self._log_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _log(self, method: str, path: str, status: int, authenticated: bool) -> None:
        with self._log_lock:
            self.requests.append((method, path, status, authenticated))

    def whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "id": hashlib.sha1(self.username.encode()).hexdigest()[:24],
            "name": self.username,
            "fullname": self.username,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    # -- lifecycle
    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with httpd.conn_lock:
            conns = list(httpd.conns)
        for conn in conns:  # wake handler threads blocked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- introspection helpers for tests (no HTTP)
    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self.store.lock:
            return sorted(rid for (rtype, rid) in self.store.repos if rtype == repo_type)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.store.lock:
            repo = self.store.get_repo(repo_type, repo_id, True)
            return self.store.resolve(repo, revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` of a repo at ``revision``."""
        with self.store.lock:
            repo = self.store.get_repo(repo_type, repo_id, True)
            listing = dict(repo.commits[self.store.resolve(repo, revision)].files)
        return {p: self.store.blob_path(o).read_bytes() for p, o in sorted(listing.items())}

    def commit_titles(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit titles, newest first (the repo's initial commit last)."""
        with self.store.lock:
            repo = self.store.get_repo(repo_type, repo_id, True)
            oid: str | None = self.store.resolve(repo, revision)
            titles = []
            while oid is not None:
                titles.append(repo.commits[oid].title)
                oid = repo.commits[oid].parent
        return titles


def start_hub_server(root: str | os.PathLike, **kwargs: Any) -> tuple[str, Any]:
    """Start a :class:`HubServer` storing blobs under ``root``; returns ``(url, stop)``."""
    hub = HubServer(root, **kwargs).start()
    return hub.url, hub.stop
