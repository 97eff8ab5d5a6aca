"""`pgv25 data inspect`: what the loader will make of a dataset, before any GPU time is spent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .buckets import bucket_probabilities
from .dataset import DataPlan
from .index import describe_problems


def bucket_table(plan: DataPlan) -> list[dict]:
    """One row per bucket: size, images, share of images, probability of being drawn, draws per image."""
    counts = np.array([n for _, n in plan.histogram()])
    probabilities = bucket_probabilities(counts, plan.weighting)
    share = counts / counts.sum()
    return [
        {"width": w, "height": h, "ratio": w / h, "images": int(n), "share": float(s), "probability": float(p),
         # how often an image of this bucket is seen relative to proportional sampling (1 = as often as any other)
         "relative_repeats": float(p / s)}
        for (w, h), n, s, p in zip(plan.sizes, counts, share, probabilities)
    ]


def report(plan: DataPlan) -> str:
    lines = [f"{plan.rows.name}: {len(plan.rows)} rows, {len(plan.index)} usable"
             f"{describe_problems(plan.index.reasons(), ', excluded')}",
             f"bucket weighting {plan.weighting!r} (P(bucket) ∝ images^weighting)",
             f"{'bucket':>11} {'ratio':>6} {'images':>8} {'share':>7} {'P(draw)':>8} {'repeats':>8}"]
    for row in bucket_table(plan):
        lines.append(f"{row['width']:>5}x{row['height']:<5} {row['ratio']:6.2f} {row['images']:8d} {row['share']:7.1%} "
                     f"{row['probability']:8.1%} {row['relative_repeats']:7.2f}x")
    if plan.parts:
        lines.append(f"{'dataset':<40} {'usable':>7} {'repeats':>8} {'share of draws':>15}")
        for part, share in zip(plan.parts, part_shares(plan)):
            lines.append(f"{part['name'][:40]:<40} {part['usable']:7d} {part['repeats']:7d}x {share:15.1%}")
    return "\n".join(lines)


def part_shares(plan: DataPlan) -> list[float]:
    """Each dataset's expected share of the images drawn: Σ over buckets of P(bucket) × its share of that bucket."""
    from .multi import positions_of_parts

    part_of = positions_of_parts(plan.rows, plan.index.rows)
    counts = np.array([n for _, n in plan.histogram()])
    probabilities = bucket_probabilities(counts, plan.weighting)
    shares = np.zeros(len(plan.parts))
    for bucket, p in enumerate(probabilities):
        members = part_of[plan.bucket_of == bucket]
        shares += p * np.bincount(members, minlength=len(plan.parts)) / max(len(members), 1)
    return shares.tolist()


def plot(plan: DataPlan, out: Path) -> Path:
    """A bar chart: share of images and probability of being drawn, per bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = bucket_table(plan)
    labels = [f"{r['width']}x{r['height']}" for r in table]
    x = np.arange(len(table))
    figure, axis = plt.subplots(figsize=(max(6, 0.55 * len(table) + 2), 4), dpi=120)
    axis.bar(x - 0.2, [r["share"] for r in table], 0.4, label="share of images")
    axis.bar(x + 0.2, [r["probability"] for r in table], 0.4, label=f"P(draw), weighting {plan.weighting}")
    for i, row in enumerate(table):
        axis.annotate(str(row["images"]), (i - 0.2, row["share"]), ha="center", va="bottom", fontsize=7)
    axis.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("fraction")
    axis.set_title(f"{len(plan.index)} images in {len(table)} aspect-ratio buckets")
    axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
