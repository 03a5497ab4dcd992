"""Alert URLs, syntax only: `${NAME}` expansion, the quick check config runs at load, and
redaction (a URL or a token never reaches a log, the store or the screen).

Config (`[alerts] urls`) and the sender (`orchestrator.monitor.alerts`) both use it; it imports
nothing of orch but the error type. Apprise itself is imported only for `deep=True` checks.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, urlsplit

from state.errors import ConfigError

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(\S+)$")
_URL_IN_TEXT_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_HOSTNAME_RE = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)(:\d{1,5})?$")
REDACTED = "***"


# -- expansion and validation ----------------------------------------------------------------
def expand_env(url: str, env: dict[str, str] | None = None) -> str:
    """Replace `${NAME}` with the environment's value; ConfigError naming NAME if unset."""
    src = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in src:
            raise ConfigError(
                f"alert URL {redact_url(url)!r} uses ${{{name}}}, which is not set in the environment",
                hint=f"export {name}=... before `orch watch`",
            )
        return src[name]

    return ENV_RE.sub(sub, url)


def url_problem(url: str, *, deep: bool = False) -> str | None:
    """Why `url` is not a usable Apprise URL, or None.

    The quick check (config load) is syntax only: Apprise needs seconds to load its ~260 service
    modules, which every `orch` command would pay. `deep=True` (the watcher's start) asks
    Apprise itself; `${NAME}` parts are checked at send time.
    """
    if not isinstance(url, str) or not url.strip():
        return "empty URL"
    m = _URL_RE.match(url.strip())
    if not m:
        return "not a URL of the form scheme://... (see docs/alerts.md)"
    if "${" in ENV_RE.sub("", url):
        return "malformed ${NAME} reference (use ${NAME} with letters, digits and '_')"
    if not deep:
        return None
    scheme = m.group(1).lower()
    logging.getLogger("apprise").propagate = False  # its log lines hold full URLs
    # lazy, for start-up time: pulls in apprise
    from apprise import Apprise
    from apprise.manager_plugins import NotificationManager

    if scheme not in NotificationManager():
        return f"unknown alert service {scheme!r} (see docs/alerts.md for the URL forms)"
    if not ENV_RE.search(url) and Apprise.instantiate(url) is None:
        return f"Apprise cannot parse this {scheme}:// URL (missing token or field?)"
    return None


def check_urls(urls: list[str], key: str = "alerts.urls", *, deep: bool = False) -> None:
    """ConfigError naming the key of the first malformed URL (the URL itself redacted)."""
    for i, url in enumerate(urls):
        problem = url_problem(url, deep=deep)
        if problem:
            raise ConfigError(f"{key}[{i}] {redact_url(url)!r}: {problem}")


def redact_url(url: str) -> str:
    """A URL safe to print: scheme and a plain host name at most; tokens, users, passwords,
    paths and queries become `***` (for Telegram/Slack/Discord the "host" IS the token)."""
    m = _URL_RE.match(url.strip()) if isinstance(url, str) else None
    if not m:
        return REDACTED
    scheme, rest = m.group(1), m.group(2)
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    host = netloc.rsplit("@", 1)[-1]
    user = "***@" if "@" in netloc else ""
    tail = rest[len(netloc) :]
    if _HOSTNAME_RE.match(host) and "${" not in host:
        return f"{scheme}://{user}{host}" + ("/***" if tail.strip("/") else "")
    return f"{scheme}://{REDACTED}"


def url_secrets(url: str) -> set[str]:
    """Every part of a URL that could be a secret (user, password, token path parts, query
    values, a non-hostname "host"), for scrubbing free text such as library error messages."""
    out: set[str] = set()
    m = _URL_RE.match(url.strip()) if isinstance(url, str) else None
    if not m:
        return out
    out.add(url.strip())
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return out
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        out.update(p for p in userinfo.split(":") if p)
    else:
        host = netloc
    if not _HOSTNAME_RE.match(host):
        out.add(host)
        out.update(h for h in host.split(":") if h)
    out.update(seg for seg in parts.path.split("/") if seg)
    out.update(v for _, v in parse_qsl(parts.query) if v)
    return {s for s in out if len(s) >= 4}


class Redactor:
    """Scrubs configured URL secrets (raw and env-expanded) and any URL out of free text."""

    def __init__(self, urls: list[str], env: dict[str, str] | None = None) -> None:
        src = os.environ if env is None else env
        secrets: set[str] = set()
        for url in urls:
            secrets |= url_secrets(url)
            expanded = ENV_RE.sub(lambda m: src.get(m.group(1), m.group(0)), url)
            secrets |= url_secrets(expanded)
            for name in ENV_RE.findall(url):
                if src.get(name):
                    secrets.add(src[name])
        # Longest first, so a token is not half-replaced by one of its own parts.
        self._secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _URL_IN_TEXT_RE.sub(lambda m: redact_url(m.group(0)), text)
        for s in self._secrets:
            text = text.replace(s, REDACTED)
        return text
