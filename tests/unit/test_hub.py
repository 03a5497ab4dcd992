"""`orchestrator.hub` against the local hub stand-in (tests/hub_server.py): each answer the
hub gives (200, a bad token, a gated repo, a missing revision, a missing repo) becomes one line
that says what to do, and the token only ever travels in the Authorization header."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.hub import Repo, check_inputs, endpoint_from_env
from tests.hub_server import HubRepo, HubServer

TOKEN = "hf_goodtoken0123456789abcdef"
OTHER = "hf_otheraccount9876543210fedcba"
SHA = "a9edf793a71806359fd534d28ef75f7cdb68bf16"
MODEL = "mistralai/Ministral-3-3B-Base-2512"
DATA = "HuggingFaceH4/no_robots"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(
        tokens={TOKEN, OTHER},
        models={MODEL: HubRepo(sha=SHA, gated="auto", granted={TOKEN})},
        datasets={DATA: HubRepo(sha="e6f9a4ac5c37faeb744ba9ecf0473184d7f8105b")},
    ) as srv:
        yield srv


def one(hub: HubServer, repo: Repo, token: str | None) -> tuple[bool, str]:
    [a] = check_inputs([repo], token=token, endpoint=hub.url)
    return a.ok, a.line


def test_a_granted_token_reads_the_pinned_gated_model(hub: HubServer) -> None:
    ok, line = one(hub, Repo(MODEL, "model", SHA), TOKEN)
    assert ok and "gated (auto)" in line and "may download" in line
    assert all(TOKEN not in u for u in hub.seen_urls)  # never in a URL
    assert hub.seen_auth and all(a == f"Bearer {TOKEN}" for a in hub.seen_auth)
    # two calls: the revision's metadata, then a HEAD on a file (metadata of a gated repo is
    # public; only a file says whether this token may download)
    assert [u.split("?")[0] for u in hub.seen_urls] == [
        f"/api/models/{MODEL}/revision/{SHA}",
        f"/{MODEL}/resolve/{SHA}/config.json",
    ]


def test_gated_without_token_or_without_access_names_the_fix(hub: HubServer) -> None:
    ok, line = one(hub, Repo(MODEL, "model", SHA), None)
    assert not ok and "HF_TOKEN is not set" in line and f"huggingface.co/{MODEL}" in line
    ok, line = one(hub, Repo(MODEL, "model", SHA), OTHER)
    assert not ok and "has not been granted access" in line and "accept" in line
    assert OTHER not in line


def test_a_token_the_hub_does_not_know_is_one_line(hub: HubServer) -> None:
    bad = "hf_bogus_not_a_real_token_000000"
    ok, line = one(hub, Repo(MODEL, "model", SHA), bad)
    assert not ok and "not a valid token" in line and bad not in line


def test_a_revision_that_does_not_exist(hub: HubServer) -> None:
    ok, line = one(hub, Repo(DATA, "dataset", "0" * 40), TOKEN)
    assert not ok and "revision 0000000000000000000000000000000000000000 does not exist" in line
    assert "data.revision" in line


def test_a_missing_repo_and_an_unpinned_one(hub: HubServer) -> None:
    ok, line = one(hub, Repo("nobody/nothing", "dataset", None), None)
    assert not ok and "not found" in line and "HF_TOKEN is not set" in line
    ok, line = one(hub, Repo(DATA, "dataset", None), TOKEN)
    assert ok and "NOT pinned" in line


def test_the_endpoint_comes_from_hf_endpoint() -> None:
    assert endpoint_from_env({}) == "https://huggingface.co"
    assert endpoint_from_env({"HF_ENDPOINT": "http://127.0.0.1:9/"}) == "http://127.0.0.1:9"
