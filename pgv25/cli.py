"""`pgv25` command line: thin argument parsing over library functions, run in-process."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

# Library chatter (missing optional backends, deprecations) is not for our users' terminals.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, `--resume` instead of any given one."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            if not arg.startswith("-"):
                continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    prefix = f"NPROC_PER_NODE={os.environ['LOCAL_WORLD_SIZE']} " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    return prefix + shlex.join(["pgv25", *kept, "--resume"])


def cmd_train(args) -> int:
    from .config import load_config, parse_cfg_options

    cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
    if args.work_dir:
        cfg.work_dir = args.work_dir
    if args.dry_run:
        print(cfg.pretty_text)
        return 0
    from .engine.runner import train

    result = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} after iteration {result.iteration}; checkpoint {result.checkpoint}")
        print(f"resume with: {resume_command(args.argv)}")
        return 0
    print(f"exported: {result.step_dir}")
    if result.grid:
        print(f"samples: {result.grid}")
    return 0


def check_train_args(args) -> None:
    from .config import load_config, parse_cfg_options

    load_config(args.config, parse_cfg_options(args.cfg_options))


def cmd_plan(args) -> int:
    import torch

    from .config import load_config, parse_cfg_options
    from .engine.options import read_options
    from .engine.plan import GIB, plan_report

    cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
    options = read_options(cfg)
    if options.data.tiny_assets:  # the embedded default's base is built on first use (seconds)
        from .tiny import ensure_tiny_assets

        ensure_tiny_assets(**options.data.tiny_assets)
    memories = args.gpu_memory
    if memories is None:
        on_gpu = args.device == "cuda" and torch.cuda.is_available()
        memories = [torch.cuda.get_device_properties(0).total_memory / GIB] if on_gpu else [16, 24, 48, 80]
    print(plan_report(options, args.gpus, memories, args.device, args.batch))
    return 0


def cmd_list_cfg(args) -> int:
    from .config import config_roots, list_configs

    configs = list_configs(args.pattern)
    if not configs:
        roots = config_roots()
        where = f"looked in {', '.join(map(str, roots))}" if roots else "no configs/ folder here, none installed with pgv25"
        if args.pattern:
            raise UserError(f"no config name contains '{args.pattern}' ({where})")
        raise UserError(f"no configs found ({where}); set PGV25_CONFIG_DIR to a folder of configs")
    for name, path in configs.items():
        print(f"{name:40s} {path}")
    return 0


def cmd_copy_cfg(args) -> int:
    """Write the config with its `_base_` files merged in: one standalone file to edit."""
    from .config import load_config

    cfg = load_config(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{cfg.config_name}.py"
    if dest.exists():
        raise UserError(f"{dest} already exists; choose another destination")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        cfg.dump(str(dest))
    except OSError as error:
        raise UserError(f"cannot write {dest}: {error.strerror or error}") from None
    print(dest)
    return 0


def cmd_generate(args) -> int:
    from .generate import DEFAULT_GUIDANCE, apply_speed_levers, generate, load_pipeline, speed_levers, write_outputs

    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to {out.parent}: {error.strerror or error}") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to {out.parent}: permission denied")
    check_speed_options(args)
    pipe = load_pipeline(args.model, args.scheduler, lora=args.lora)
    levers = speed_levers(str(pipe.device), args.eager, args.compile, lora=args.lora is not None)
    if levers:  # on a GPU: fused QKV, channels-last, cuDNN attention first (see --help); --compile anywhere
        apply_speed_levers(pipe, levers)
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[args.scheduler]
    prompts = args.prompt
    with compile_errors_named("compile" in levers):
        images = generate(
            pipe, prompts, seed=args.seed, steps=args.steps, guidance_scale=guidance, negative_prompt=args.negative_prompt,
            width=args.width, height=args.height, num_images=args.num_images,
        )
    labels = [p for p in prompts for _ in range(args.num_images)]
    for path in write_outputs(images, labels, out):
        print(path)
    return 0


def generate_image_set(args, prompts, folder: Path) -> dict:
    """`eval generate`'s and `data pairs`' images: the settings recorded (a rerun with others is refused), then this
    process's share of the missing images; the pipeline loads only when one is missing. Returns the counts."""
    import torch

    from .eval.generation import generate_images, image_path, record_settings, world
    from .generate import DEFAULT_GUIDANCE, apply_speed_levers, load_pipeline, speed_levers

    rank, world_size, local_rank = world()
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[args.scheduler]
    settings = {"model": str(Path(args.model).resolve()), "lora": str(Path(args.lora).resolve()) if args.lora else None,
                "scheduler": args.scheduler, "steps": args.steps, "guidance_scale": guidance, "width": args.width,
                "height": args.height, "negative_prompt": args.negative_prompt, "seed": args.seed}
    try:
        record_settings(folder, settings, prompts, args.seed, write=rank == 0)
    except OSError as error:
        raise UserError(f"cannot write to {folder}: {error.strerror or error}") from None
    mine = prompts[rank::world_size]
    if all(image_path(folder, p).is_file() for p in mine):
        return {"asked": len(prompts), "mine": len(mine), "made": 0, "present": len(mine)}
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, args.scheduler, device=device, lora=args.lora)
    levers = speed_levers(device, args.eager, args.compile, lora=args.lora is not None)
    if levers:
        apply_speed_levers(pipe, levers)
    with compile_errors_named("compile" in levers):
        return generate_images(pipe, prompts, folder, args.seed, args.steps, guidance, args.negative_prompt, args.width,
                               args.height, rank, world_size, batch_size=args.batch_size)


@contextlib.contextmanager
def compile_errors_named(compiling: bool):
    """A failed torch.compile (no C++ compiler for inductor on this machine, say) is one line naming --compile."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    try:
        yield
    except (TorchDynamoException, InductorError) as error:
        if not compiling:
            raise
        from .data.tables import first_line

        raise UserError(f"--compile failed ({first_line(error)[:200]}); run without --compile") from None


def add_speed_options(parser, batching: bool = True) -> None:
    """--eager and --compile (and --batch-size for image sets), as `pgv25 generate` has them."""
    parser.add_argument("--eager", action="store_true",
                        help="the plain pipeline: no fused QKV, channels-last or cuDNN attention (on by default on a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet's transformer blocks: about 10 s once per image size (and batch), then "
                             "faster (pays after about 6 images at 1024² on an H200)")
    if batching:
        parser.add_argument("--batch-size", type=int, default=1,
                            help="prompts per pipeline call, each with its own seed (the same images up to rounding)")


def check_speed_options(args) -> None:
    if args.eager and args.compile:
        raise UserError("--eager and --compile exclude each other: --eager is the plain pipeline")


def check_positive(args, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def cmd_eval_generate(args) -> int:
    """Images for a prompt file (MJHQ-30K's meta_data.json, JSONL or CSV) from an export, sharded and resumable."""
    from .eval.generation import SETTINGS, world
    from .eval.prompts import read_prompts

    check_positive(args, ("steps", "width", "height", "per_category", "batch_size"))
    check_speed_options(args)
    out = Path(args.out)
    counts = generate_image_set(args, read_prompts(args.prompts, args.per_category), out)
    if world()[0] == 0:
        print(f"{counts['asked']} prompts; this process made {counts['made']} image(s), {counts['present']} were there "
              f"already; images in {out}, settings in {out / SETTINGS}")
    return 0


def cmd_eval_fid(args) -> int:
    """FID (with KID and CLIP score) of image sets against a reference, overall and per category; a report."""
    from .eval.fid import evaluate
    from .eval.report import markdown, write_report

    out = Path(args.out)
    report = evaluate(args.reference, args.images, out, args.resolution, args.inception, args.clip, not args.no_kid,
                      args.batch_size)
    try:
        paths = write_report(report, out)
    except OSError as error:
        raise UserError(f"cannot write the report to {out}: {error.strerror or error}") from None
    print(markdown(report).split("## KID")[0].rstrip())
    print(f"report: {paths['markdown']}  chart: {paths['chart']}  numbers: {paths['json']}")
    return 0


def _data_config(args):
    """The config, its tiny assets built if it uses them, and the global batch the run would have."""
    from .config import load_config, parse_cfg_options

    cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
    if cfg.get("tiny_assets"):
        from .tiny import ensure_tiny_assets

        ensure_tiny_assets(**cfg.tiny_assets)
    if cfg.get("tiny_dreambooth"):  # the tiny DreamBooth config's instance images, as training makes them
        from .tiny.dreambooth import ensure_instance_images

        ensure_instance_images(**cfg.tiny_dreambooth)
    if cfg.train_dataloader.dataset.get("streaming"):
        raise UserError(f"{args.config} streams its dataset: there is no scan to inspect or cache "
                        "(add --cfg-options train_dataloader.dataset.streaming=False to download and scan it)")
    processes = int(os.environ.get("NPROC_PER_NODE") or 1) * int(os.environ.get("NNODES") or 1)
    return cfg, int(cfg.train_dataloader.batch_size) * processes


def _planned_data(cfg, global_batch: int, config: str, cache: bool = False):
    """The dataset config and plan training will use: with prior preservation, the class images too once they are drawn."""
    from .data.dataset import plan_data
    from .data.multi import dataset_config
    from .engine.options import validation_loss_options
    from .objectives import objective_options

    data_cfg = dataset_config(cfg.train_dataloader)
    objective = objective_options(cfg)
    holdout = validation_loss_options(cfg).holdout  # training plans without the images validation.loss.split holds out
    if objective["type"] != "prior_preservation":
        return data_cfg, plan_data(data_cfg, global_batch, holdout=holdout)
    from .engine.prior_data import plan_with_class_images

    planned = plan_with_class_images(data_cfg, objective, global_batch, holdout)
    if not isinstance(planned, int):
        return planned
    where = objective["class_data_dir"]
    if cache:  # a cache of the instance images alone would never be used: training caches both kinds together
        raise UserError(f"{planned} of {objective['num_class_images']} class images are not drawn yet in {where}: "
                        f"`pgv25 train {config}` draws them, then builds the cache of instance and class images")
    print(f"prior preservation: {planned} of {objective['num_class_images']} class images are not drawn yet in {where} "
          "(training draws them first); the instance data alone:")
    return data_cfg, plan_data(data_cfg, global_batch)


def cmd_data_inspect(args) -> int:
    from .data.index import problem_lines
    from .data.inspect import plot, report

    cfg, global_batch = _data_config(args)
    _, plan = _planned_data(cfg, global_batch, args.config)
    print(report(plan))
    out = Path(args.out or Path(cfg.get("work_dir") or Path("work_dirs") / cfg.config_name) / "buckets.png")
    print(f"histogram: {plot(plan, out)}")
    if plan.index.problems:
        listing = out.with_name("excluded_rows.txt")
        listing.write_text(problem_lines(plan.index.problems))
        print(f"excluded rows: {listing}")
    return 0


def cmd_data_cache(args) -> int:
    import torch

    from .data.cache import ensure_cache
    from .files import DTYPES

    cfg, global_batch = _data_config(args)
    data_cfg, plan = _planned_data(cfg, global_batch, args.config, cache=True)
    data_cfg.setdefault("cache", {})["build"] = "auto"
    on_gpu = torch.cuda.is_available()
    model = cfg.model
    folder = ensure_cache(plan, data_cfg, model.pretrained_model_name_or_path, int(cfg.randomness.seed),
                          torch.device("cuda" if on_gpu else "cpu"),
                          DTYPES[model.get("weight_dtype", "fp32")] if on_gpu else torch.float32,
                          DTYPES[model.get("vae_dtype", "fp32")] if on_gpu else torch.float32, config_name=args.config)
    print(f"latent cache: {folder}")
    print(f"train from it with: pgv25 train {args.config} --cfg-options train_dataloader.dataset.cache.enabled=True")
    return 0


def pairs_scorer(args):
    """The scorer of `pgv25 data pairs` (None with --labels), loaded before any image is made."""
    from .data.sample_pairs import check_options, load_scorer, parse_scorer_options, python_path_for_scorers

    check_options(args.samples, args.pairs, args.margin, args.top)
    if bool(args.scorer) == bool(args.labels):
        raise UserError("give one of --scorer module:function (a reward model: function(images, prompts) -> scores) "
                        "or --labels FILE.csv (human labels: columns id, score)")
    if not args.scorer:
        return None, {}
    python_path_for_scorers()
    options = parse_scorer_options(args.scorer_option)
    return load_scorer(args.scorer, options), options


def cmd_data_pairs(args) -> int:
    """Preference pairs from a model's own samples: generate (sharded, resumable), score, pair."""
    from collections import Counter

    from .data import sample_pairs as sp
    from .eval.generation import world
    from .eval.prompts import read_prompts

    check_positive(args, ("steps", "width", "height", "batch_size"))
    check_speed_options(args)
    score, options = pairs_scorer(args)
    samples = sp.sample_prompts(read_prompts(args.prompts), args.samples)
    rank, world_size, _ = world()
    out = Path(args.out)
    images = out / sp.IMAGES
    generate_image_set(args, samples, images)
    if args.labels:
        if rank != 0:
            return 0
        labels = sp.read_labels(args.labels)
        scores = {s.id: labels.get(s.id) for s in samples}
        why, what = "no label", f"labels {Path(args.labels).resolve()}"
    else:
        folder = sp.scores_folder(out, sp.scorer_key(args.scorer, options))
        done = sp.read_scores(folder)
        reasons = Counter()
        mine = [s for s in samples[rank::world_size] if s.id not in done]
        sp.append_scores(folder, rank, sp.score_images(score, mine, images, reasons))
        if rank != 0:
            return 0
        scores = sp.wait_for({s.id for s in samples}, folder) if world_size > 1 else sp.read_scores(folder)
        why, what = "not scored (scorer failed, or no finite score)", args.scorer
    missing = sum(scores.get(s.id) is None for s in samples)
    summary = sp.build_pairs(out, samples, scores, args.pairs, args.margin, args.top, args.min_score,
                             Counter({why: missing}) if missing else Counter(), {"scorer": what, "options": options})
    print(f"{summary['pairs']} pairs from {summary['prompts']} prompts × {args.samples} samples ({summary['scored']} scored, "
          f"{missing} skipped, {summary['prompts_without_a_pair']} prompt(s) without a pair): {out / sp.PAIRS}; "
          f"top {args.top} per prompt: {out / sp.TOP}")
    return 0


def cmd_eval_shapes(args) -> int:
    from .eval.shapes import evaluate_model, format_table, write_report
    from .generate import load_pipeline

    pipe = load_pipeline(args.model, args.scheduler, lora=args.lora)
    report, results = evaluate_model(pipe, tuple(args.aspect), per_prompt=args.per_prompt, seed=args.seed, steps=args.steps,
                                     guidance_scale=args.guidance, limit=args.limit)
    out = Path(args.out or Path(args.lora or args.model) / "eval")
    write_report(report, results, out)
    print(format_table(report))
    print(f"report: {out / 'shapes_eval.json'}  worst cases: {out / 'shapes_eval_worst.png'}")
    return 0


def cmd_ckpt_verify(args) -> int:
    from .engine.integrity import report

    lines, healthy = report(Path(args.target))
    print("\n".join(lines))
    return 0 if healthy else 1


def cmd_export_single_file(args) -> int:
    from .engine.single_file import write_single_file

    folder = Path(args.step_dir)
    out = write_single_file(folder, Path(args.out), args.dtype, title=args.title or folder.name,
                            run={"source": str(folder.resolve())})
    print(f"{out} ({out.stat().st_size / 2**30:.2f} GiB)")
    return 0


def cmd_lora_info(args) -> int:
    from .models.lora_files import describe, read_lora

    print("\n".join(describe(read_lora(args.file))))
    return 0


def cmd_lora_kohya(args) -> int:
    from .models.lora_files import resolve, write_kohya

    print(write_kohya(resolve(args.file), Path(args.out)))
    return 0


def cmd_lora_merge(args) -> int:
    from .files import DTYPES
    from .models.lora_files import merge, read_lora, write_merged

    if len(args.files) < 2:
        raise UserError("merge needs at least two LoRA files")
    weights = args.weights or [1.0] * len(args.files)
    if len(weights) != len(args.files):
        raise UserError(f"--weights: {len(weights)} values for {len(args.files)} LoRA files")
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be ≥ 1, got {args.rank}")
    loras = [read_lora(f) for f in args.files]
    layers = merge(loras, weights, args.rank)
    sources = [{"file": str(lora.path), "weight": w} for lora, w in zip(loras, weights)]
    out = write_merged(layers, loras[0].layout, Path(args.out), DTYPES[args.dtype], sources)
    rank = max(layer.rank for layer in layers.values())
    how = f"truncated SVD to rank {rank}" if args.rank is not None else f"concatenated, rank {rank}"
    print(f"{out}: {len(layers)} layers, {how}, alpha = rank")
    return 0


def cmd_lora_fuse(args) -> int:
    from .engine.export import fuse_lora_pipeline

    print(fuse_lora_pipeline(args.base, args.lora, Path(args.out), args.scale, args.dtype))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgv25", description="Fine-tune Playground v2.5 with its EDM schedule; export diffusers pipelines.")
    p.add_argument("--version", action="version", version=f"pgv25 {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a config (a name under configs/ or a path)")
    t.add_argument("config", help="config name (see list-cfg) or path to a .py config")
    t.add_argument("--work-dir", help="output folder (default work_dirs/<config name>)")
    t.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=[], help="override config keys, e.g. train_cfg.max_iters=100")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from the latest checkpoint in the work dir, or from CKPT")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even though model, data, batch size, seed or process count differ from the checkpoint's")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    ls = sub.add_parser("list-cfg", help="list the available configs")
    ls.add_argument("pattern", nargs="?", help="only names containing this")
    ls.set_defaults(func=cmd_list_cfg)

    cp = sub.add_parser("copy-cfg", help="write a config, its _base_ files merged in, to a file you can edit")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.set_defaults(func=cmd_copy_cfg)

    g = sub.add_parser("generate", help="generate images from an exported pipeline folder")
    g.add_argument("--model", required=True, help="a diffusers pipeline folder, e.g. work_dirs/<cfg>/step<N>")
    g.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    g.add_argument("--lora", help="a LoRA export (work_dirs/<config>/step<N>) to apply to --model, the base pipeline")
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, help="classifier-free guidance (default 3.0 for dpmpp, 5.0 for euler)")
    g.add_argument("--scheduler", choices=["dpmpp", "euler", "native"], default="dpmpp",
                   help="EDM DPM++ 2M Karras (default), EDM Euler, or the folder's own sampler")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--out", required=True, help="output PNG (a labelled grid when several images)")
    add_speed_options(g, batching=False)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="measure a trained model automatically")
    esub = e.add_subparsers(dest="eval_command", required=True)
    es = esub.add_parser("shapes", help="shapes task: background, shape colour and shape type read back from generated images")
    es.add_argument("--model", required=True, help="a diffusers pipeline folder (an export, or the base with --lora)")
    es.add_argument("--lora", help="a LoRA export to apply to --model")
    es.add_argument("--per-prompt", type=int, default=2, help="images per prompt (seeds seed, seed+1, ...)")
    es.add_argument("--steps", type=int, default=25)
    es.add_argument("--guidance", type=float, default=3.0)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--limit", type=int, help="only the first N seen and N held-out colour/shape/background combinations")
    es.add_argument("--aspect", nargs="+", default=["1:1"], choices=["1:1", "2:1", "1:2"],
                    help="aspect ratios to generate at (2:1 is 1.5x wide, 0.75x high: the same area)")
    es.add_argument("--scheduler", default="native", choices=["native", "dpmpp", "euler"],
                    help="native: the folder's own sampler (an EDM export's is DPM++; a ddpm-schedule export's its DDPM one)")
    es.add_argument("--out", help="report folder (default MODEL/eval)")
    es.set_defaults(func=cmd_eval_shapes)
    eg = esub.add_parser("generate", help="an image per prompt of a prompt file (MJHQ-30K's meta_data.json, JSONL or CSV "
                                          "with prompt, category, id), sharded over NPROC_PER_NODE and resumable")
    eg.add_argument("--model", required=True, help="a diffusers pipeline folder (an export, or the base with --lora)")
    eg.add_argument("--lora", help="a LoRA export to apply to --model")
    eg.add_argument("--prompts", required=True, help="meta_data.json ({id: {category, prompt}}), .jsonl or .csv")
    eg.add_argument("--out", required=True, help="folder: <out>/<category>/<id>.png, generation.json, meta_data.json")
    eg.add_argument("--per-category", type=int, help="only the first N prompts of each category (a quick look)")
    eg.add_argument("--seed", type=int, default=0, help="with each prompt's id, the seed of its image")
    eg.add_argument("--steps", type=int, default=50)
    eg.add_argument("--guidance", type=float, help="default: 3.0 (5.0 with --scheduler euler), the model card's")
    eg.add_argument("--width", type=int, help="default: the model's own size (1024 for Playground v2.5)")
    eg.add_argument("--height", type=int)
    eg.add_argument("--negative-prompt")
    eg.add_argument("--scheduler", default="native", choices=["native", "dpmpp", "euler"],
                    help="native: the export's own sampler (EDM DPM++ for Playground v2.5)")
    add_speed_options(eg)
    eg.set_defaults(func=cmd_eval_generate)
    ef = esub.add_parser("fid", help="FID, KID and CLIP score of image sets against a reference set (MJHQ-30K or any "
                                     "folder), overall and per category, side by side")
    ef.add_argument("--reference", required=True,
                    help="MJHQ-30K as downloaded (meta_data.json + <category>/<id>.jpg), its parquet (image + label), "
                         "or any folder of images (categories: its subfolders)")
    ef.add_argument("--images", nargs="+", required=True, metavar="[NAME=]FOLDER",
                    help="the sets to measure, e.g. base=eval/base step800=eval/step800 (`pgv25 eval generate` folders)")
    ef.add_argument("--out", required=True, help="folder for fid.md, fid.png, fid.json and the cached features")
    ef.add_argument("--resolution", type=int, default=299,
                    help="both sets resized to this square first (shorter side, PIL bicubic, centre crop), then to the "
                         "Inception's 299² (default 299: clean-fid's resize)")
    ef.add_argument("--inception", help="the FID Inception TorchScript file (default "
                                        "$PGV25_EVAL_WEIGHTS or ~/.cache/pgv25/eval, inception-2015-12-05.pt)")
    ef.add_argument("--clip", help="a local CLIP folder (e.g. openai/clip-vit-large-patch14 downloaded): CLIP score "
                                   "of each set against the prompts of its meta_data.json")
    ef.add_argument("--no-kid", action="store_true", help="leave KID out (it is slow on tens of thousands of images)")
    ef.add_argument("--batch-size", type=int, default=32)
    ef.set_defaults(func=cmd_eval_fid)

    pl = sub.add_parser("plan", help="predict a run's peak memory per GPU, part by part, and list the levers that fit a card")
    pl.add_argument("config")
    pl.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=[])
    pl.add_argument("--gpus", type=int, default=1, help="processes (one per GPU) the run is spread over")
    pl.add_argument("--gpu-memory", type=float, nargs="+", metavar="GIB",
                    help="memory per GPU to plan for (default: this machine's GPU, else 16 24 48 80)")
    pl.add_argument("--batch", type=int, help="images per update to reach with batch × accumulation × GPUs (default: the config's)")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a CPU process's resident memory (fp32 compute, the loading peak) instead of a GPU's")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("data", help="look at or prepare a config's dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("pairs", help="preference pairs from a model's own samples: N seeded images per prompt, scored by "
                                       "a reward model or human labels, best against worst (sharded over "
                                       "NPROC_PER_NODE, resumable)")
    dp.add_argument("--model", required=True, help="a diffusers pipeline folder (an export, or the base with --lora)")
    dp.add_argument("--lora", help="a LoRA export to apply to --model")
    dp.add_argument("--prompts", required=True, help="meta_data.json ({id: {category, prompt}}), .jsonl or .csv")
    dp.add_argument("--out", required=True, help="folder: images/, scores/, pairs.jsonl, top.jsonl, summary.json")
    dp.add_argument("--samples", type=int, default=8, help="images per prompt")
    dp.add_argument("--scorer", help="module:function or path/to/file.py:function, called as function(images, prompts, "
                                     "**options) -> one number per image (higher: preferred)")
    dp.add_argument("--scorer-option", nargs="+", default=[], metavar="KEY=VALUE", help="keyword arguments of the scorer")
    dp.add_argument("--labels", help="human labels instead of a scorer: a CSV with columns id (images/meta_data.json's "
                                     "ids) and score")
    dp.add_argument("--pairs", default="best-worst", choices=["best-worst", "all"],
                    help="per prompt: the best against the worst, or every pair whose scores differ by more than --margin")
    dp.add_argument("--margin", type=float, default=0.0, help="a pair's scores must differ by more than this")
    dp.add_argument("--top", type=int, default=1, help="samples per prompt in top.jsonl (curated fine-tuning)")
    dp.add_argument("--min-score", type=float, help="top.jsonl keeps only samples scored at least this")
    dp.add_argument("--seed", type=int, default=0, help="with each sample's id, the seed of its image")
    dp.add_argument("--steps", type=int, default=25)
    dp.add_argument("--guidance", type=float, help="default: 3.0 (5.0 with --scheduler euler)")
    dp.add_argument("--width", type=int)
    dp.add_argument("--height", type=int)
    dp.add_argument("--negative-prompt")
    dp.add_argument("--scheduler", default="native", choices=["native", "dpmpp", "euler"])
    add_speed_options(dp)
    dp.set_defaults(func=cmd_data_pairs)
    di = dsub.add_parser("inspect", help="scan the dataset: usable images, excluded rows, bucket histogram (PNG)")
    di.add_argument("config")
    di.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=[])
    di.add_argument("--out", help="histogram PNG (default work_dirs/<config>/buckets.png)")
    di.set_defaults(func=cmd_data_inspect)
    dc = dsub.add_parser("cache", help="encode the dataset's latents and caption embeddings to disk (train with dataset.cache.enabled=True)")
    dc.add_argument("config")
    dc.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=[])
    dc.set_defaults(func=cmd_data_cache)

    k = sub.add_parser("ckpt", help="check checkpoints and exports")
    ksub = k.add_subparsers(dest="ckpt_command", required=True)
    kv = ksub.add_parser("verify", help="compare every file with the size and SHA-256 recorded when it was written; "
                                         "exit 1 if anything is damaged")
    kv.add_argument("target", help="a work dir (all its checkpoints and exports), a checkpoint, or an export")
    kv.set_defaults(func=cmd_ckpt_verify)

    x = sub.add_parser("export", help="convert an export for other tools")
    xsub = x.add_subparsers(dest="export_command", required=True)
    xs = xsub.add_parser("single-file", help="one .safetensors in the original SDXL layout with edm_mean/edm_std "
                                             "(ComfyUI's Load Checkpoint and A1111/Forge sample it as Playground v2.5)")
    xs.add_argument("step_dir", help="a pipeline export (work_dirs/<config>/step<N>, or any SDXL-layout diffusers folder)")
    xs.add_argument("--out", required=True, help="FILE.safetensors")
    xs.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    xs.add_argument("--title", help="modelspec.title in the file's metadata (default: the folder's name)")
    xs.set_defaults(func=cmd_export_single_file)

    lo = sub.add_parser("lora", help="inspect, convert, merge and fuse LoRA files")
    losub = lo.add_subparsers(dest="lora_command", required=True)
    li = losub.add_parser("info", help="layout, rank, alpha, targets and base architecture of a LoRA file")
    li.add_argument("file", help="a LoRA .safetensors (diffusers or kohya layout) or a LoRA export folder")
    li.set_defaults(func=cmd_lora_info)
    lk = losub.add_parser("kohya", help="write a pgv25/diffusers LoRA in the kohya layout (ComfyUI LoraLoader, A1111)")
    lk.add_argument("file")
    lk.add_argument("--out", required=True)
    lk.set_defaults(func=cmd_lora_kohya)
    lm = losub.add_parser("merge", help="several LoRAs into one: exactly (ranks concatenated) or by SVD to --rank")
    lm.add_argument("files", nargs="+", metavar="FILE")
    lm.add_argument("--weights", nargs="+", type=float, help="one factor per file (default 1 each)")
    lm.add_argument("--rank", type=int, help="truncated SVD of the summed update to this rank (default: exact concatenation)")
    lm.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    lm.add_argument("--out", required=True, help="FILE.safetensors, in the inputs' layout")
    lm.set_defaults(func=cmd_lora_merge)
    lf = losub.add_parser("fuse", help="a full pipeline folder with the LoRA folded into its weights")
    lf.add_argument("--base", required=True, help="the base pipeline folder the LoRA was trained on")
    lf.add_argument("--lora", required=True, help="a LoRA .safetensors or a LoRA export folder")
    lf.add_argument("--scale", type=float, default=1.0)
    lf.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    lf.add_argument("--out", required=True, help="a new folder")
    lf.set_defaults(func=cmd_lora_fuse)
    return p


def quiet_libraries() -> None:
    """Progress bars and INFO lines of the libraries underneath would drown our progress line.

    Cheap: the loggers are set by name, and diffusers and transformers (seconds to import) are silenced
    by `quiet_progress_bars` only in the processes that go on to use them. `bitsandbytes.backends` and
    `kernels`: diffusers imports bitsandbytes whenever it is installed (its quantizer registry), and on a CPU
    with AVX512-BF16 bitsandbytes then tries to fetch a 4-bit inference kernel from the Hub through `kernels`,
    warning twice when it cannot; pgv25 never uses that kernel (8-bit AdamW does not need it). `torch.utils._pytree`:
    diffusers imports torchao whenever it is installed (the float8 extra), and torchao's registrations draw two
    deprecation warnings from torch 2.13 there, on every command.
    """
    import warnings

    for noisy in ("diffusers", "transformers", "datasets", "accelerate", "huggingface_hub", "httpx", "mmengine",
                  "bitsandbytes.backends", "kernels", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mmengine.logging import MMLogger

    MMLogger.get_instance("mmengine").setLevel(logging.ERROR)


def ours_or_a_warning(record: logging.LogRecord) -> bool:
    """The terminal's filter: pgv25's own lines, and other libraries' warnings and errors; not their INFO chatter."""
    return record.name == "pgv25" or record.name.startswith("pgv25.") or record.levelno >= logging.WARNING


def configure_logging() -> None:
    """Progress to stdout, as `HH:MM:SS message`; stderr carries only problems, so an error is the one line there."""
    root = logging.getLogger()
    if not root.handlers:  # what logging.basicConfig does, with the filter on the terminal's handler
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(ours_or_a_warning)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    quiet_libraries()


def quiet_progress_bars() -> None:
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    configure_logging()
    try:
        sharded = ((args.command == "train" and not args.dry_run) or getattr(args, "eval_command", None) == "generate"
                   or getattr(args, "data_command", None) == "pairs")
        if sharded and os.environ.get("NPROC_PER_NODE"):
            from .launch import inside_distributed_launch, relaunch

            if not inside_distributed_launch():
                # The launcher reads the config only: it never imports diffusers (seconds every rank waits for)
                if args.command == "train":
                    check_train_args(args)  # a typo fails here in one line, not in N processes
                else:
                    from .eval.prompts import read_prompts

                    read_prompts(args.prompts)  # a missing or unreadable prompt file, too
                    if args.command == "data":
                        pairs_scorer(args)  # and a scorer that cannot be imported
                return relaunch(argv)
        quiet_progress_bars()
        code = args.func(args)
    except UserError as error:
        # One write call: the ranks of a distributed run share stderr, and print() writes the text
        # and the newline separately, which interleaves two ranks' lines into one.
        sys.stderr.write(f"pgv25: error: {error}\n")
        sys.stderr.flush()
        code = 2
    except KeyboardInterrupt:
        print("pgv25: interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End a distributed worker without interpreter teardown.

    Tearing down a gloo process group can deadlock: the main thread holds the GIL while joining a gloo
    thread that needs the GIL to free the tensors of the last collective. So the process group is never
    destroyed (it stays registered while the trainer is freed) and the process ends here. Everything the
    run writes is complete (and fsync'ed) by now, so skipping destructors loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
