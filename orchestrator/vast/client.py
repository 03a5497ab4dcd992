"""A typed client of the Vast.ai REST API (httpx), and where its API key and base URL come from.

Everything goes through `VastClient._request`: Bearer auth, JSON in and out, retries with a
growing backoff plus jitter (Vast's 429 carries no Retry-After), and every other error turned
into a `VastApiError` (a `ProviderError`) that carries Vast's own message. The key lives only in
the httpx client's default headers: it never appears in a repr, an exception, a log line, a URL
or argv. The base URL is the only difference between Vast and the test server.

What follows the official client (vast-ai/vast-cli, 2026-08):
- `VAST_URL` overrides the default base URL (`vastai/api/client.py`: `server_url_default =
  os.getenv("VAST_URL") or "https://console.vast.ai"`); an explicit `api_url` wins, as `--url`.
- The key: `VAST_API_KEY`, else the two-factor session key `vast_tfa_key` when that file exists,
  else `vast_api_key` (`vastai/cli/main.py`: `key_file = TFAKEY_FILE if os.path.exists(TFAKEY_FILE)
  else APIKEY_FILE`), else the legacy `~/.vast_api_key` (`vastai/cli/util.py` copies it over).
  An expired session key (401 "Invalid user key" or 404 "Session expired. Please log in again.",
  `_is_tfa_session_expired`) is retried once with the normal key; orch never deletes the file.
- Retried: 429/502/503/504 and connection errors, with a growing backoff (`_request`,
  `_RETRYABLE_STATUS`); 120 s per request "for slow operations like instance creation"
  (`_DEFAULT_TIMEOUT_SECONDS`). Unlike the CLI, a create is never resent once it may have
  reached Vast: a read timeout, a dropped connection or a 5xx answer raises `VastUncertain`, and
  the caller looks the instance up by its unique label.

    ProviderError
    └── VastApiError        status, error code, Vast's msg, and new_contract when a failed
        │                   create still made an instance (a bid that was too low)
        └── VastUncertain   a request that changes something was sent, its outcome is unknown
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from orchestrator.vast.keys import ApiKey, find_api_key, key_paths, tfa_key_path
from orchestrator.vast.models import Instance, Offer, SshEndpoint, parse_offers
from state.errors import ConfigError, ProviderError

if TYPE_CHECKING:
    from orchestrator.config import VastTarget

__all__ = [
    "DEFAULT_API_URL",
    "ApiKey",
    "Instance",
    "Offer",
    "SshEndpoint",
    "VastApiError",
    "VastClient",
    "VastUncertain",
    "account_credit",
    "api_url_for",
    "check_api_url",
    "find_api_key",
    "key_paths",
    "tfa_key_path",
]

DEFAULT_API_URL = "https://console.vast.ai"
RETRY_STATUS = frozenset({429, 502, 503, 504})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: The official client's per-request timeout, "for slow operations like instance creation".
CREATE_TIMEOUT_S = 120.0
#: The official client's expired two-factor session answers (`_is_tfa_session_expired`).
TFA_EXPIRED = frozenset({(401, "Invalid user key"), (404, "Session expired. Please log in again.")})


def account_credit(user: Mapping[str, Any]) -> float | None:
    """What the account can still spend, from `GET /api/v0/users/current/` (`credit`, the CLI's
    "Credit" column in `vastai/cli/display.py` user_fields; else `balance`); None if unknown."""
    for key in ("credit", "balance"):
        value = user.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


# -- errors -------------------------------------------------------------------------------------
class VastApiError(ProviderError):
    """Vast refused a request; `code` is Vast's error code (`no_such_ask`, ...)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str = "",
        new_contract: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.new_contract = new_contract
        super().__init__(message, hint=hint)


class VastUncertain(VastApiError):
    """A request that changes something (a create) was sent and may have been carried out."""


# -- the base URL -------------------------------------------------------------------------------
def check_api_url(url: str) -> str:
    """https anywhere; plain http only to loopback (a test server), never the key in clear."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return url.rstrip("/")
    raise ConfigError(
        f"api_url {url!r} is not usable",
        hint="use https://console.vast.ai (plain http is allowed only to 127.0.0.1, for tests); "
        "check api_url in orch.toml and VAST_URL",
    )


def api_url_for(cfg: VastTarget, env: Mapping[str, str] | None = None) -> str:
    """The base URL of a vast target: `api_url` when orch.toml sets it, else `VAST_URL`, else
    https://console.vast.ai (as the official client's `--url` / `VAST_URL` / default)."""
    env = os.environ if env is None else env
    if "api_url" in cfg.model_fields_set:
        return cfg.api_url.rstrip("/")
    return (env.get("VAST_URL") or "").strip().rstrip("/") or cfg.api_url.rstrip("/")


def _encode_query(params: Mapping[str, Any]) -> dict[str, str]:
    """As the official CLI: strings as they are, everything else JSON-encoded (httpx quotes)."""
    return {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items() if v is not None
    }


# -- the client ---------------------------------------------------------------------------------
class VastClient:
    """The Vast.ai REST API. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        api_url: str,
        key: ApiKey,
        *,
        timeout_s: float = 30.0,
        create_timeout_s: float | None = None,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = check_api_url(api_url)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.create_timeout_s = create_timeout_s  # None: CREATE_TIMEOUT_S
        self.dropped_offers = 0  # rows of the last search that were not offers at all
        self._sleep = sleep
        self._key = key
        self._secrets = [k.reveal() for k in (key, key.fallback) if k is not None and k.reveal()]
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {key.reveal()}", "Accept": "application/json"},
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,  # a redirect must not carry the key elsewhere
        )

    @classmethod
    def from_config(
        cls, api_url: str, env: Mapping[str, str] | None = None, **kw: Any
    ) -> VastClient:
        return cls(api_url, find_api_key(env), **kw)

    def __repr__(self) -> str:
        return f"VastClient({self.api_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        """Growing delay with jitter: base * 2^attempt, capped, times a factor in [0.5, 1.5)."""
        return min(self.backoff_max_s, self.backoff_s * (2**attempt)) * (0.5 + random.random())

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "****")
        return text

    def _session_expired(self, resp: httpx.Response) -> bool:
        """A two-factor session key that expired, with a normal key to fall back on."""
        if self._key.fallback is None or resp.status_code not in (401, 404):
            return False
        try:
            msg = resp.json().get("msg")
        except (ValueError, AttributeError):
            return False
        return (resp.status_code, msg) in TFA_EXPIRED

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """One call. A non-idempotent call is resent only when it surely did not reach Vast
        (no connection, or a 429 from the rate limiter); otherwise `VastUncertain`."""
        where = f"{method} {path}"
        last = ""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._http.request(
                    method,
                    path,
                    params=_encode_query(params or {}),
                    json=body if body is not None else None,
                    **extra,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The request never reached Vast: always safe to try again.
                last = f"cannot connect to {self.api_url} ({type(exc).__name__})"
            except httpx.HTTPError as exc:
                if not idempotent:
                    raise VastUncertain(
                        f"Vast did not answer {where} ({type(exc).__name__}); it may have been done",
                        status=0,
                    ) from exc
                if not isinstance(exc, (httpx.TimeoutException, httpx.RemoteProtocolError)):
                    raise ProviderError(
                        f"Vast request {where} failed: {self._scrub(str(exc))}"
                    ) from exc
                last = f"no answer from {self.api_url} in time ({type(exc).__name__})"
            else:
                if self._session_expired(resp):
                    self._use_fallback()
                    continue
                if resp.status_code not in RETRY_STATUS:
                    return self._decode(resp, where, idempotent=idempotent)
                if not idempotent and resp.status_code != 429:
                    raise VastUncertain(
                        f"Vast answered {where} with HTTP {resp.status_code}; it may have been done",
                        status=resp.status_code,
                    )
                last = f"HTTP {resp.status_code}: {self._scrub(resp.text[:200])}"
            if attempt < self.max_retries:
                self._sleep(self.backoff(attempt))
        raise ProviderError(
            f"Vast {where} kept failing after {self.max_retries + 1} tries: {last}",
            hint="Vast may be rate limiting or down; try again in a minute",
        )

    def _use_fallback(self) -> None:
        fallback = self._key.fallback
        assert fallback is not None
        self._key = fallback
        self._http.headers["Authorization"] = f"Bearer {fallback.reveal()}"

    def _decode(self, resp: httpx.Response, where: str, *, idempotent: bool = True) -> Any:
        try:
            data: Any = resp.json()
        except ValueError:
            data = None
        failed = resp.status_code >= 400 or (
            isinstance(data, dict) and data.get("success") is False
        )
        if not failed:
            if data is None:
                msg = f"Vast answered {where} with something that is not JSON"
                if not idempotent:  # it may have been done all the same
                    raise VastUncertain(msg, status=resp.status_code)
                raise ProviderError(msg)
            return data
        body = data if isinstance(data, dict) else {}
        code = str(body.get("error") or "")
        msg = str(
            body.get("msg")
            or body.get("message")
            or body.get("detail")
            or body.get("error")
            or resp.text[:200]
            or resp.reason_phrase
        )
        contract = body.get("new_contract")
        hint = None
        if resp.status_code == 401:
            hint = "check the Vast API key (VAST_API_KEY or ~/.config/vastai/vast_api_key)"
        elif resp.status_code == 403:
            # docs api-reference/authentication.mdx: "a scoped key that lacks the required
            # permission for the endpoint you're calling".
            hint = "the Vast API key lacks the permission for this call: use a key that may read and rent instances"
        elif resp.status_code == 404:
            hint = (
                "Vast answered 404 for a call that exists: check api_url (and VAST_URL) and the key"
            )
        cls = VastUncertain if resp.status_code >= 500 and not idempotent else VastApiError
        raise cls(
            f"Vast refused {where}: {self._scrub(msg)} (HTTP {resp.status_code}{', ' + code if code else ''})",
            status=resp.status_code,
            code=code,
            new_contract=int(contract)
            if isinstance(contract, (int, str)) and str(contract).isdigit()
            else None,
            hint=hint,
        )

    # -- calls ------------------------------------------------------------------------------
    def check_key(self) -> dict[str, Any]:
        """`GET /api/v0/users/current/`: the account (with `credit`/`balance`), or VastApiError."""
        data = self._request("GET", "/api/v0/users/current/")
        return data if isinstance(data, dict) else {}

    def search_offers(self, query: dict[str, Any]) -> list[Offer]:
        """`POST /api/v0/bundles/` with a query built by `offers.build_query`. Rows that are not
        offers at all (no usable id) are dropped and counted in `dropped_offers`."""
        data = self._request("POST", "/api/v0/bundles/", body=query)
        offers, self.dropped_offers = parse_offers(
            data.get("offers") if isinstance(data, dict) else None
        )
        return offers

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str,
        env: dict[str, str] | None = None,
        bid_dph: float | None = None,
    ) -> int:
        """`PUT /api/v0/asks/{offer_id}/`; `bid_dph` makes it interruptible. Returns the id.

        Sent once, with `create_timeout_s` (120 s). `VastUncertain` when it may have made an
        instance anyway: look it up by `label`. A refused create can still have made one (a bid
        that was too low makes a stopped one): the VastApiError then carries `new_contract`.
        """
        body: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "disk": float(disk_gb),
            "label": label,
            "env": dict(env or {}),
            "onstart": onstart,
            "runtype": "ssh_direc ssh_proxy",
        }
        if bid_dph is not None:
            body["price"] = round(float(bid_dph), 6)
        data = self._request(
            "PUT",
            f"/api/v0/asks/{int(offer_id)}/",
            body=body,
            idempotent=False,
            timeout=self.create_timeout_s or CREATE_TIMEOUT_S,
        )
        contract = data.get("new_contract") if isinstance(data, dict) else None
        if not isinstance(contract, (int, str)) or not str(contract).isdigit():
            raise VastUncertain(f"Vast accepted offer {offer_id} but named no instance", status=200)
        return int(contract)

    def show_instance(self, instance_id: int) -> Instance | None:
        """`GET /api/v0/instances/{id}/?owner=me`; None only for `{"instances": null}`, Vast's
        answer for an instance that does not exist (`vastai/api/instances.py` show_instance).
        Any error, a 404 included (a wrong path or key), is raised, never taken as "gone"."""
        data = self._request(
            "GET", f"/api/v0/instances/{int(instance_id)}/", params={"owner": "me"}
        )
        if not isinstance(data, dict) or "instances" not in data:
            raise ProviderError(f"Vast answered instance {instance_id} without an `instances` key")
        inst = data["instances"]
        if isinstance(inst, list):  # tolerate the list shape some versions answer
            inst = next((i for i in inst if str(i.get("id")) == str(instance_id)), None)
        if inst is None:
            return None
        return Instance.parse(inst)

    def iter_instances(
        self,
        *,
        select_filters: dict[str, Any] | None = None,
        page_size: int = 25,
    ) -> Iterator[Instance]:
        """`GET /api/v1/instances/` with `select_filters`, ordered by id, following `next_token`
        as `after_token` (keyset pages of at most 25; `vastai/api/instances.py` show_instances)."""
        params: dict[str, Any] = {
            "select_filters": select_filters or {},
            "order_by": [{"col": "id", "dir": "asc"}],
            "limit": min(page_size, 25),
        }
        seen: set[str] = set()
        while True:
            data = self._request("GET", "/api/v1/instances/", params=params)
            rows = data.get("instances") if isinstance(data, dict) else None
            for item in rows or []:
                yield Instance.parse(item)
            token = data.get("next_token") if isinstance(data, dict) else None
            if not token or str(token) in seen:  # a repeated token would loop forever
                return
            seen.add(str(token))
            params["after_token"] = token

    def list_instances(self) -> list[Instance]:
        return list(self.iter_instances())

    def find_by_label(self, label: str) -> list[Instance]:
        """Every instance labelled exactly `label` (filtered by Vast as `vastai show instances
        --label` does, `{"label": {"in": [...]}}`, and checked again here)."""
        found = self.iter_instances(select_filters={"label": {"in": [label]}})
        return [i for i in found if i.label == label]

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """`POST /api/v0/instances/{id}/ssh/`: the key reaches a running instance's authorized_keys."""
        self._request(
            "POST",
            f"/api/v0/instances/{int(instance_id)}/ssh/",
            body={"ssh_key": public_key.strip()},
        )

    def set_state(self, instance_id: int, state: str) -> None:
        if state not in ("stopped", "running"):
            raise ValueError(f"state must be 'stopped' or 'running', not {state!r}")
        self._request("PUT", f"/api/v0/instances/{int(instance_id)}/", body={"state": state})

    def stop_instance(self, instance_id: int) -> None:
        self.set_state(instance_id, "stopped")

    def start_instance(self, instance_id: int) -> None:
        self.set_state(instance_id, "running")

    def change_bid(self, instance_id: int, price: float) -> None:
        """`PUT /api/v0/instances/bid_price/{id}/` `{"client_id": "me", "price": P}`
        (`vastai/api/instances.py` change_bid): an outbid instance resumes on its own disk."""
        self._request(
            "PUT",
            f"/api/v0/instances/bid_price/{int(instance_id)}/",
            body={"client_id": "me", "price": round(float(price), 6)},
        )

    def label_instance(self, instance_id: int, label: str) -> None:
        self._request("PUT", f"/api/v0/instances/{int(instance_id)}/", body={"label": label})

    def destroy_instance(self, instance_id: int) -> bool:
        """`DELETE /api/v0/instances/{id}/`: True if destroyed now, False if Vast says it is
        already gone (`no_such_instance`). A bare 404 is an error, not "gone"."""
        try:
            self._request("DELETE", f"/api/v0/instances/{int(instance_id)}/", body={})
        except VastApiError as exc:
            if exc.code == "no_such_instance":
                return False
            raise
        return True
