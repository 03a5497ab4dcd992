"""The controller's half of push: subscribe each target's agent with a `watch` request and feed
every pushed line to the very code path a poll answer takes (`Poller.poll_target(pushed=...)`).

    hub = attach(poller)        # the poller's requests now subscribe where the agent can push
    hub.active(target)          # pushes arrive and the heartbeat is on time: poll slowly

How a target is watched:

- The poller's ordinary poll (`observe`) becomes a `watch` request when the target has no live
  subscription for exactly its active runs (a new run, a reconnect, a watcher restart). The
  answer is a full observation, judged as a poll's; from then on the agent pushes. An agent
  that does not know `watch` answers with an error and the target is polled as before (asked
  again only on a new connection).
- One listener thread per subscription reads the pushed lines (`Agent.drain`) and feeds them
  in order. A change line's runs are judged at once; the others are skipped, as a poll skips a
  run the agent left out. Every `interval_s` the last observation of every run is judged again
  (the heartbeat says nothing changed since), so the stale clock, timeouts and the exit grace
  run as they do under polling.
- Deltas: the agent sends only what changed since its last line of a run (`delta: true`);
  the subscription keeps the full observation of every run (as JSON, the form the patch
  applies to) and judges the patched whole, so the state machine sees what a poll would show.
- Sequence numbers: a line whose `push` number is not above the last one of its channel is a
  duplicate and dropped; a gap (a line lost) or a line of another channel ends the
  subscription (a patch over a copy that missed a line could be wrong), and the full poll
  that follows subscribes again with a whole observation. Whatever slips through, the store decides: a transition is written only from the phase
  it was judged from, and an alert only once per dedup key.
- Silence: no line (change or heartbeat) for `silence_s` means the box, the agent or the
  channel froze: a full poll goes out at once, whose deadline makes the target unreachable
  exactly as a poll that got no answer; the subscription ends and the target is polled at its
  normal cadence until a new subscription works.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.monitor.statemachine import MONITORED_PHASES
from state.models import RunObservation, TargetObservation
from state.watch import apply_patch

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.base import Agent, Target

log = logging.getLogger("orch.monitor.push")

DRAIN_WAIT_S = 1.0  # the listener's longest sleep between looks (data wakes it at once)
RUNSET_CHECK_S = 2.0  # how often a listener compares its runs with the store's active ones


@dataclass
class PushStats:
    """Counters of one hub (the benchmark and the tests read them)."""

    subscribed: int = 0
    lines: int = 0
    changes: int = 0
    beats: int = 0
    duplicates: int = 0
    gaps: int = 0
    replays: int = 0
    unsupported: int = 0
    silences: int = 0
    lost: int = 0


@dataclass
class Subscription:
    """One `watch` on one agent channel, and its listener thread."""

    hub: PushHub
    name: str
    agent: Agent
    runs: frozenset[str]
    chan: str = ""
    last_seq: int = 0
    last_line: float = field(default_factory=time.monotonic)
    cache: dict[str, RunObservation] = field(default_factory=dict)
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)  # the same, as JSON (patched)
    box_raw: dict[str, Any] = field(default_factory=dict)
    box: TargetObservation | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    lines: queue.SimpleQueue[dict[str, Any]] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    broken: bool = False  # a gap or a stranger's line: subscribe again from a full answer

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopped.is_set()

    def receive(self, line: dict[str, Any]) -> None:
        """`Agent.on_push`: called on whichever thread read the line; only queues it."""
        self.lines.put(line)

    def start(self, answer: dict[str, Any]) -> None:
        self.chan = str(answer.get("chan") or "")
        self.last_seq = int(answer.get("push") or 0)
        self.last_line = time.monotonic()
        self.box_raw = {k: answer.get(k) for k in ("disk_free_bytes", "gpus")}
        for d in answer.get("runs") or []:
            if isinstance(d, dict) and isinstance(d.get("run_dir"), str):
                self.raw[d["run_dir"]] = d
        self._remember(TargetObservation.model_validate(answer))
        self.thread = threading.Thread(
            target=self._listen, name=f"orch-push-{self.name}", daemon=True
        )
        self.thread.start()

    def _remember(self, obs: TargetObservation) -> None:
        self.box = obs
        for r in obs.runs:
            self.cache[r.run_dir] = r

    # -- the listener thread -----------------------------------------------------------------
    def _listen(self) -> None:
        hub = self.hub
        mon = hub.ctx.config.monitor_for(self.name)
        replay_at = time.monotonic() + mon.interval_s
        runset_at = time.monotonic() + RUNSET_CHECK_S
        why = "stopped"
        try:
            while not self.stopped.is_set():
                ok = self.agent.drain(DRAIN_WAIT_S)
                self._handle_queued()
                if self.broken:
                    why = "a line went missing"
                    break
                if self.stopped.is_set():
                    return
                if not ok:
                    why = "channel closed"
                    break
                now = time.monotonic()
                if now - self.last_line > hub.silence_s(self.name):
                    why = "silent"
                    hub.stats.silences += 1
                    break
                if now >= runset_at:
                    runset_at = now + RUNSET_CHECK_S
                    if hub.active_runs(self.name) != self.runs:
                        why = "runs changed"
                        break  # the poll below subscribes again with the new set
                if now >= replay_at:
                    replay_at = now + mon.interval_s
                    self._replay()
        except Exception:  # a listener must never take the watcher down
            log.exception("push listener of %s failed", self.name)
            why = "listener error"
        self.stopped.set()
        if why != "runs changed":
            hub.stats.lost += 1
        log.debug("push from %s ended: %s", self.name, why)
        hub.ended(self)
        # A full poll now: it either subscribes again (a new channel, a new run set) or, past
        # its deadline, makes the target unreachable as any unanswered poll does.
        hub.poll(self.name)

    def _handle_queued(self) -> None:
        while not self.stopped.is_set():
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            self._handle(line)

    def _handle(self, line: dict[str, Any]) -> None:
        hub = self.hub
        hub.stats.lines += 1
        try:
            seq = int(line.get("push") or 0)
        except (TypeError, ValueError):
            return
        if str(line.get("chan") or "") != self.chan:
            hub.stats.gaps += 1  # another channel's line: do not trust either, look again
            self.broken = True
            return
        if seq <= self.last_seq:
            hub.stats.duplicates += 1
            return
        if seq > self.last_seq + 1:
            hub.stats.gaps += 1  # a line went missing: no patch is applied over the hole
            self.broken = True
            return
        self.last_seq = seq
        self.last_line = time.monotonic()
        if line.get("beat"):
            hub.stats.beats += 1
            return
        body = line.get("obs")
        if isinstance(line.get("delta"), dict):
            body = self._patched(line["delta"])
            if body is None:
                self.broken = True
                return
        if not isinstance(body, dict):
            return  # e.g. a `log` line: another reader's (orch logs -f)
        try:
            obs = TargetObservation.model_validate(body)
        except ValueError as exc:
            log.warning("target %s pushed an unusable line: %s", self.name, exc)
            return
        hub.stats.changes += 1
        self._remember(obs)
        hub.feed(self.name, obs)

    def _patched(self, delta: dict[str, Any]) -> dict[str, Any] | None:
        """The whole observation a delta line describes (only its runs, as a change line),
        or None when it patches a run this subscription has no copy of."""
        for k in ("disk_free_bytes", "gpus"):
            if k in delta:
                self.box_raw[k] = delta[k]
        runs = []
        for patch in delta.get("runs") or []:
            base = self.raw.get(str(patch.get("run_dir"))) if isinstance(patch, dict) else None
            if base is None:
                log.warning("target %s pushed a change of a run it was not asked", self.name)
                return None
            merged = apply_patch(base, patch)
            self.raw[merged["run_dir"]] = merged
            runs.append(merged)
        out: dict[str, Any] = {**self.box_raw, "runs": runs}
        if delta.get("host_time"):
            out["host_time"] = delta["host_time"]
        return out

    def _replay(self) -> None:
        """Judge every run again from its last observation: nothing changed since (the agent
        would have said), but time passed (stale clock, timeout, exit grace)."""
        if self.box is None or not self.cache:
            return
        self.hub.stats.replays += 1
        obs = self.box.model_copy(update={"runs": list(self.cache.values())})
        self.hub.feed(self.name, obs)


class PushHub:
    """The subscriptions of one poller, one per target at most."""

    def __init__(
        self,
        ctx: Context,
        *,
        feed: Callable[[str, TargetObservation], object],
        poll: Callable[[str], object],
    ) -> None:
        self.ctx = ctx
        self._feed = feed
        self._poll = poll
        self._subs: dict[str, Subscription] = {}
        self._unsupported: dict[str, int] = {}  # target -> id() of the agent that said no
        self._lock = threading.Lock()
        self.stats = PushStats()
        self.closed = False

    # -- settings -----------------------------------------------------------------------------
    def enabled(self, name: str) -> bool:
        return self.ctx.config.monitor_for(name).push

    def heartbeat_s(self, name: str) -> float:
        return self.ctx.config.monitor_for(name).push_heartbeat_s

    def silence_s(self, name: str) -> float:
        """No line for this long: the box is not talking (two heartbeats missed, and a bit)."""
        return 2.5 * self.heartbeat_s(name) + 1.0

    # -- state --------------------------------------------------------------------------------
    def active(self, name: str) -> bool:
        """Pushes are arriving from `name` (so its poll job may go slow)."""
        sub = self._subs.get(name)
        return sub is not None and sub.alive

    def active_runs(self, name: str) -> frozenset[str]:
        marks = ",".join("?" for _ in MONITORED_PHASES)
        rows = self.ctx.store.query(
            f"SELECT run_dir FROM runs WHERE target = ? AND phase IN ({marks})",
            (name, *(p.value for p in MONITORED_PHASES)),
        )
        return frozenset(str(r["run_dir"]) for r in rows)

    def ended(self, sub: Subscription) -> None:
        with self._lock:
            if self._subs.get(sub.name) is sub:
                del self._subs[sub.name]
        if sub.agent.on_push == sub.receive:
            sub.agent.on_push = None

    def feed(self, name: str, obs: TargetObservation) -> None:
        if not self.closed:
            self._feed(name, obs)

    def poll(self, name: str) -> None:
        if self.closed:
            return
        try:
            self._poll(name)
        except Exception:
            log.exception("poll of %s after push ended failed", name)

    # -- the poller's requests ----------------------------------------------------------------
    def request(
        self, name: str, target: Target, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One poll request of the poller: a `watch` when `name` has no live subscription for
        exactly these runs (and its agent may push), else the plain `observe`."""
        agent = target.agent()
        runs = frozenset(str(q.get("run_dir")) for q in payload.get("runs", []))
        sub = self._subs.get(name)
        if (
            self.closed
            or payload.get("op") != "observe"
            or not self.enabled(name)
            or not runs
            or any(q.get("job_id") for q in payload.get("runs", []))  # Slurm: squeue, polled
            or self._unsupported.get(name) == id(agent)
            or (sub is not None and sub.alive and sub.agent is agent and sub.runs == runs)
        ):
            return agent.request(payload, timeout=timeout)
        if sub is not None:
            self._stop(sub)
        new = Subscription(self, name, agent, runs)
        agent.on_push = new.receive
        hb = self.heartbeat_s(name)
        watch = {
            **payload,
            "op": "watch",
            "heartbeat_s": hb,
            "progress_s": self.ctx.config.monitor_for(name).push_progress_s,
            "delta": True,
        }
        answer = agent.request(watch, timeout=timeout)
        if answer.get("ok") is False and "unknown op" in str(answer.get("error", "")):
            # An agent from before push: poll it, and ask again only on a new connection.
            agent.on_push = None
            self._unsupported[name] = id(agent)
            self.stats.unsupported += 1
            log.info("target %s: the agent cannot push (%s); polling", name, answer.get("error"))
            return agent.request(payload, timeout=timeout)
        if answer.get("ok") is False or "chan" not in answer:
            agent.on_push = None
            return answer
        self._unsupported.pop(name, None)
        with self._lock:
            if self.closed:
                agent.on_push = None
                return answer
            self._subs[name] = new
        self.stats.subscribed += 1
        new.start(answer)
        return answer

    def _stop(self, sub: Subscription) -> None:
        sub.stopped.set()
        with self._lock:
            if self._subs.get(sub.name) is sub:
                del self._subs[sub.name]

    def close(self) -> None:
        self.closed = True
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
        for sub in subs:
            sub.stopped.set()
        for sub in subs:
            if sub.thread is not None and sub.thread is not threading.current_thread():
                sub.thread.join(2 * DRAIN_WAIT_S + 1.0)


def attach(poller: Any) -> PushHub:
    """Give `poller` (a `refresh.Poller`) a push hub: its polls subscribe, pushed lines take
    the poll path. Returns the hub (also `poller.push`)."""
    hub = PushHub(
        poller.ctx,
        feed=lambda name, obs: poller.poll_target(name, collect=False, pushed=obs),
        poll=lambda name: poller.poll_target(name, collect=False),
    )
    poller.push = hub
    return hub
