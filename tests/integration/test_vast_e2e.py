"""`orch up` -> `orch launch` -> `orch down` end to end, through the real VastClient against the
local Vast stand-in (tests/vast_server.py), whose instances' ssh leads to a real OpenSSH sshd on
loopback. Also: a failure after create destroys the instance; SIGINT during the wait destroys
it; a preempted (outbid) instance makes its runs `lost` with an alert through the monitor; and
the API key never shows up in output, the store, any process's argv or the box's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobs.spec import StageSpec
from orchestrator import launch as launch_mod
from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.targets.factory import make_target
from orchestrator.vast.provider import check_instance
from state.errors import TargetError
from state.models import RunRecord, RunSpec, WorkerTask
from state.phases import Phase
from tests.conftest import REPO
from tests.sshd import SshServer
from tests.vast_server import Box, VastServer

pytestmark = pytest.mark.integration

KEY = "vk-e2e-7f3a9c1d5b2e8f40a6c3d9e1b7f5a2c4"
PACKAGES = ("state", "worker", "jobs", "orchestrator")


@dataclass
class Env:
    root: Path
    server: VastServer
    sshd: SshServer
    box: Box
    remote: Path
    capsys: pytest.CaptureFixture[str] | None = None
    outputs: list[str] = field(default_factory=list)

    def orch(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real `orch` CLI as a process (so its argv and output can be checked)."""
        res = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.outputs += [res.stdout, res.stderr]
        return res

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the `orch` CLI in this process (cheaper than a process; same code path)."""
        assert self.capsys is not None
        self.capsys.readouterr()
        rc = main(list(args))
        out, err = self.capsys.readouterr()
        self.outputs += [out, err]
        return subprocess.CompletedProcess(["orch", *args], rc, out, err)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def toml(server: VastServer, sshd: SshServer, remote: Path, **extra: str) -> str:
    lines = [
        'default_target = "gpu"',
        "[targets.gpu]",
        'kind = "vast"',
        f'api_url = "{server.url}"',
        f'identity_file = "{sshd.client_key}"',
        f'user = "{sshd.user}"',
        f'workdir = "{remote}"',
        f'python = "{sys.executable}"',
        "poll_s = 0.05",
        "ready_timeout_s = 60",
        "boot_grace_s = 1.0",
        'onstart = "echo onstart-ran > ~/onstart.txt"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[targets.gpu.offer]",
        'gpu_names = ["RTX 4090"]',
        "max_dph = 1.0",
        "[targets.gpu.monitor]",
        "provider_check_s = 60",
        "connect_timeout_s = 3",
        "command_timeout_s = 5",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def env(
    fresh_sshd: SshServer,
    tmp_path: Path,
    isolated_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Env]:
    box = Box(
        host=fresh_sshd.host,
        port=fresh_sshd.port,
        home=tmp_path / "box-home",
        authorized_keys=fresh_sshd.root / "authorized_keys",
    )
    server = VastServer(api_key=KEY, box=box, boot_polls=2).start()
    # The key where the official CLI keeps it (0600), not in the environment or orch.toml.
    key_file = isolated_home / ".config" / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    root = tmp_path / "proj"
    root.mkdir()
    for pkg in PACKAGES:
        shutil.copytree(
            REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    remote = tmp_path / "remote"
    (root / "orch.toml").write_text(toml(server, fresh_sshd, remote))
    monkeypatch.chdir(root)
    try:
        yield Env(root, server, fresh_sshd, box, remote, capsys)
    finally:
        server.stop()
        with contextlib.suppress(Exception):  # runs this test started on the loopback "box"
            out = subprocess.run(
                ["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True
            )
            for s in out.stdout.split():
                if s.startswith("orch-vt-"):
                    subprocess.run(["tmux", "kill-session", "-t", s], capture_output=True)


class ArgvScanner:
    """Scan every process's /proc/PID/cmdline while a test runs, looking for the key."""

    def __init__(self, needle: str) -> None:
        self.needle = needle.encode()
        self.hits: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        data = Path(f"/proc/{pid}/cmdline").read_bytes()
                        if self.needle in data:
                            self.hits.append(data.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1
            self._stop.wait(0.05)

    def __enter__(self) -> ArgvScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def files_containing(root: Path, needle: str) -> list[Path]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if needle.encode() in p.read_bytes():
                    hits.append(p)
    return hits


def stage(name: str, *argv: str) -> StageSpec:
    return StageSpec(
        name=name,
        stage_dir=f"{name}_dir",
        task=WorkerTask(command="exec", args={"argv": list(argv)}),
        timeout_s=300,
    )


def wait_exit(ctx: Context, rec_target: str, rec: object, timeout: float = 60) -> int:
    target = make_target(ctx, rec_target)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = launch_mod.read_remote_exit_code(target, rec)  # type: ignore[arg-type]
            if code is not None:
                return code
            time.sleep(0.2)
    finally:
        target.close()
    raise AssertionError("the run wrote no exit_code")


def live_row(ctx: Context) -> dict:
    row = ctx.store.live_instance_for("gpu")
    assert row is not None
    return row


# -- the whole flow ---------------------------------------------------------------------------
def test_up_launch_down_end_to_end(env: Env) -> None:
    env.server.add_offer(dph_total=0.55, geolocation="Texas, US")
    cheap = env.server.add_offer(dph_total=0.31, geolocation="Norway, NO", direct=False)
    foreign = env.server.add_instance(label="from-the-console")
    with ArgvScanner(KEY) as scan:
        up = env.orch("up")
        assert up.returncode == 0, up.stderr
        # The chosen offer is printed before renting: GPU, $/h, reliability, location.
        assert f"offer {cheap}" in up.stdout and "RTX 4090" in up.stdout and "$0.310/h" in up.stdout
        assert "reliability 99.5%" in up.stdout and "Norway, NO" in up.stdout

        ctx = Context()
        try:
            row = live_row(ctx)
            iid = int(row["instance_id"])
            assert row["state"] == "running" and row["dph"] == pytest.approx(0.31)
            assert (row["ssh_host"], row["ssh_port"]) == (env.box.host, env.box.port)
            assert '"endpoint": "proxy"' in row["info_json"]  # the offer had no direct port
            body = env.server.create_bodies[iid]
            assert body["onstart"].splitlines()[1] == "touch ~/.no_auto_tmux"
            assert (env.box.home / ".no_auto_tmux").exists()  # onstart ran on the "box"
            assert (env.box.home / "onstart.txt").read_text() == "onstart-ran\n"
            assert "price" not in body  # on-demand
            # The key went in through the instance ssh-key call (the box started with none).
            pub = Path(f"{env.sshd.client_key}.pub").read_text().strip()
            assert env.server.attached_keys[iid] == [pub]
            known = ctx.state_dir / "vast" / f"known_hosts-{iid}"
            assert known.read_text().count("ssh-ed25519") == 1  # pinned on first use

            # `orch launch` on the vast target: an ssh target now.
            rec = launch_mod.launch_stage(
                ctx, stage("vt-hello", sys.executable, "-c", "print('hi from vast')"), "gpu"
            )
            assert rec.target == "gpu" and rec.phase == Phase.RUNNING
            assert wait_exit(ctx, "gpu", rec) == 0
            assert "\nhi from vast\n" in (env.remote / rec.run_dir / "stdout.log").read_text()
            from orchestrator.monitor.refresh import refresh_once

            refresh_once(ctx, ["gpu"])
            done = ctx.store.get_run(rec.stage_dir, rec.run_id)
            assert done is not None and done.phase == Phase.SUCCEEDED and done.pulled_at is None

            # `orch instances`: ours with its target, the console's one marked.
            listed = env.cli("instances")
            assert listed.returncode == 0, listed.stderr
            assert (
                str(iid) in listed.stdout
                and str(foreign) in listed.stdout
                and "not orch's" in listed.stdout
            )

            # `orch plan` on the live box: probed over ssh, and the account's credit
            # (/users/current) held against the stages' dollars at the instance's $/h.
            planned = env.cli("plan", "all", "--profile", "tiny", "--json")
            doc = json.loads(planned.stdout)
            assert "vast instance" in doc["capacity"]["where"], planned.stderr
            assert doc["capacity"]["credit"] == 25.0
            assert [c["ok"] for c in doc["checks"] if c["what"] == "credit"] == [True]

            # `orch up` again reuses the live instance: nothing new is rented.
            again_up = env.cli("up")
            assert again_up.returncode == 0, again_up.stderr
            assert "already exists" in again_up.stdout and list(env.server.create_bodies) == [iid]
            # A stopped (not outbid) instance is started again rather than replaced.
            env.server.set_status(
                iid, actual="stopped", cur="stopped", intended="stopped", next_="stopped"
            )
            restarted = env.cli("up")
            assert restarted.returncode == 0, restarted.stderr
            assert "starting the stopped instance" in restarted.stdout
            assert env.server.instances[iid]["actual_status"] == "running"
            assert list(env.server.create_bodies) == [iid]

            # down refuses while a run is active...
            busy = launch_mod.launch_stage(
                ctx, stage("vt-sleep", "sleep", "120"), "gpu", sync=False
            )
            refused = env.cli("down")
            assert refused.returncode != 0 and "active run" in refused.stderr
            assert iid in env.server.instances
            # ...and --force destroys anyway, marking the run cancelled.
            gone = env.orch("down", "--force", "--pull")
            assert gone.returncode == 0, gone.stderr
            # --pull fetched the finished run (verified against its manifest) before destroying.
            assert (ctx.runs_dir / rec.stage_dir / rec.run_id / "manifest.json").is_file()
            pulled = ctx.store.get_run(rec.stage_dir, rec.run_id)
            assert pulled is not None and pulled.pulled_at is not None
            assert iid not in env.server.instances and foreign in env.server.instances
            after = ctx.store.get_run(busy.stage_dir, busy.run_id)
            assert after is not None and after.phase == Phase.CANCELLED
            assert ctx.store.live_instance_for("gpu") is None
            assert not known.exists()  # the pinned key went with the instance
            with pytest.raises(TargetError, match="orch up gpu"):
                make_target(ctx, "gpu")
            again = env.cli("down")
            assert again.returncode == 0 and "nothing to destroy" in again.stdout
        finally:
            ctx.close()

    # The key: sent on every request as a Bearer header, and nowhere else.
    assert env.server.auth_headers and set(env.server.auth_headers) == {f"Bearer {KEY}"}
    assert scan.scans > 5 and scan.hits == []
    assert not any(KEY in out for out in env.outputs)
    state_dir = Path(os.environ["ORCH_STATE_DIR"])
    assert files_containing(state_dir, KEY) == []  # state.db, its WAL, known_hosts
    assert files_containing(env.remote, KEY) == [] and files_containing(env.box.home, KEY) == []
    assert all(KEY not in str(b) for b in env.server.create_bodies.values())


# -- failures destroy what was rented -----------------------------------------------------------
def test_failure_after_create_destroys_and_tries_next_offer_once(env: Env) -> None:
    first = env.server.add_offer(dph_total=0.2, boot="exited")
    second = env.server.add_offer(dph_total=0.3, boot="error_msg")
    env.server.add_offer(dph_total=0.4)  # never tried: one retry only
    res = env.cli("up")
    assert res.returncode != 0
    assert "pull access denied" in res.stderr  # Vast's own status message
    assert f"offer {first}" in res.stdout and f"offer {second}" in res.stdout
    assert env.server.instances == {}  # both destroyed
    assert len(env.server.create_bodies) == 2
    ctx = Context()
    try:
        rows = ctx.store.list_instances()
        assert len(rows) == 2 and all(r["destroyed_at"] and r["state"] == "destroyed" for r in rows)
    finally:
        ctx.close()


def test_failure_after_running_destroys_unless_keep(env: Env) -> None:
    env.server.add_offer()
    env.server.inject(
        500,
        body={"success": False, "error": "server_error", "msg": "ssh key service down"},
        path=r"/ssh/$",
        method="POST",
    )
    res = env.cli("up")
    assert res.returncode != 0 and "ssh key service down" in res.stderr
    assert env.server.instances == {} and "destroyed Vast instance" in res.stderr

    env.server.add_offer(boot="exited")
    kept = env.cli("up", "--keep")
    assert kept.returncode != 0 and len(env.server.instances) == 1  # --keep: left for inspection
    assert env.cli("down").returncode == 0 and env.server.instances == {}


def test_low_bid_that_creates_a_stopped_instance_is_destroyed(env: Env) -> None:
    (env.root / "orch.toml").write_text(
        toml(env.server, env.sshd, env.remote, interruptible="true", bid_dph="0.05")
    )
    env.server.add_offer(min_bid=0.2)
    res = env.cli("up")
    assert res.returncode != 0 and "bid" in res.stderr and "below the minimum" in res.stderr
    assert env.server.instances == {} and len(env.server.create_bodies) == 1
    assert next(iter(env.server.create_bodies.values()))["price"] == 0.05


def test_sigint_during_wait_destroys(env: Env) -> None:
    env.server.add_offer(boot="never")  # stays `loading`
    proc = env.popen("up")
    deadline = time.monotonic() + 30
    while not env.server.create_bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.server.create_bodies, "orch up never created the instance"
    polls = env.server.request_count("GET", r"^/api/v0/instances/\d+/$")
    while (
        env.server.request_count("GET", r"^/api/v0/instances/\d+/$") < polls + 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)  # it is waiting now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert env.server.instances == {} and "destroyed Vast instance" in err
    assert KEY not in out + err


@pytest.mark.parametrize("create_timeout_s", [1.2, 0.3])
def test_slow_create_leaves_exactly_one_recorded_instance(
    env: Env, monkeypatch: pytest.MonkeyPatch, create_timeout_s: float
) -> None:
    """Scaled by 1/100: Vast answers the create after 0.4 s (40 s, longer than the old 30 s
    timeout). With the official 120 s (1.2 s) the answer arrives; with the old 30 s (0.3 s) it
    is lost and the label finds the instance. Either way: one create, one recorded box, up."""
    from orchestrator.vast import client as client_mod

    monkeypatch.setattr(client_mod, "CREATE_TIMEOUT_S", create_timeout_s)
    env.server.create_delay_s = 0.4
    env.server.add_offer()
    env.server.add_offer(dph_total=0.5)
    res = env.cli("up")
    assert res.returncode == 0, res.stderr
    assert env.server.request_count("PUT", "/asks/") == 1 and len(env.server.instances) == 1
    ctx = Context()
    try:
        (iid,) = env.server.instances
        rows = ctx.store.list_instances(live_only=True)
        assert [r["instance_id"] for r in rows] == [str(iid)] and rows[0]["state"] == "running"
        assert rows[0]["label"] == env.server.instances[iid]["label"]
        assert ("answer was lost" in res.stderr) == (create_timeout_s < 0.4)
    finally:
        ctx.close()


def test_sigint_during_a_slow_create_destroys_what_it_made(env: Env) -> None:
    env.server.create_delay_s = 5.0  # the instance exists at once; the answer takes 5 s
    env.server.add_offer()
    proc = env.popen("up")
    deadline = time.monotonic() + 30
    while not env.server.create_bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.server.create_bodies, "orch up never sent the create"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert env.server.instances == {} and "destroyed Vast instance" in err
    ctx = Context()
    try:
        rows = ctx.store.list_instances()
        assert len(rows) == 1 and rows[0]["destroyed_at"] is not None  # recorded, then destroyed
    finally:
        ctx.close()


def test_orch_killed_during_a_create_leaves_a_record_that_finds_the_box(env: Env) -> None:
    """SIGKILL (no cleanup at all) while Vast is still answering the create: the label was
    written to the store before the request went out, so the next `orch instances` finds the
    instance by it (`select_filters` on /api/v1/instances/) and records it: never a box
    billing without a record."""
    env.server.create_delay_s = 5.0  # the instance exists at once; the answer takes 5 s
    env.server.add_offer()
    proc = env.popen("up")
    deadline = time.monotonic() + 30
    while not env.server.create_bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.server.create_bodies, "orch up never sent the create"
    proc.kill()
    proc.communicate(timeout=30)
    [(iid, body)] = env.server.create_bodies.items()
    listed = env.cli("instances", "--json")
    assert listed.returncode == 0, listed.stderr
    [line] = [d for d in json.loads(listed.stdout) if d["id"] == iid]
    assert line["target"] == "gpu" and not line["orphan"]
    ctx = Context()
    try:
        row = live_row(ctx)
        assert row["instance_id"] == str(iid) and row["label"] == body["label"]
    finally:
        ctx.close()
    assert list(env.server.instances) == [iid] and env.server.request_count("PUT", "/asks/") == 1


# -- preemption ---------------------------------------------------------------------------------
def test_preemption_marks_runs_lost_with_an_alert(env: Env) -> None:
    (env.root / "orch.toml").write_text(
        toml(env.server, env.sshd, env.remote, interruptible="true")
    )
    env.server.add_offer(min_bid=0.15)
    assert env.cli("up").returncode == 0
    ctx = Context()
    try:
        iid = int(live_row(ctx)["instance_id"])
        assert env.server.create_bodies[iid]["price"] == pytest.approx(0.165)  # min_bid + 10 %
        rec = launch_mod.launch_stage(ctx, stage("vt-train", "sleep", "300"), "gpu")
        assert check_instance(ctx, "gpu").lost is False

        # Outbid: Vast stops the instance; its processes (tmux included) and sshd go away.
        env.server.preempt(iid)
        subprocess.run(["tmux", "kill-session", "-t", rec.session], capture_output=True)
        env.sshd.stop()

        # Within provider_check_s the cached verdict is returned without asking Vast again.
        shows = env.server.request_count("GET", rf"^/api/v0/instances/{iid}/$")
        assert check_instance(ctx, "gpu").lost is False
        assert env.server.request_count("GET", rf"^/api/v0/instances/{iid}/$") == shows
        ctx.store.upsert_instance(
            "vast", str(iid), "gpu", last_checked_at="2000-01-01T00:00:00+00:00"
        )

        # The monitor's own wiring: an unreachable vast target -> Actions.provider_verdict ->
        # check_instance -> the state machine marks the run lost and records an alert.
        from orchestrator.monitor.actions import Actions
        from orchestrator.monitor.refresh import Poller

        poller = Poller(ctx, deliver=False, provider_verdict=Actions(ctx).provider_verdict)
        try:
            poller.poll(["gpu"])
        finally:
            poller.close()
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None and final.phase == Phase.LOST, final
        assert "outbid" in final.reason
        alerts = [a for a in ctx.store.recent_alerts() if a["run_id"] == rec.run_id]
        assert any(a["kind"] == "lost" for a in alerts), alerts
        assert live_row(ctx)["state"] == "outbid"
        # `orch up` keeps the outbid box: a raised bid within the ceiling resumes it in place.
        env.sshd.start()
        again = env.cli("up")
        assert again.returncode == 0, again.stderr
        assert "raising its bid" in again.stdout and env.server.bids[iid] == [pytest.approx(0.198)]
        assert int(live_row(ctx)["instance_id"]) == iid and list(env.server.instances) == [iid]
    finally:
        ctx.close()
    assert env.cli("down").returncode == 0 and env.server.instances == {}


def test_up_without_key_or_vast_target_is_one_clear_error(env: Env, isolated_home: Path) -> None:
    (isolated_home / ".config" / "vastai" / "vast_api_key").unlink()
    env.server.add_offer()
    res = env.cli("up")
    assert (
        res.returncode == 2 and "no Vast API key" in res.stderr and env.server.create_bodies == {}
    )
    res = env.cli("up", "local")
    assert res.returncode == 2 and "not 'vast'" in res.stderr
    assert main(["down", "nope"]) == 2


# -- auto-relaunch of a lost training run -------------------------------------------------------
def small_train_task(model: str, **over: object) -> WorkerTask:
    """A real (tiny, CPU) training task that checkpoints every 4 steps."""
    data = {"source": "tiny:recall", "format": "sft"}
    args: dict[str, object] = {
        "model": model,
        "data": {**data, "name": "recall", "split": "train", "limit": 160},
        "eval_data": {**data, "name": "recall-val", "split": "validation", "limit": 16},
        "mask": "prefix",
        "max_steps": 40,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 20,
        "eval_batches": 2,
        "probe_every": 20,
        "probe_batch_size": 8,
        "save_every": 4,
        "keep_checkpoints": 2,
        "heartbeat_s": 0.5,
        **over,
    }
    return WorkerTask(command="train", args=args)


def _lose_box(
    env: Env, ctx: Context, rec: object, iid: int, *, outbid: bool, min_bid: float | None = None
) -> object:
    """Vast takes the instance away; the monitor's poll marks the run lost (as it would)."""
    from orchestrator.monitor.actions import Actions
    from orchestrator.monitor.refresh import Poller

    if outbid:
        env.server.preempt(iid, min_bid=min_bid)
    else:  # stopped by its host (intended_status still running, on demand): the disk survives
        env.server.set_status(iid, actual="stopped", cur="stopped", next_="stopped")
    # The instance stops: every process of the run dies at once (frozen ones too).
    with contextlib.suppress(subprocess.CalledProcessError, ProcessLookupError):
        _signal_run(rec.session, signal.SIGKILL)  # type: ignore[attr-defined]
    subprocess.run(["tmux", "kill-session", "-t", rec.session], capture_output=True)  # type: ignore[attr-defined]
    env.sshd.stop()
    poller = Poller(ctx, deliver=False, provider_verdict=Actions(ctx).provider_verdict)
    try:
        poller.poll(["gpu"])
    finally:
        poller.close()
    lost = ctx.store.get_run(rec.stage_dir, rec.run_id)  # type: ignore[attr-defined]
    assert lost is not None and lost.phase == Phase.LOST, lost
    env.sshd.start()  # the box orch rents next answers on the same loopback sshd
    return lost


def _signal_run(session: str, sig: int) -> None:
    """Signal every process of a run's tmux pane (the wrapper and the worker)."""
    out = subprocess.run(
        ["tmux", "list-panes", "-t", session, "-F", "#{pane_pid}"],
        capture_output=True,
        text=True,
        check=True,
    )
    os.killpg(os.getpgid(int(out.stdout.split()[0])), sig)


def _freeze(env: Env, rec: object) -> None:
    """SIGSTOP the worker process itself (tmux resumes a stopped pane process, not its
    children), so what the run has on disk stops changing."""
    pid = int((env.remote / rec.run_dir / "pid").read_text())  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while _proc_state(pid) != "T":
        assert time.monotonic() < deadline, _proc_state(pid)
        time.sleep(0.01)


def _proc_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T ...) from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_file(path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _wait_done(env: Env, run_dir: str, timeout: float = 240) -> dict:
    _wait_file(env.remote / run_dir / "exit_code", timeout)
    return json.loads((env.remote / run_dir / "summary.json").read_text())


def _frozen_training(env: Env, ctx: Context, small_model: str) -> tuple[int, RunRecord]:
    """A training run on the rented box, frozen once its step-8 checkpoint is on the box's
    disk: the instance id and the run."""
    iid = int(live_row(ctx)["instance_id"])
    spec = StageSpec(name="vt-sft", stage_dir="vt-sft", task=small_train_task(small_model))
    rec = launch_mod.launch_stage(ctx, spec, "gpu")
    _wait_file(env.remote / rec.run_dir / "checkpoints" / "step-8" / "meta.json")
    _freeze(env, rec)
    return iid, rec


def _relaunch_of(env: Env, ctx: Context, rec: RunRecord) -> tuple[RunRecord, dict]:
    """The run the relaunch of `rec` started, and its spec.json on the box."""
    new = next(r for r in ctx.store.list_runs() if r.stage == "vt-sft" and r.key != rec.key)
    return new, json.loads((env.remote / new.run_dir / "spec.json").read_text())


def test_lost_training_run_relaunches_on_a_new_box_from_the_pulled_checkpoint(
    env: Env, small_model: str
) -> None:
    from orchestrator.monitor.actions import Actions, wanted_actions

    conf = toml(env.server, env.sshd, env.remote, interruptible="true", auto_relaunch="true")
    conf = conf.replace(
        "provider_check_s = 60", "provider_check_s = 60\npull_checkpoints_every_s = 0.3"
    )
    (env.root / "orch.toml").write_text(conf)
    env.server.add_offer(min_bid=0.15)
    env.server.add_offer(min_bid=0.15, dph_total=0.45)
    assert env.cli("up").returncode == 0
    ctx = Context()
    try:
        first = int(live_row(ctx)["instance_id"])
        spec = StageSpec(name="vt-sft", stage_dir="vt-sft", task=small_train_task(small_model))
        rec = launch_mod.launch_stage(ctx, spec, "gpu")
        # The watcher's checkpoint mirror pulls each new checkpoint while the run trains.
        actions = Actions(ctx)
        local_ck = env.root / rec.run_dir / "checkpoints"
        remote_ck = env.remote / rec.run_dir / "checkpoints"
        _wait_file(remote_ck / "step-4" / "meta.json")
        # Freeze the run where it is (a tiny run would otherwise finish in seconds); it is still
        # an active run to the store, which is all the mirror looks at.
        _freeze(env, rec)
        assert actions.mirror_checkpoints() == [rec.key]
        assert actions.mirror_checkpoints() == []  # not due again yet
        assert actions.mirror_checkpoints(now=time.monotonic() + 10) == [rec.key]
        on_box = sorted(p.name for p in remote_ck.glob("step-*") if (p / "meta.json").exists())
        steps = sorted(p.name for p in local_ck.glob("step-*") if (p / "meta.json").exists())
        assert steps == on_box and 1 <= len(steps) <= 2, (steps, on_box)  # keep_checkpoints
        assert not list(local_ck.glob(".*.tmp")), "a save in progress was mirrored"
        _signal_run(rec.session, signal.SIGKILL)
        newest_pulled = max(steps, key=lambda s: int(s.split("-")[1]))
        # Outbid beyond the bid ceiling (max_dph 1.0): the new box is another machine; nothing
        # of the old run is on its disk.
        shutil.rmtree(env.remote / rec.run_dir)
        lost = _lose_box(env, ctx, rec, first, outbid=True, min_bid=5.0)
        assert "outbid" in lost.reason

        assert wanted_actions(ctx, lost) == ["relaunch"]
        Actions(ctx).on_final(lost)  # what the watcher's completion hook does
        Actions(ctx).on_final(lost)  # a second call (a restarted watcher) does nothing more

        second = int(live_row(ctx)["instance_id"])
        assert second != first and first not in env.server.instances  # outbid one destroyed
        runs = [r for r in ctx.store.list_runs() if r.stage == "vt-sft" and r.key != rec.key]
        assert len(runs) == 1, runs
        new = runs[0]
        summary = _wait_done(env, new.run_dir)
        assert summary["resumed_from"] == newest_pulled
        assert summary["steps"] == 40
        spec_json = json.loads((env.remote / new.run_dir / "spec.json").read_text())
        assert spec_json["relaunch_of"] == rec.key and spec_json["relaunch_count"] == 1
        assert "pulled to the laptop" in spec_json["resumed_from"]
        alerts = [a for a in ctx.store.recent_alerts() if a["kind"] == "relaunched"]
        assert len(alerts) == 1 and new.key in alerts[0]["body"], alerts
        assert newest_pulled in alerts[0]["body"] and "newly rented" in alerts[0]["body"]
    finally:
        ctx.close()


def test_relaunch_resumes_from_the_surviving_disk_and_respects_the_limit(
    env: Env, small_model: str
) -> None:
    from orchestrator.monitor.actions import Actions, wanted_actions

    (env.root / "orch.toml").write_text(
        toml(env.server, env.sshd, env.remote, auto_relaunch="true", max_relaunches="1")
    )
    env.server.add_offer()
    assert env.cli("up").returncode == 0
    ctx = Context()
    try:
        iid, rec = _frozen_training(env, ctx, small_model)
        lost = _lose_box(env, ctx, rec, iid, outbid=False)
        # Nothing pulled: the checkpoint comes from the old run dir on the restarted instance.
        Actions(ctx).on_final(lost)
        assert int(live_row(ctx)["instance_id"]) == iid  # started again, not re-rented
        relaunched = [a for a in ctx.store.recent_alerts() if a["kind"] == "relaunched"]
        assert "started the stopped instance again" in relaunched[0]["body"]
        new, spec_json = _relaunch_of(env, ctx, rec)
        assert "surviving disk" in spec_json["resumed_from"]
        on_disk = sorted((env.remote / rec.run_dir / "checkpoints").glob("step-*"))
        newest_box = max((p.name for p in on_disk), key=lambda s: int(s.split("-")[1]))
        summary = _wait_done(env, new.run_dir)
        assert summary["resumed_from"] == newest_box and summary["steps"] == 40

        # The relaunched run is lost too: max_relaunches = 1 stops the chain there.
        lost2 = ctx.store.get_run(new.stage_dir, new.run_id)
        assert lost2 is not None
        ctx.store.update_run(new.stage_dir, new.run_id, phase=Phase.LOST, reason="test")
        lost2 = ctx.store.get_run(new.stage_dir, new.run_id)
        assert lost2 is not None and wanted_actions(ctx, lost2) == []
        # An eval run is never relaunched.
        ev = rec.model_copy(
            update={"spec_json": rec.spec_json and rec.spec_json.replace('"train"', '"eval"')}
        )
        assert wanted_actions(ctx, ev.model_copy(update={"phase": Phase.LOST})) == []
    finally:
        ctx.close()


def test_relaunch_keeps_an_outbid_box_by_a_raised_bid_and_says_so(
    env: Env, small_model: str
) -> None:
    """Outbid within the bid ceiling: the relaunch raises the bid (`PUT /api/v0/instances/
    bid_price/{id}/`, vastai/api/instances.py change_bid) rather than renting elsewhere, resumes
    from the checkpoint on the same disk, and its alert says it kept the box that way."""
    from orchestrator.monitor.actions import Actions

    (env.root / "orch.toml").write_text(
        toml(env.server, env.sshd, env.remote, interruptible="true", auto_relaunch="true")
    )
    env.server.add_offer(min_bid=0.15)
    env.server.add_offer(min_bid=0.15, dph_total=0.45)  # what a rent elsewhere would take
    assert env.cli("up").returncode == 0
    ctx = Context()
    try:
        iid, rec = _frozen_training(env, ctx, small_model)
        lost = _lose_box(env, ctx, rec, iid, outbid=True, min_bid=0.3)  # ceiling: max_dph 1.0
        assert "outbid" in lost.reason
        Actions(ctx).on_final(lost)
        assert int(live_row(ctx)["instance_id"]) == iid and env.server.bids[iid] == [0.33]
        assert env.server.request_count("DELETE") == 0 and list(env.server.create_bodies) == [iid]
        [alert] = [a for a in ctx.store.recent_alerts() if a["kind"] == "relaunched"]
        assert "raising its bid" in alert["body"] and "$0.330/h" in alert["body"], alert
        new, spec_json = _relaunch_of(env, ctx, rec)
        assert "surviving disk" in spec_json["resumed_from"]
        assert _wait_done(env, new.run_dir)["steps"] == 40
    finally:
        ctx.close()


def test_a_relaunch_that_cannot_rent_is_one_alert_and_leaves_nothing_running(env: Env) -> None:
    from datetime import datetime, timezone

    from orchestrator.monitor import ledger
    from orchestrator.monitor.actions import Actions

    (env.root / "orch.toml").write_text(
        toml(env.server, env.sshd, env.remote, auto_relaunch="true")
    )
    ctx = Context()
    try:
        now = datetime.now(timezone.utc)
        task = WorkerTask(command="train", args={"model": "tiny://default"})
        spec = RunSpec(run_id="r1", stage="vt-sft", stage_dir="vt-sft", task=task, target="gpu")
        rec = RunRecord(
            run_id="r1",
            stage="vt-sft",
            stage_dir="vt-sft",
            target="gpu",
            phase=Phase.LOST,
            reason="instance lost: outbid",
            session="orch-vt-sft-r1",
            run_dir="runs/vt-sft/r1",
            created_at=now,
            updated_at=now,
            spec_json=spec.model_dump_json(),
        )
        ctx.store.insert_run(rec)
        # Vast has no offer that matches: the relaunch cannot rent a box.
        Actions(ctx).on_final(rec)
        Actions(ctx).on_final(rec)  # the retry fails again: still one alert
        alerts = [a for a in ctx.store.recent_alerts() if a["run_id"] == "r1"]
        assert [a["kind"] for a in alerts] == ["relaunch_failed"], alerts
        assert "orch up gpu" in alerts[0]["body"] and "no offer" in alerts[0]["body"].lower()
        assert "relaunch" not in ledger.actions_done(ctx.store, "vt-sft", "r1")
        assert env.server.instances == {}  # nothing rented, nothing to pay for
        assert [r.key for r in ctx.store.list_runs()] == ["vt-sft/r1"]  # nothing launched
    finally:
        ctx.close()
