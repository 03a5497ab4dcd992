"""The markdown of reports/RESULTS.md, rendered from `ReportData` (pure: text in, text out).

Sections: profile and provenance, headline table, the ablation (delta, retention), recovery
(3A vs 3B), the leakage probe (3B vs 3B-leaky), plots, one table per stage, what the numbers
mean, runs. The interpretation is written from the numbers, not assumed: on the tiny profile a
bidirectional prompt may cost nothing, and the text then says so.
"""

from __future__ import annotations

from jobs.recovery import Ratio
from jobs.report_model import LeakProbe, ReportData, StageResult, StudyReport
from jobs.seeds import FIGURES, JUDGED, NOISE_SDS, SeedStudy, Spread

LABELS = {
    "stage1": "1 causal (base)",
    "stage2": "2 prefix (base)",
    "stage3a": "3A causal SFT",
    "stage3b": "3B prefix SFT",
    "stage3b-leaky": "3B-leaky full_bidir SFT",
    "stage4": "4 prefix (3B ckpt)",
    "stage4a": "4A prefix (3A ckpt)",
}
#: The seed's own figures (Ministral 3B), quoted for comparison only.
SEED = {"stage1": 0.695057, "stage2": 0.355898, "delta": -0.339159, "retention": 0.512}
SECTIONS = (
    "## Headline",
    "## The ablation: stage 1 vs stage 2",
    "## Recovery after fine-tuning",
    "## Leakage probe",
    "## Plots",
    "## Per-stage details",
    "## What these numbers mean",
    "## Runs",
)
#: Added first when the report covers several seeds.
SEEDS_SECTION = "## Across seeds"
EVAL_ORDER = ("stage1", "stage2", "stage4a", "stage4")


def f(v: float | None, digits: int = 4, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def num(v: float) -> str:
    """A count as a count (`600`, not `600.000`); anything else to 3 decimals."""
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


def r(x: Ratio, suffix: str = "", digits: int = 3) -> str:
    return x.fmt(digits, suffix)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _commit(s: StageResult) -> str:
    if not s.commit:
        return "-"
    return f"`{s.commit[:10]}`" + (" (dirty)" if s.dirty else "")


def headline(d: ReportData) -> list[str]:
    s1 = d.math.stage1
    rows = []
    for name in ("stage1", "stage2", "stage4a", "stage4"):
        s = d.stages.get(name)
        acc = s.macro_acc if s else None
        rows.append(
            [
                LABELS[name],
                s.mask or "-" if s else "-",
                f(acc),
                f(s.macro_acc_norm) if s else "-",
                f(acc - s1, signed=True) if acc is not None and s1 is not None else "-",
                f"`{s.run_id}`" if s else "not run",
            ]
        )
    return _table(["stage", "mask", "macro acc", "macro acc_norm", "vs stage 1", "run"], rows)


def ablation(d: ReportData) -> list[str]:
    m = d.math
    return [
        *_table(
            ["", "this study", "seed (Ministral 3B)"],
            [
                ["stage 1 macro acc (causal)", f(m.stage1, 6), f(SEED["stage1"], 6)],
                ["stage 2 macro acc (prefix)", f(m.stage2, 6), f(SEED["stage2"], 6)],
                [
                    "delta (stage2 - stage1)",
                    f(m.delta, 6, signed=True),
                    f(SEED["delta"], 6, signed=True),
                ],
                ["retention (stage2 / stage1)", r(m.retention, "x"), f"{SEED['retention']:.3f}x"],
            ],
        ),
    ]


def recovery(d: ReportData) -> list[str]:
    rows = []
    for rec in d.math.recoveries:
        rows.append(
            [
                f"{rec.fine_tune} ({rec.eval_stage})",
                f(rec.accuracy),
                r(rec.vs_baseline, "x"),
                r(rec.gap_closed),
                f(rec.delta_vs_ablated, signed=True),
                f(rec.delta_vs_baseline, signed=True),
            ]
        )
    return [
        "`recovery = stage4 / stage1`; `gap closed = (stage4 - stage2) / (stage1 - stage2)` (1.0 = all "
        "of the ablation's loss won back; undefined when stage 1 and 2 are equal).",
        "",
        *_table(
            [
                "fine-tune",
                "post-FT prefix acc",
                "recovery vs stage 1",
                "gap closed",
                "vs stage 2",
                "vs stage 1",
            ],
            rows,
        ),
    ]


def _probe_rows(s: StageResult) -> list[list[str]]:
    rows = []
    picks: list[tuple[str, LeakProbe]] = []
    if s.probes:
        picks.append(("first", s.probes[0]))
        if len(s.probes) > 1:
            picks.append(("last", s.probes[-1]))
    for when, p in picks:
        flag = "-" if p.flagged is None else ("LEAK" if p.flagged else "ok")
        step = "" if p.step is None else f" (step {p.step})"
        rows.append(
            [
                LABELS[s.stage],
                f"{when}{step}",
                p.mask,
                f(p.loss_mask),
                f(p.loss_causal),
                f(p.ratio, 3),
                f(p.future_sensitivity, 3),
                f(p.max_logit_diff, 4),
                flag,
            ]
        )
    return rows


def leakage(d: ReportData) -> list[str]:
    rows: list[list[str]] = []
    for name in ("stage3b", "stage3b-leaky"):
        s = d.stages.get(name)
        rows += _probe_rows(s) if s else []
        if s is None or not s.probes:
            rows.append(
                [
                    LABELS[name],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "not run" if s is None else "no probe recorded",
                ]
            )
    return [
        "Two measurements on a fixed held-out batch, same weights. (1) The seed's: loss under the "
        "training mask vs causal loss (it saw 0.070 vs 1.023 on its leaky run). A low ratio is not "
        "proof of a leak: weights fine-tuned as a prefix LM come to rely on the bidirectional prompt, "
        "so their causal loss rises while their prefix loss falls. (2) The guard's verdict, the "
        "counterfactual: replace the tokens after a cut point and re-run under the training mask; "
        "predictions of labels before the cut may not change under a leak-free mask (max abs logit "
        "change 0), whatever the weights learned. *future sens.* is the loss change (nats) at those "
        "positions: positive once the weights exploit a leak.",
        "",
        *_table(
            [
                "run",
                "probe",
                "mask",
                "loss under mask",
                "causal loss",
                "ratio",
                "future sens.",
                "max abs logit change",
                "guard",
            ],
            rows,
        ),  # fmt: skip
    ]


def stage_table(s: StageResult) -> list[str]:
    lines = [f"### {LABELS[s.stage]} (`{s.stage}`, `{s.stage_dir}`)", ""]
    meta = [
        ["run", f"`{s.run_id}`"],
        ["commit", _commit(s)],
        ["profile / target", f"{s.profile or '-'} / {s.target or '-'}"],
        ["model", f"`{s.model}`" if s.model else "-"],
        ["mask", s.mask or "-"],
    ]
    if s.revisions:
        pins = ", ".join(f"{k} `{v[:12] if len(v) == 40 else v}`" for k, v in s.revisions.items())
        meta.append(["revisions", pins])
    if s.kind == "eval":
        meta += [["macro acc", f(s.macro_acc)], ["macro acc_norm", f(s.macro_acc_norm)]]
    else:
        meta += [
            ["train loss", f(s.train_loss)],
            ["eval loss", f(s.eval_loss)],
            ["steps", str(s.steps or "-")],
        ]
    meta += [[k, num(v)] for k, v in s.throughput.items()]
    lines += _table(["", ""], meta)
    if s.tasks:
        lines += _table(
            ["task", "acc", "acc_norm", "n", "chance"],
            [
                [
                    n,
                    f(t.acc),
                    f(t.acc_norm),
                    str(t.n or "-"),
                    f(t.chance if t.chance is not None else s.profile_chance, 3),
                ]
                for n, t in s.tasks.items()
            ],
        )
    return lines


def interpretation(d: ReportData) -> list[str]:
    m = d.math
    out: list[str] = []
    if d.profile == "tiny":
        out.append(
            "These numbers come from the `tiny` profile: a very small model built offline and trained on a "
            "synthetic task on CPU in minutes. They show that the pipeline, the masks, the leakage guard and "
            "the recovery math work end to end on real runs. They are not evidence about Ministral 3B; the "
            "`ministral-3b` profile runs the real study."
        )
    s1 = d.stages.get("stage1")
    if s1 and s1.macro_acc is not None and s1.chance is not None:
        verdict = "clearly above" if s1.macro_acc > s1.chance + 0.1 else "NOT clearly above"
        out.append(
            f"Stage 1 scores {f(s1.macro_acc, 3)} against a chance level of {f(s1.chance, 3)}: {verdict} chance."
        )
    if s1 and s1.chance is not None:
        flat = [n for n, t in s1.tasks.items() if t.acc is not None and t.acc <= s1.chance + 0.1]
        if flat:
            out.append(
                f"Under the causal mask the model is at or near chance on {', '.join(flat)}: it did not "
                "learn that task, so its numbers (and any change in them) carry no signal."
            )
    s2 = d.stages.get("stage2")
    if s1 and s2:
        per = [
            f"{n} {f(s2.tasks[n].acc - t.acc, 3, signed=True)}"  # type: ignore[operator]
            for n, t in s1.tasks.items()
            if n in s2.tasks and t.acc is not None and s2.tasks[n].acc is not None
        ]
        if per:
            out.append(f"Per task, the bidirectional prompt changed accuracy by: {', '.join(per)}.")
    if m.delta is not None:
        if m.delta < -0.02:
            out.append(
                f"Making the prompt bidirectional cost {f(-m.delta, 3)} macro accuracy here (retention "
                f"{r(m.retention, 'x')}), in the same direction as the seed's drop on Ministral 3B "
                f"({SEED['delta']:+.3f}, {SEED['retention']:.3f}x)."
            )
        elif m.delta > 0.02:
            out.append(
                f"Making the prompt bidirectional did not hurt here: accuracy went up by {f(m.delta, 3)} "
                f"(retention {r(m.retention, 'x')}), unlike the seed's drop on Ministral 3B "
                f"({SEED['delta']:+.3f}). This is what the code measured; the task was not tuned to match the "
                "seed. A likely reason: a tiny model trained briefly on short synthetic prompts has not built "
                "deep left-to-right representations that extra right-context would disturb, and letting prompt "
                "tokens see later prompt tokens can even help recall."
            )
        else:
            out.append(
                f"Making the prompt bidirectional barely changed accuracy here ({f(m.delta, 3, signed=True)}, "
                f"retention {r(m.retention, 'x')}), unlike the seed's drop on Ministral 3B "
                f"({SEED['delta']:+.3f}). With no drop to recover, the gap-closed ratio is not meaningful; "
                "the recovery ratios against stage 1 still are."
            )
    for rec in m.recoveries:
        if rec.accuracy is not None:
            text = (
                f"After fine-tuning {rec.fine_tune}, the prefix-mask eval scores {f(rec.accuracy, 3)} "
                f"({r(rec.vs_baseline, 'x')} of stage 1; gap closed {r(rec.gap_closed)})"
            )
            if rec.delta_vs_ablated is not None and rec.delta_vs_ablated < 0:
                text += (
                    ": below stage 2, so this fine-tune did not recover the ablation's loss; it cost "
                    "more than it taught (see the per-task tables: accuracy on tasks the SFT data does "
                    "not cover can fall while the model adapts)"
                )
            s4 = d.stages.get({"3A": "stage4a", "3B": "stage4"}.get(rec.fine_tune, ""))
            if s2 and s4:
                # Per task against stage 2: which tasks the fine-tune won back and which it cost.
                per = [
                    f"{n} {f(s2.tasks[n].acc, 3)} -> {f(t.acc, 3)}"
                    for n, t in s4.tasks.items()
                    if n in s2.tasks and t.acc is not None and s2.tasks[n].acc is not None
                ]
                if per:
                    text += f" (per task vs stage 2: {', '.join(per)})"
            out.append(text + ".")
    leaky, safe = d.stages.get("stage3b-leaky"), d.stages.get("stage3b")
    # The last probe counts: on the starting weights a mask shows no leak (the model has not
    # learned to exploit it yet); after training under it the collapse is plain.
    if leaky and leaky.probes and leaky.probes[-1].ratio is not None:
        p = leaky.probes[-1]
        collapsed = p.flagged if p.flagged is not None else (p.ratio or 1.0) < 0.5
        numbers = (
            f"loss {f(p.loss_mask, 3)} under the mask vs {f(p.loss_causal, 3)} causal "
            f"(ratio {f(p.ratio, 3)})"
        )
        if collapsed:
            text = f"The forced `full_bidir` run's probe shows the leak: {numbers}"
        else:
            text = (
                f"The forced `full_bidir` run's last probe did NOT collapse: {numbers}; at this "
                "size and step count the weights had not yet learned to exploit the mask"
            )
        if safe and safe.probes and safe.probes[-1].ratio is not None:
            sp = safe.probes[-1]
            text += f", while the `prefix` run's ratio is {f(sp.ratio, 3)}"
            if sp.max_logit_diff is not None:
                text += (
                    f" with its predictions unchanged when later tokens are replaced (max abs logit "
                    f"change {f(sp.max_logit_diff, 4)})"
                )
                if sp.ratio is not None and sp.ratio < 0.5:
                    text += ": a low ratio there is adaptation, not leakage"
        if collapsed:
            text += ". This is the seed's invalid 3B objective, reproduced on purpose and caught"
        out.append(text + ".")
    return [p + "\n" for p in out] or ["No stage numbers to interpret yet.\n"]


def _sp(x: Spread | None, signed: bool = False) -> str:
    return x.fmt(3, signed) if x is not None else "-"


def _range(x: Spread | None) -> str:
    return f"{x.lo:.3f} .. {x.hi:.3f}" if x is not None else "-"


def across_seeds(st: SeedStudy, detail_seed: int | None) -> list[str]:
    """The spread of every stage and figure over the seeds, and the claims checked per seed."""
    seeds = ", ".join(str(x) for x in st.seeds)
    tasks = list(dict.fromkeys(t for s in EVAL_ORDER for t in st.stages.get(s, {}) if t != "macro"))
    rows = []
    for name in EVAL_ORDER:
        row = st.stages.get(name, {})
        m = row.get("macro")
        rows.append([LABELS[name], _sp(m), _range(m), *[_sp(row.get(t)) for t in tasks]])
    out = [
        f"{len(st.seeds)} seeds ({seeds}). A seed sets everything random in a study: on the tiny "
        "profile the tiny model is rebuilt from it (initial weights, pre-training rows and their "
        "order), and every stage's fine-tune order follows it; the evaluation questions are the "
        f"same for every seed. Mean ± sample sd over the seeds, and the range. A figure is "
        "*larger than the spread* when it has one sign on every seed and its mean exceeds "
        + ("the sd across seeds." if NOISE_SDS == 1 else f"{NOISE_SDS:g} sd across seeds."),
        "",
        *_table(["stage", "macro acc", "range", *tasks], rows),
    ]
    frows = []
    for key, label in FIGURES.items():
        x = st.figures.get(key)
        if x is None:
            continue
        verdict = "-"
        if key in JUDGED:
            verdict = "larger than the spread" if x.beyond_noise else "within the spread"
        frows.append([label, _sp(x, signed=key in JUDGED), _range(x), verdict])
    out += _table(["figure", "mean ± sd", "range", "against the seed-to-seed spread"], frows)
    out += ["What the study claims, checked on each seed separately:", ""]
    for c in st.claims:
        failed = [str(k) for k, v in c.per_seed.items() if v is False]
        unchecked = [str(k) for k, v in c.per_seed.items() if v is None]
        mark = "holds" if c.holds else "does NOT hold"
        note = f" (fails on seed {', '.join(failed)})" if failed else ""
        note += (
            f" (not checked on seed {', '.join(unchecked)}: a stage is missing)"
            if unchecked
            else ""
        )
        out.append(f"- **{mark}** on {c.held} of {len(c.per_seed)} seeds{note}: {c.text}.")
    out.append("")
    prow = []
    for seed in st.seeds:
        prow.append([str(seed), *[_seed_value(st, s, seed) for s in EVAL_ORDER]])
    out += [
        "Macro accuracy per seed:",
        "",
        *_table(["seed", *(LABELS[s] for s in EVAL_ORDER)], prow),
    ]
    out += [
        f"The sections below show seed {detail_seed}'s runs in detail (probes, loss curves, "
        "per-stage tables).",
        "",
    ]
    return out


def _seed_value(st: SeedStudy, stage: str, seed: int | None) -> str:
    x = st.stages.get(stage, {}).get("macro")
    if x is None:
        return "-"
    i = st.seeds.index(seed)
    # a stage missing on some seeds has fewer values: only index when every seed has one
    return f"{x.values[i]:.4f}" if x.n == len(st.seeds) else "-"


def render_markdown(
    d: ReportData, plot_files: list[str], plot_note: str = "", study: StudyReport | None = None
) -> str:
    """The whole document. `study` (several seeds) adds the spread across seeds up front; the
    detailed sections are then those of `d`'s seed."""
    seed = f", seed {d.seed}" if d.seed is not None else ""
    lines = [
        "# Results: prefix-mask ablation study",
        "",
        f"Profile: **{d.profile}**{seed if study is None else ''}. Generated {d.generated_at} by "
        f"`orch report` from the pulled runs under `{d.runs_dir}` (the latest succeeded run of each "
        "stage" + (" for each seed" if study is not None else "") + ").",
        "",
    ]
    if d.missing:
        lines += [
            f"Not in this report (no succeeded pulled run{seed}): {', '.join(d.missing)}.",
            "",
        ]
    if study is not None:
        lines += [SEEDS_SECTION, "", *across_seeds(study.spread, d.seed)]
    lines += [
        SECTIONS[0] + (f" (seed {d.seed})" if study is not None else ""),
        "",
        *headline(d),
        SECTIONS[1],
        "",
        *ablation(d),
        SECTIONS[2],
        "",
        *recovery(d),
        SECTIONS[3],
        "",
        *leakage(d),
        SECTIONS[4],
        "",
    ]
    for name in plot_files:
        lines += [f"![{name}]({name})", ""]
    if plot_note:
        lines += [plot_note, ""]
    lines += [SECTIONS[5], ""]
    for name in LABELS:
        if name in d.stages:
            lines += stage_table(d.stages[name])
        else:
            lines += [f"### {LABELS[name]} (`{name}`)", "", "not run (no succeeded pulled run)", ""]
    lines += [SECTIONS[6], "", *interpretation(d), SECTIONS[7], ""]
    runs = list(study.runs.values()) if study is not None else [d]
    rows = []
    for rd in runs:
        for n, st in rd.stages.items():
            rows.append(
                [
                    n,
                    "-" if st.seed is None else str(st.seed),
                    f"`{st.run_dir}`",
                    _commit(st),
                    st.target or "-",
                ]
            )
    lines += _table(["stage", "seed", "run dir", "commit", "target"], rows)
    return "\n".join(lines).rstrip() + "\n"
