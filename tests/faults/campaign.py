"""The fault campaign's record: every scenario states what is injected, what orch must report,
within what time, and what must survive; with `ORCH_FAULTS_OUT=FILE` each run appends what was
measured as one JSON line, and

    python -m tests.faults.campaign FILE

prints the table of docs/RELIABILITY.md from it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Scenario:
    """One fault scenario: the contract (`injected`, `report`, `within_s`, `survives`) and
    what a run measured (`detected_s`, `notes`)."""

    name: str
    injected: str
    report: str
    within_s: float
    survives: str
    detected_s: float | None = None
    notes: list[str] = field(default_factory=list)
    _t0: float = field(default=0.0, repr=False)

    def start(self) -> None:
        """The fault is injected now: the detection clock starts."""
        self._t0 = time.monotonic()

    def detected(self) -> float:
        """What orch had to report has been seen: record the time and check the bound."""
        self.detected_s = time.monotonic() - self._t0
        assert self.detected_s <= self.within_s, (
            f"{self.name}: detected after {self.detected_s:.1f} s, bound {self.within_s} s"
        )
        return self.detected_s

    def note(self, text: str) -> None:
        self.notes.append(text)

    def record(self) -> None:
        """Append the result to $ORCH_FAULTS_OUT (when set): called once the checks passed."""
        out = os.environ.get("ORCH_FAULTS_OUT")
        if not out:
            return
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")


def table(lines: list[dict[str, object]]) -> str:
    """The markdown table of scenario results (pure)."""
    rows = [
        "| scenario | injected | orch reported | bound | measured | survived |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in lines:
        got = d.get("detected_s")
        measured = f"{got:.1f} s" if isinstance(got, (int, float)) else "—"
        notes = "; ".join(_short(str(n)) for n in d.get("notes") or [])  # type: ignore[union-attr]
        survived = str(d["survives"]) + (f" ({notes})" if notes else "")
        rows.append(
            f"| {d['name']} | {d['injected']} | {d['report']} | {d['within_s']:.0f} s "
            f"| {measured} | {survived} |"
        )
    return "\n".join(rows)


def _short(text: str, n: int = 110) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


if __name__ == "__main__":
    text = Path(sys.argv[1]).read_text(encoding="utf-8")
    print(table([json.loads(ln) for ln in text.splitlines() if ln.strip()]))
