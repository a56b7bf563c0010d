"""A stand-in Hugging Face Hub on 127.0.0.1, for testing pulls without the network.

It serves files registered as (repo_id, revision, filename) -> bytes at
`/{repo_id}/resolve/{revision}/{filename}`, answering HEAD and GET with the
headers huggingface-hub (2.x, `hf_hub_download`) relies on:

    X-Repo-Commit   40 hex digits, one commit per (repo, revision)
    ETag            the sha256 for LFS files, a git blob sha1 for small files
    X-Linked-Etag   the sha256 (LFS files only): the name of the blob in the HF cache
    X-Linked-Size   the size (LFS files only)
    Content-Length  and `Range` -> 206 + Content-Range

Unknown repos answer 404 `X-Error-Code: RepoNotFound`, unknown revisions
`RevisionNotFound`, unknown files `EntryNotFound`.

For `snapshot_download` it also answers the two API calls it makes:
`GET /api/models/{repo_id}/revision/{revision}` (repo info: `sha`, `siblings`)
and `GET /api/models/{repo_id}/tree/{revision}[/{path}]` (every file with its
git blob id, size and, for LFS files, `lfs: {oid: sha256, size, pointerSize}`). Faults can be injected: cut
the connection part-way through GET bodies (`drop_after`), or serve bytes that
do not match the advertised sha256 (`corrupt`). Every request is recorded
(`requests`, `gets()`) so tests can see whether a download resumed with Range.

Use it as a context manager, and `point_hf_at` (with pytest's monkeypatch) to
send huggingface-hub to it with its cache under a temporary HF_HOME:

    with HubServer() as hub:
        sha = hub.add("org/repo", "model.gguf", b"...")
        point_hf_at(monkeypatch, hub.url, tmp_path / "hf")
        ...
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

HF_CHUNK = 16 * 1024  # huggingface-hub's download chunk size in tests (see point_hf_at)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Request(NamedTuple):
    """One request the server received."""

    method: str
    path: str
    range: str | None  # the Range header, if any


@dataclass
class HubFile:
    data: bytes
    lfs: bool
    sha256: str
    corrupted: bool = False

    @property
    def etag(self) -> str:
        """What the hub reports: the sha256 for LFS files, the git blob sha1 otherwise."""
        if self.lfs:
            return self.sha256
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """The git blob sha1 the tree API lists: of the file, or of its LFS pointer."""
        if not self.lfs:
            return self.etag
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry

    def served(self) -> bytes:
        """The bytes sent on GET: the file, or (corrupted) the same length with every byte flipped."""
        return bytes(b ^ 0xFF for b in self.data) if self.corrupted else self.data


@dataclass
class _Drop:
    after: int  # bytes of body to send before cutting the connection
    times: int  # how many more GETs to cut
    absolute: bool  # `after` counts from the start of the file, not of the response
    filename: str | None


def commit_for(repo_id: str, revision: str) -> str:
    """The 40-hex commit the server reports for (repo_id, revision)."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubServer:
    """A tiny Hub on 127.0.0.1 (a ThreadingHTTPServer in a daemon thread)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, str, str], HubFile] = {}
        self._repos: set[str] = set()
        self._drops: list[_Drop] = []
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- content ------------------------------------------------------------------

    def add(self, repo_id: str, filename: str, data: bytes, revision: str = "main", lfs: bool = True) -> str:
        """Serve `data` as `filename` of `repo_id` at `revision`; returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._repos.add(repo_id)
            self._files[(repo_id, revision, filename)] = HubFile(data, lfs, sha)
        return sha

    def add_repo(self, repo_id: str) -> None:
        """A repo that exists but holds no files (its files answer EntryNotFound)."""
        with self._lock:
            self._repos.add(repo_id)

    def corrupt(self, repo_id: str, filename: str, revision: str = "main", on: bool = True) -> None:
        """Serve bytes that do not hash to the advertised sha256 (same size), or stop doing so."""
        with self._lock:
            self._files[(repo_id, revision, filename)].corrupted = on

    # --- faults -------------------------------------------------------------------

    def drop_after(self, nbytes: int, times: int = 1, absolute: bool = False, filename: str | None = None) -> None:
        """Cut the connection after `nbytes` of body on the next `times` GETs (of `filename`, else any file).

        By default the count starts at the beginning of each response, so a client that
        resumes with Range makes progress on every attempt. With `absolute=True` it is a
        file offset: no response ever gets past it, so resuming never completes.
        """
        with self._lock:
            self._drops.append(_Drop(nbytes, times, absolute, filename))

    def clear_faults(self) -> None:
        """Stop cutting connections and stop corrupting files."""
        with self._lock:
            self._drops.clear()
            for f in self._files.values():
                f.corrupted = False

    def _take_drop(self, filename: str) -> _Drop | None:
        with self._lock:
            for drop in self._drops:
                if drop.times > 0 and drop.filename in (None, filename):
                    drop.times -= 1
                    return drop
        return None

    # --- what happened ---------------------------------------------------------------

    def gets(self, filename: str | None = None) -> list[Request]:
        """The GET requests received (for `filename` only, if given)."""
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs if r.method == "GET" and (filename is None or r.path.endswith("/" + filename))]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request handling (called from the handler threads) ------------------------

    def _record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append(Request(method, path, range_header))

    def _resolve_revision(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], str]:
        """(200, {}, revision name) or a 404 for an unknown repo or revision; caller holds the lock.
        A commit the server reported stands for its revision."""
        if repo_id not in self._repos:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, revision
        revisions = {rev for (repo, rev, _) in self._files if repo == repo_id} | {"main"}
        revision = {commit_for(repo_id, rev): rev for rev in revisions}.get(revision, revision)
        if revision not in revisions:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, revision
        return 200, {}, revision

    def _api(self, path: str) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body) for the repo-info and tree API paths."""
        rest = path.removeprefix("/api/models/")
        for marker in ("/revision/", "/tree/"):
            repo_id, sep, tail = rest.partition(marker)
            if sep:
                break
        else:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, {}
        revision, _, sub = tail.partition("/")
        repo_id, revision, sub = unquote(repo_id), unquote(revision), unquote(sub)
        with self._lock:
            status, headers, revision = self._resolve_revision(repo_id, revision)
            if status != 200:
                return status, headers, {"error": headers["X-Error-Message"]}
            files = {name: f for (repo, rev, name), f in sorted(self._files.items()) if (repo, rev) == (repo_id,
                                                                                                      revision)}
        commit = commit_for(repo_id, revision)
        if marker == "/revision/":
            return 200, {}, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                             "siblings": [{"rfilename": name} for name in files]}
        prefix = sub.rstrip("/") + "/" if sub else ""
        return 200, {}, [f.tree_entry(name) for name, f in files.items() if name.startswith(prefix)]

    def _lookup(self, path: str) -> tuple[int, dict[str, str], HubFile | None]:
        """(status, headers, file) for a /resolve/ path."""
        repo_id, sep, rest = path.lstrip("/").partition("/resolve/")
        if not sep or "/" not in rest:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, None
        revision, _, filename = rest.partition("/")
        repo_id, revision, filename = unquote(repo_id), unquote(revision), unquote(filename)
        with self._lock:
            status, headers, revision = self._resolve_revision(repo_id, revision)
            if status != 200:
                return status, headers, None
            commit = commit_for(repo_id, revision)
            file = self._files.get((repo_id, revision, filename))
        if file is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                         "X-Repo-Commit": commit}, None
        headers = {"X-Repo-Commit": commit, "ETag": f'"{file.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if file.lfs:
            headers["X-Linked-Etag"] = f'"{file.sha256}"'
            headers["X-Linked-Size"] = str(len(file.data))
        return 200, headers, file


def _parse_range(header: str | None, total: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for a satisfiable single range, None for no range, "bad" otherwise."""
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return "bad"
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        return (max(total - n, 0), total - 1) if n > 0 and total > 0 else "bad"
    start = int(m.group(1))
    end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
    if start >= total or end < start:
        return "bad"
    return start, end


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real hub; bodies are Content-Length framed
        timeout = 10  # idle keep-alive connections do not hold a thread forever

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            range_header = self.headers.get("Range")
            hub._record(self.command, path, range_header)
            if path.startswith("/api/models/"):
                status, headers, value = hub._api(path)
                self._send(status, headers, json.dumps(value).encode(), content_type="application/json")
                return
            status, headers, file = hub._lookup(path)
            if file is None:
                self._send(status, headers, b"" if not body else b'{"error": "not found"}',
                           content_type="application/json")
                return
            data = file.served() if body else file.data
            total = len(file.data)
            rng = _parse_range(range_header, total)
            if rng == "bad":
                self._send(416, {**headers, "Content-Range": f"bytes */{total}"}, b"")
                return
            start, end = (0, total - 1) if rng is None else rng  # type: ignore[misc]
            payload = data[start:end + 1] if total else b""
            if rng is not None:
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            self.send_response(206 if rng is not None else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not body:
                return
            drop = hub._take_drop(path.rsplit("/", 1)[-1])
            if drop is None:
                self.wfile.write(payload)
                return
            cut = max(drop.after - start, 0) if drop.absolute else drop.after
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _send(self, status: int, headers: dict[str, str], payload: bytes,
                  content_type: str = "application/octet-stream") -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


def point_hf_at(monkeypatch: Any, endpoint: str, hf_home: Path) -> None:
    """Send huggingface-hub to `endpoint`, with its cache and token under `hf_home`, for one test.

    huggingface_hub.constants reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is
    first imported, so besides the environment (for code that imports it later, and
    subprocesses) the constants themselves are patched. Also: no token is sent, and
    the one-second pause between download resumes is skipped to keep tests fast.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download

    endpoint = endpoint.rstrip("/")
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache),
                        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_OIDC_RESOURCE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    if hasattr(constants, "AGENT_HARNESSES_PATH"):
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(hf_home / ".agent_harnesses.json"))
    try:  # huggingface-hub fetches `{ENDPOINT}/api/agent-harnesses` once per process: keep it out of the log
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        pass
    else:
        if hasattr(_detect_agent, "_registry"):
            monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    # http_get hands on only whole chunks (10 MiB by default): the bytes of a partial chunk are lost when
    # the connection drops, so small chunks let a test file of a few hundred KB resume part-way through.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", HF_CHUNK)
    # http_get sleeps 1 s before each resume; its module uses `time` for nothing else.
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda _s: None))


def set_hf_offline(monkeypatch: Any, offline: bool = True) -> None:
    """HF_HUB_OFFLINE for this test (the constant too: huggingface-hub reads the variable at import)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def write_hub_catalog(path: Path, name: str, repo: str, filename: str, sha256: str, size: int) -> Path:
    """A user catalog file with one model whose only source is `repo`/`filename` on the hub."""
    path.write_text(f"""
[[model]]
name = "{name}"
arch = "llama"
tokenizer = "llama"
file = "tiny.gguf"
sha256 = "{sha256}"
size = {size}

[[model.sources]]
kind = "hf"
repo = "{repo}"
file = "{filename}"
""")
    return path
