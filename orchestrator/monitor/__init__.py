"""The monitor: the run state machine, one-round-trip polls, the APScheduler watcher, alerts
and the actions taken when a run ends (pull, next stage, idle instance).

    statemachine  pure: (previous RunState, observation, now, limits) -> (RunState, alerts)
    refresh       one agent round trip per target; phases and alerts into the store first
    alerts        Apprise URLs and a command hook; redaction; retry with backoff
    actions       pull on completion, next stage, idle instances, provider verdicts
    scheduler     APScheduler jobs, one per target with active runs
    watch         `orch watch` (foreground) and `orch launch --watch`
"""
