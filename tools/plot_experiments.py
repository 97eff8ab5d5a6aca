"""Markdown table, bar-chart PNGs and sample sheets of one experiment record (tools/experiments.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pgv25.eval.shapes import ROWS

MEASURES = [row for row in ROWS if row[2] in ("pct", "err")]  # (label, key, kind) of the evaluator's table


def cell(value, kind: str) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if kind == "pct" else f"{value:.1f}"


def table(record: dict) -> str:
    arms = record["arms"]
    groups = list(next(iter(arms.values()))["scores"])
    header = "| arm | group | " + " | ".join(label.replace("|", "\\|") for label, _, _ in MEASURES) + " | train s |"
    lines = [header, "|" + "---|" * (len(MEASURES) + 3)]
    for name, arm in arms.items():
        for group in groups:
            scores = arm["scores"][group]
            values = " | ".join(cell(scores.get(key), kind) for _, key, kind in MEASURES)
            lines.append(f"| {name} | {group} ({scores['images']} images) | {values} | {arm.get('train_seconds', '–')} |")
    return "\n".join(lines)


def bar_chart(record: dict, out: Path, groups: list[str] | None = None) -> Path:
    """Accuracies (left) and the black/white background errors (right), one bar per arm × group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = record["arms"]
    groups = groups or list(next(iter(arms.values()))["scores"])
    series = [(f"{name} · {group}", arm["scores"][group]) for name, arm in arms.items() for group in groups]
    pct = [m for m in MEASURES if m[2] == "pct"]
    err = [m for m in MEASURES if m[2] == "err"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(series)
    for i, (label, scores) in enumerate(series):
        xs = [j + i * width for j in range(len(pct))]
        left.bar(xs, [100 * (scores.get(k) or 0) for _, k, _ in pct], width, label=label)
        xe = [j + i * width for j in range(len(err))]
        right.bar(xe, [scores.get(k) or 0 for _, k, _ in err], width, label=label)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(pct))], [m[0] for m in pct])
    left.set_ylabel("accuracy, %")
    left.set_ylim(0, 105)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(err))], ["black background", "white background"])
    right.set_ylabel("mean |RGB error| (of 255), lower is better")
    left.legend(fontsize=7, loc="lower left")
    fig.suptitle(record.get("title", ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def accuracy_chart(record: dict, out: Path) -> Path | None:
    """DPO arms' implicit accuracy (share of pairs whose winner the policy prefers) over training."""
    series = {name: arm["implicit_accuracy"] for name, arm in record["arms"].items() if arm.get("implicit_accuracy")}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 3.6))
    for name, points in series.items():
        axis.plot([i for i, _ in points], [100 * a for _, a in points], marker=".", label=name)
    axis.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xlabel("iteration")
    axis.set_ylabel("implicit accuracy, % (ties ½)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_experiment(name: str, record: dict, work: Path, docs: Path) -> Path:
    """docs/<name>.md (table + images), docs/<name>.png, docs/<name>_<arm>_samples_<aspect>.png."""
    docs.mkdir(parents=True, exist_ok=True)
    chart = bar_chart(record, docs / f"{name}.png")
    images = []
    for arm in record["arms"]:
        for sheet in sorted((work / arm).glob("samples_*.png")):
            target = docs / f"{name}_{arm}_{sheet.name}"
            shutil.copyfile(sheet, target)
            images.append((arm, sheet.stem.replace("samples_", "").replace("x", ":"), target.name))
    lines = [f"# {record.get('title', name)}", "", f"Reproduce: `{record.get('command', '')}`", "", table(record), "",
             f"![scores]({chart.name})", ""]
    accuracy = accuracy_chart(record, docs / f"{name}_accuracy.png")
    if accuracy is not None:
        lines += [f"![implicit accuracy over training]({accuracy.name})", ""]
    timing = record.get("timing")
    if timing:
        lines += [f"Seconds per iteration, measured in the same run in alternating chunks: pgv25 "
                  f"{timing['pgv25']['seconds_per_iter']:.4f}, reference {timing['reference']['seconds_per_iter']:.4f} "
                  f"(ratio {timing['ratio_pgv25_over_reference']:.3f}; < 1 means pgv25 is faster).", ""]
    if record.get("summary"):
        lines += record["summary"] + [""]
    for arm, note in ((a, v.get("note", "")) for a, v in record["arms"].items()):
        lines.append(f"- **{arm}**: {note}")
    lines.append("")
    for arm, aspect, file in images:
        lines += [f"{arm}, {aspect} (seed 0):", "", f"![{arm} {aspect}]({file})", ""]
    out = docs / f"{name}.md"
    out.write_text("\n".join(lines))
    return out
