"""The memory planner against every peak measured at full size: a markdown table of measured and predicted GiB.

    python tools/plan_check.py                      # docs/perf_runs/memory_peaks.json
    python tools/plan_check.py --peaks OTHER.json
    python tools/plan_check.py --cards 16 24 48 80 --batch 4   # the README's "Which config fits my GPU" table

Each row of the JSON holds a measured peak (a GPU's peak allocated memory, or a CPU training process's peak
resident memory) and the setup that gave it, as `pgv25.engine.plan.Setup` fields. The shapes are Playground v2.5's
published configs, built on the meta device: nothing is downloaded. tests/test_engine/test_plan.py holds every row
to 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pgv25.engine.plan import Setup, describe, predict, ranked, shapes_of
from pgv25.models import playground_configs as published

PEAKS = REPO / "docs" / "perf_runs" / "memory_peaks.json"


def playground_shapes():
    return shapes_of(published.UNET, published.VAE, published.TEXT_ENCODER, published.TEXT_ENCODER_2)


def compared(peaks_file: Path = PEAKS) -> list[dict]:
    """Each recorded peak with the planner's prediction beside it."""
    shapes = playground_shapes()
    rows = []
    for row in json.loads(peaks_file.read_text())["peaks"]:
        plan = predict(shapes, Setup(**row["setup"]))
        rows.append({**row, "predicted_gib": round(plan.peak, 2),
                     "error": plan.peak / row["measured_gib"] - 1, "plan": plan})
    return rows


def cards_table(memories: list[float], batch: int, rank: int = 32) -> list[str]:
    """For each card and for a full fine-tune and a LoRA at 1024² (GPU defaults: compiled transformer blocks, the
    latent cache): the setup the planner ranks first for `batch` images per update, and its predicted peak."""
    shapes = playground_shapes()
    lines = ["| GPU memory | what | levers (`--cfg-options`) | batch × accumulation | predicted peak |", "| --- | --- | --- | --- | --- |"]
    for memory in memories:
        for base in (Setup(lora_rank=None, compiled=True), Setup(lora_rank=rank, compiled=True, frozen_dtype="bf16")):
            found = ranked(shapes, base, memory, batch)
            what = f"LoRA rank {rank}" if base.lora else "full fine-tune"
            if not found:
                lines.append(f"| {memory:g} GB | {what} | does not fit | | |")
                continue
            setup, plan = found[0]
            levers = " ".join(o for o in setup.levers() if not o.startswith(("train_dataloader.batch_size", "optim_wrapper.accumulative")))
            lines.append(f"| {memory:g} GB | {what} | {describe(setup)}: `{levers}` | {setup.batch} × {setup.accumulation} | "
                         f"{plan.peak:.1f} GiB |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peaks", type=Path, default=PEAKS)
    parser.add_argument("--cards", type=float, nargs="+", help="GiB per card: print the setups that fit each instead")
    parser.add_argument("--batch", type=int, default=4, help="with --cards: images per update")
    args = parser.parse_args(argv)
    if args.cards:
        print("\n".join(cards_table(args.cards, args.batch)))
        return 0
    print("| run | card | measured GiB | predicted GiB | error |")
    print("| --- | --- | --- | --- | --- |")
    for row in compared(args.peaks):
        print(f"| {row['name']} | {row['card']} | {row['measured_gib']:.1f} | {row['predicted_gib']:.1f} | {row['error']:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
