"""A local stand-in for the Hugging Face hub's two calls `orch plan` makes (a real HTTP server on
127.0.0.1, no mocks), answering as huggingface_hub 2.4 expects the hub to (its `hf_api.py`,
`file_download.py`, `utils/_http.py` `hf_raise_for_status`):

- `GET /api/{models|datasets}/{repo}/revision/{rev}` (`HfApi.model_info` / `dataset_info`):
  200 with `{"id", "sha", "gated", "private"}`; a gated repo's metadata is public (200 without a
  token too: only its files are gated);
- `HEAD /{repo}/resolve/{rev}/{file}` (`hf_hub_url` + `get_hf_file_metadata`): 200, or 401/403
  with `X-Error-Code: GatedRepo` for a gated repo whose conditions this token's account has not
  accepted (`GatedRepoError`: "Cannot access gated repo");
- `X-Error-Code: RevisionNotFound`, 404, for a revision the repo does not have
  (`RevisionNotFoundError`);
- `X-Error-Code: RepoNotFound` for a missing (or private, unseen) repo: 401 without a token
  (the comment in `hf_raise_for_status`: "401 is misleading as it is returned for private and
  gated repos if user is not authenticated, missing repos"), 404 with one;
- 401 with `X-Error-Message: Invalid credentials in Authorization header` for a token the hub
  does not know (the one 401 `hf_raise_for_status` does not read as a missing repo).

The token is read from the `authorization: Bearer ...` header only (`utils/_headers.py`);
`seen_urls` records request paths so a test can check that no token ever went into a URL.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class HubRepo:
    sha: str
    revisions: set[str] = field(default_factory=set)  # besides `sha` and "main"
    gated: str | bool = False  # False | "auto" | "manual" (ModelInfo.gated)
    granted: set[str] = field(default_factory=set)  # tokens whose account accepted the gate
    private: bool = False


@dataclass
class HubServer:
    tokens: set[str] = field(default_factory=set)  # tokens the hub knows
    models: dict[str, HubRepo] = field(default_factory=dict)
    datasets: dict[str, HubRepo] = field(default_factory=dict)
    seen_urls: list[str] = field(default_factory=list)
    seen_auth: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _answer(self, head: bool) -> None:
                status, headers, body = server.handle(
                    self.command, self.path, self.headers.get("authorization", "")
                )
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:
                self._answer(head=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- the hub's rules --------------------------------------------------------------------
    def handle(self, method: str, raw: str, auth: str) -> tuple[int, dict[str, str], Any]:
        path = urlsplit(raw).path
        self.seen_urls.append(raw)
        self.seen_auth.append(auth)
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            return (
                401,
                {"X-Error-Message": "Invalid credentials in Authorization header"},
                {"error": "Invalid credentials in Authorization header"},
            )
        if path.startswith("/api/"):
            kind, rest = path[len("/api/") :].split("/", 1)
            repo_id, _, rev = rest.partition("/revision/")
            table = self.models if kind == "models" else self.datasets
            return self._info(table, repo_id, unquote(rev) or "main", token)
        if method == "HEAD" and "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            rev = unquote(rest.split("/", 1)[0])
            return self._file(repo_id, rev, token)
        return 404, {}, {"error": "not found"}

    def _missing(self, token: str | None) -> tuple[int, dict[str, str], Any]:
        status = 404 if token else 401
        return (
            status,
            {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            {"error": "Repository not found"},
        )

    def _info(
        self, table: dict[str, HubRepo], repo_id: str, rev: str, token: str | None
    ) -> tuple[int, dict[str, str], Any]:
        repo = table.get(repo_id)
        if repo is None or (repo.private and token not in repo.granted):
            return self._missing(token)
        if rev not in {"main", repo.sha, *repo.revisions}:
            return (
                404,
                {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                {"error": f"Invalid rev id: {rev}"},
            )
        sha = repo.sha if rev == "main" else rev
        return 200, {}, {"id": repo_id, "sha": sha, "gated": repo.gated, "private": repo.private}

    def _file(self, repo_id: str, rev: str, token: str | None) -> tuple[int, dict[str, str], Any]:
        repo = self.models.get(repo_id)
        if repo is None:
            return self._missing(token)
        if rev not in {"main", repo.sha, *repo.revisions}:
            return 404, {"X-Error-Code": "RevisionNotFound"}, None
        if repo.gated and token not in repo.granted:
            status = 403 if token else 401
            return (
                status,
                {
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": "Access to model is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                },
                None,
            )
        return 200, {"X-Repo-Commit": repo.sha, "ETag": '"abc"'}, None
