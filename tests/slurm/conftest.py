"""Fixtures for the Slurm scenarios: a private single-node cluster (tests/slurm/cluster.py) and a
login node, the test sshd, whose sessions get the cluster's `SLURM_CONF` through `SetEnv` as a
real login node's /etc/slurm would give it. Both are per test: the cluster starts in well under
a second, and a test that kills slurmd must not leave a broken node to the next one.

Locally a missing Slurm is a skip; in CI (`CI=true`) it fails (scripts/setup.sh installs it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_tools
from tests.slurm.cluster import SlurmCluster, missing_tools
from tests.sshd import SshServer, make_server


def require_slurm() -> None:
    missing = missing_tools()
    if missing:
        msg = (
            f"missing Slurm tools: {', '.join(missing)} (scripts/setup.sh installs slurm-wlm munge)"
        )
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require_slurm()
    # A short path: munge's and slurm's socket paths must fit in sun_path (108 bytes).
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), partitions={"short": "MaxTime=1"})
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_login(tmp_path: Path, slurm_cluster: SlurmCluster) -> Iterator[SshServer]:
    """The login node: a real sshd whose sessions see the cluster (`SetEnv SLURM_CONF=...`)."""
    require_tools("sshd", "ssh", "ssh-keygen", "rsync")
    server = make_server(tmp_path / "login")
    server.set_env = dict(slurm_cluster.env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def slurm_toml(server: SshServer, workdir: Path, name: str = "cluster", **extra: object) -> str:
    """orch.toml with one `slurm` target on `server` (the test's interpreter: no bootstrap)."""
    lines = [
        f'default_target = "{name}"',
        f"[targets.{name}]",
        'kind = "slurm"',
        f'host = "{server.host}"',
        f"port = {server.port}",
        f'user = "{server.user}"',
        f'identity_file = "{server.client_key}"',
        f'workdir = "{workdir}"',
        f'python = "{sys.executable}"',
    ]
    for key, value in {"signal_before_s": 0, **extra}.items():
        if isinstance(value, dict):
            inline = ", ".join(f'{k} = "{v}"' for k, v in value.items())
            lines.append(f"{key} = {{ {inline} }}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"
