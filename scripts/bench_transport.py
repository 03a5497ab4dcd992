"""Transport benchmark (issue 2): status poll, no-op code re-sync, artifact pull and resume.

    .venv/bin/python scripts/bench_transport.py            # full run (200 MB artifact)
    .venv/bin/python scripts/bench_transport.py --mb 20    # quicker

Starts its own OpenSSH sshd on 127.0.0.1 (tests/sshd.py's make_server) and measures, side by
side in one run:
1. one status poll (`observe`) on the persistent agent channel vs a fresh `ssh host python -m
   state.agent ...` process per poll (and, for scale, a new channel on the open paramiko
   connection per poll); median ms and ratio. Target: poll <= 25 ms.
2. a no-op re-sync of this repository with `sync_code` vs a bare `rsync -a` of the same tree
   (same excludes) over the same ssh: file data sent and median time. Target: ~0 bytes, <= 1.5x.
3. a pull of an N MB artifact with `sync_down` vs a bare `rsync -a` over the same ssh: median
   throughput and ratio (target >= 0.8x); then a pull cut off mid-way by SIGKILLing the sshd
   connection child, resumed and verified by sha256.
Prints a Markdown table (for docs/BENCHMARKS.md) and writes .bench/transport.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.codesync import code_files, sync_code  # noqa: E402
from orchestrator.sshcmd import rsync_shell, ssh_argv  # noqa: E402
from orchestrator.targets.ssh import SshTarget  # noqa: E402
from state.errors import UnreachableError  # noqa: E402
from tests.sshd import make_server  # noqa: E402

BARE_EXCLUDES = [
    ".git/",
    ".venv/",
    ".venv-*/",
    "/runs/",
    "/.orch/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    ".bench/",
]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bench_poll(t: SshTarget, n_agent: int, n_fresh: int) -> dict[str, float]:
    wd = t.workdir
    for i in range(3):  # three run dirs to observe, as the monitor would
        rd = Path(wd) / "runs" / "bench" / f"20260101-00000{i}"
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "exit_code").write_text("0\n")
    req = {
        "op": "observe",
        "gpus": False,
        "runs": [{"run_dir": f"runs/bench/20260101-00000{i}"} for i in range(3)],
    }
    agent = t.agent()
    agent.request({"op": "ping"}, timeout=60)  # started (python startup is not a poll)
    persistent = timed(lambda: agent.request(req, timeout=10), n_agent)
    line = (json.dumps(req) + "\n").encode()

    def fresh_ssh() -> None:
        out = subprocess.run(
            ssh_argv(t.endpoint, t.agent_argv()), input=line, capture_output=True, timeout=60
        )
        assert out.returncode == 0 and out.stdout.count(b"\n") == 2, out.stderr

    def new_channel() -> None:
        res = t.run(t.agent_argv(), timeout=60, stdin=line)
        assert res.ok and res.stdout.count("\n") == 2, res.stderr

    fresh = timed(fresh_ssh, n_fresh)
    channel = timed(new_channel, n_fresh)
    return {
        "agent_ms": median_ms(persistent),
        "agent_p90_ms": statistics.quantiles(persistent, n=10)[-1] * 1000,
        "fresh_ssh_ms": median_ms(fresh),
        "new_channel_ms": median_ms(channel),
        "ratio_fresh_over_agent": median_ms(fresh) / median_ms(persistent),
        "n_agent": n_agent,
        "n_fresh": n_fresh,
    }


def snapshot_repo(dest: Path) -> Path:
    """A frozen copy of this repo (its .git and the files sync_code would send): other people
    edit the live tree while this runs, and a no-op must stay a no-op."""
    shutil.copytree(REPO / ".git", dest / ".git")
    for rel in code_files(REPO):
        src = REPO / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def bench_resync(t: SshTarget, n: int, root: Path) -> dict[str, float]:
    src = snapshot_repo(root)
    sync_code(t, src)  # populate
    ours, literal = [], []
    bare_dest = f"{t.workdir}/bare-code"
    t.run(["mkdir", "-p", bare_dest], timeout=30, check=True)
    bare_argv = [
        "rsync",
        "-a",
        "--delete",
        "--stats",
        "-e",
        rsync_shell(t.endpoint),
        *(f"--exclude={e}" for e in BARE_EXCLUDES),
        f"{src}/",
        f"{t.endpoint.rsync_host}:{bare_dest}/",
    ]
    subprocess.run(bare_argv, check=True, capture_output=True)  # populate
    bare = []
    for _ in range(n):  # interleaved so both see the same machine load
        t0 = time.perf_counter()
        st = sync_code(t, src)
        ours.append(time.perf_counter() - t0)
        literal.append(st.literal_bytes)
        t0 = time.perf_counter()
        subprocess.run(bare_argv, check=True, capture_output=True)
        bare.append(time.perf_counter() - t0)
    return {
        "files": len(code_files(src)),
        "literal_bytes_max": max(literal),
        "sync_code_ms": median_ms(ours),
        "bare_rsync_ms": median_ms(bare),
        "ratio": median_ms(ours) / median_ms(bare),
        "n": n,
    }


def bench_pull(t: SshTarget, server, mb: int, n: int, local_root: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    art_dir = Path(t.workdir) / "runs" / "bench" / "artifact"
    art_dir.mkdir(parents=True, exist_ok=True)
    art = art_dir / "model.safetensors"
    with open(art, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    size = art.stat().st_size
    digest = sha256(art)
    ours, bare = [], []
    for i in range(n):
        dest = local_root / f"ours{i}"
        t0 = time.perf_counter()
        t.sync_down("runs/bench/artifact", dest, timeout=600)
        ours.append(time.perf_counter() - t0)
        assert sha256(dest / art.name) == digest
        shutil.rmtree(dest)
        dest = local_root / f"bare{i}"
        dest.mkdir()
        t0 = time.perf_counter()
        subprocess.run(
            [
                "rsync",
                "-a",
                "-e",
                rsync_shell(t.endpoint),
                f"{t.endpoint.rsync_host}:{art_dir}/",
                f"{dest}/",
            ],
            check=True,
            capture_output=True,
        )
        bare.append(time.perf_counter() - t0)
        shutil.rmtree(dest)
    ours_mbs = size / 1e6 / statistics.median(ours)
    bare_mbs = size / 1e6 / statistics.median(bare)

    # Cut the link mid-way, then resume.
    dest = local_root / "cut"
    dest.mkdir()
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            t.sync_down("runs/bench/artifact", dest, timeout=600)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=pull)
    th.start()
    cut_at = 0
    while th.is_alive():
        parts = list(dest.glob(f".{art.name}.*"))
        if parts and parts[0].stat().st_size >= size * 0.4:
            cut_at = parts[0].stat().st_size
            server.signal_connections(signal.SIGKILL)
            break
        time.sleep(0.005)
    th.join()
    interrupted = bool(errors) and isinstance(errors[0], UnreachableError)
    partial = dest / ".rsync-partial" / art.name
    kept = partial.stat().st_size if partial.exists() else 0
    t0 = time.perf_counter()
    st = t.sync_down("runs/bench/artifact", dest, timeout=600)
    resume_s = time.perf_counter() - t0
    ok = sha256(dest / art.name) == digest
    return {
        "mib": size / 2**20,
        "sync_down_MBps": ours_mbs,
        "bare_rsync_MBps": bare_mbs,
        "ratio": ours_mbs / bare_mbs,
        "n": n,
        "cut_interrupted": interrupted,
        "cut_at_bytes": cut_at,
        "partial_kept_bytes": kept,
        "resume_literal_bytes": st.literal_bytes,
        "resume_matched_bytes": st.extra.get("matched_bytes", 0),
        "resume_s": resume_s,
        "resume_sha256_ok": ok,
    }


def render(result: dict) -> str:  # type: ignore[type-arg]
    """The Markdown lines for docs/BENCHMARKS.md."""
    p, r, q = result["poll"], result["resync"], result["pull"]
    load0, load1 = result["load_avg_1m_start_end"]
    mib = q.get("mib", q.get("mb", 0) * 1e6 / 2**20)
    return "\n".join(
        [
            f"machine: {result['machine']}; {result['ssh']}; {result['rsync']}; "
            f"load average (1 min) {load0:.1f} at start, {load1:.1f} at end",
            "",
            "| measure | orch | baseline | ratio | target |",
            "|---|---|---|---|---|",
            f"| status poll (`observe` of 3 runs), median (p90) | {p['agent_ms']:.2f} ms ({p['agent_p90_ms']:.2f}) "
            "on the persistent agent channel "
            f"| {p['fresh_ssh_ms']:.0f} ms fresh `ssh` process; {p['new_channel_ms']:.0f} ms new channel on "
            f"the open connection | {p['ratio_fresh_over_agent']:.0f}x faster | <= 25 ms |",
            f"| no-op re-sync of the repo ({r['files']} files), median of {r['n']} | {r['sync_code_ms']:.0f} ms, "
            f"{r['literal_bytes_max']} B file data | {r['bare_rsync_ms']:.0f} ms bare `rsync -a` "
            f"| {r['ratio']:.2f}x | ~0 B, <= 1.5x |",
            f"| pull of a {mib:.0f} MiB artifact, median of {q['n']} | {q['sync_down_MBps']:.1f} MB/s `sync_down` "
            f"| {q['bare_rsync_MBps']:.1f} MB/s bare `rsync -a` | {q['ratio']:.2f}x | >= 0.8x |",
            f"| pull cut mid-way (sshd child SIGKILLed at {q['cut_at_bytes'] / 2**20:.0f} MiB) "
            f"| interrupted={q['cut_interrupted']}, {q['partial_kept_bytes'] / 2**20:.0f} MiB kept in "
            f".rsync-partial; resume sent {q['resume_literal_bytes'] / 2**20:.0f} MiB, reused "
            f"{q['resume_matched_bytes'] / 2**20:.0f} MiB, {q['resume_s']:.1f} s; sha256 ok={q['resume_sha256_ok']} "
            "| | | resumes, verifies |",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="artifact size in MB")
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--fresh-polls", type=int, default=20)
    ap.add_argument("--syncs", type=int, default=7)
    ap.add_argument("--pulls", type=int, default=3)
    ap.add_argument("--render", type=Path, help="only print the table of a saved result JSON")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        root = Path(tmp)
        server = make_server(root / "sshd")
        server.start()
        try:
            t = SshTarget(
                "bench",
                host=server.host,
                port=server.port,
                user=server.user,
                identity_file=server.client_key,
                known_hosts=root / "known_hosts",
                workdir=str(root / "box"),
                python=sys.executable,
            )
            sync_code(t, REPO)
            poll = bench_poll(t, args.polls, args.fresh_polls)
            resync = bench_resync(t, args.syncs, root / "snapshot")
            pull = bench_pull(t, server, args.mb, args.pulls, root / "local")
            t.close()
        finally:
            server.stop()
    result = {
        "load_avg_1m_start_end": [load0, os.getloadavg()[0]],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        "rsync": subprocess.run(
            ["rsync", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "poll": poll,
        "resync": resync,
        "pull": pull,
    }
    out = REPO / ".bench" / "transport.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0 if pull["resume_sha256_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
