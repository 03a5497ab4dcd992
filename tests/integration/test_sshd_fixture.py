import subprocess

import pytest

pytestmark = pytest.mark.integration


def test_real_sshd_accepts_our_key(sshd_server):
    out = subprocess.run(
        [
            "ssh",
            "-i",
            str(sshd_server.client_key),
            "-p",
            str(sshd_server.port),
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={sshd_server.root}/kh",
            "-o",
            "StrictHostKeyChecking=accept-new",
            f"{sshd_server.user}@127.0.0.1",
            "echo",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi"
