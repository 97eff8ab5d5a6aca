"""Prior preservation's data: the class images drawn (once) by the base pipeline, then added to the instance
dataset as a companion part, so every batch pairs instance images with class images of its bucket."""

from __future__ import annotations

import logging

import torch

from ..data.class_images import ClassImages, assign_sizes, generate_class_images, missing_indices, present
from ..data.dataset import DataPlan, plan_data
from ..data.multi import SHARED
from ..errors import UserError
from ..models.loading import resolve_pretrained
from . import distributed

logger = logging.getLogger("pgv25")


def class_images_options(objective: dict) -> ClassImages:
    generation = objective["class_generation"]
    return ClassImages(objective["class_prompt"], objective["class_data_dir"], objective["num_class_images"],
                       generation["negative_prompt"], int(generation["steps"]), float(generation["guidance_scale"]),
                       int(generation["batch_size"]), int(generation["seed"]))


def with_class_part(data_cfg: dict, options: ClassImages) -> dict:
    """The dataset config with the class images as one more part: captioned with the class prompt, none of the
    instance data's caption handling or filters, drawn only beside the instance batches."""
    parts = list(data_cfg.get("parts") or [{k: v for k, v in data_cfg.items() if k not in SHARED}])
    shared = {k: v for k, v in data_cfg.items() if k in SHARED}
    class_part = {"type": "folder", "path": str(options.folder), "caption": options.prompt, "captions": {}, "filters": {},
                  "mask": {}, "keep_uncaptioned": False, "name": f"class images ({options.prompt})", "companion": True}
    return {**shared, "parts": [*parts, class_part]}


def add_class_images(data_cfg: dict, plan: DataPlan, objective: dict, runtime, model_name: str, global_batch: int,
                     holdout: float = 0.0):
    """Draw the missing class images (split over the processes), then plan instance + class images as one (without the
    instance images `holdout` keeps for the validation loss: plan.held_out)."""
    options = class_images_options(objective)
    sizes = assign_sizes(options.count, plan.histogram())
    todo = distributed.broadcast_object(missing_indices(options) if runtime.rank == 0 else None)  # one list for all ranks
    if todo:
        device = runtime.device

        def load_pipe():
            from ..generate import load_pipeline

            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on a GPU: the SDXL VAE overflows fp16
            return load_pipeline(resolve_pretrained(model_name), "native", device=str(device), dtype=dtype)

        generate_class_images(options, sizes, load_pipe, todo, runtime.rank, runtime.world_size)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elif runtime.rank == 0:
        logger.info("class images: %d in %s, none to generate", len(present(options.folder)), options.folder)
    runtime.accelerator.wait_for_everyone()
    if len(present(options.folder)) < options.count:
        raise UserError(f"{options.folder} holds {len(present(options.folder))} class images, fewer than num_class_images="
                        f"{options.count}: a process could not write them")
    combined = with_class_part(data_cfg, options)
    with runtime.accelerator.local_main_process_first():
        plan = plan_data(combined, global_batch, holdout=holdout)
    logger.info("prior preservation: %d instance and %d class images (%s), each batch half and half, class loss × %g",
                int((~plan.companion).sum()), int(plan.companion.sum()), options.folder, objective["prior_loss_weight"])
    return combined, plan


def class_images_plan(data_cfg: dict, objective: dict) -> DataPlan:
    """The class images alone, over the shared settings: what the validation loss's class curve measures."""
    combined = with_class_part(data_cfg, class_images_options(objective))
    part = {k: v for k, v in combined["parts"][-1].items() if k not in ("name", "companion")}
    return plan_data({**{k: v for k, v in combined.items() if k in SHARED}, **part}, 1, "objective.class_data_dir")


def plan_with_class_images(data_cfg: dict, objective: dict, global_batch: int, holdout: float = 0.0) -> tuple[dict, DataPlan] | int:
    """For `pgv25 data inspect` and `data cache`: the instance + class plan training will use (the same cache key), when
    every class image is drawn; else how many are still missing (training draws them first)."""
    options = class_images_options(objective)
    missing = options.count - len(present(options.folder))
    if missing > 0:
        return missing
    combined = with_class_part(data_cfg, options)
    return combined, plan_data(combined, global_batch, holdout=holdout)
