"""Insight #3, second half (docs/experiments §5): preference alignment where the prompt leaves a choice open.

    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py alignment --lr 1e-5 --beta 5000 [--start BASE_EXPORT] [--iters 300]

1. The start: `playgroundv2_5_tiny_shapes_open` (the tiny default trained also on "a red circle"-style captions drawn
   equally often on black, white and blue), trained for its 2,800 steps, or `--start`.
2. On-policy pairs: `pgv25 data pairs` on six of the nine open captions, `--samples` images each from the start,
   scored by `pgv25.eval.shapes:preference` with background=black (1 for a black background, +0.1 for each stated
   attribute right): every pair whose scores differ by more than 0.5 (a black sample against a non-black one), and the
   black samples of each prompt as the curated set (`top.jsonl`, score ≥ 1).
3. Arms from the start, each for the same steps of 16 images (8 pairs for DPO), over seeds: nothing; curated
   fine-tuning (the denoising loss on the curated set); DPO of the whole UNet; DPO of a LoRA.
4. Measured on the nine open captions (the three held out of the pairs apart) with `--open-samples` images each: the
   share of black backgrounds, shape colour and shape accuracy, the spread over backgrounds; and on explicit captions
   ("a red circle on a white background"), the accuracy of each attribute: alignment must not paint them black.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPEN_CONFIG = "playgroundv2_5_tiny_shapes_open"
DPO_CONFIG = "playgroundv2_5_dpo_tiny_shapes"
PREFERRED = "black"
HELD_OUT_OPEN = (("red", "triangle"), ("green", "circle"), ("yellow", "square"))  # one per colour and shape


def open_prompts() -> tuple[list[str], list[str]]:
    """(the open captions the pairs are made from, the held-out ones)."""
    from pgv25.tiny.shapes import open_caption, open_combinations

    combos = open_combinations()
    return ([open_caption(*c) for c in combos if c not in HELD_OUT_OPEN], [open_caption(*c) for c in HELD_OUT_OPEN])


def explicit_prompts() -> list[tuple[tuple[str, str, str], str]]:
    """Seen explicit captions of the open colours, on every background they are drawn on (black among them)."""
    from pgv25.tiny.shapes import OPEN_BACKGROUNDS, caption, combinations

    return [(c, caption(*c)) for c in combinations(held_out=False) if c[0] not in OPEN_BACKGROUNDS]


def make_pairs(start: str, work: Path, samples: int, folder: str = "pairs") -> dict:
    prompts = work / "pair_prompts.jsonl"
    trained, _ = open_prompts()
    prompts.write_text("".join(json.dumps({"id": f"open{i}", "prompt": p}) + "\n" for i, p in enumerate(trained)))
    out = work / folder
    subprocess.run([sys.executable, "-m", "pgv25.cli", "data", "pairs", "--model", start, "--prompts", str(prompts),
                    "--out", str(out), "--samples", str(samples), "--steps", "25", "--scorer", "pgv25.eval.shapes:preference",
                    "--scorer-option", f"background={PREFERRED}", "--pairs", "all", "--margin", "0.5",
                    "--top", str(samples), "--min-score", "1.0"], check=True, cwd=REPO)
    return {"folder": str(out), **json.loads((out / "summary.json").read_text())}


def arms(start: str, pairs: Path, lr: float, beta: float, curated_images: int) -> dict[str, tuple[dict, str, str]]:
    """name → (options, config, note). Every arm: the same steps of 16 images (fewer for a curated set smaller than
    that), the same lr, a constant schedule."""
    # lr: DPO's (1e-5 with β 5000, the DPO config's); the plain fine-tune and the LoRA take ten times that, as their
    # configs do against a full fine-tune's
    common = {"model.pretrained_model_name_or_path": start, "optim_wrapper.optimizer.lr": lr,
              "optim_wrapper.optimizer.weight_decay": 0.0, "param_scheduler": dict(type="constant", warmup_iters=0)}
    dpo = {**common, "train_dataloader.batch_size": 8, "train_dataloader.dataset.type": "manifest",
           "train_dataloader.dataset.path": str(pairs / "pairs.jsonl"), "objective.beta": beta,
           "objective.loss_weighting": "epsilon"}
    batch = max(1, min(16, curated_images))
    curated = {**common, "train_dataloader.batch_size": batch, "train_dataloader.dataset.type": "manifest",
               "train_dataloader.dataset.path": str(pairs / "top.jsonl"), "train_dataloader.dataset.image_column": "image",
               "train_dataloader.dataset.caption_dropout": 0.1, "optim_wrapper.optimizer.lr": lr * 10}
    return {
        "curated": (curated, "playgroundv2_5_tiny_shapes", f"fine-tuning (denoising loss) on the black samples alone, {batch} per step, lr {lr * 10:g}"),
        "dpo_full": (dpo, DPO_CONFIG, f"DPO of the whole UNet, ε-MSE weighting, β {beta:g}, 8 pairs per step, lr {lr:g}"),
        "dpo_full_lr10": ({**dpo, "optim_wrapper.optimizer.lr": lr * 10}, DPO_CONFIG,
                          f"DPO of the whole UNet as dpo_full, at the curated arm's lr {lr * 10:g}"),
        "dpo_lora": ({**dpo, "model.lora.enabled": True, "model.lora.rank": 16, "model.lora.alpha": 16,
                      "optim_wrapper.optimizer.lr": lr * 10},
                     DPO_CONFIG, f"DPO of a rank-16 attention LoRA (the UNet with its LoRA off as reference), β {beta:g}, "
                                 f"8 pairs per step, lr {lr * 10:g}"),
    }


def read(pipe, prompts: list[str], per_prompt: int, seed: int, steps: int) -> list:
    from pgv25.eval.shapes import read_image
    from pgv25.generate import generate

    images = generate(pipe, prompts, seed=seed, steps=steps, guidance_scale=3.0, num_images=per_prompt)
    return [read_image(image) for image in images]


def measure(step_dir: str, lora: str | None, open_samples: int, steps: int, explicit_limit: int | None = None) -> dict:
    """Open captions: black share, background spread, colour and shape accuracy; explicit captions: accuracies."""
    from pgv25.generate import load_pipeline
    from pgv25.tiny.shapes import OPEN_BACKGROUNDS, parse_open_caption

    pipe = load_pipeline(step_dir, "native", lora=lora)
    out = {}
    trained, held = open_prompts()
    for group, prompts in (("open_pairs", trained), ("open_held_out", held)):
        readings = read(pipe, prompts, open_samples, 1000, steps)
        stated = [parse_open_caption(p) for p in prompts for _ in range(open_samples)]
        n = len(readings)
        out[group] = {
            "images": n, "preferred_share": sum(r.background == PREFERRED for r in readings) / n,
            "backgrounds": {b: sum(r.background == b for r in readings) / n for b in OPEN_BACKGROUNDS}
                           | {"other": sum(r.background not in OPEN_BACKGROUNDS for r in readings) / n},
            "shape_colour_accuracy": sum(r.shape_colour == s[0] for r, s in zip(readings, stated)) / n,
            "shape_accuracy": sum(r.shape == s[1] for r, s in zip(readings, stated)) / n,
        }
    explicit = explicit_prompts()[:explicit_limit]
    readings = read(pipe, [p for _, p in explicit], 2, 2000, steps)
    expected = [c for c, _ in explicit for _ in range(2)]
    n = len(readings)
    not_black = [(c, r) for c, r in zip(expected, readings) if c[2] != PREFERRED]
    out["explicit"] = {
        "images": n,
        "background_accuracy": sum(r.background == c[2] for c, r in zip(expected, readings)) / n,
        "background_accuracy_not_black": sum(r.background == c[2] for c, r in not_black) / len(not_black),
        "painted_black": sum(r.background == PREFERRED for _, r in not_black) / len(not_black),
        "shape_colour_accuracy": sum(r.shape_colour == c[0] for c, r in zip(expected, readings)) / n,
        "shape_accuracy": sum(r.shape == c[1] for c, r in zip(expected, readings)) / n,
    }
    return out


def run_alignment(args, work: Path, record: dict, record_file: Path, cfg_options: dict, build_cfg, train_arm) -> dict:
    def save():
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2))

    if "start" not in record:
        record["start"] = {"step_dir": args.start} if args.start else train_arm(build_cfg({}, work / "start", None, cfg_options, OPEN_CONFIG))
        save()
    start = record["start"]["step_dir"]
    if "pairs" not in record:
        record["pairs"] = make_pairs(start, work, args.pair_samples)
        save()
    pairs = Path(record["pairs"]["folder"])
    if "nothing" not in record["arms"]:
        record["arms"]["nothing"] = {"note": "the start, not trained further",
                                     "seeds": {"-": measure(start, None, args.open_samples, args.eval_steps, args.eval_limit)}}
        save()
    for name, (options, config, note) in arms(start, pairs, args.lr, args.beta, record["pairs"]["top"]).items():
        if args.arms and name not in args.arms:
            continue
        if record["pairs"]["top" if name == "curated" else "pairs"] == 0:
            print(f"{name}: no {'curated samples' if name == 'curated' else 'pairs'} from the start's samples: not trained")
            continue
        entry = record["arms"].setdefault(name, {"note": note, "seeds": {}})
        for seed in args.seeds:
            if str(seed) in entry["seeds"]:
                continue
            trained = train_arm(build_cfg({**options, "randomness.seed": seed}, work / f"{name}_seed{seed}", args.iters or 300,
                                          cfg_options, config))
            lora = trained["step_dir"] if options.get("model.lora.enabled") else None
            entry["seeds"][str(seed)] = {**measure(start if lora else trained["step_dir"], lora, args.open_samples, args.eval_steps,
                                                   args.eval_limit),
                                         "train_seconds": trained["train_seconds"]}
            save()
    for seed in args.round2_seeds:  # iterated DPO: pairs from the aligned model, then DPO again from it
        entry = record["arms"].setdefault("dpo_full_round2", {
            "note": "DPO of the whole UNet, second round: pairs made again from the first round's model (same seed), "
                    "then the same DPO from it", "seeds": {}})
        first = work / f"dpo_full_seed{seed}" / f"step{args.iters or 300}"
        if str(seed) in entry["seeds"] or not first.is_dir():
            continue
        summary_ = make_pairs(str(first), work, args.pair_samples, f"pairs_round2_seed{seed}")
        options, config, _ = arms(str(first), Path(summary_["folder"]), args.lr, args.beta, summary_["top"])["dpo_full"]
        trained = train_arm(build_cfg({**options, "randomness.seed": seed}, work / f"dpo_full_round2_seed{seed}",
                                      args.iters or 300, cfg_options, config))
        entry["seeds"][str(seed)] = {**measure(trained["step_dir"], None, args.open_samples, args.eval_steps, args.eval_limit),
                                     "train_seconds": trained["train_seconds"], "pairs": summary_["pairs"]}
        save()
    return record


METRICS = [("open_pairs", "preferred_share", "black share, pair prompts"),
           ("open_held_out", "preferred_share", "black share, held-out open prompts"),
           ("open_pairs", "shape_colour_accuracy", "open: shape colour"),
           ("open_pairs", "shape_accuracy", "open: shape"),
           ("explicit", "background_accuracy_not_black", "explicit non-black backgrounds kept"),
           ("explicit", "background_accuracy", "explicit: background"),
           ("explicit", "shape_colour_accuracy", "explicit: shape colour"),
           ("explicit", "shape_accuracy", "explicit: shape")]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.mean(values):.1%} ± {statistics.stdev(values):.1%}"


def summary(record: dict, docs: Path) -> Path:
    """docs/alignment.md: a table of mean ± sd over seeds per arm, and a bar chart of the black share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    pairs = record["pairs"]
    lines = ["# Preference alignment where the prompt leaves a choice open", "",
             f"Reproduce: `{record.get('command', '')}`", "",
             f"Pairs: {pairs['pairs']} from {pairs['prompts']} open captions × {pairs['samples'] // pairs['prompts']} samples of "
             f"the start ({pairs['scored']} scored; a black sample against a non-black one, by `pgv25.eval.shapes:preference`); "
             f"curated set: the {pairs['top']} black samples.", "",
             "| arm | seeds | " + " | ".join(label for _, _, label in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    names, shares, errors = [], [], []
    for name, arm in record["arms"].items():
        seeds = list(arm["seeds"].values())
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cell([s[g][k] for s in seeds]) for g, k, _ in METRICS) + " |")
        values = [s["open_held_out"]["preferred_share"] for s in seeds]
        names.append(name)
        shares.append(statistics.mean(values))
        errors.append(statistics.stdev(values) if len(values) > 1 else 0)
    lines += [""] + [f"- **{n}**: {a['note']}" for n, a in record["arms"].items()]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar(names, shares, yerr=errors, capsize=4, color="#333")
    axis.axhline(1 / 3, ls="--", c="grey", lw=1)
    axis.axhline(0.8, ls=":", c="green", lw=1)
    axis.set_ylim(0, 1)
    axis.set_ylabel("black backgrounds, held-out open prompts")
    figure.tight_layout()
    figure.savefig(docs / "alignment.png", dpi=110)
    plt.close(figure)
    lines += ["", "![black share](alignment.png)", ""]
    out = docs / "alignment.md"
    out.write_text("\n".join(lines))
    return out
