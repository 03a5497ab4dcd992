"""Fault campaign, security: an injection corpus (hypothesis) through orch's real quoting
(`orchestrator.sshcmd` / `wrapper`: argv lists joined with `shlex`) over the real sshd. Strings
full of shell metacharacters, and payloads that would `touch` a canary file if any shell ever
parsed them, go through as remote argv, as a run's env values (the launcher's `env K=V ... sh
WRAPPER` line, run by the real wrapper), as forwarded secrets (the 0600 file the wrapper
sources), as workdir paths (sftp, rsync), and as `--set` values; each arrives byte for byte and
the canary never appears. Run and stage names are refused unless they match the name rule."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import overrides as ov
from orchestrator import wrapper
from orchestrator.context import Context
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target
from state import names
from state.errors import ConfigError
from tests.faults.campaign import Scenario
from tests.integration.monitor_harness import write_project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

META = list(";|&$`\\\"' \t\n<>(){}*?[]!#~=%^-") + ["$(", "${", "`", "&&", "||", "\\n"]
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _payloads(canary: Path) -> list[str]:
    c = shlex.quote(str(canary))
    return [
        f"; touch {c}",
        f"$(touch {c})",
        f"`touch {c}`",
        f"' ; touch {c} ; '",
        f'" ; touch {c} ; "',
        f"x && touch {c}",
        f"x || touch {c} ||",
        f"\ntouch {c}\n",
        f"$({{touch,{c}}})",
        f"'\"$(touch {c})\"'",
    ]


def corpus(canary: Path, *, path_safe: bool = False) -> st.SearchStrategy[str]:
    chars = st.one_of(
        st.sampled_from(META), st.characters(blacklist_categories=("Cs", "Cc")), st.just("a")
    )
    text = st.lists(chars, max_size=12).map("".join)
    out = st.one_of(
        st.sampled_from(_payloads(canary)),
        text,
        st.tuples(text, st.sampled_from(_payloads(canary))).map("".join),
    )
    if path_safe:  # a single path component: no '/', not '.' or '..', not empty
        out = out.map(lambda s: "w" + s.replace("/", "_").replace("\n", "_"))
    return out


@pytest.fixture
def box(tmp_path: Path, sshd_server: SshServer) -> Iterator[tuple[Target, Path, Path]]:
    work = tmp_path / "box-work"
    root = write_project(
        tmp_path / "project",
        sshd_server.toml("box", workdir=work),
        hook_url="json://127.0.0.1:9/none",
        monitor={},
    )
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    target.run(["mkdir", "-p", str(work / "bin")], timeout=10, check=True)
    target.put_bytes(wrapper.wrapper_script(), wrapper.wrapper_remote_path(str(work)), mode=0o755)
    canary = tmp_path / "canary"
    try:
        yield target, work, canary
    finally:
        target.close()
        ctx.close()


def test_injection_corpus(box: tuple[Target, Path, Path], tmp_path: Path) -> None:
    target, work, canary = box
    sc = Scenario(
        name="injection corpus (hypothesis)",
        injected="shell metacharacters and `touch CANARY` payloads as remote argv, env values "
        "(the wrapper line), forwarded secrets (sourced file), workdir paths (sftp, rsync), "
        "`--set` values; run and stage names",
        report="each value arrives byte for byte; names outside `^[A-Za-z0-9_.-]{1,64}$` "
        "are one ConfigError",
        within_s=240,
        survives="the box: the canary file is never created",
    )
    counts: dict[str, int] = {}
    sc.start()

    @FAST
    @given(corpus(canary))
    def argv_round_trip(s: str) -> None:
        res = target.run(["printf", "%s|%s", s, "end"], timeout=20, check=True)
        assert res.stdout == f"{s}|end"
        counts["argv"] = counts.get("argv", 0) + 1

    @FAST
    @given(corpus(canary), corpus(canary))
    def env_and_secret_through_the_wrapper(value: str, secret: str) -> None:
        n = counts.get("env", 0) + 1
        counts["env"] = n
        rd = f"{work}/runs/inj/{n}"
        target.run(["mkdir", "-p", rd], timeout=10, check=True)
        target.put_bytes(
            wrapper.secrets_env_text({"ORCH_T_SECRET": secret}).encode(),
            f"{rd}/{wrapper.SECRETS_FILE}",
            mode=0o600,
        )
        code = (
            "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps("
            "[os.environ['ORCH_T_VALUE'], os.environ['ORCH_T_SECRET'], sys.argv[2]]))"
        )
        out = f"{rd}/got.json"
        cmd = wrapper.wrapper_command(
            wrapper_path=wrapper.wrapper_remote_path(str(work)),
            run_dir_abs=rd,
            argv=[sys.executable, "-c", code, out, value],
            env={"ORCH_T_VALUE": value},
        )
        target.run(["sh", "-c", cmd], timeout=30)  # what tmux runs: one shell parse
        assert (Path(rd) / names.EXIT_CODE).read_text().strip() == "0"
        assert json.loads(Path(out).read_text()) == [value, secret, value]

    @settings(FAST, max_examples=12)
    @given(corpus(canary, path_safe=True))
    def workdir_paths(component: str) -> None:
        n = counts.get("workdir", 0) + 1
        counts["workdir"] = n
        wd = f"{work}/{n}-{component}"
        target.run(["mkdir", "-p", f"{wd}/run"], timeout=10, check=True)
        target.put_bytes(component.encode(), f"{wd}/run/f.txt")
        assert target.run(["cat", f"{wd}/run/f.txt"], timeout=10).stdout == component
        local = tmp_path / "pulled" / str(n)
        target.sync_down(f"{wd}/run", local)
        assert (local / "f.txt").read_text() == component

    @settings(FAST, max_examples=200)
    @given(corpus(canary))
    def set_values_and_names(value: str) -> None:
        counts["set"] = counts.get("set", 0) + 1
        got = ov.parse_assignments([f"note={value}"])["note"]
        assert json.loads(json.dumps(got)) == got  # what spec.json carries, exactly
        if isinstance(got, str):  # a JSON string literal is a string: its quotes go
            assert got in (value, value.strip()) or json.dumps(got) == value.strip()
        for name in (value, f"a{value}", f"{value}z", "ok\n", "a\nb"):
            valid = re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) and name not in {".", ".."}
            try:
                names.check_name(name, "run id")
                assert valid, f"{name!r} accepted as a name"
            except ConfigError:
                assert not valid, f"{name!r} refused"
        for env_name in (f"A{value}", "A\n", "A\nB"):
            try:
                wrapper.check_env_name(env_name)
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name), env_name
            except ConfigError:
                pass

    argv_round_trip()
    env_and_secret_through_the_wrapper()
    workdir_paths()
    set_values_and_names()
    sc.detected()
    assert not canary.exists(), "a payload was executed"
    sc.note(", ".join(f"{k}: {v} examples" for k, v in counts.items()))
    sc.record()
