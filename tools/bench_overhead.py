"""pgv25's per-iteration overhead against a minimal reference loop, on the tiny config (CPU or GPU).

    python tools/bench_overhead.py --iters 40 --rounds 3

Both sides do the same work per iteration from the same tiny base pipeline and the same image
folder, batch 16 at 64²: read and augment the images, encode them with the VAE and the captions
with both text encoders, one EDM training step of the UNet (Karras-index σ, x0 target, no loss
weight, gradient clipping at 1.0), AdamW.
- pgv25: `Trainer.step()` of `pgv25 train playgroundv2_5_tiny_shapes` (its loader, sampler, caption
  dropout, micro-conditioning, σ-binned loss, non-finite guard), after construction, with the config
  set to the reference's work (SAME_WORK): the tiny config's latent cache off — the reference has
  none, and a side that reads cached latents measures the cache, not the overhead — and the
  reference's σ draw and loss. The tool checks that pgv25 really encodes every step.
- reference: tools/reference_edm.py, the stand-alone loop of diffusers' documented EDM procedure (a
  torch Dataset with PIL resize + centre crop + flip, `pipe.encode_prompt`, `vae.encode(...)` with
  Playground's latent normalisation, EDMEulerScheduler preconditioning, AdamW, clipping, lr schedule).
Rounds alternate; the overhead is reference images/s ÷ pgv25 images/s − 1 (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_edm import ReferenceTrainer  # noqa: E402

from pgv25.config import load_config, parse_cfg_options  # noqa: E402
from pgv25.models.loading import resolve_pretrained  # noqa: E402

# What the reference loop does, set on pgv25's side so that both measure the same work.
SAME_WORK = {
    "train_dataloader.dataset.cache.enabled": "False",  # encode images and captions every step, as the reference does
    "model.sigma_sampler.type": "karras_index",  # σ uniform over the 1000-step Karras grid
    "model.loss_weighting": "none",
    "optim_wrapper.clip_grad.max_norm": "1.0",
}


def rate(step, iters: int) -> float:
    step()  # warm-up
    images, start = 0, time.perf_counter()
    for _ in range(iters):
        images += step()
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work-dir", default="work_dirs/bench_overhead")
    parser.add_argument("--cfg-options", nargs="+", default=[])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from pgv25.engine.runner import Trainer

    changed = [o.split("=", 1)[0] for o in args.cfg_options if o.split("=", 1)[0] in SAME_WORK]
    if changed:
        parser.error(f"--cfg-options may not change {', '.join(changed)}: the reference loop's work is fixed")
    cfg = load_config("playgroundv2_5_tiny_shapes", parse_cfg_options([
        f"train_dataloader.batch_size={args.batch}", "validation.interval=0", "default_hooks.logger.interval=100000",
        *args.cfg_options, *(f"{k}={v}" for k, v in SAME_WORK.items())]))
    cfg.work_dir = args.work_dir
    trainer = Trainer(cfg)  # builds the tiny assets if needed
    if trainer.codec is None or trainer.conditioner is None:
        raise SystemExit("bench_overhead: pgv25 would train from cached latents; both sides must encode every step")

    def pgv25_step() -> int:
        return trainer.step().images

    # the config's paths may start with ~ (the default cache); the reference takes them as plain paths
    model, data = resolve_pretrained(cfg.model.pretrained_model_name_or_path), Path(cfg.train_dataloader.dataset.path).expanduser()
    reference = ReferenceTrainer(model, data, args.batch,
                                 float(cfg.optim_wrapper.optimizer.lr), max_iters=trainer.max_iters, device=str(trainer.device)).step
    rates = {"pgv25": [], "reference": []}
    for _ in range(args.rounds):
        rates["pgv25"].append(rate(pgv25_step, args.iters))
        rates["reference"].append(rate(reference, args.iters))
        print(f"pgv25 {rates['pgv25'][-1]:.1f} images/s   reference {rates['reference'][-1]:.1f} images/s", flush=True)
    ours, ref = statistics.median(rates["pgv25"]), statistics.median(rates["reference"])
    result = {"pgv25_images_per_s": ours, "reference_images_per_s": ref, "overhead": ref / ours - 1, "rounds": rates,
              "threads": torch.get_num_threads(), "batch": args.batch, "iters": args.iters, "same_work": SAME_WORK}
    print(f"overhead of pgv25 vs the reference loop: {result['overhead']:+.1%} (medians of {args.rounds} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
