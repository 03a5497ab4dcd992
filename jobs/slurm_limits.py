"""A Slurm partition's limits, read from `scontrol` and `sinfo`, and whether a stage's job fits
them (pure; no I/O). `orchestrator/slurm/partition.py` asks the login node, `orch plan` prints
the rows.

    part = partition_from(answer, "gpu")                # Partition (OrchError: no such partition)
    rows = partition_checks(part, account="lab", qos=None)   # the partition itself: up, nodes
    rows += stage_checks(JobRequest("stage3a", gpus=1, ...), part)  # GPUs, --time, memory, CPUs

The answer is one round trip: `scontrol --all --oneliner show partition` (one line per partition,
`Key=Value` words), then `sinfo --all --noheader --Node --format='%N %P %c %m %T %G'` (one line
per node and partition: name, partition with `*` for the default, CPUs, memory in MB, the
extended state, gres), each followed by a `@@orch NAME=RC` line (`ANSWER_SCRIPT`).
Formats, from the man pages (Slurm 22.05):
- a time limit is `[days-]hours:minutes:seconds` or `UNLIMITED` in scontrol's output; slurm.conf
  accepts "minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
  days-hours:minutes:seconds or UNLIMITED" (`parse_duration` reads them all; `NONE`: no default);
- memory limits are megabytes (`MaxMemPerNode=2000`) or `UNLIMITED`;
- gres is `name[:type]:count[(S:sockets)]`, comma-separated, `(null)` when none;
- a node state is a word (`idle`, `mixed`, `allocated`, `drained`, `down`, ...) with a flag
  suffix in sinfo's output (`*`: not responding, `~`: powered off, `#`: powering up, `%`:
  powering down, `$`: maintenance reservation, `@`: reboot pending, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from jobs.plan import Check
from state.errors import TargetError

#: The one login-node command (run with `sh -c`): every partition, every node of every one.
ANSWER_SCRIPT = (
    'scontrol --all --oneliner show partition 2>&1; echo "@@orch scontrol=$?"; '
    "sinfo --all --noheader --Node --format='%N %P %c %m %T %G' 2>&1; echo \"@@orch sinfo=$?\""
)

#: Node states (sinfo %T, lower case, flags stripped) in which a node takes new jobs now.
USABLE_STATES = frozenset({"idle", "mixed", "allocated", "completing", "planned", "reserved"})
_UNLIMITED = frozenset({"UNLIMITED", "INFINITE", "NONE", "N/A", "(NULL)"})


# ---- values -----------------------------------------------------------------------------------


def parse_duration(text: str) -> int | None:
    """A Slurm time as seconds; None for `UNLIMITED`/`INFINITE`/`NONE`. ValueError otherwise.
    `5` is minutes, `5:30` minutes:seconds, `1:05:30` h:m:s, `2-3` days-hours, `2-3:04`,
    `2-3:04:05` (slurm.conf's forms; scontrol prints `[d-]hh:mm:ss`)."""
    t = text.strip()
    if t.upper() in _UNLIMITED:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"not a Slurm time: {text!r}")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        h, mi, s = (nums + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if len(nums) == 1:
        return nums[0] * 60
    if len(nums) == 2:
        return nums[0] * 60 + nums[1]
    return (nums[0] * 60 + nums[1]) * 60 + nums[2]


def format_duration(seconds: int | None) -> str:
    """Seconds as Slurm prints a limit: `[d-]hh:mm:ss`, or `UNLIMITED`."""
    if seconds is None:
        return "UNLIMITED"
    d, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    mi, s = divmod(rest, 60)
    hms = f"{h:02d}:{mi:02d}:{s:02d}"
    return f"{d}-{hms}" if d else hms


_MEM_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_mem_mb(text: str | None) -> int | None:
    """Megabytes from a Slurm memory value (`4000`, `4000M`, `64G`, `512K`; no suffix is MB, as
    for `--mem`); None for `UNLIMITED`, `0` or nothing. ValueError otherwise."""
    if text is None:
        return None
    t = text.strip().upper()
    if not t or t in _UNLIMITED:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", t)
    if not m:
        raise ValueError(f"not a Slurm memory size: {text!r}")
    mb = int(float(m.group(1)) * _MEM_UNITS[m.group(2) or "M"])
    return mb or None


def mb(n: int | None) -> str:
    """Megabytes as Slurm counts them, for a row: `4000 MB`, `62.5 GB` (binary, /1024)."""
    if n is None:
        return "?"
    return f"{n} MB" if n < 10 * 1024 else f"{n / 1024:.1f} GB"


@dataclass(frozen=True)
class Gres:
    name: str  # gpu, mps, shard, ...
    type: str | None  # a100, tesla, ... (None: untyped)
    count: int


def parse_gres(text: str) -> tuple[Gres, ...]:
    """`gpu:a100:4(S:0-1),mps:400` -> (Gres(gpu, a100, 4), Gres(mps, None, 400)); `(null)` or
    empty -> (). A count may carry a K/M/G multiplier (`mps:100K`)."""
    out: list[Gres] = []
    t = text.strip()
    if not t or t.upper() in _UNLIMITED:
        return ()
    for item in re.split(r",(?![^(]*\))", t):  # commas outside the (S:...) parentheses
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if len(parts) < 2:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", parts[-1])
        if not m:  # `gpu:a100` without a count is one
            if len(parts) == 2:
                out.append(Gres(parts[0], parts[1] or None, 1))
            continue
        count = int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)]
        out.append(Gres(parts[0], ":".join(parts[1:-1]) or None, count))
    return tuple(out)


# ---- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmNode:
    name: str
    cpus: int | None
    memory_mb: int | None  # RealMemory
    state: str  # sinfo %T as printed, e.g. `idle`, `mixed`, `drained`, `down*`
    gres: tuple[Gres, ...] = ()

    @property
    def base_state(self) -> str:
        return re.sub(r"[^a-z_]+$", "", self.state.lower())

    @property
    def usable(self) -> bool:
        """Takes new jobs now: a usable state, responding (no `*`). A powered-off cloud node
        (`idle~`) counts: Slurm boots it for the job."""
        return self.base_state in USABLE_STATES and "*" not in self.state

    def gpus(self, gpu_type: str | None = None) -> int:
        """GPUs of this node that `--gres=gpu[:TYPE]:N` can take."""
        return sum(
            g.count
            for g in self.gres
            if g.name == "gpu" and (gpu_type is None or g.type == gpu_type)
        )


@dataclass(frozen=True)
class Partition:
    """What `scontrol show partition` and `sinfo` say of one partition. None: no limit."""

    name: str
    default: bool = False
    state: str = "UP"
    max_time_s: int | None = None
    default_time_s: int | None = None
    max_nodes: int | None = None
    max_cpus_per_node: int | None = None
    max_mem_per_node_mb: int | None = None
    def_mem_per_node_mb: int | None = None
    def_mem_per_cpu_mb: int | None = None
    max_mem_per_cpu_mb: int | None = None
    allow_accounts: tuple[str, ...] | None = None  # None: ALL
    allow_qos: tuple[str, ...] | None = None
    nodes: tuple[SlurmNode, ...] = ()
    others: tuple[str, ...] = field(default=(), compare=False)  # the cluster's other partitions

    @property
    def usable_nodes(self) -> tuple[SlurmNode, ...]:
        return tuple(n for n in self.nodes if n.usable)

    def max_gpus(self, gpu_type: str | None = None) -> int:
        """The most GPUs (of `gpu_type`) one node of the partition has (any state)."""
        return max((n.gpus(gpu_type) for n in self.nodes), default=0)

    def gpu_types(self) -> list[str]:
        """`gpu:a100:4` per distinct gres of the nodes (what a row shows)."""
        seen = {
            f"gpu:{g.type}:{g.count}" if g.type else f"gpu:{g.count}"
            for n in self.nodes
            for g in n.gres
            if g.name == "gpu"
        }
        return sorted(seen)


def parse_scontrol_partitions(text: str) -> dict[str, dict[str, str]]:
    """`scontrol --oneliner show partition` -> {name: {Key: Value}} (values as printed)."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.startswith("PartitionName="):
            continue
        fields: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        out[fields["PartitionName"]] = fields
    return out


def parse_sinfo_nodes(text: str) -> list[tuple[str, bool, SlurmNode]]:
    """`sinfo -N -h -o '%N %P %c %m %T %G'` -> (partition, is default, node) per line."""
    out: list[tuple[str, bool, SlurmNode]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 5 or line.startswith("@@orch"):
            continue
        name, part, cpus, mem, state = words[:5]
        gres = parse_gres(" ".join(words[5:])) if len(words) > 5 else ()
        node = SlurmNode(
            name,
            int(cpus) if cpus.isdigit() else None,
            int(mem) if mem.isdigit() else None,
            state,
            gres,
        )
        out.append((part.rstrip("*"), part.endswith("*"), node))
    return out


def split_answer(stdout: str) -> dict[str, tuple[str, int | None]]:
    """The `ANSWER_SCRIPT` output -> {"scontrol": (text, rc), "sinfo": (text, rc)}."""
    out: dict[str, tuple[str, int | None]] = {}
    chunk: list[str] = []
    for line in stdout.splitlines():
        m = re.fullmatch(r"@@orch (\w+)=(\d+)", line.strip())
        if m:
            out[m.group(1)] = ("\n".join(chunk), int(m.group(2)))
            chunk = []
        else:
            chunk.append(line)
    return out


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None or value.upper() == "ALL":
        return None
    return tuple(v for v in value.split(",") if v)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def partition_from(stdout: str, want: str | None, *, where: str = "the cluster") -> Partition:
    """The partition `want` (None: the cluster's default) from the `ANSWER_SCRIPT` output.
    TargetError when Slurm did not answer, or when the partition does not exist (naming those
    that do)."""
    parts = split_answer(stdout)
    text, rc = parts.get("scontrol", (stdout, None))
    if rc != 0:
        last = (text.strip().splitlines() or ["no answer"])[-1]
        raise TargetError(
            f"scontrol on {where} failed: {last}",
            hint="is slurmctld up, and does the login node see its config (SLURM_CONF)?",
        )
    table = parse_scontrol_partitions(text)
    listed = [f"{n}{'*' if f.get('Default') == 'YES' else ''}" for n, f in table.items()]
    if want is None:
        default = [n for n, f in table.items() if f.get("Default") == "YES"]
        if not default:
            raise TargetError(
                f"{where} has no default partition (partitions: {', '.join(listed) or 'none'})",
                hint='set partition = "..." in the target',
            )
        want = default[0]
    if want not in table:
        raise TargetError(
            f"partition {want!r} does not exist on {where}; its partitions: "
            f"{', '.join(listed) or 'none'} (* = default)",
            hint="set partition = one of them in the target",
        )
    f = table[want]
    sinfo_text, _ = parts.get("sinfo", ("", None))
    nodes = tuple(n for p, _, n in parse_sinfo_nodes(sinfo_text) if p == want)
    return Partition(
        name=want,
        default=f.get("Default") == "YES",
        state=f.get("State", "UP"),
        max_time_s=parse_duration(f.get("MaxTime", "UNLIMITED")),
        default_time_s=parse_duration(f.get("DefaultTime", "NONE")),
        max_nodes=_int(f.get("MaxNodes")),
        max_cpus_per_node=_int(f.get("MaxCPUsPerNode")),
        max_mem_per_node_mb=parse_mem_mb(f.get("MaxMemPerNode")),
        def_mem_per_node_mb=parse_mem_mb(f.get("DefMemPerNode")),
        def_mem_per_cpu_mb=parse_mem_mb(f.get("DefMemPerCPU")),
        max_mem_per_cpu_mb=parse_mem_mb(f.get("MaxMemPerCPU")),
        allow_accounts=_names(f.get("AllowAccounts")),
        allow_qos=_names(f.get("AllowQos")),
        nodes=nodes,
        others=tuple(n for n in table if n != want),
    )


# ---- does it fit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRequest:
    """What the job script asks of Slurm for one stage (orchestrator/slurm/jobscript.py)."""

    stage: str
    gpus: int
    gpu_type: str | None
    time_min: int  # --time
    cpus: int  # --cpus-per-task (1 when not set)
    mem_mb: int | None  # --mem (None: not set)


def job_memory_mb(req: JobRequest, part: Partition) -> int | None:
    """The memory the job gets: `--mem`, else the partition's default (DefMemPerNode, or
    DefMemPerCPU times the CPUs); None when neither says (the cluster-wide default applies)."""
    if req.mem_mb is not None:
        return req.mem_mb
    if part.def_mem_per_node_mb is not None:
        return part.def_mem_per_node_mb
    if part.def_mem_per_cpu_mb is not None:
        return part.def_mem_per_cpu_mb * req.cpus
    return None


def _where(part: Partition) -> str:
    return f"partition {part.name}"


def summary(part: Partition) -> str:
    """One line for the plan's title: nodes, gres, CPUs, memory, MaxTime."""
    gres = ", ".join(part.gpu_types()) or "no GPUs"
    cpus = max((n.cpus or 0 for n in part.nodes), default=0)
    mem = max((n.memory_mb or 0 for n in part.nodes), default=0)
    return (
        f"slurm {_where(part)}: {len(part.usable_nodes)}/{len(part.nodes)} node(s) up, {gres}, "
        f"<= {cpus} CPUs and {mb(mem)} a node, MaxTime {format_duration(part.max_time_s)}"
    )


def partition_checks(part: Partition, *, account: str | None, qos: str | None) -> list[Check]:
    """Rows about the partition itself: up, with a node that takes jobs, open to the account
    and QOS the target names."""
    rows = [
        Check("target", "partition state", "UP", f"{part.name}: {part.state}",
              part.state == "UP",
              "" if part.state == "UP" else f"partition {part.name} is {part.state}: "
              "wait, or pick another partition (partition = ...)"),
    ]  # fmt: skip
    states = ", ".join(sorted({n.state for n in part.nodes})) or "no nodes"
    up = len(part.usable_nodes)
    rows.append(
        Check("target", "nodes up", ">= 1", f"{up} of {len(part.nodes)} ({states})", up > 0,
              "" if up else f"no node of partition {part.name} takes jobs now: wait, ask the "
              "admins, or pick another partition")
    )  # fmt: skip
    for what, mine, allowed in (("account", account, part.allow_accounts),
                                ("qos", qos, part.allow_qos)):  # fmt: skip
        if allowed is None:
            continue
        ok = None if mine is None else mine in allowed
        rows.append(
            Check("target", f"Allow{'Accounts' if what == 'account' else 'Qos'}",
                  mine or f"(your default {what})", ",".join(allowed), ok,
                  f"set {what} = one of {', '.join(allowed)} in the target" if ok is False else "")
        )  # fmt: skip
    return rows


def _fits_one_node(req: JobRequest, nodes: Iterable[SlurmNode], mem: int | None) -> bool:
    return any(
        n.gpus(req.gpu_type) >= req.gpus
        and (n.cpus is None or n.cpus >= req.cpus)
        and (mem is None or n.memory_mb is None or n.memory_mb >= mem)
        for n in nodes
    )


def stage_checks(req: JobRequest, part: Partition) -> list[Check]:
    """Rows for one stage's job against the partition: GPUs a node, --time against MaxTime,
    memory a node, CPUs a node, and (when each fits alone) one node that has all of it."""
    s, where, rows = req.stage, _where(part), []
    if req.gpus > 0:
        most = part.max_gpus(req.gpu_type)
        kind = f"gpu:{req.gpu_type}" if req.gpu_type else "gpu"
        have = f"{most} a node ({', '.join(part.gpu_types()) or 'no gpu gres'})"
        fix = ""
        if most < req.gpus:
            fix = (f"at most {most} {kind} a node on {where}: --set {s}.resources.gpus={most}, "
                   "or another partition") if most else (
                   f"no node of {where} has {kind} gres: another partition"
                   + (", or another gpu_type" if req.gpu_type else ""))  # fmt: skip
        rows.append(Check(s, "GPUs a node", f"{req.gpus} ({kind})", have, most >= req.gpus, fix))
    need_s = req.time_min * 60
    ok = part.max_time_s is None or need_s <= part.max_time_s
    fix = "" if ok else (
        f"{where} allows {format_duration(part.max_time_s)}: lower {s}'s timeout_s "
        f"(--set {s}.timeout_s=...) or time_margin_s, or pick a partition with a longer MaxTime"
    )  # fmt: skip
    rows.append(
        Check(s, "time limit", f"--time={req.time_min} ({format_duration(need_s)})",
              f"MaxTime {format_duration(part.max_time_s)}", ok, fix)
    )  # fmt: skip
    mem = job_memory_mb(req, part)
    if mem is not None:
        node_mem = max((n.memory_mb or 0 for n in part.nodes), default=0) or None
        limits = [(f"RealMemory {mb(node_mem)}", node_mem)]
        limits.append((f"MaxMemPerNode {mb(part.max_mem_per_node_mb)}", part.max_mem_per_node_mb))
        if part.max_mem_per_cpu_mb is not None:
            per = part.max_mem_per_cpu_mb * req.cpus
            limits.append((f"MaxMemPerCPU {part.max_mem_per_cpu_mb} MB x {req.cpus}", per))
        known = [(label, v) for label, v in limits if v is not None]
        over = [label for label, v in known if mem > v]
        have = "; ".join(label for label, _ in known) or "no limit"
        src = "--mem" if req.mem_mb is not None else "the partition's default"
        rows.append(
            Check(s, "memory a node", f"{mb(mem)} ({src})", have, not over,
                  f"over {over[0]} on {where}: a smaller mem in the target" if over else "")
        )  # fmt: skip
    node_cpus = max((n.cpus or 0 for n in part.nodes), default=0) or None
    cap_cpus = min(v for v in (node_cpus, part.max_cpus_per_node) if v is not None) if (
        node_cpus or part.max_cpus_per_node) else None  # fmt: skip
    have = f"{node_cpus or '?'} a node" + (
        f", MaxCPUsPerNode {part.max_cpus_per_node}" if part.max_cpus_per_node else ""
    )
    ok_c = None if cap_cpus is None else req.cpus <= cap_cpus
    rows.append(
        Check(s, "CPUs a node", str(req.cpus), have, ok_c,
              f"cpus_per_task <= {cap_cpus} in the target" if ok_c is False else "")
    )  # fmt: skip
    if (
        all(r.ok is not False for r in rows)
        and part.nodes
        and not _fits_one_node(req, part.nodes, mem)
    ):
        rows.append(
            Check(s, "one node", "all of it on one node", "no node has it all", False,
                  f"no single node of {where} has the GPUs, CPUs and memory together")
        )  # fmt: skip
    return rows
