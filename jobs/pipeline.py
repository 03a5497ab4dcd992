"""The study as a graph: dependency order, cycle detection, what `--with-deps` must run first,
and a pure scheduler that places stages on targets.

A stage depends on the stages named by its `InputRef`s (stage 4 on 3B, stage 4A on 3A). The
local `report` stage has no hard inputs (it reports whatever was pulled) but always runs last.
Everything here is pure: the runner in `orchestrator.pipeline_runner` does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jobs.spec import StageSpec
from jobs.stages import RECIPES, REPORT_STAGE, STAGE_NAMES, STUDY_STAGES, recipe
from state.errors import StageError
from state.suggest import did_you_mean

Graph = Mapping[str, list[str]]


def dependency_graph(specs: Iterable[StageSpec] | None = None) -> dict[str, list[str]]:
    """`{stage: [stages it needs]}` from specs, or from the study's stage table."""
    if specs is None:
        return {r.name: [r.input_stage] if r.input_stage else [] for r in RECIPES}
    return {s.name: list(dict.fromkeys(s.depends_on)) for s in specs}


def find_cycle(graph: Graph) -> list[str] | None:
    """A dependency cycle as `[a, b, ..., a]`, or None. Unknown dependencies are not cycles."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for dep in graph.get(node, []):
            if dep not in color:
                continue
            if color[dep] == grey:
                return [*stack[stack.index(dep) :], dep]
            if color[dep] == white and (found := visit(dep)):
                return found
        stack.pop()
        color[node] = black
        return None

    for node in graph:
        if color[node] == white and (found := visit(node)):
            return found
    return None


def check_graph(graph: Graph) -> None:
    """StageError on a cycle or on a dependency that is not a stage."""
    for node, deps in graph.items():
        for dep in deps:
            if dep not in graph:
                raise StageError(f"stage {node} depends on {dep!r}, which is not a stage")
    cycle = find_cycle(graph)
    if cycle:
        raise StageError(f"stage dependencies form a cycle: {' -> '.join(cycle)}")


def topological_order(graph: Graph, stages: Iterable[str] | None = None) -> list[str]:
    """`stages` (default: all) ordered so every stage follows its dependencies.

    Ties keep the graph's own order (the study table's order), so the output is stable. The
    report stage, if included, always comes last.
    """
    check_graph(graph)
    wanted = list(graph) if stages is None else list(dict.fromkeys(stages))
    for s in wanted:
        if s not in graph:
            raise StageError(
                f"unknown stage {s!r}",
                hint=did_you_mean(s, graph, f"known stages: {', '.join(graph)}"),
            )
    rank = {n: i for i, n in enumerate(graph)}
    done: set[str] = set()
    out: list[str] = []
    pending = sorted(wanted, key=rank.__getitem__)
    while pending:
        for s in pending:
            if all(d in done or d not in wanted for d in graph[s]) and (
                s != REPORT_STAGE or len(pending) == 1
            ):
                out.append(s)
                done.add(s)
                pending.remove(s)
                break
        else:  # pragma: no cover - check_graph rules this out
            raise StageError(f"cannot order stages {pending}")
    return out


def upstream(stage: str, graph: Graph) -> list[str]:
    """Every stage `stage` needs, transitively, in run order."""
    seen: set[str] = set()
    todo = list(graph.get(stage, []))
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(graph.get(s, []))
    return topological_order(graph, seen) if seen else []


def downstream(stage: str, graph: Graph) -> list[str]:
    """Every stage that needs `stage`, transitively."""
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node, deps in graph.items():
            if node not in out and (stage in deps or out.intersection(deps)):
                out.add(node)
                changed = True
    return [n for n in graph if n in out]


def missing_upstream(stage: str, have_succeeded: set[str], graph: Graph | None = None) -> list[str]:
    """The upstream stages that must run before `stage`, in order.

    A direct input that has a succeeded run is satisfied (its own inputs are not needed again);
    one that has none is missing, and so are its missing inputs, recursively.
    """
    g = graph if graph is not None else dependency_graph()
    if stage not in g:
        raise StageError(
            f"unknown stage {stage!r}", hint=did_you_mean(stage, g, f"known stages: {', '.join(g)}")
        )
    missing: set[str] = set()

    def need(s: str) -> None:
        for dep in g.get(s, []):
            if dep not in have_succeeded and dep not in missing:
                missing.add(dep)
                need(dep)

    need(stage)
    return topological_order(g, missing) if missing else []


def expand(stages: Iterable[str]) -> list[str]:
    """Stage names as given on the command line; `all` is the whole study plus the report."""
    out: list[str] = []
    for s in stages:
        if s == "all":
            out.extend(STAGE_NAMES)
        else:
            recipe(s)  # StageError for an unknown name
            out.append(s)
    return list(dict.fromkeys(out))


def plan(
    stages: Iterable[str],
    have_succeeded: set[str],
    *,
    with_deps: bool,
    graph: Graph | None = None,
) -> list[str]:
    """The stages to run, in order: the requested ones, plus (with `with_deps`) the upstream
    stages that have no succeeded run yet. Without `with_deps`, a missing input is a StageError
    that names it and says how to fix it. A stage in the plan satisfies its downstream."""
    g = graph if graph is not None else dependency_graph()
    requested = expand(stages)
    planned = set(requested)
    for s in requested:
        missing = [m for m in missing_upstream(s, have_succeeded | planned, g) if m not in planned]
        if missing and not with_deps:
            first = missing[0]
            raise StageError(
                f"stage {s} needs a succeeded run of {', '.join(missing)}; none found on record",
                hint=f"run `orch launch {first}` first, or `orch launch {s} --with-deps`",
            )
        planned.update(missing)
        # With deps the missing ones may themselves need more; missing_upstream is transitive.
    return topological_order(g, planned)


def descendants_count(graph: Graph) -> dict[str, int]:
    return {n: len(downstream(n, graph)) for n in graph}


@dataclass
class Scheduler:
    """Places planned stages on targets, one stage at a time per target (a box's GPU is one
    stage's). Pure: the runner calls `next_launches`, launches, and reports `finished`.

    Rules: a stage runs once all its planned inputs succeeded; a stage that needs a checkpoint
    runs on the target where that checkpoint is (`located`, updated as stages finish); stages
    without inputs take any idle target, those with dependents first when there are several
    targets (they unblock more work); after a failure nothing new is launched.
    """

    order: list[str]
    targets: list[str]
    graph: Graph = field(default_factory=dependency_graph)
    #: stage -> target of its latest succeeded run (inputs satisfied before the pipeline)
    located: dict[str, str] = field(default_factory=dict)
    started: dict[str, str] = field(default_factory=dict)  # stage -> target
    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.targets:
            raise StageError("no target to run on")
        self._prio = descendants_count(self.graph)

    @property
    def busy(self) -> dict[str, str]:
        done = set(self.succeeded) | set(self.failed)
        return {t: s for s, t in self.started.items() if s not in done}

    @property
    def stopped(self) -> bool:
        return bool(self.failed)

    def remaining(self) -> list[str]:
        return [s for s in self.order if s not in self.started]

    def finished_all(self) -> bool:
        return not self.busy and (self.stopped or not self.remaining())

    def _target_for(self, stage: str) -> str | None:
        """The target the stage must run on (its inputs' target), or None for any."""
        places = {self.located[d] for d in self.graph.get(stage, []) if d in self.located}
        if len(places) > 1:
            raise StageError(
                f"stage {stage} needs checkpoints that live on different targets: {sorted(places)}",
                hint="run its inputs on one target",
            )
        return places.pop() if places else None

    def _ready(self, stage: str) -> bool:
        deps = [d for d in self.graph.get(stage, []) if d in self.order]
        if stage == REPORT_STAGE:
            return all(s in self.succeeded for s in self.order if s != REPORT_STAGE)
        return all(d in self.succeeded for d in deps)

    def next_launches(self) -> list[tuple[str, str]]:
        """`(stage, target)` pairs to launch now (and marks them started)."""
        if self.stopped:
            return []
        out: list[tuple[str, str]] = []
        ready = [s for s in self.remaining() if self._ready(s)]
        if len(self.targets) > 1:
            rank = {s: i for i, s in enumerate(self.order)}
            ready.sort(key=lambda s: (-self._prio.get(s, 0), rank[s]))
        for stage in ready:
            if stage == REPORT_STAGE:
                if not self.busy:
                    out.append((stage, "local"))
                    self.started[stage] = "local"
                continue
            busy = self.busy
            pinned = self._target_for(stage)
            if pinned is not None:
                if pinned in busy:
                    continue
                target = pinned
            else:
                idle = [t for t in self.targets if t not in busy]
                if not idle:
                    continue
                target = idle[0]
            self.started[stage] = target
            out.append((stage, target))
            if len(self.targets) == 1:
                break  # one target: one stage at a time, in table order
        return out

    def finished(self, stage: str, ok: bool) -> None:
        if ok:
            self.succeeded.append(stage)
            self.located[stage] = self.started[stage]
        else:
            self.failed.append(stage)

    def not_launched(self) -> list[str]:
        return self.remaining()


def study_order() -> list[str]:
    """The whole study in run order (report last)."""
    return topological_order(dependency_graph())


__all__ = [
    "STUDY_STAGES",
    "Scheduler",
    "check_graph",
    "dependency_graph",
    "downstream",
    "expand",
    "find_cycle",
    "missing_upstream",
    "plan",
    "study_order",
    "topological_order",
    "upstream",
]
