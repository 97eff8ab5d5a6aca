"""`pgv25 eval fid`'s report: several models side by side against one reference set, as the model card's MJHQ-30K
chart puts them — `fid.json` (every number), `fid.md` (a table per metric: categories down, models across) and
`fid.png` (FID per category, a bar per model)."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_file
from .metrics import OVERALL


def categories_of(report: dict) -> list[str]:
    """The report's categories, overall first, then as the models name them (sorted)."""
    seen = {c for model in report["models"].values() for c in model["scores"]}
    return [OVERALL] + sorted(seen - {OVERALL})


def _cell(row: dict | None, metric: str) -> str:
    if row is None:
        return "–"
    if row.get("too_few") and metric in ("fid", "kid"):
        return f"n={row['images']}/{row['reference']} (too few)"
    value = row.get(metric)
    if value is None:
        return "–"
    if metric == "kid":
        return f"{value * 1000:.2f} ± {row['kid_std'] * 1000:.2f}"
    return f"{value + 0.0:.2f}" if abs(value) >= 0.005 else "0.00"  # a distance of identical sets, not "-0.00"


def markdown(report: dict) -> str:
    models = list(report["models"])
    categories = categories_of(report)
    lines = [f"# FID against {report['reference']['name']}", "",
             f"Reference: `{report['reference']['source']}`, {report['reference']['images']} images. Images resized to "
             f"{report['resolution']}² (shorter side, PIL bicubic, centre crop), then the FID Inception's own resize to "
             f"299² (`{report['feature_network']['file']}`, sha256 {report['feature_network']['sha256'][:12]}…). "
             "FID and KID: torchmetrics; lower is better. CLIP score: higher is better.", ""]
    tables = [("FID", "fid"), ("KID × 10³ (mean ± std over subsets)", "kid")]
    if any("clip" in m for m in report["models"].values()):
        tables.append((f"CLIP score ({report.get('clip_model', 'CLIP')})", "clip"))
    for title, metric in tables:
        lines += [f"## {title}", "", "| category | " + " | ".join(models) + " |",
                  "| --- | " + " | ".join("---:" for _ in models) + " |"]
        for category in categories:
            cells = []
            for name in models:
                model = report["models"][name]
                if metric == "clip":
                    value = model.get("clip", {}).get(category)
                    cells.append("–" if value is None else f"{value:.2f}")
                else:
                    cells.append(_cell(model["scores"].get(category), metric))
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Images", "", "| category | reference | " + " | ".join(models) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for category in categories:
        counts = [str(report["models"][m]["scores"].get(category, {}).get("images", 0)) for m in models]
        lines.append(f"| {category} | {report['reference']['categories'].get(category, 0)} | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: Path) -> Path:
    """FID per category (overall first), a bar per model; a category a model has too few images for gets no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, categories = list(report["models"]), categories_of(report)
    width = 0.8 / max(len(models), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) * max(1, len(models)) ** 0.5 + 2), 4))
    x = np.arange(len(categories))
    for i, name in enumerate(models):
        scores = report["models"][name]["scores"]
        heights = [scores.get(c, {}).get("fid", np.nan) for c in categories]
        bars = axes.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(x, categories, rotation=30, ha="right")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title(f"FID per category against {report['reference']['name']} ({report['resolution']}²)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fid.json", "markdown": out / "fid.md", "chart": out / "fid.png"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(markdown(report))
    bar_chart(report, paths["chart"])
    return paths
