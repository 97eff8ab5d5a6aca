"""The shapes experiments of docs/experiments: train each arm on the tiny config, score it with the
shapes evaluator, write a markdown table, a JSON record and PNG plots.

    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py noise_schedule   # EDM vs SDXL's DDPM schedule
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py sigma_sampling   # karras_index vs lognormal + EDM weighting, ...
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py buckets          # balanced aspect buckets vs centre crop
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py parity           # pgv25 vs tools/reference_edm.py
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py goal             # the default config, scored
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py preference       # DPO vs fine-tuning on the winners vs nothing
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py dreambooth       # a new concept, with vs without prior preservation
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py fid              # pgv25 eval fid on the toy: base, DDPM, EDM, default
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py precision        # fp32 vs bf16 weights, nearest vs stochastic rounding
    PGV25_CACHE=/tmp/pgv25 python tools/experiments.py alignment        # on-policy pairs where the prompt leaves a choice open

Every arm starts from the same tiny base pipeline with the same data order seed and the same number
of iterations; only what the experiment varies differs. An arm whose scores exist under
`--work-dir` is not trained again (delete `<work-dir>/<experiment>/<arm>` to redo it), so an
interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25.config import load_config  # noqa: E402

logger = logging.getLogger("pgv25")
CONFIG = "playgroundv2_5_tiny_shapes"
# Mixed aspect ratios for the bucket experiment: mostly square, as photo collections are.
# Shapes anywhere in the frame (spread 1), as a photo's subject is often off-centre: what centre crop cuts.
MIXED = dict(per_caption=10, aspects={"1:1": 0.6, "2:1": 0.2, "1:2": 0.2}, spread=1.0)
EXTREME_PROMPTS = [  # pure black and pure white backgrounds: where a DDPM-schedule model drifts to grey
    "a red circle on a black background", "a yellow square on a black background", "a white triangle on a black background",
    "a blue circle on a black background", "a red square on a white background", "a black circle on a white background",
    "a green triangle on a white background", "a blue square on a white background",
]
SAMPLE_PROMPTS = [
    "a red circle on a white background", "a blue square on a black background", "a yellow triangle on a blue background",
    "a green square on a yellow background", "a red triangle on a blue background", "a black square on a red background",
    "a white triangle on a green background", "a green circle on a white background",
]


@dataclass
class Arm:
    name: str
    options: dict = field(default_factory=dict)  # dotted config keys → values
    note: str = ""
    config: str = CONFIG


def mixed_data(root: str, weighting) -> dict:
    return {"tiny_assets.extra_datasets": {"shapes_mixed": MIXED},
            "train_dataloader.dataset.path": f"{root}/shapes_mixed",
            "train_dataloader.dataset.buckets": dict(enabled=True, step=16, sizes=[[64, 64], [96, 48], [48, 96]],
                                                     weighting=weighting)}


PUBLIC_PATH = {"model.sigma_sampler": dict(type="karras_index"), "model.loss_weighting": "none",
               "train_dataloader.dataset.cache.enabled": False}


def experiments(root: str) -> dict:
    """Arms per experiment; `root` is the tiny assets folder."""
    karras = {"model.sigma_sampler": dict(type="karras_index"), "model.loss_weighting": "none"}
    lognormal = {"model.sigma_sampler": dict(type="lognormal", P_mean=-1.2, P_std=1.2), "model.loss_weighting": "edm"}
    return {
        "noise_schedule": dict(
            title="Insight #1: EDM's noise schedule vs SDXL's DDPM schedule",
            arms=[Arm("edm", {"model.noise_schedule": "edm"}, "Playground v2.5: EDM, σ_max 80"),
                  Arm("ddpm", {"model.noise_schedule": "ddpm"}, "SDXL: scaled-linear β, ε-prediction, σ_max 14.6")],
            aspects=("1:1",), prompts=EXTREME_PROMPTS),
        "sigma_sampling": dict(
            title="σ sampling and loss weighting",
            arms=[Arm("karras_index", karras, "uniform over the 1000-step Karras grid, unweighted (diffusers, sdxlengine)"),
                  Arm("lognormal_edm", lognormal, "ln σ ~ N(−1.2, 1.2²), λ(σ) = (σ²+σ_d²)/(σσ_d)² (EDM paper)"),
                  Arm("karras_index_edm", {**karras, "model.loss_weighting": "edm"}, "the Karras grid with EDM weighting"),
                  Arm("lognormal_edm_high", {**lognormal, "model.sigma_sampler": dict(type="lognormal", P_mean=-0.6, P_std=1.4)},
                      "ln σ ~ N(−0.6, 1.4²): twice the share of σ > 1, where the layout is decided; EDM weighting")],
            aspects=("1:1",), prompts=SAMPLE_PROMPTS),
        "buckets": dict(
            title="Insight #2: balanced aspect-ratio buckets vs centre-crop to square",
            arms=[Arm("balanced_buckets", mixed_data(root, "uniform"), "64², 96×48, 48×96 buckets drawn uniformly"),
                  Arm("center_crop", {**mixed_data(root, "uniform"), "train_dataloader.dataset.buckets": dict(enabled=False),
                                      "train_dataloader.dataset.center_crop": True}, "every image centre-cropped to 64²")],
            aspects=("1:1", "2:1", "1:2"), per_prompt=1, prompts=SAMPLE_PROMPTS[:4]),
        "goal": dict(title="The tiny config's defaults", arms=[Arm("default", {}, "playgroundv2_5_tiny_shapes as shipped")],
                     aspects=("1:1",), prompts=SAMPLE_PROMPTS),
    }


def build_cfg(options: dict, work_dir: Path, iters: int | None, cfg_options: dict, config: str = CONFIG):
    cfg = load_config(config)
    base = {"validation.interval": 0, "sample_grid.prompts": [], "default_hooks.checkpoint.interval": 10**9,
            "work_dir": str(work_dir)}
    if iters:
        base["train_cfg.max_iters"] = iters
    cfg.merge_from_dict(copy.deepcopy({**base, **options, **cfg_options}))  # mmengine pops `_delete_` from what it merges
    return cfg


def score_arm(step_dir: Path, out: Path, aspects, per_prompt: int, prompts: list[str], steps: int = 25, limit: int | None = None) -> dict:
    from pgv25.eval.shapes import evaluate_model, format_table, native_size, write_report
    from pgv25.generate import generate, labelled_grid, load_pipeline
    from pgv25.tiny.shapes import aspect_size

    pipe = load_pipeline(step_dir, "native")  # each arm's own sampler (a ddpm arm's is DDPM's)
    start = time.time()
    report, results = evaluate_model(pipe, tuple(aspects), per_prompt=per_prompt, steps=steps, limit=limit)
    write_report(report, results, out / "eval")
    print(format_table(report), flush=True)
    for aspect in aspects:
        width, height = aspect_size(native_size(pipe), aspect)
        images = generate(pipe, prompts, seed=0, steps=steps, guidance_scale=3.0, width=width, height=height)
        labelled_grid(images, prompts).save(out / f"samples_{aspect.replace(':', 'x')}.png")
    return {"scores": report, "eval_seconds": round(time.time() - start, 1)}


def train_arm(cfg) -> dict:
    from pgv25.engine.runner import Trainer

    start = time.time()
    trainer = Trainer(cfg)  # setup: loading the base, building the latent cache when enabled
    setup = time.time() - start
    result = trainer.run()
    return {"step_dir": str(result.step_dir), "train_seconds": round(time.time() - start, 1), "setup_seconds": round(setup, 1),
            "iterations": result.iteration}


def run_parity(work: Path, iters: int | None, cfg_options: dict, chunk: int = 50) -> dict:
    """pgv25's Trainer and the reference loop, same base, data folder, batch, lr schedule and iterations,
    stepped in alternating chunks so both see the same machine state; seconds per iteration of each."""
    from reference_edm import ReferenceTrainer

    from pgv25.engine.runner import Trainer

    # The reference follows the public path (Karras-index σ, unweighted x0 loss, pixels through the VAE every
    # step): pgv25 runs the same procedure here, so that quality and speed compare like with like.
    cfg = build_cfg(PUBLIC_PATH, work / "pgv25", iters, cfg_options)
    trainer = Trainer(cfg)
    opt = cfg.optim_wrapper.optimizer
    reference = ReferenceTrainer(
        cfg.model.pretrained_model_name_or_path, cfg.train_dataloader.dataset.path, int(cfg.train_dataloader.batch_size),
        float(opt.lr), float(opt.weight_decay), cfg.param_scheduler.type, int(cfg.param_scheduler.warmup_iters),
        trainer.max_iters, float(cfg.optim_wrapper.clip_grad.max_norm), float(cfg.train_dataloader.dataset.caption_dropout),
        int(cfg.train_dataloader.dataset.resolution), int(cfg.get("seed", 0) or 0))
    seconds = {"pgv25": 0.0, "reference": 0.0}
    done = 0
    while done < trainer.max_iters:
        n = min(chunk, trainer.max_iters - done)
        start = time.perf_counter()
        for _ in range(n):
            trainer.step()
            trainer.iteration += 1
        seconds["pgv25"] += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            reference.step()
        seconds["reference"] += time.perf_counter() - start
        done += n
        print(f"iter {done}/{trainer.max_iters}: pgv25 {seconds['pgv25'] / done * 1000:.1f} ms/it, "
              f"reference {seconds['reference'] / done * 1000:.1f} ms/it", flush=True)
    _, step_dir = trainer.save()
    reference.save(work / "reference" / "export")
    per_iter = {k: v / done for k, v in seconds.items()}
    return {"pgv25": {"step_dir": str(step_dir), "seconds_per_iter": per_iter["pgv25"]},
            "reference": {"step_dir": str(work / "reference" / "export"), "seconds_per_iter": per_iter["reference"]},
            "ratio_pgv25_over_reference": per_iter["pgv25"] / per_iter["reference"], "iterations": done}


DPO_CONFIG = "playgroundv2_5_dpo_tiny_shapes"
PAIRS = {"shape_pairs": {"pairs": True, "per_caption": 4}}  # as in the DPO config


def matched_beta(beta: float, sampler_cfg: dict) -> float:
    """β for EDM's λ = 1/σ² + 1/σ_d² that gives the median pair of σ draws the weight β gives it under ε-MSE's
    λ = 1/σ² (their mean ratio says nothing: E[1/σ²] is set by the rare smallest σ)."""
    import torch

    from pgv25 import edm

    options = dict(sampler_cfg)
    sampler = edm.build_sigma_sampler(options.pop("type"), {}, **options)
    sigma = sampler(100_000, torch.Generator().manual_seed(0))
    ratio = edm.loss_weight(sigma, 0.5, "epsilon").median() / edm.loss_weight(sigma, 0.5, "edm").median()
    return float(beta * ratio)


def preference_arms(root: str, start: str, lr: float, beta: float) -> list[Arm]:
    """From one under-trained start, for the same steps, seed and learning rate: DPO (two weightings) and
    plain fine-tuning on the winners alone. The start itself is the third arm ('nothing')."""
    aligned = {"model.pretrained_model_name_or_path": start, "optim_wrapper.optimizer.lr": lr}
    winners = {**aligned, "tiny_assets.extra_datasets": PAIRS, "train_dataloader.batch_size": 8,
               "train_dataloader.dataset.type": "manifest", "train_dataloader.dataset.path": f"{root}/shape_pairs/metadata.jsonl",
               "train_dataloader.dataset.image_column": "chosen", "train_dataloader.dataset.caption_dropout": 0.0,
               "optim_wrapper.optimizer.weight_decay": 0.0, "param_scheduler": dict(type="constant", warmup_iters=0)}
    sampler = load_config(DPO_CONFIG).model.sigma_sampler
    edm_beta = matched_beta(beta, sampler)
    return [
        Arm("sft_winners", winners, f"fine-tuning (denoising loss) on the 336 winners alone, batch 8, lr {lr:g}"),
        Arm("dpo_epsilon", {**aligned, "objective.beta": beta, "objective.loss_weighting": "epsilon"},
            f"DPO, λ = 1/σ² (Diffusion-DPO's ε-MSE), β {beta:g}, 8 pairs per step, lr {lr:g}", DPO_CONFIG),
        Arm("dpo_edm", {**aligned, "objective.beta": round(edm_beta, 1), "objective.loss_weighting": "edm"},
            f"DPO, EDM's λ = 1/σ² + 1/σ_d², β {edm_beta:.1f} (matched at the median σ), lr {lr:g}", DPO_CONFIG),
    ]


def implicit_accuracy(work_dir: Path) -> list[tuple[int, float]]:
    """(iteration, implicit accuracy over the logging window) from a DPO run's scalars.jsonl."""
    lines = (work_dir / "scalars.jsonl").read_text().splitlines()
    return [(row["iteration"], row["dpo/implicit_accuracy"]) for row in map(json.loads, lines) if "dpo/implicit_accuracy" in row]


def run_preference(args, work: Path, record: dict, record_file: Path, cfg_options: dict, root: str) -> dict:
    """Train the start (the default config for --start-iters steps), then each arm from it; score all of them."""
    spec = dict(title="Insight #3: preference alignment (DPO under EDM) on the shapes", aspects=("1:1",), prompts=SAMPLE_PROMPTS)
    if "start" not in record:
        record["start"] = train_arm(build_cfg({"train_cfg.max_iters": args.start_iters}, work / "start", None, cfg_options))
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2))
    start = record["start"]["step_dir"]
    arms = [Arm("nothing", note=f"the start: playgroundv2_5_tiny_shapes after {args.start_iters} steps, not trained further")]
    arms += preference_arms(root, start, args.lr, args.beta)
    for arm in arms:
        if args.arms and arm.name not in args.arms or arm.name in record["arms"]:
            continue
        trained = {"step_dir": start}
        if arm.name != "nothing":
            trained = train_arm(build_cfg(arm.options, work / arm.name, args.iters or 300, cfg_options, arm.config))
        scored = score_arm(Path(trained["step_dir"]), work / arm.name, spec["aspects"], args.per_prompt, spec["prompts"],
                           args.eval_steps, args.eval_limit)
        entry = {"note": arm.note, "options": {k: str(v) for k, v in arm.options.items()}, **trained, **scored}
        if arm.config == DPO_CONFIG:
            entry["implicit_accuracy"] = implicit_accuracy(work / arm.name)
        record["arms"][arm.name] = entry
        record_file.write_text(json.dumps(record, indent=2))
    return spec


DREAMBOOTH_CONFIG = "playgroundv2_5_dreambooth_lora_tiny_shapes"
# The concept: a ring (a circle with a hole), a shape the dataset never has, named by the trigger word "zwx" where a
# caption names the shape: the tiny text encoders only know captions of that one form, so a longer prompt ("a red zwx
# circle ...") draws noise before any training. Its class is the circle. (A new colour does not work at this size: the
# tiny VAE, trained on the six colours alone, cannot reconstruct magenta or orange.)
CONCEPT, TRIGGER = "ring", "zwx"
INSTANCE = ("red", "white")  # the instance images: red rings on white, each at its own size and place
INSTANCE_PROMPT = f"a red {TRIGGER} on a white background"
CLASS_PROMPT = "a red circle on a white background"  # the class ("a [V] dog" / "a dog")
DREAMBOOTH_SAMPLES = [INSTANCE_PROMPT, f"a blue {TRIGGER} on a yellow background", f"a white {TRIGGER} on a black background",
                      CLASS_PROMPT, "a blue circle on a yellow background", "a green circle on a white background",
                      "a red square on a white background", "a yellow triangle on a blue background"]


def dreambooth_arms(start: str, instance_dir: str, class_dir: str, args) -> list[Arm]:
    """From the trained tiny default, the same fine-tune on the same ≤ 10 instance images, without and with prior
    preservation; the start itself is the third arm ('nothing'). A full fine-tune, as in the DreamBooth paper: at this
    size a LoRA of the attention layers broke the model at lr 1e-3 and had not learned the ring at 2e-4 (see the doc)."""
    common = {"model.pretrained_model_name_or_path": start, "model.lora.enabled": False,
              "train_dataloader.dataset.path": instance_dir, "train_dataloader.dataset.caption": INSTANCE_PROMPT,
              "model_card.instance_prompt": INSTANCE_PROMPT, "optim_wrapper.optimizer.lr": args.lr,
              "tiny_dreambooth": dict(_delete_=True)}  # the config's own instance images are not used
    what = f"full fine-tune, {args.instance_images} instance images captioned '{INSTANCE_PROMPT}', 2 per step, lr {args.lr:g}"
    # The validation loss on the class images, every 50 iterations: the prior arm measures them as val_loss_class (it
    # draws them first), the other arm as its held-out dataset (val_loss): the same images, noise and σ grid.
    class_loss = {"validation.loss.interval": 50}
    return [
        Arm("prior", {**common, **class_loss, "objective.class_prompt": CLASS_PROMPT, "objective.class_data_dir": class_dir,
                      "objective.num_class_images": args.class_images, "objective.prior_loss_weight": 1.0},
            f"{what}; + prior preservation: {args.class_images} class images of '{CLASS_PROMPT}' drawn by the start, "
            "2 per step, weight 1", DREAMBOOTH_CONFIG),
        Arm("no_prior", {**common, **class_loss, "objective": dict(_delete_=True, type="denoising"),
                         "validation.loss.dataset": dict(type="folder", path=class_dir, caption=CLASS_PROMPT)},
            f"{what}; instance loss only", DREAMBOOTH_CONFIG),
    ]


CLASS_CURVE = {"prior": "val_loss_class", "no_prior": "val_loss"}  # the class images' loss, as each arm logs it


def class_loss_curves(work: Path, docs: Path) -> list[str]:
    """docs/dreambooth_class_loss.png: each arm's validation loss on the class images over training (the drift from
    the start that prior preservation holds back), and a line per arm for the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    lines = []
    for arm, key in CLASS_CURVE.items():
        scalars = work / arm / "scalars.jsonl"
        rows = [row for row in map(json.loads, scalars.read_text().splitlines()) if key in row] if scalars.is_file() else []
        if not rows:
            continue
        axis.plot([r["iteration"] for r in rows], [r[key] for r in rows], marker=".", label=arm)
        low = min(rows, key=lambda r: r[key])
        lines.append(f"- {arm}: class-image loss {rows[0][key]:.4f} at the start, lowest {low[key]:.4f} (iteration "
                     f"{low['iteration']}), {rows[-1][key]:.4f} at the end ({rows[-1][key] / rows[0][key] - 1:+.1%}).")
    if not lines:
        plt.close(figure)
        return []
    axis.set_xlabel("iteration")
    axis.set_ylabel("validation loss, mean over 8 σ")
    axis.set_title(f"class images: '{CLASS_PROMPT}'", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(docs / "dreambooth_class_loss.png", dpi=110)
    plt.close(figure)
    return ["", "Validation loss on the class images (`validation.loss`, every 50 iterations; the same images, σ grid "
                "and noise in both arms):", "", *lines, "", "![class-image loss](dreambooth_class_loss.png)"]


def score_concept(start: str, trained: Path | None, out: Path, per_prompt: int, steps: int, limit: int | None) -> dict:
    """The evaluator's seen/held-out scores (reading rings, so a ring drawn for an ordinary prompt counts as wrong), the
    concept's share on trigger prompts, and how often rings leak into ordinary prompts."""
    from pgv25.eval.shapes import evaluate_model, evaluate_pipeline, format_table, native_size, write_report
    from pgv25.generate import generate, labelled_grid, load_pipeline
    from pgv25.tiny.shapes import COLOURS

    if trained is None or (trained / "pytorch_lora_weights.safetensors").is_file():  # a LoRA export applied to its base
        pipe = load_pipeline(start, "native", lora=trained)
    else:
        pipe = load_pipeline(trained, "native")
    began, words = time.time(), {CONCEPT: TRIGGER}
    report, results = evaluate_model(pipe, ("1:1",), per_prompt=per_prompt, steps=steps, limit=limit, rings=True)
    ordinary = [reading for _, reading, _ in results]
    side = native_size(pipe)
    others = [(c, CONCEPT, b) for c in COLOURS for b in COLOURS if c != b and (c, b) != INSTANCE]
    trigger_groups = {"trigger, instance prompt": ([(INSTANCE[0], CONCEPT, INSTANCE[1])], 8 * per_prompt),
                      "trigger, other colours": (others[:limit] if limit else others, per_prompt)}
    for group, (combos, n) in trigger_groups.items():
        report[group], found = evaluate_pipeline(pipe, combos, n, 0, steps, 3.0, side, words=words, rings=True)
        results += found
    write_report(report, results, out / "eval")
    print(format_table(report), flush=True)
    images = generate(pipe, DREAMBOOTH_SAMPLES, seed=0, steps=steps, guidance_scale=3.0, width=side, height=side)
    labelled_grid(images, DREAMBOOTH_SAMPLES).save(out / "samples_1x1.png")
    leak = sum(r.shape == CONCEPT for r in ordinary) / len(ordinary)
    return {"scores": report, "leak": leak, "eval_seconds": round(time.time() - began, 1)}


def dreambooth_summary(record: dict) -> list[str]:
    """Concept share and drift (each arm's seen/held-out accuracies minus the start's), one line per arm."""
    arms = record["arms"]
    if "nothing" not in arms:
        return []
    base = arms["nothing"]["scores"]
    keys = (("shape colour", "shape_colour_accuracy"), ("shape type", "shape_accuracy"), ("background", "background_accuracy"))
    lines = ["| arm | concept share, instance prompt | concept share, other colours | rings for ordinary prompts | "
             "drift seen (colour / type / bg, points) | drift held-out (colour / type / bg, points) |", "|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        s = arm["scores"]
        drift = ["/".join(f"{100 * (s[g][k] - base[g][k]):+.1f}" for _, k in keys) for g in ("1:1 seen", "1:1 held-out")]
        lines.append(f"| {name} | {s['trigger, instance prompt']['shape_accuracy']:.1%} | "
                     f"{s['trigger, other colours']['shape_accuracy']:.1%} | {arm['leak']:.1%} | "
                     f"{drift[0]} | {drift[1]} |")
    return ["Concept share: images for the trigger prompts whose shape is read as a ring. Drift: accuracy on the "
            "ordinary prompts minus the start's, in percentage points (0 is no drift).", ""] + lines


def run_dreambooth(args, work: Path, record: dict, record_file: Path, cfg_options: dict) -> dict:
    """The start (the default config trained as shipped, or --start), the instance images, then each arm; score all."""
    from pgv25.tiny.dreambooth import write_concept_images

    spec = dict(title="DreamBooth at toy scale: a new shape from a few images, with and without prior preservation",
                aspects=("1:1",), prompts=DREAMBOOTH_SAMPLES)
    if "start" not in record:
        record["start"] = ({"step_dir": str(Path(args.start).resolve()), "note": "given with --start"} if args.start else
                           train_arm(build_cfg({}, work / "start", None, cfg_options)))
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2))
    start = record["start"]["step_dir"]
    instance_dir = work / "instance_images"
    if not instance_dir.is_dir():
        write_concept_images(instance_dir, INSTANCE[0], CONCEPT, INSTANCE[1], args.instance_images)
    arms = [Arm("nothing", note="the start: playgroundv2_5_tiny_shapes trained as shipped, no DreamBooth")]
    arms += dreambooth_arms(start, str(instance_dir), str(work / "class_images"), args)
    for arm in arms:
        if args.arms and arm.name not in args.arms or arm.name in record["arms"]:
            continue
        trained, export = {"step_dir": start}, None
        if arm.name != "nothing":
            trained = train_arm(build_cfg(arm.options, work / arm.name, args.iters or 600, cfg_options, arm.config))
            export = Path(trained["step_dir"])
        scored = score_concept(start, export, work / arm.name, args.per_prompt, args.eval_steps, args.eval_limit)
        record["arms"][arm.name] = {"note": arm.note, "options": {k: str(v) for k, v in arm.options.items()}, **trained, **scored}
        record_file.write_text(json.dumps(record, indent=2))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    record["summary"] = dreambooth_summary(record) + class_loss_curves(work, docs)
    return spec


def write_real_set(folder: Path, per_combination: int, seed: int, limit: int | None = None, spread: float = 1.0) -> Path:
    """Real shapes images laid out as MJHQ-30K lays out its reference set: meta_data.json ({id: {category, prompt}})
    and <category>/<id>.png, the category being the shape (MJHQ's ten categories become the toy's three). Drawn with
    their own seed, as the training set is drawn (`spread`), but none of them is a training image. The same file is
    the prompt file of `pgv25 eval generate`."""
    import random

    from pgv25.tiny.shapes import caption, combinations, draw

    meta_file = folder / "meta_data.json"
    if meta_file.is_file():
        return meta_file
    rng, meta = random.Random(seed), {}
    for colour, shape, background in combinations()[:limit]:
        for k in range(per_combination):
            image_id = f"{colour}_{shape}_on_{background}_{k}"
            (folder / shape).mkdir(parents=True, exist_ok=True)
            draw(colour, shape, background, 64, rng, spread).save(folder / shape / f"{image_id}.png")
            meta[image_id] = {"category": shape, "prompt": caption(colour, shape, background)}
    meta_file.write_text(json.dumps(meta, indent=1))
    return meta_file


def read_generated(folder: Path, meta_file: Path) -> dict:
    """The shapes evaluator's scores of the images in `folder`, each read against its prompt."""
    from PIL import Image

    from pgv25.eval.shapes import read_image, score
    from pgv25.tiny.shapes import parse_caption

    meta = json.loads(meta_file.read_text())
    readings = [(parse_caption(row["prompt"]), read_image(Image.open(folder / row["category"] / f"{image_id}.png")))
                for image_id, row in meta.items()]
    return score(readings)


def mean_accuracy(scores: dict) -> float:
    """The shapes evaluator's mean accuracy over the three attributes."""
    return sum(scores[k] for k in ("shape_accuracy", "shape_colour_accuracy", "background_accuracy")) / 3


def fid_summary(report: dict, record: dict) -> list[str]:
    """FID, KID and the evaluator's accuracies side by side, and the order each puts the models in."""
    arms = [name for name in record["arms"] if name in report["models"]]
    group = "1:1 (all prompts)"
    lines = ["| arm | FID | KID (± std over 100 subsets) | FID circle / square / triangle | shape type | shape colour | "
             "background | evaluator mean |", "|---|---|---|---|---|---|---|---|"]
    for name in arms:
        scores, acc = report["models"][name]["scores"], record["arms"][name]["scores"][group]
        per = " / ".join(f"{scores[c]['fid']:.1f}" if "fid" in scores.get(c, {}) else "–" for c in ("circle", "square", "triangle"))
        kid = scores["overall"]
        lines.append(f"| {name} | {kid['fid']:.1f} | {kid['kid']:.0f} ± {kid['kid_std']:.0f} | {per} | "
                     f"{acc['shape_accuracy']:.1%} | {acc['shape_colour_accuracy']:.1%} | {acc['background_accuracy']:.1%} | "
                     f"{mean_accuracy(acc):.1%} |")
    models = [name for name in arms if name != "real"]
    orders = {"FID": sorted(models, key=lambda n: report["models"][n]["scores"]["overall"]["fid"]),
              "KID": sorted(models, key=lambda n: report["models"][n]["scores"]["overall"]["kid"]),
              "the evaluator's mean accuracy": sorted(models, key=lambda n: -mean_accuracy(record["arms"][n]["scores"][group]))}
    return lines + [""] + [f"Best to worst by {what}: {' > '.join(order)}." for what, order in orders.items()]


def run_fid(args, work: Path, record: dict, record_file: Path, cfg_options: dict) -> dict:
    """`pgv25 eval generate` + `pgv25 eval fid` on the toy: the untrained base, SDXL's DDPM schedule and EDM at equal
    iterations, and the default as shipped, against real shapes images, with the toy's feature network."""
    from pgv25.eval.fid import evaluate
    from pgv25.eval.generation import generate_images, record_settings
    from pgv25.eval.prompts import read_prompts
    from pgv25.eval.report import write_report
    from pgv25.eval.shapes_features import save_features, train_features
    from pgv25.generate import generate, labelled_grid, load_pipeline

    spec = dict(title="FID on the shapes: pgv25 eval fid against the shapes evaluator",
                aspects=("1:1",), prompts=SAMPLE_PROMPTS)
    per, limit = args.per_prompt, args.eval_limit  # real and generated images per (colour, shape, background)
    spread = build_cfg({}, work, None, cfg_options).tiny_assets.get("spread", 1.0)  # the training images' placement
    reference_meta = write_real_set(work / "reference", per, seed=1, limit=limit, spread=spread)
    network = work / "shapes_features.pt"
    if "feature_network" not in record:
        net, accuracy = train_features(images=args.feature_images)
        save_features(net, network)
        record["feature_network"] = {"file": str(network), "training_images": args.feature_images,
                                     "accuracy_on_fresh_real_images": accuracy}
    iters = args.iters or 1500  # the DDPM and EDM arms'; the default trains as shipped (its own 2,800) unless --iters
    arms = [("real", None, "real shapes images drawn with another seed: FID's floor at this set size"),
            ("base", "base", "the tiny base as built, UNet untrained"),
            ("ddpm", {"model.noise_schedule": "ddpm", "train_cfg.max_iters": iters}, f"SDXL's DDPM schedule, {iters} iterations"),
            ("edm", {"model.noise_schedule": "edm", "train_cfg.max_iters": iters}, f"Playground's EDM schedule, {iters} iterations"),
            ("default", {}, "playgroundv2_5_tiny_shapes as shipped")]
    shared_file = Path(args.work_dir) / "trained_arms.json"  # the noise_schedule and goal experiments' arms, reused
    shared = json.loads(shared_file.read_text()) if shared_file.exists() else {}
    prompts = read_prompts(reference_meta)
    for name, options, note in arms:
        images = work / name / "images"
        if name == "real":
            write_real_set(images, per, seed=2, limit=limit, spread=spread)
        else:
            if options == "base":
                from pgv25.tiny import ensure_tiny_assets

                cfg = build_cfg({}, work / name, None, cfg_options)
                ensure_tiny_assets(**cfg.tiny_assets)  # built on first use, as `pgv25 train` builds them
                step_dir = Path(cfg.model.pretrained_model_name_or_path)
                entry = {"step_dir": str(step_dir)}
            else:
                cfg = build_cfg(options, work / name, args.iters if name == "default" else None, cfg_options)
                key = json.dumps(cfg.to_dict(), sort_keys=True, default=str).replace(str(work / name), "")
                entry = shared.get(key)
                if entry is None or not Path(entry["step_dir"]).is_dir():
                    entry = shared[key] = train_arm(cfg)
                    shared_file.parent.mkdir(parents=True, exist_ok=True)
                    shared_file.write_text(json.dumps(shared, indent=2))
                step_dir = Path(entry["step_dir"])
            pipe = load_pipeline(step_dir, "native")
            began = time.time()
            record_settings(images, {"model": str(step_dir), "scheduler": "native", "steps": args.eval_steps,
                                     "guidance_scale": 3.0, "width": 64, "height": 64, "seed": 0}, prompts, 0)
            counts = generate_images(pipe, prompts, images, seed=0, steps=args.eval_steps, guidance_scale=3.0, width=64,
                                     height=64, progress=False)
            before = record["arms"].get(name, {})
            entry = {**entry, "generate_seconds": round(time.time() - began, 1) if counts["made"] else before.get("generate_seconds"),
                     "images_made": counts["made"] or before.get("images_made")}
            sheet = generate(pipe, SAMPLE_PROMPTS, seed=0, steps=args.eval_steps, guidance_scale=3.0, width=64, height=64)
            labelled_grid(sheet, SAMPLE_PROMPTS).save(work / name / "samples_1x1.png")
        record["arms"][name] = {"note": note, **(entry if name != "real" else {}),
                                "scores": {"1:1 (all prompts)": read_generated(images, reference_meta)}}
        record_file.write_text(json.dumps(record, indent=2))
    began = time.time()
    report = evaluate(str(work / "reference"), [f"{name}={work / name / 'images'}" for name, _, _ in arms], work / "report",
                      resolution=64, inception=str(network))
    record["fid_seconds"] = round(time.time() - began, 1)
    paths = write_report(report, work / "report")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "fid_per_category.png").write_bytes(paths["chart"].read_bytes())
    record["summary"] = fid_summary(report, record) + ["", "![FID per category](fid_per_category.png)"]
    return spec


PRECISIONS = {"fp32": ({"model.trained_dtype": "fp32"}, "fp32 weights (the default)"),
              "bf16_nearest": ({"model.trained_dtype": "bf16", "optim_wrapper.rounding": "nearest"},
                               "bf16 weights, each fp32 update rounded to nearest"),
              "bf16_stochastic": ({"model.trained_dtype": "bf16", "optim_wrapper.rounding": "stochastic"},
                                  "bf16 weights, each fp32 update rounded stochastically")}


def precision_arms(lrs: list[float], seeds: list[int]) -> list[Arm]:
    return [Arm(f"{name}_lr{lr:g}_seed{seed}", {**options, "optim_wrapper.optimizer.lr": lr, "randomness.seed": seed},
                f"{note}; lr {lr:g}, seed {seed}")
            for lr in lrs for name, (options, note) in PRECISIONS.items() for seed in seeds]


def final_loss(work_dir: Path, last: int = 5) -> float:
    """The mean logged training loss over the last `last` log lines (each a mean over its interval)."""
    rows = [row for row in map(json.loads, (work_dir / "scalars.jsonl").read_text().splitlines()) if "loss" in row]
    return sum(row["loss"] for row in rows[-last:]) / len(rows[-last:])


def precision_summary(record: dict, work: Path, docs: Path) -> list[str]:
    """Mean ± standard deviation over seeds per (precision, lr): final loss and the evaluator's seen accuracies; and
    docs/precision_loss.png, the loss curves (mean over seeds)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[str]] = {}
    for name in record["arms"]:
        precision, lr, _ = name.rsplit("_", 2)
        groups.setdefault((precision, lr), []).append(name)

    def spread(values):
        return f"{statistics.mean(values):.1%} ± {statistics.stdev(values) if len(values) > 1 else 0:.1%}"

    lines = ["| weights | lr | seeds | final loss | shape colour (seen) | shape type (seen) | background (seen) |",
             "|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(1, len({lr for _, lr in groups}), figsize=(11, 4), squeeze=False)
    for (precision, lr), names in groups.items():
        arms = [record["arms"][n] for n in names]
        losses = [a["final_loss"] for a in arms]
        seen = [a["scores"]["1:1 seen"] for a in arms]
        loss_sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        lines.append(f"| {precision} | {lr[2:]} | {len(names)} | {statistics.mean(losses):.4f} ± {loss_sd:.4f} | "
                     f"{spread([s['shape_colour_accuracy'] for s in seen])} | {spread([s['shape_accuracy'] for s in seen])} | "
                     f"{spread([s['background_accuracy'] for s in seen])} |")
        curves = [[(r["iteration"], r["loss"]) for r in map(json.loads, (work / n / "scalars.jsonl").read_text().splitlines())
                   if "loss" in r] for n in names]
        axis = axes[0][sorted({lr for _, lr in groups}, key=lambda v: -float(v[2:])).index(lr)]
        steps = [i for i, _ in curves[0]]
        axis.plot(steps, [statistics.mean(c[k][1] for c in curves) for k in range(len(steps))],
                  label=f"{precision} ({len(names)} seed{'s' if len(names) > 1 else ''})")
        axis.set_title(f"lr {lr[2:]}: training loss, mean over seeds")
        axis.set_yscale("log")
        axis.set_xlabel("iteration")
        axis.legend()
    figure.tight_layout()
    figure.savefig(docs / "precision_loss.png", dpi=110)
    plt.close(figure)
    return lines + ["", "![loss curves](precision_loss.png)"]


def run_precision(args, work: Path, record: dict, record_file: Path, cfg_options: dict) -> dict:
    """The tiny default trained with fp32 weights, bf16 weights rounded to nearest, and bf16 weights with stochastic
    rounding, at the default lr and a tenth of it, over seeds; the final loss and the evaluator's scores."""
    spec = dict(title="bf16 trained weights: stochastic rounding against round-to-nearest and fp32", aspects=("1:1",),
                prompts=SAMPLE_PROMPTS)
    default_lr = float(load_config(CONFIG).optim_wrapper.optimizer.lr)
    for arm in precision_arms([default_lr, default_lr / 10], args.seeds):
        if args.arms and arm.name not in args.arms or arm.name in record["arms"]:
            continue
        trained = train_arm(build_cfg(arm.options, work / arm.name, args.iters or 1000, cfg_options))
        scored = score_arm(Path(trained["step_dir"]), work / arm.name, spec["aspects"], args.per_prompt, spec["prompts"],
                           args.eval_steps, args.eval_limit)
        record["arms"][arm.name] = {"note": arm.note, "options": {k: str(v) for k, v in arm.options.items()}, **trained,
                                    **scored, "final_loss": final_loss(work / arm.name)}
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    record["summary"] = precision_summary(record, work, docs)
    return spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=["noise_schedule", "sigma_sampling", "buckets", "parity", "goal", "preference", "dreambooth", "fid",
                                               "precision", "alignment"])
    parser.add_argument("--iters", type=int, help="training iterations per arm (default: the config's)")
    parser.add_argument("--per-prompt", type=int, default=2, help="evaluation images per prompt")
    parser.add_argument("--eval-steps", type=int, default=25, help="sampling steps of the evaluation")
    parser.add_argument("--eval-limit", type=int, help="evaluate only the first N seen and N held-out combinations")
    parser.add_argument("--work-dir", default="work_dirs/experiments")
    parser.add_argument("--docs", default="docs/experiments", help="where the table, JSON and plots go")
    parser.add_argument("--arms", nargs="+", help="only these arms")
    parser.add_argument("--cfg-options", nargs="+", default=[], help="KEY=VALUE overrides for every arm")
    parser.add_argument("--start-iters", type=int, default=700, help="preference: steps of the under-trained start")
    parser.add_argument("--lr", type=float, help="preference, dreambooth: learning rate of every arm (default 1e-4, 5e-5)")
    parser.add_argument("--beta", type=float, default=500.0, help="preference: β of the ε-MSE DPO arm")
    parser.add_argument("--start", help="dreambooth, alignment: an export to start from (default: train it)")
    parser.add_argument("--instance-images", type=int, default=8, help="dreambooth: images of the new concept")
    parser.add_argument("--class-images", type=int, default=48, help="dreambooth: class images of the prior arm")
    parser.add_argument("--feature-images", type=int, default=4000, help="fid: real images the feature network trains on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="precision, alignment: the seeds of every arm")
    parser.add_argument("--pair-samples", type=int, default=24, help="alignment: samples per open caption the pairs come from")
    parser.add_argument("--open-samples", type=int, default=16, help="alignment: samples per open caption measured")
    parser.add_argument("--round2-seeds", type=int, nargs="*", default=[], help="alignment: seeds of a second DPO round "
                        "(pairs from the first round's model)")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-5 if args.experiment == "dreambooth" else 1e-4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from pgv25.config import parse_cfg_options
    from plot_experiments import write_experiment

    cfg_options = parse_cfg_options(args.cfg_options)
    root = load_config(CONFIG).tiny_assets.root
    work = Path(args.work_dir) / args.experiment
    record_file = work / "record.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {"arms": {}}
    if args.experiment == "alignment":
        from alignment import run_alignment, summary

        run_alignment(args, work, record, record_file, cfg_options, build_cfg, train_arm)
        record["command"] = "python tools/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
        record_file.write_text(json.dumps(record, indent=2))
        print(f"written {summary(record, Path(args.docs))}")
        return
    if args.experiment == "preference":
        spec = run_preference(args, work, record, record_file, cfg_options, root)
    elif args.experiment == "dreambooth":
        spec = run_dreambooth(args, work, record, record_file, cfg_options)
    elif args.experiment == "fid":
        spec = run_fid(args, work, record, record_file, cfg_options)
    elif args.experiment == "precision":
        spec = run_precision(args, work, record, record_file, cfg_options)
    elif args.experiment == "parity":
        spec = dict(title="Parity with the public recipe (diffusers' --do_edm_style_training)", aspects=("1:1",),
                    prompts=SAMPLE_PROMPTS,
                    arms=[Arm("pgv25", note="pgv25 train on the public path: Karras-index σ, unweighted, no latent cache"),
                          Arm("reference", note="tools/reference_edm.py: the documented procedure, same settings")])
        if "timing" not in record:
            record["timing"] = run_parity(work, args.iters, cfg_options)
            record_file.parent.mkdir(parents=True, exist_ok=True)
            record_file.write_text(json.dumps(record, indent=2))
        for arm in spec["arms"]:
            if arm.name not in record["arms"]:
                step_dir = Path(record["timing"][arm.name]["step_dir"])
                record["arms"][arm.name] = {"note": arm.note, "step_dir": str(step_dir),
                                            **score_arm(step_dir, work / arm.name, spec["aspects"], args.per_prompt, spec["prompts"],
                                                        args.eval_steps, args.eval_limit)}
                record_file.write_text(json.dumps(record, indent=2))
    else:
        spec = experiments(root)[args.experiment]
        shared_file = Path(args.work_dir) / "trained_arms.json"  # identical arms of other experiments train once
        shared = json.loads(shared_file.read_text()) if shared_file.exists() else {}
        for arm in spec["arms"]:
            if args.arms and arm.name not in args.arms or arm.name in record["arms"]:
                continue
            cfg = build_cfg(arm.options, work / arm.name, args.iters, cfg_options)
            key = json.dumps(cfg.to_dict(), sort_keys=True, default=str).replace(str(work / arm.name), "")
            trained = shared.get(key)
            if trained is None or not Path(trained["step_dir"]).is_dir():
                trained = shared[key] = train_arm(cfg)
                shared_file.parent.mkdir(parents=True, exist_ok=True)
                shared_file.write_text(json.dumps(shared, indent=2))
            else:
                print(f"{arm.name}: same configuration as {trained['step_dir']}, not trained again", flush=True)
            scored = score_arm(Path(trained["step_dir"]), work / arm.name, spec["aspects"], spec.get("per_prompt", args.per_prompt),
                               spec["prompts"], args.eval_steps, args.eval_limit)
            record["arms"][arm.name] = {"note": arm.note, "options": {k: str(v) for k, v in arm.options.items()}, **trained, **scored}
            record_file.parent.mkdir(parents=True, exist_ok=True)
            record_file.write_text(json.dumps(record, indent=2))
    record["title"] = spec["title"]
    record["command"] = "python tools/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record_file.write_text(json.dumps(record, indent=2))
    print(f"written {write_experiment(args.experiment, record, work, Path(args.docs))}")


if __name__ == "__main__":
    main()
