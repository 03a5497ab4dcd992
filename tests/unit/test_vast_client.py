"""VastClient against the local Vast stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import VastTarget
from orchestrator.vast.client import (
    ApiKey,
    Instance,
    VastApiError,
    VastClient,
    VastUncertain,
    account_credit,
    api_url_for,
    check_api_url,
    find_api_key,
)
from state.errors import ConfigError, ProviderError
from tests.vast_server import RATE_LIMIT_TEXT, VastServer

KEY = "vk-unit-0123456789abcdef-secret"


@pytest.fixture
def server() -> Iterator[VastServer]:
    with VastServer(api_key=KEY) as srv:
        yield srv


def client_for(server: VastServer, key: str = KEY, **kw: object) -> VastClient:
    kw.setdefault("backoff_s", 0.001)
    return VastClient(server.url, ApiKey(key, "test"), **kw)  # type: ignore[arg-type]


# -- the key ------------------------------------------------------------------------------------
def test_key_lookup_order(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no Vast API key"):
        find_api_key()
    legacy = isolated_home / ".vast_api_key"
    legacy.write_text("legacy-key\n")
    assert find_api_key().reveal() == "legacy-key"
    xdg = isolated_home / ".config" / "vastai" / "vast_api_key"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("  xdg-key \n")
    k = find_api_key()
    assert k.reveal() == "xdg-key" and k.source == str(xdg)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_home / "elsewhere"))
    assert find_api_key().reveal() == "legacy-key"  # XDG_CONFIG_HOME moves the file it reads
    monkeypatch.setenv("VAST_API_KEY", "env-key")
    assert find_api_key().reveal() == "env-key"


def test_two_factor_session_key_preferred(isolated_home: Path) -> None:
    # vastai/cli/main.py: `key_file = TFAKEY_FILE if os.path.exists(TFAKEY_FILE) else APIKEY_FILE`
    conf = isolated_home / ".config" / "vastai"
    conf.mkdir(parents=True)
    (conf / "vast_api_key").write_text("normal-key\n")
    (conf / "vast_tfa_key").write_text("session-key\n")
    k = find_api_key()
    assert k.reveal() == "session-key" and k.source.endswith("vast_tfa_key")
    assert k.fallback is not None and k.fallback.reveal() == "normal-key"
    assert "session-key" not in repr(k) and "normal-key" not in repr(k)


def test_expired_session_key_falls_back_to_the_normal_key(server: VastServer) -> None:
    # vastai/cli/main.py `_is_tfa_session_expired`: 404 "Session expired. Please log in again."
    server.expired_session_keys.add("sess-1")
    key = ApiKey("sess-1", "vast_tfa_key", fallback=ApiKey(KEY, "vast_api_key"))
    with VastClient(server.url, key, backoff_s=0.001) as c:
        assert c.check_key()["username"] == "tester"
        assert c.check_key()["username"] == "tester"
    assert server.auth_headers == ["Bearer sess-1", f"Bearer {KEY}", f"Bearer {KEY}"]


def test_vast_url_like_the_cli() -> None:
    # vastai/api/client.py: `server_url_default = os.getenv("VAST_URL") or "https://console.vast.ai"`;
    # an explicit api_url wins, as --url does.
    env = {"VAST_URL": "https://vast.example.org/"}
    assert api_url_for(VastTarget(), env) == "https://vast.example.org"
    assert api_url_for(VastTarget(), {}) == "https://console.vast.ai"
    explicit = VastTarget(api_url="https://console.vast.ai")
    assert api_url_for(explicit, env) == "https://console.vast.ai"


def test_account_credit() -> None:
    assert account_credit({"credit": 12.5, "balance": -1.0}) == 12.5
    assert account_credit({"credit": None, "balance": 3}) == 3.0
    assert account_credit({"credit": True}) is None and account_credit({}) is None


def test_key_never_in_repr_or_errors(server: VastServer) -> None:
    key = ApiKey(KEY, "VAST_API_KEY")
    assert KEY not in repr(key) and KEY not in str(key)
    c = VastClient(server.url, key, backoff_s=0.001, max_retries=1)
    assert KEY not in repr(c)
    server.inject(500, body={"success": False, "error": "server_error", "msg": f"echo {KEY}"})
    with pytest.raises(ProviderError) as info:
        c.check_key()
    assert KEY not in str(info.value) and "****" in str(info.value)
    server.rate_limit(5)
    with pytest.raises(ProviderError) as info2:
        c.check_key()
    assert KEY not in str(info2.value)


def test_bearer_auth_and_bad_key(server: VastServer) -> None:
    with client_for(server) as c:
        assert c.check_key()["username"] == "tester"
    assert server.auth_headers[-1] == f"Bearer {KEY}"
    with client_for(server, key="wrong") as bad, pytest.raises(VastApiError) as info:
        bad.check_key()
    assert info.value.status == 401 and "Invalid user key" in str(info.value)
    assert "VAST_API_KEY" in (info.value.hint or "")


def test_api_url_must_be_https_or_loopback() -> None:
    assert check_api_url("https://console.vast.ai/") == "https://console.vast.ai"
    assert check_api_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    with pytest.raises(ConfigError, match="api_url"):
        check_api_url("http://console.vast.ai")


# -- retries ------------------------------------------------------------------------------------
def test_429_without_retry_after_is_retried(server: VastServer) -> None:
    sleeps: list[float] = []
    server.rate_limit(3)
    with client_for(server, sleep=sleeps.append) as c:
        assert c.check_key()["id"] == 1
    assert server.request_count("GET", "/users/current/") == 4
    assert len(sleeps) == 3 and sleeps[0] < sleeps[2]  # the backoff grows


def test_5xx_retried_then_gives_up_with_message(server: VastServer) -> None:
    server.inject(503, text="upstream unavailable", times=2)
    with client_for(server) as c:
        assert c.search_offers({}) == []
    server.rate_limit(10)
    with client_for(server, max_retries=2) as c, pytest.raises(ProviderError) as info:
        c.check_key()
    assert "3 tries" in str(info.value) and RATE_LIMIT_TEXT in str(info.value)


def test_other_errors_carry_vasts_message_without_retry(server: VastServer) -> None:
    server.inject(400, body={"success": False, "error": "invalid_args", "msg": "disk must be > 8"})
    with client_for(server) as c, pytest.raises(VastApiError) as info:
        c.check_key()
    assert info.value.code == "invalid_args" and "disk must be > 8" in str(info.value)
    assert server.request_count() == 1


def test_backoff_grows_with_jitter() -> None:
    c = VastClient("http://127.0.0.1:9", ApiKey("k", "t"), backoff_s=1.0, backoff_max_s=8.0)
    d = [c.backoff(i) for i in range(6)]
    assert all(0.5 <= d[0] < 1.5 for _ in range(1)) and 4.0 <= d[3] < 12.0 and d[5] < 12.0
    assert len({round(c.backoff(0), 6) for _ in range(20)}) > 1  # jitter
    c.close()


# -- calls --------------------------------------------------------------------------------------
def test_search_sends_filters_and_parses_offers(server: VastServer) -> None:
    cheap = server.add_offer(dph_total=0.3)
    server.add_offer(dph_total=0.9)
    server.add_offer(gpu_name="RTX 3090", dph_total=0.2)
    with client_for(server) as c:
        offers = c.search_offers(
            {"gpu_name": {"in": ["RTX 4090"]}, "dph_total": {"lte": 0.5}, "limit": 5}
        )
    assert [o.id for o in offers] == [cheap]
    assert offers[0].gpu_name == "RTX 4090" and offers[0].reliability == pytest.approx(0.995)


def test_search_survives_null_rows_and_ignores_unknown_filters(server: VastServer) -> None:
    nulls = server.add_offer(gpu_ram=None, dph_total=None, reliability=None, direct_port_count=None)
    unreliable = server.add_offer(reliability=0.5, reliability2=0.5)
    with client_for(server) as c:
        # A null never meets a comparison, as in SQL.
        got = {o.id for o in c.search_offers({"reliability": {"gte": 0.9}})}
        assert nulls not in got and unreliable not in got
        # `reliability2` is not a filter key (vastai/api/query.py): Vast ignores it.
        got = {o.id for o in c.search_offers({"reliability2": {"gte": 0.9}})}
        assert {nulls, unreliable} <= got
        # The CLI's default `external: {eq: false}` (vastai/api/offers.py search_offers) hides
        # external offers; without it they are listed.
        external = server.add_offer(external=True)
        assert external not in {o.id for o in c.search_offers({"external": {"eq": False}})}
        rows = c.search_offers({})
        assert external in {o.id for o in rows}
    row = next(o for o in rows if o.id == nulls)
    assert row.gpu_ram is None and row.dph_total is None and row.reliability is None


def test_create_show_label_stop_start_destroy(server: VastServer) -> None:
    oid = server.add_offer()
    with client_for(server) as c:
        iid = c.create_instance(
            oid, image="img", disk_gb=40, label="orch-x", onstart="touch ~/.no_auto_tmux\n"
        )
        body = server.create_bodies[iid]
        assert (
            body["runtype"] == "ssh_direc ssh_proxy"
            and "price" not in body
            and body["disk"] == 40.0
        )
        inst = c.show_instance(iid)
        assert isinstance(inst, Instance) and inst.id == iid and inst.label == "orch-x"
        c.label_instance(iid, "renamed")
        c.stop_instance(iid)
        inst = c.show_instance(iid)
        assert inst is not None and inst.label == "renamed" and inst.actual_status == "stopped"
        assert inst.intended_status == "stopped" and inst.stop_kind() == "user"
        c.start_instance(iid)  # scheduled again on the same machine: loading, then running
        states = [(c.show_instance(iid) or inst).actual_status for _ in range(2)]
        assert states == ["loading", "running"]
        assert c.destroy_instance(iid) is True
        assert c.show_instance(iid) is None  # {"instances": null}
        assert c.destroy_instance(iid) is False  # no_such_instance: already gone


def test_create_gone_offer_and_low_bid(server: VastServer) -> None:
    oid = server.add_offer(min_bid=0.25)
    with client_for(server) as c:
        with pytest.raises(VastApiError) as gone:
            c.create_instance(99999, image="i", disk_gb=10, label="l", onstart="")
        assert gone.value.code == "no_such_ask" and "no longer available" in str(gone.value)
        with pytest.raises(VastApiError) as low:
            c.create_instance(oid, image="i", disk_gb=10, label="l", onstart="", bid_dph=0.1)
        assert low.value.new_contract is not None  # an instance exists and must be destroyed
        inst = c.show_instance(low.value.new_contract)
        assert inst is not None and inst.stop_kind(interruptible=True) == "user"


def test_404_is_not_gone(server: VastServer) -> None:
    """Only `{"instances": null}` means gone; a 404 means a wrong path or key."""
    server.inject(404, body={"success": False, "error": "not_found", "msg": "no such page"})
    with client_for(server) as c, pytest.raises(VastApiError) as info:
        c.show_instance(5)
    assert info.value.status == 404 and "api_url" in (info.value.hint or "")
    server.inject(404, body={"success": False, "error": "not_found", "msg": "no such page"})
    with client_for(server) as c, pytest.raises(VastApiError):
        c.destroy_instance(5)  # not "already gone" either
    server.inject(200, body={"success": True})  # no `instances` key at all
    with client_for(server) as c, pytest.raises(ProviderError, match="without an `instances` key"):
        c.show_instance(5)


def test_key_without_permission_is_one_line(server: VastServer) -> None:
    server.read_only_keys.add("ro-key")
    oid = server.add_offer()
    with client_for(server, key="ro-key") as c:
        assert c.check_key()["id"] == 1
        with pytest.raises(VastApiError) as info:
            c.create_instance(oid, image="i", disk_gb=10, label="l", onstart="")
    assert info.value.status == 403 and "permission" in (info.value.hint or "")
    assert "\n" not in str(info.value) and server.instances == {}


def test_slow_create_answers_within_the_create_timeout(server: VastServer) -> None:
    """Scaled by 1/100: the old 30 s timeout is 0.3 s, the official 120 s is 1.2 s, and Vast
    answers after 0.4 s (40 s). The create succeeds once; a create that times out is never
    resent (it raises VastUncertain and leaves exactly the one instance Vast made)."""
    server.create_delay_s = 0.4
    oid, other = server.add_offer(), server.add_offer()
    with client_for(server, timeout_s=0.3, create_timeout_s=1.2) as c:
        iid = c.create_instance(oid, image="i", disk_gb=10, label="slow-1", onstart="")
    assert list(server.instances) == [iid]
    with client_for(server, timeout_s=0.3, create_timeout_s=0.1) as c:
        with pytest.raises(VastUncertain, match="may have been done"):
            c.create_instance(other, image="i", disk_gb=10, label="slow-2", onstart="")
        time.sleep(0.5)
        assert [i.id for i in c.find_by_label("slow-2")] == [max(server.instances)]
    assert server.request_count("PUT", "/asks/") == 2 and len(server.instances) == 2


def test_create_retried_only_when_it_surely_did_not_reach_vast(server: VastServer) -> None:
    oid = server.add_offer()
    server.rate_limit(2, path="/asks/")  # the rate limiter refused it: safe to send again
    with client_for(server) as c:
        c.create_instance(oid, image="i", disk_gb=10, label="a", onstart="")
    assert server.request_count("PUT", "/asks/") == 3
    oid = server.add_offer()
    server.inject(502, text="bad gateway", path="/asks/")
    with client_for(server) as c, pytest.raises(VastUncertain):
        c.create_instance(oid, image="i", disk_gb=10, label="b", onstart="")
    assert server.request_count("PUT", "/asks/") == 4  # sent once, never resent
    server.inject(500, body={"success": False, "error": "server_error", "msg": "db"}, path="/asks/")
    with client_for(server) as c, pytest.raises(VastUncertain):
        c.create_instance(oid, image="i", disk_gb=10, label="b", onstart="")


def test_per_endpoint_rate_limit_without_retry_after(server: VastServer) -> None:
    server.min_interval_s = 0.05
    with client_for(server, backoff_s=0.03) as c:
        for _ in range(3):
            assert c.check_key()["id"] == 1
        c.search_offers({})  # another endpoint: its own interval
    assert server.request_count("GET", "/users/current/") > 3  # some were 429 and retried


def test_change_bid_resumes_an_outbid_instance(server: VastServer) -> None:
    oid = server.add_offer(min_bid=0.2)
    with client_for(server) as c:
        iid = c.create_instance(oid, image="i", disk_gb=10, label="l", onstart="", bid_dph=0.22)
        server.preempt(iid, min_bid=0.3)
        inst = c.show_instance(iid)
        assert inst is not None and inst.outbid and inst.min_bid == 0.3
        c.change_bid(iid, 0.25)  # still below the new minimum
        assert (c.show_instance(iid) or inst).outbid
        c.change_bid(iid, 0.33)
        assert server.create_bodies[iid]["price"] == 0.22 and server.bids[iid] == [0.25, 0.33]
        states = [(c.show_instance(iid) or inst).actual_status for _ in range(3)]
        assert states[-1] == "running" and not (c.show_instance(iid) or inst).outbid


def test_list_follows_keyset_pages(server: VastServer) -> None:
    ids = [server.add_instance() for _ in range(60)]
    with client_for(server) as c:
        got = [i.id for i in c.iter_instances(page_size=100)]
    assert got == ids
    assert server.request_count("GET", "/api/v1/instances/") == 3  # 25 + 25 + 10
    pages = [r for r in server.requests if r.path == "/api/v1/instances/"]
    assert all(r.query.get("limit") == ["25"] for r in pages)
    assert "after_token" not in pages[0].query and "after_token" in pages[1].query
    with client_for(server) as c:
        c.label_instance(ids[30], "orch-gpu-0123abcd")
        assert [i.id for i in c.find_by_label("orch-gpu-0123abcd")] == [ids[30]]
        assert c.find_by_label("nobody") == []
    q = server.requests[-1].query
    assert q["select_filters"] == ['{"label": {"in": ["nobody"]}}']


def test_attach_ssh_key(server: VastServer) -> None:
    oid = server.add_offer()
    with client_for(server) as c:
        iid = c.create_instance(oid, image="i", disk_gb=10, label="l", onstart="")
        c.attach_ssh_key(iid, "ssh-ed25519 AAAAC3Nza test@host\n")
        assert server.attached_keys[iid] == ["ssh-ed25519 AAAAC3Nza test@host"]
        with pytest.raises(VastApiError, match="public key"):
            c.attach_ssh_key(iid, "not a key")


def test_ssh_endpoint_direct_or_proxy_never_mixed() -> None:
    both = Instance.parse(
        {
            "id": 1,
            "public_ipaddr": "1.2.3.4",
            "ports": {"22/tcp": [{"HostPort": "40022"}]},
            "ssh_host": "ssh5.vast.ai",
            "ssh_port": 33854,
        }
    )
    ep = both.ssh_endpoint()
    assert ep is not None and (ep.host, ep.port, ep.kind) == ("1.2.3.4", 40022, "direct")
    proxy = Instance.parse(
        {
            "id": 2,
            "public_ipaddr": "1.2.3.4",
            "ports": {},
            "ssh_host": "ssh5.vast.ai",
            "ssh_port": 33854,
        }
    )
    ep = proxy.ssh_endpoint()
    assert ep is not None and (ep.host, ep.port, ep.kind) == ("ssh5.vast.ai", 33854, "proxy")
    assert Instance.parse({"id": 3}).ssh_endpoint() is None


def test_no_key_in_http_logs(server: VastServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with client_for(server) as c:
        c.check_key()
        c.show_instance(1)
    assert caplog.records and KEY not in caplog.text
