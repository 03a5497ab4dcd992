"""`orch plan` against real services on loopback: the Vast test server's offers (too little GPU
memory, too little disk, one that fits), the local hub stand-in (a token that may download the
gated model, none, a revision that does not exist), and a box over a real sshd whose torch is
older than the runtime contract, which `orch launch` then refuses before anything starts.

The "old torch" box is the system interpreter with a `torch-2.5.1` distribution on its path (a
dist-info directory and a package that answers `torch.cuda.is_available()`): the probe and the
bootstrap read versions from package metadata (`importlib.metadata`), as they do on a real box.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.profiles import DATASET_REVISIONS, MINISTRAL_3B_ID, MINISTRAL_3B_REVISION
from orchestrator.cli import main
from orchestrator.context import Context
from tests.conftest import REPO
from tests.hub_server import HubRepo, HubServer
from tests.sshd import SshServer
from tests.vast_server import VastServer

pytestmark = pytest.mark.integration

KEY = "vk-plan-2b7e1c9d4f6a8e03b5d7c1a9e2f4b6d8"
TOKEN = "hf_plantoken0123456789abcdefghij"
PACKAGES = ("state", "worker", "jobs", "orchestrator")


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(
        tokens={TOKEN},
        models={MINISTRAL_3B_ID: HubRepo(sha=MINISTRAL_3B_REVISION, gated="auto", granted={TOKEN})},
        datasets={repo: HubRepo(sha=sha) for repo, sha in DATASET_REVISIONS.items()},
    ) as srv:
        yield srv


@pytest.fixture
def vast(isolated_home: Path) -> Iterator[VastServer]:
    server = VastServer(api_key=KEY).start()
    key_file = isolated_home / ".config" / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    try:
        yield server
    finally:
        server.stop()


def project(root: Path, toml: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "orch.toml").write_text(toml)
    return root


def vast_toml(server: VastServer, key: Path, gpu: str, disk_gb: int) -> str:
    return (
        'default_target = "gpu"\n'
        "[experiment]\n"
        'profile = "ministral-3b"\n'
        "[targets.gpu]\n"
        'kind = "vast"\n'
        f'api_url = "{server.url}"\n'
        f'identity_file = "{key}"\n'
        f"disk_gb = {disk_gb}\n"
        "[targets.gpu.offer]\n"
        f'gpu_names = ["{gpu}"]\n'
        "max_dph = 5.0\n"
    )


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def failing(plan: dict) -> set[str]:
    return {c["what"].split(" (")[0] for c in plan["checks"] if c["ok"] is False}


def test_plan_on_vast_offers_says_what_does_not_fit_and_what_does(
    vast: VastServer,
    hub: HubServer,
    sshd_server: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # a 24 GB card for a 3B full fine-tune, and the default 80 GB disk for 41 GB checkpoints
    vast.add_offer(gpu_name="RTX 4090", gpu_ram=24564.0, disk_space=80.0, dph_total=0.4)
    root = project(tmp_path / "p", vast_toml(vast, sshd_server.client_key, "RTX 4090", 80))
    monkeypatch.chdir(root)
    rc, plan = plan_json(capsys, "stage3b")
    assert rc == 1
    assert {"GPU memory", "disk"} <= failing(plan), plan["checks"]
    [st] = plan["stages"]
    assert st["params"] > 3e9 and st["memory"]["peak"] > 50e9
    assert st["disk"]["checkpoint"] > 35e9  # fp32 weights + AdamW moments
    assert "does not fit gpu" in plan["verdict"]
    # the hub rows: the granted token may read the pinned gated model and data sets
    hub_rows = [c for c in plan["checks"] if c["stage"] == "hub"]
    assert hub_rows and all(c["ok"] for c in hub_rows), hub_rows
    assert all(TOKEN not in u for u in hub.seen_urls)
    assert not vast.instances  # nothing was rented

    # an 80 GB card and a disk that holds two checkpoints and the cache: it fits, with $
    vast.add_offer(gpu_name="H100 SXM", gpu_ram=81559.0, disk_space=400.0, dph_total=2.2)
    (root / "orch.toml").write_text(vast_toml(vast, sshd_server.client_key, "H100 SXM", 250))
    rc, plan = plan_json(capsys, "stage3b")
    assert not failing(plan), plan["checks"]
    assert rc == 0, plan["verdict"]
    [st] = plan["stages"]
    assert st["seconds"] and st["dollars"] == pytest.approx(st["seconds"] / 3600 * 2.2, rel=0.05)
    assert not vast.instances


def test_plan_hub_rows_name_the_fix(
    vast: VastServer,
    hub: HubServer,
    sshd_server: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    vast.add_offer(gpu_name="H100 SXM", gpu_ram=81559.0, disk_space=400.0, dph_total=2.2)
    root = project(tmp_path / "p", vast_toml(vast, sshd_server.client_key, "H100 SXM", 250))
    monkeypatch.chdir(root)
    rc, plan = plan_json(capsys, "stage1")
    model_rows = [c for c in plan["checks"] if c["what"] == f"model {MINISTRAL_3B_ID}"]
    assert rc == 1 and model_rows and model_rows[0]["ok"] is False
    assert "HF_TOKEN" in model_rows[0]["fix"]

    # a data set revision the hub does not have
    rc, plan = plan_json(capsys, "stage1", "--set", "tasks.4.revision=" + "0" * 40)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rc, plan = plan_json(capsys, "stage1", "--set", "tasks.4.revision=" + "0" * 40)
    bad = [c for c in plan["checks"] if c["ok"] is False]
    assert rc == 1 and len(bad) == 1 and "google/boolq" in bad[0]["what"], bad
    assert "revision" in bad[0]["fix"].lower()


# ---- a box whose torch is too old ---------------------------------------------------------------


def old_torch_python(root: Path) -> Path:
    """An interpreter that sees torch 2.5.1 installed (as an image with that torch would)."""
    site = root / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(
        "__version__ = '2.5.1+cu124'\n"
        "class version:\n    cuda = '12.4'\n"
        "class cuda:\n    @staticmethod\n    def is_available():\n        return False\n"
    )
    dist = site / "torch-2.5.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    (dist / "RECORD").write_text("")
    exe = root / "python"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec /usr/bin/python3 "$@"\n')
    exe.chmod(0o755)
    return exe


def test_a_box_with_an_old_torch_is_refused_by_plan_and_by_launch(
    sshd_server: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs /usr/bin/python3 as the box's interpreter")
    python = old_torch_python(tmp_path / "box")
    root = tmp_path / "p"
    root.mkdir()
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    project(
        root,
        'default_target = "box"\n'
        "[targets.box]\n"
        'kind = "ssh"\n'
        f'host = "{sshd_server.host}"\n'
        f"port = {sshd_server.port}\n"
        f'user = "{sshd_server.user}"\n'
        f'identity_file = "{sshd_server.client_key}"\n'
        f'workdir = "{tmp_path / "remote"}"\n'
        f'python = "{python}"\n',
    )
    monkeypatch.chdir(root)
    rc, plan = plan_json(capsys, "stage1")
    torch_rows = [c for c in plan["checks"] if c["what"] == "torch"]
    assert rc == 1 and torch_rows and torch_rows[0]["ok"] is False, plan["checks"]
    assert "2.5.1" in torch_rows[0]["have"] and "2.6" in torch_rows[0]["fix"]

    capsys.readouterr()
    rc = main(["launch", "stage1"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert any("torch 2.5.1" in ln and "2.6" in ln for ln in lines), err
    ctx = Context(cwd=root)
    try:
        assert ctx.store.list_runs() == []  # nothing recorded, nothing started
    finally:
        ctx.close()
    assert not (tmp_path / "remote" / "venv").exists()  # nothing installed around it
