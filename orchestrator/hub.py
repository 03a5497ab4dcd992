"""Check the Hugging Face hub before a box is rented: does each pinned revision exist, and can
this `HF_TOKEN` read the model (a gated repo needs an account that accepted its conditions)?

    answers = check_inputs(repos, token=os.environ.get("HF_TOKEN"))   # one HubAnswer per repo

Two calls per repo, the ones huggingface_hub itself makes (read in huggingface_hub 2.4's
`hf_api.py`, `file_download.py`, `utils/_http.py`):

- `GET {endpoint}/api/{models|datasets}/{repo}/revision/{rev}` (`HfApi.model_info` /
  `dataset_info`, the revision quoted with `safe=""`): 200 with the repo's `sha` and `gated`
  (`False`, `"auto"` or `"manual"`);
- for a gated model, `HEAD {endpoint}/{repo}/resolve/{rev}/config.json` (`hf_hub_url` +
  `get_hf_file_metadata`): metadata of a gated repo is public, its files are not, so only a
  file tells whether this token may download.

The token goes in the `authorization: Bearer ...` header only (`utils/_headers.py`
`build_hf_headers`), never in a URL, argv, a log line or an error message. The endpoint is
`HF_ENDPOINT` when set (huggingface_hub's `constants.ENDPOINT`), else https://huggingface.co.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

import httpx

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 15.0
TOKEN_URL = "https://huggingface.co/settings/tokens"


def endpoint_from_env(environ: dict[str, str] | None = None) -> str:
    """`HF_ENDPOINT` (as huggingface_hub reads it, trailing `/` dropped), else the hub."""
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class Repo:
    """One input of the study on the hub."""

    repo_id: str
    kind: str  # model | dataset
    revision: str | None  # None: the default branch (unpinned)
    needed_by: str = ""  # the stages, for the message


@dataclass(frozen=True)
class HubAnswer:
    repo: Repo
    ok: bool
    line: str  # what the hub said, one line (the fix included when not ok)
    sha: str | None = None
    gated: str | bool | None = None


def _error_code(resp: httpx.Response) -> tuple[str, str]:
    return resp.headers.get("X-Error-Code", ""), resp.headers.get("X-Error-Message", "")


def _rev(repo: Repo) -> str:
    return repo.revision or "main"


def _explain(repo: Repo, resp: httpx.Response, *, has_token: bool, file: bool) -> str:
    """One line for a failed hub answer, following `hf_raise_for_status` (utils/_http.py)."""
    code, message = _error_code(resp)
    what = f"{repo.kind} {repo.repo_id}"
    page = f"https://huggingface.co/{'datasets/' if repo.kind == 'dataset' else ''}{repo.repo_id}"
    if code == "RevisionNotFound":
        # `X-Error-Code: RevisionNotFound` -> RevisionNotFoundError
        return (
            f"{what}: revision {_rev(repo)} does not exist on the hub; fix the pin "
            f"(--set {'revision' if repo.kind == 'model' else 'data.revision'}=SHA, see "
            f"{page}/commits/main)"
        )
    if code == "GatedRepo":
        # `X-Error-Code: GatedRepo` -> GatedRepoError (401 without a token, 403 with one whose
        # account is not on the authorized list)
        if not has_token:
            return (
                f"{what} is gated and HF_TOKEN is not set: accept its conditions at {page}, "
                f"then export HF_TOKEN (a read token from {TOKEN_URL})"
            )
        return (
            f"{what} is gated and this HF_TOKEN's account has not been granted access: accept "
            f"its conditions at {page} (or, for a fine-grained token, allow 'read access to "
            f"public gated repos')"
        )
    if resp.status_code == 401 and message == "Invalid credentials in Authorization header":
        # the one 401 hf_raise_for_status does not read as "repo not found"
        return f"HF_TOKEN is not a valid token (the hub refused it): create a read token at {TOKEN_URL}"
    if code == "RepoNotFound" or resp.status_code == 401:
        # `X-Error-Code: RepoNotFound`, or a 401 on /api/...: RepositoryNotFoundError ("missing,
        # or private or gated and the user is not authenticated")
        auth = "" if has_token else " (HF_TOKEN is not set)"
        return f"{what} not found, or private and this token cannot see it{auth}: check the id"
    if resp.status_code == 403:
        # a plain 403: "Make sure your token has the correct permissions" (HfHubHTTPError)
        return (
            f"{what}: HF_TOKEN lacks the permission to {'download it' if file else 'read it'} "
            f"({message or 'forbidden'}): use a read token, or a fine-grained one with read access "
            f"to this repo ({TOKEN_URL})"
        )
    if resp.status_code == 429:
        return f"{what}: the hub is rate-limiting this address (429); try again in a minute"
    return f"{what}: the hub answered HTTP {resp.status_code}{f' ({message})' if message else ''}"


def check_repo(
    client: httpx.Client, endpoint: str, repo: Repo, token: str | None, *, gated_file: str
) -> HubAnswer:
    """The revision exists, and for a gated model this token may download `gated_file`."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    api = f"{endpoint}/api/{repo.kind}s/{repo.repo_id}"
    if repo.revision:
        api += f"/revision/{quote(repo.revision, safe='')}"
    try:
        resp = client.get(api, headers=headers)
    except httpx.HTTPError as exc:
        return HubAnswer(repo, False, f"cannot reach {endpoint}: {type(exc).__name__}")
    if resp.status_code != 200:
        return HubAnswer(repo, False, _explain(repo, resp, has_token=bool(token), file=False))
    try:
        info = resp.json()
    except ValueError:
        info = {}
    sha = info.get("sha") if isinstance(info, dict) else None
    gated = info.get("gated") if isinstance(info, dict) else None
    pin = f"pinned at {repo.revision[:12]}" if repo.revision else "NOT pinned (default branch)"
    if not gated or repo.kind != "model":
        return HubAnswer(repo, True, f"{repo.kind} {repo.repo_id}: {pin}, readable", sha, gated)
    url = f"{endpoint}/{repo.repo_id}/resolve/{quote(_rev(repo), safe='')}/{gated_file}"
    try:
        head = client.head(url, headers=headers, follow_redirects=False)
    except httpx.HTTPError as exc:
        return HubAnswer(repo, False, f"cannot reach {endpoint}: {type(exc).__name__}", sha, gated)
    if head.status_code >= 400:
        return HubAnswer(
            repo, False, _explain(repo, head, has_token=bool(token), file=True), sha, gated
        )
    return HubAnswer(
        repo,
        True,
        f"model {repo.repo_id}: {pin}, gated ({gated}), this token may download it",
        sha,
        gated,
    )


def check_inputs(
    repos: Iterable[Repo],
    *,
    token: str | None,
    endpoint: str | None = None,
    gated_file: str = "config.json",
    transport: httpx.BaseTransport | None = None,
) -> list[HubAnswer]:
    """Check every repo once (same id, kind and revision), in order."""
    base = (endpoint or endpoint_from_env()).rstrip("/")
    seen: set[tuple[str, str, str | None]] = set()
    out: list[HubAnswer] = []
    local = base.startswith(("http://127.0.0.1", "http://localhost"))  # no proxy for loopback
    with httpx.Client(timeout=TIMEOUT_S, transport=transport, trust_env=not local) as client:
        for repo in repos:
            key = (repo.repo_id, repo.kind, repo.revision)
            if key in seen:
                continue
            seen.add(key)
            out.append(check_repo(client, base, repo, token, gated_file=gated_file))
    return out
