"""`jobs.slurm_limits`: a partition's limits parsed from real `scontrol` / `sinfo` output, and the
rows `orch plan` shows for a stage's job against them (pure; no cluster needed).

The captured answers come from the test cluster of tests/slurm/cluster.py (slurm-wlm 22.05.8,
`sinfo -V`), started with extra partitions `short` (`MaxTime=1`), `lim` (`MaxTime=2-03:04:05
DefaultTime=30 MaxNodes=1 MaxMemPerNode=2000`) and `cpu` (`DefMemPerCPU=500 MaxMemPerCPU=1000
MaxCPUsPerNode=2 Hidden=YES AllowAccounts=lab,other AllowQos=normal`), the last one with typed
gres (`Gres=gpu:tesla:2`), then the node drained (`scontrol update nodename=vm state=drain`).
"""

from __future__ import annotations

import pytest

from jobs.slurm_limits import (
    Gres,
    JobRequest,
    Partition,
    SlurmNode,
    format_duration,
    parse_duration,
    parse_gres,
    parse_mem_mb,
    parse_sinfo_nodes,
    partition_checks,
    partition_from,
    stage_checks,
)
from state.errors import TargetError

# `scontrol --all --oneliner show partition`, then `sinfo --all --noheader --Node
# --format='%N %P %c %m %T %G'` (jobs.slurm_limits.ANSWER_SCRIPT), slurm-wlm 22.05.8.
ANSWER = """\
PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=4,mem=4000M,node=1,billing=4
PartitionName=short AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=00:01:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=4,mem=4000M,node=1,billing=4
PartitionName=lim AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=00:30:00 DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=1 MaxTime=2-03:05:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=2000 TRES=cpu=4,mem=4000M,node=1,billing=4
@@orch scontrol=0
vm debug* 4 4000 idle gpu:2
vm short 4 4000 idle gpu:2
vm lim 4 4000 idle gpu:2
@@orch sinfo=0
"""

# The typed-gres cluster, with a hidden partition that has per-CPU memory limits.
TYPED = """\
PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=4,mem=4000M,node=1,billing=4
PartitionName=cpu AllowGroups=ALL AllowAccounts=lab,other AllowQos=normal AllocNodes=ALL Default=NO QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=2 Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerCPU=500 MaxMemPerCPU=1000 TRES=cpu=4,mem=4000M,node=1,billing=4
@@orch scontrol=0
vm debug* 4 4000 drained gpu:tesla:2
vm cpu 4 4000 drained gpu:tesla:2
@@orch sinfo=0
"""

# `scontrol show partition nope --oneliner` prints this on stdout and exits 1.
NOT_FOUND = "Partition nope not found\n@@orch scontrol=1\n@@orch sinfo=0\n"


def req(stage: str = "s", **over: object) -> JobRequest:
    base: dict[str, object] = {
        "stage": stage,
        "gpus": 1,
        "gpu_type": None,
        "time_min": 31,
        "cpus": 1,
        "mem_mb": None,
    }
    return JobRequest(**{**base, **over})  # type: ignore[arg-type]


def by_what(rows):
    return {r.what: r for r in rows}


# ---- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        # scontrol's output: [days-]hh:mm:ss, UNLIMITED (seen above)
        ("00:01:00", 60),
        ("2-03:05:00", ((2 * 24 + 3) * 60 + 5) * 60),
        ("UNLIMITED", None),
        ("NONE", None),  # DefaultTime=NONE
        # slurm.conf's MaxTime forms (man slurm.conf: "minutes, minutes:seconds,
        # hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds or
        # "UNLIMITED"")
        ("30", 30 * 60),
        ("5:30", 5 * 60 + 30),
        ("1:05:30", 3600 + 5 * 60 + 30),
        ("2-3", (2 * 24 + 3) * 3600),
        ("2-3:04", (2 * 24 + 3) * 3600 + 4 * 60),
        ("2-3:04:05", (2 * 24 + 3) * 3600 + 4 * 60 + 5),
        ("INFINITE", None),
    ],
)
def test_every_time_form_slurm_documents_is_read(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


def test_a_time_that_is_not_one_is_refused_and_limits_print_as_slurm_does() -> None:
    with pytest.raises(ValueError, match="not a Slurm time"):
        parse_duration("soon")
    assert format_duration(60) == "00:01:00"
    assert format_duration(parse_duration("2-03:05:00")) == "2-03:05:00"
    assert format_duration(None) == "UNLIMITED"


def test_memory_is_megabytes_without_a_suffix_as_for_mem() -> None:
    assert parse_mem_mb("2000") == 2000
    assert parse_mem_mb("4000M") == 4000
    assert parse_mem_mb("64G") == 64 * 1024
    assert parse_mem_mb("1T") == 1024 * 1024
    assert parse_mem_mb("UNLIMITED") is None
    assert parse_mem_mb("0") is None  # `--mem=0`: the whole node, no number to compare
    assert parse_mem_mb(None) is None
    with pytest.raises(ValueError):
        parse_mem_mb("lots")


def test_gres_forms_untyped_typed_with_sockets_and_others() -> None:
    assert parse_gres("gpu:2") == (Gres("gpu", None, 2),)
    assert parse_gres("gpu:tesla:2") == (Gres("gpu", "tesla", 2),)
    # sinfo's %G with socket affinity and a second gres (man sinfo, slurm gres.conf docs)
    assert parse_gres("gpu:a100:4(S:0-1),mps:400") == (
        Gres("gpu", "a100", 4),
        Gres("mps", None, 400),
    )
    assert parse_gres("gpu:a100:2(S:0),gpu:v100:1(S:1)") == (
        Gres("gpu", "a100", 2),
        Gres("gpu", "v100", 1),
    )
    assert parse_gres("(null)") == ()
    assert parse_gres("shard:8K") == (Gres("shard", None, 8 * 1024),)


def test_node_states_and_their_flags() -> None:
    text = "\n".join(
        [
            "n1 gpu* 64 512000 idle gpu:a100:4(S:0-1)",
            "n2 gpu* 64 512000 mixed gpu:a100:4(S:0-1)",
            "n3 gpu* 64 512000 down* gpu:a100:4(S:0-1)",
            "n4 gpu* 64 512000 drained gpu:a100:8(S:0-1)",
            "n5 gpu* 64 512000 idle~ gpu:a100:4",
            "n6 gpu* 64 512000 draining gpu:a100:4",
        ]
    )
    nodes = parse_sinfo_nodes(text)
    assert [(p, d) for p, d, _ in nodes] == [("gpu", True)] * 6
    usable = {n.name: n.usable for _, _, n in nodes}
    assert usable == {"n1": True, "n2": True, "n3": False, "n4": False, "n5": True, "n6": False}
    part = Partition("gpu", nodes=tuple(n for _, _, n in nodes))
    assert part.max_gpus() == 8 and part.max_gpus("a100") == 8 and part.max_gpus("h100") == 0
    assert part.gpu_types() == ["gpu:a100:4", "gpu:a100:8"]


# ---- the real answers --------------------------------------------------------------------------


def test_the_captured_answer_gives_each_partition_s_limits() -> None:
    debug = partition_from(ANSWER, None)  # the default
    assert debug.name == "debug" and debug.default and debug.max_time_s is None
    assert debug.max_mem_per_node_mb is None and debug.max_nodes is None
    assert debug.nodes == (SlurmNode("vm", 4, 4000, "idle", (Gres("gpu", None, 2),)),)
    assert debug.others == ("short", "lim")
    short = partition_from(ANSWER, "short")
    assert short.max_time_s == 60 and not short.default
    lim = partition_from(ANSWER, "lim")
    assert lim.max_time_s == ((2 * 24 + 3) * 60 + 5) * 60
    assert lim.default_time_s == 30 * 60 and lim.max_nodes == 1
    assert lim.max_mem_per_node_mb == 2000 and lim.def_mem_per_node_mb is None


def test_the_typed_hidden_partition_with_per_cpu_memory() -> None:
    cpu = partition_from(TYPED, "cpu")
    assert cpu.def_mem_per_cpu_mb == 500 and cpu.max_mem_per_cpu_mb == 1000
    assert cpu.max_cpus_per_node == 2
    assert cpu.allow_accounts == ("lab", "other") and cpu.allow_qos == ("normal",)
    assert cpu.max_gpus("tesla") == 2 and cpu.max_gpus("a100") == 0
    assert not cpu.usable_nodes  # drained


def test_a_missing_partition_is_one_error_naming_those_that_exist() -> None:
    with pytest.raises(TargetError) as e:
        partition_from(ANSWER, "gpu", where="target 'cluster'")
    assert e.value.message == (
        "partition 'gpu' does not exist on target 'cluster'; its partitions: debug*, short, lim "
        "(* = default)"
    )
    # scontrol's own refusal (a controller down, a partition asked by name) is its last line
    with pytest.raises(TargetError, match="scontrol on the cluster failed: Partition nope not"):
        partition_from(NOT_FOUND, "nope")


# ---- the rows ----------------------------------------------------------------------------------


def test_a_job_that_fits_the_partition_is_all_yes() -> None:
    rows = by_what(stage_checks(req(gpus=2, mem_mb=200, cpus=1), partition_from(ANSWER, None)))
    assert set(rows) == {"GPUs a node", "time limit", "memory a node", "CPUs a node"}
    assert all(r.ok for r in rows.values()), rows
    assert rows["time limit"].have == "MaxTime UNLIMITED"


def test_more_gpus_than_a_node_has_is_refused_with_the_numbers() -> None:
    row = by_what(stage_checks(req("stage2", gpus=3), partition_from(ANSWER, None)))["GPUs a node"]
    assert row.ok is False and row.need == "3 (gpu)" and row.have == "2 a node (gpu:2)"
    assert "--set stage2.resources.gpus=2" in row.fix
    # a type the nodes do not have
    typed = partition_from(TYPED, "debug")
    row = by_what(stage_checks(req(gpu_type="a100"), typed))["GPUs a node"]
    assert row.ok is False and "no node of partition debug has gpu:a100" in row.fix


def test_a_time_limit_over_max_time_is_refused_with_both() -> None:
    row = by_what(stage_checks(req("stage3a", time_min=11), partition_from(ANSWER, "short")))[
        "time limit"
    ]
    assert row.ok is False
    assert row.need == "--time=11 (00:11:00)" and row.have == "MaxTime 00:01:00"
    assert "timeout_s" in row.fix
    ok = by_what(stage_checks(req(time_min=1), partition_from(ANSWER, "short")))["time limit"]
    assert ok.ok is True


def test_memory_against_the_node_max_mem_per_node_and_per_cpu() -> None:
    lim = partition_from(ANSWER, "lim")
    row = by_what(stage_checks(req(mem_mb=3000), lim))["memory a node"]
    assert row.ok is False and "MaxMemPerNode 2000 MB" in row.fix
    row = by_what(stage_checks(req(mem_mb=5000), partition_from(ANSWER, None)))["memory a node"]
    assert row.ok is False and "RealMemory 4000 MB" in row.fix
    # no --mem: the partition's DefMemPerCPU times the CPUs; 2 CPUs over MaxCPUsPerNode=2? no
    cpu = partition_from(TYPED, "cpu")
    rows = by_what(stage_checks(req(gpus=0, cpus=2), cpu))
    assert rows["memory a node"].need == "1000 MB (the partition's default)"
    assert rows["memory a node"].ok and rows["CPUs a node"].ok
    rows = by_what(stage_checks(req(gpus=0, cpus=3, mem_mb=3500), cpu))
    assert rows["CPUs a node"].ok is False and "cpus_per_task <= 2" in rows["CPUs a node"].fix
    assert rows["memory a node"].ok is False  # MaxMemPerCPU 1000 x 3
    # no --mem and no partition default: no memory row (the cluster-wide default applies)
    assert "memory a node" not in by_what(stage_checks(req(), partition_from(ANSWER, None)))


def test_each_fits_alone_but_no_single_node_has_it_all() -> None:
    nodes = (
        SlurmNode("big-mem", 8, 512000, "idle", ()),
        SlurmNode("gpu", 8, 16000, "idle", (Gres("gpu", None, 4),)),
    )
    rows = by_what(stage_checks(req(gpus=2, mem_mb=100000), Partition("p", nodes=nodes)))
    assert rows["GPUs a node"].ok and rows["memory a node"].ok
    assert rows["one node"].ok is False


def test_the_partition_rows_state_nodes_account_qos() -> None:
    cpu = partition_from(TYPED, "cpu")
    rows = by_what(partition_checks(cpu, account="nlp", qos=None))
    assert rows["partition state"].ok is True
    assert rows["nodes up"].ok is False and rows["nodes up"].have == "0 of 1 (drained)"
    assert rows["AllowAccounts"].ok is False and "lab, other" in rows["AllowAccounts"].fix
    assert rows["AllowQos"].ok is None  # the user's default QOS: unknown here
    rows = by_what(partition_checks(partition_from(ANSWER, None), account=None, qos=None))
    assert set(rows) == {"partition state", "nodes up"} and all(r.ok for r in rows.values())
