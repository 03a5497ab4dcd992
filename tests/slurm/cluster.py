"""A real single-node Slurm cluster on loopback for tests (no mocks): munged, slurmctld, slurmd.

Everything lives under one directory: the munge key and socket, `slurm.conf` and `gres.conf`,
state and spool dirs, pid and log files, with ports of its own, so parallel test runs never
collide and nothing under /etc is touched. Clients (sbatch, squeue, scontrol, scancel) find this
cluster only through `SLURM_CONF` (`cluster.env`); the test sshd hands that to every ssh session
with `SetEnv`, as a real login node's own /etc/slurm would.

What works without systemd or cgroups (see /work/shared/reference/slurm-notes.md):
`proctrack/linuxproc`, `task/none`, `select/cons_tres` with `CR_Core_Memory` and a `DefMemPerCPU`;
fake GPUs are gres entries on character devices (`mknod PATH c 1 3`, i.e. /dev/null-like).
Daemons run in the foreground (`-D`) as children of the test process and are stopped by their
Popen handles, never by name; jobs are cancelled first (job processes outlive slurmd).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    for d in SBIN:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def missing_tools() -> list[str]:
    return [t for t in (*DAEMONS, *CLIENTS) if find_tool(t) is None]


@dataclass
class SlurmCluster:
    root: Path
    cpus: int = 4
    memory_mb: int = 4000
    gpus: int = 2
    #: extra partitions: name -> extra `PartitionName=` options (e.g. "MaxTime=5")
    partitions: dict[str, str] = field(default_factory=dict)
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    ctld_port: int = field(default_factory=free_port)
    slurmd_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- paths --------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    # -- config -------------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "dev", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        devs = []
        for i in range(self.gpus):
            dev = r / "dev" / f"gpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
            devs.append(str(dev))
        parts = [
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            *(
                f"PartitionName={name} Nodes={self.node} State=UP {opts}".rstrip()
                for name, opts in self.partitions.items()
            ),
        ]
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "ClusterName=orchtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"SlurmdLogFile={self.log('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=100",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=20",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb}{gres} State=UNKNOWN",
            *parts,
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        gres_lines = [f"NodeName={self.node} Name=gpu File={d}" for d in devs]
        (r / "gres.conf").write_text("".join(line + "\n" for line in gres_lines))

    # -- lifecycle ----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives with the daemon
        env = {**os.environ, **self.env}
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def start_munged(self) -> None:
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                find_tool("munged") or "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={self.log('munged')}",
                f"--seed-file={m / 'munged.seed'}",
                "--num-threads=2",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), "munged", 10)

    def start_slurmctld(self) -> None:
        self._spawn(
            "slurmctld", [find_tool("slurmctld") or "slurmctld", "-D", "-c", "-f", str(self.conf)]
        )
        self._wait(lambda: self.client(["scontrol", "ping"]).returncode == 0, "slurmctld", 20)

    def start_slurmd(self) -> None:
        self._spawn("slurmd", [find_tool("slurmd") or "slurmd", "-D", "-f", str(self.conf)])

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        self.start_munged()
        self.start_slurmctld()
        self.start_slurmd()
        self.wait_node_idle(timeout)

    def wait_node_idle(self, timeout: float = 30.0) -> None:
        def idle() -> bool:
            st = self.node_state()
            return st.startswith(("IDLE", "MIXED", "ALLOCATED"))

        self._wait(idle, "the node to become idle", timeout)

    def node_state(self) -> str:
        res = self.client(["sinfo", "-h", "-N", "-o", "%T", "-n", self.node])
        return res.stdout.strip().upper()

    def kill_slurmd(self) -> None:
        """SIGKILL slurmd, as a node failure would; its jobs' processes live on."""
        p = self.procs.pop("slurmd", None)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

    def client(self, argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)

    def cancel_all(self) -> None:
        with contextlib.suppress(Exception):
            self.client(["scancel", "--full", "--partition", "debug"])
            for name in self.partitions:
                self.client(["scancel", "--full", "--partition", name])

    def stop(self) -> None:
        if "slurmctld" in self.procs:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def logs_tail(self, n: int = 40) -> str:
        out = []
        for d in DAEMONS:
            p = self.log(d)
            if p.exists():
                out.append(f"--- {d}.log\n" + "\n".join(p.read_text().splitlines()[-n:]))
            q = self.root / "log" / f"{d}.out"
            if q.exists() and q.stat().st_size:
                out.append(f"--- {d}.out\n" + "\n".join(q.read_text().splitlines()[-n:]))
        return "\n".join(out)

    def _wait(self, ok: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited {p.returncode} while waiting for {what}\n{self.logs_tail()}"
                    )
            try:
                if ok():  # type: ignore[operator]
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs_tail()}")
