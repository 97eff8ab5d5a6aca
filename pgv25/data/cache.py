"""VAE latents and text embeddings on disk, so training runs the UNet alone.

Layout of `<cache_dir>/latents/<key>/` (safetensors, read lazily with `safe_open`):
  latents-r<rank>-<n>.safetensors  "<position>": [F, C, h, w] (F = 2 with random_flip: plain and
                                   mirrored, each encoded from its own pixels; a latent flip is not
                                   exact), "<position>.time_ids": [F, 6]; for preference pairs
                                   [F, 2, C, h, w] and [F, 2, 6]: winner and loser, one crop, one flip;
                                   with masked loss "<position>.loss_weights": [F, 1, h, w] (data/masks.py)
  text-r<rank>-<n>.safetensors     "<caption id>.embeds": [77, D], "<caption id>.pooled": [D]
  index.npz                        per usable position: latent file id (-1: unreadable image), caption ids
  meta.json                        the inputs of `key` and the file list; written last, it marks the cache complete

`key` is a digest of everything the stored tensors depend on: the scanned data, the buckets, crop
and flip settings, the VAE/text-encoder files and the storage dtype. A changed config therefore
gets a new cache instead of silently reusing a stale one. Random crops are drawn once per image
(seeded) when the cache is built: the one augmentation a latent cache cannot keep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.integrity import share_permissions
from ..errors import UserError
from .multi import ConcatRows
from .dataset import DataPlan, companion_flag
from .masks import masked_sample
from .transforms import DEFAULT_MAX_PIXELS, BucketTransform, ImageProblem, cover_size, decode

logger = logging.getLogger("pgv25")
VERSION = 1
SHARD = 512  # samples per file
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cache_key(plan: DataPlan, data_cfg: dict, encoders_identity: str, force_zeros: bool, seed: int) -> tuple[str, dict]:
    inputs = {
        "version": VERSION,
        "rows": plan.rows.fingerprint,
        "usable": hashlib.sha1(plan.index.rows.tobytes()).hexdigest(),
        "buckets": [list(s) for s in plan.sizes],
        "assignment": hashlib.sha1(np.ascontiguousarray(plan.bucket_of).tobytes()).hexdigest(),
        "center_crop": bool(data_cfg.get("center_crop", False)),
        "random_flip": bool(data_cfg.get("random_flip", True)),
        "max_image_pixels": int(data_cfg.get("max_image_pixels", 0) or 0),
        "encoders": encoders_identity,
        "force_zeros_for_empty_prompt": force_zeros,
        "dtype": cache_options(data_cfg)["dtype"],
        "seed": None if data_cfg.get("center_crop", False) else seed,  # of the random crops drawn once
    }
    if isinstance(plan.rows, ConcatRows):  # several datasets: each one's template
        inputs["caption_templates"] = [options.template for options in plan.rows.options]
    else:
        template = plan.captions.template
        if template != "{caption}":  # only then: caches built before caption templates existed keep their key
            inputs["caption_template"] = template
    return hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20], inputs


def cache_options(data_cfg: dict) -> dict:
    options = {"enabled": False, "build": "auto", "dtype": "fp16", "batch_size": 16, **(data_cfg.get("cache") or {})}
    if options["dtype"] not in DTYPES:
        raise UserError(f"train_dataloader.dataset.cache.dtype must be one of {', '.join(DTYPES)}, got '{options['dtype']}'")
    if options["build"] not in ("auto", "never"):
        raise UserError(f"train_dataloader.dataset.cache.build must be 'auto' or 'never', got '{options['build']}'")
    return options


def cache_folder(data_cfg: dict, key: str) -> Path:
    root = data_cfg.get("cache_dir")
    if not root:
        raise UserError("train_dataloader.dataset.cache_dir must be set to use the latent cache")
    return Path(root).expanduser() / "latents" / key


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


class _ShardWriter:
    """Tensors into numbered safetensors files of about SHARD samples each."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.files, self.pending, self.count = folder, prefix, [], {}, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> int:
        """Store; returns the index (in `files`) of the file they will be in."""
        self.pending.update({k: v.contiguous() for k, v in tensors.items()})
        self.count += 1
        file_id = len(self.files)
        if self.count >= SHARD:
            self.flush()
        return file_id

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            name = f"{self.prefix}-{len(self.files):05d}.safetensors"
            save_file(self.pending, str(self.folder / name))
            self.files.append(name)
            self.pending, self.count = {}, 0


def build_cache(plan: DataPlan, data_cfg: dict, folder: Path, codec, conditioner, seed: int, device,
                rank: int = 0, world_size: int = 1, barrier=lambda: None) -> None:
    """Encode this rank's share of images and captions into `folder`; rank 0 then writes the index and meta.json."""
    options = cache_options(data_cfg)
    dtype = DTYPES[options["dtype"]]
    work = folder.with_name(folder.name + ".building")
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # a build killed midway starts again
        work.mkdir(parents=True)
    barrier()
    start = time.time()
    transform = BucketTransform(bool(data_cfg.get("center_crop", False)), random_flip=False)
    flips = (False, True) if data_cfg.get("random_flip", True) else (False,)
    max_pixels = int(data_cfg.get("max_image_pixels") or DEFAULT_MAX_PIXELS)
    captions, caption_ids = _caption_table(plan, conditioner.force_zeros_for_empty_prompt)

    latents = _ShardWriter(work, f"latents-r{rank}")
    positions = np.arange(rank, len(plan.index), world_size)
    file_of, problems = {}, []
    encode = SliceEncoder(codec, device)  # one for the build: a slice halved for want of memory stays halved
    for bucket in range(len(plan.sizes)):  # one bucket at a time: a batch shares one shape
        mine = positions[plan.bucket_of[positions] == bucket]
        for chunk in np.array_split(mine, max(1, -(-len(mine) // options["batch_size"]))):
            pixels, time_ids, weights, kept = [], [], [], []
            for position in chunk.tolist():
                try:
                    sample = _encode_inputs(plan, position, plan.sizes[bucket], transform, flips, max_pixels, seed)
                except ImageProblem as problem:
                    problems.append((plan.rows.label(int(plan.index.rows[position])), str(problem)))
                    continue
                pixels += sample[0]
                time_ids += sample[1]
                weights += sample[2]
                kept.append(position)
            if not kept:
                continue
            per_sample = (len(flips), 2) if plan.rows.pairs else (len(flips),)
            encoded = encode(torch.stack(pixels)).to(dtype)
            stacked_weights = None
            if weights:  # averaged over each latent pixel's patch: what the loss weighs the latent with
                stacked_weights = F.interpolate(torch.stack(weights).float(), size=encoded.shape[-2:], mode="area")
                stacked_weights = stacked_weights.to(torch.float16).view(len(kept), len(flips), 1, *encoded.shape[-2:])
            encoded = encoded.view(len(kept), *per_sample, *encoded.shape[1:])
            stacked_ids = torch.stack(time_ids).view(len(kept), *per_sample, 6)
            for i, position in enumerate(kept):
                tensors = {str(position): encoded[i], f"{position}.time_ids": stacked_ids[i]}
                if stacked_weights is not None:
                    tensors[f"{position}.loss_weights"] = stacked_weights[i]
                file_of[position] = latents.add(tensors)
    latents.flush()

    text = _ShardWriter(work, f"text-r{rank}")
    text_file = {}
    mine = list(range(rank, len(captions), world_size))
    for first in range(0, len(mine), 64):
        ids = mine[first : first + 64]
        embeds, pooled = conditioner.encode([captions[i] for i in ids])
        for i, caption_id in enumerate(ids):
            text_file[caption_id] = text.add({f"{caption_id}.embeds": embeds[i].to(dtype).cpu(),
                                              f"{caption_id}.pooled": pooled[i].to(dtype).cpu()})
    text.flush()
    part = {"latent_files": latents.files, "latent_of": file_of, "text_files": text.files, "text_of": text_file, "problems": problems}
    torch.save(part, work / f"part-r{rank}.pt")
    barrier()
    if rank == 0:
        _finish(work, folder, world_size, len(plan.index), captions, caption_ids, flips, options["dtype"], conditioner.force_zeros_for_empty_prompt)
        logger.info("latent cache of %d %s and %d captions written in %.0f s: %s", len(plan.index),
                    "pairs" if plan.rows.pairs else "images", len(captions),
                    time.time() - start, folder)
    barrier()


def _encode_inputs(plan: DataPlan, position: int, target: tuple[int, int], transform, flips, max_pixels: int, seed: int):
    """Pixels, time_ids and (masked datasets) loss weights of one position, per flip: lists of tensors to encode."""
    row = int(plan.index.rows[position])
    images = [(decode(plan.rows.open(row, loser), max_pixels, cover_size(*original, target)), original)
              for loser, original in _originals(plan, position)]
    draw = random.Random(f"{seed}/cache/{position}")
    crop = (draw.random(), draw.random()) if plan.rows.pairs else None  # one relative crop for a pair
    pixels, time_ids, weights = [], [], []
    for flip in flips:  # same crop (same seeded draw), mirrored or not
        for image, original in images:
            rng = random.Random(f"{seed}/cache/{position}")
            if plan.rows.masked:
                p, t, w = masked_sample(transform, plan.rows, row, image, target, rng, original, max_pixels, flip=flip)
                weights.append(w)
            else:
                p, t = transform(image, target, rng, original, flip=flip, crop=crop)
            pixels.append(p)
            time_ids.append(t)
    return pixels, time_ids, weights


def _originals(plan: DataPlan, position: int) -> list[tuple[bool, tuple[int, int]]]:
    """(is the loser, original (w, h)) of each image of a sample: one, or a pair's two."""
    index = plan.index
    images = [(False, (int(index.widths[position]), int(index.heights[position])))]
    if plan.rows.pairs:
        images.append((True, (int(index.widths_2[position]), int(index.heights_2[position]))))
    return images


def _caption_table(plan: DataPlan, force_zeros: bool) -> tuple[list[str], list[list[int]]]:
    """Unique captions (with "" first when the unconditional input is its encoding) and each position's caption ids."""
    captions = [] if force_zeros else [""]
    ids_of = {c: i for i, c in enumerate(captions)}
    caption_ids = []
    for row in plan.index.rows.tolist():
        ids = []
        for caption in plan.rows.captions[row]:
            if caption not in ids_of:
                ids_of[caption] = len(captions)
                captions.append(caption)
            ids.append(ids_of[caption])
        caption_ids.append(ids)
    return captions, caption_ids


def _finish(work: Path, folder: Path, world_size: int, positions: int, captions, caption_ids, flips, dtype: str, force_zeros: bool) -> None:
    files, latent_file = [], np.full(positions, -1, np.int64)
    text_files, text_file = [], np.full(len(captions), -1, np.int64)
    problems = []
    for rank in range(world_size):
        part = torch.load(work / f"part-r{rank}.pt", weights_only=True)
        for position, local in part["latent_of"].items():
            latent_file[position] = len(files) + local
        for caption_id, local in part["text_of"].items():
            text_file[caption_id] = len(text_files) + local
        files += part["latent_files"]
        text_files += part["text_files"]
        problems += [tuple(p) for p in part["problems"]]
        (work / f"part-r{rank}.pt").unlink()
    lengths = np.array([len(ids) for ids in caption_ids], np.int64)
    np.savez(work / "index.npz", latent_file=latent_file, text_file=text_file,
             caption_ids=np.concatenate([np.array(ids, np.int64) for ids in caption_ids]), caption_offsets=np.concatenate([[0], np.cumsum(lengths)]))
    meta = {"latent_files": files, "text_files": text_files, "flips": len(flips), "dtype": dtype, "captions": len(captions),
            "force_zeros_for_empty_prompt": force_zeros, "unreadable": problems}
    (work / "meta.json").write_text(json.dumps(meta))
    share_permissions(work)  # safetensors writes owner-only files; the cache is shared like any other
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)


class CachedLatentDataset(torch.utils.data.Dataset):
    """Item (step, slot, position) → a cached latent (plain or mirrored), time_ids and caption embeddings."""

    def __init__(self, folder: Path, plan: DataPlan, caption_dropout: float = 0.0, seed: int = 0):
        self.folder, self.plan, self.caption_dropout, self.seed = folder, plan, caption_dropout, seed
        self.meta = json.loads((folder / "meta.json").read_text())
        index = np.load(folder / "index.npz")
        self.latent_file, self.text_file = index["latent_file"], index["text_file"]
        self.caption_ids, self.caption_offsets = index["caption_ids"], index["caption_offsets"]
        self._handles = {}  # opened lazily in each loader worker

    def __len__(self) -> int:
        return len(self.latent_file)

    def _file(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open

            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        step, slot, position = key
        rng = random.Random(f"{self.seed}/{step}/{slot}")
        file_id = int(self.latent_file[position])
        if file_id < 0:  # the reason the build gave (a truncated image, a bad mask)
            label = self.plan.rows.label(int(self.plan.index.rows[position]))
            reasons = dict(map(tuple, self.meta.get("unreadable", [])))
            return {"problem": reasons.get(label, "truncated or corrupt image"), "label": label}
        latents = self._file(self.meta["latent_files"][file_id])
        variant = rng.randrange(self.meta["flips"])
        ids = self.caption_ids[self.caption_offsets[position] : self.caption_offsets[position + 1]]
        caption_id = int(ids[rng.randrange(len(ids))])
        drop = rng.random() < self.caption_dropout
        if drop and not self.meta["force_zeros_for_empty_prompt"]:
            caption_id = 0  # the encoding of ""
        text = self._file(self.meta["text_files"][int(self.text_file[caption_id])])
        embeds, pooled = text.get_tensor(f"{caption_id}.embeds"), text.get_tensor(f"{caption_id}.pooled")
        if drop and self.meta["force_zeros_for_empty_prompt"]:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        masked = {"loss_weights": latents.get_tensor(f"{position}.loss_weights")[variant]} if self.plan.rows.masked else {}
        return {"latents": latents.get_tensor(str(position))[variant], "time_ids": latents.get_tensor(f"{position}.time_ids")[variant],
                "prompt_embeds": embeds, "pooled": pooled, **companion_flag(self.plan, position), **masked}


# Pixels per VAE call while building: `batch_size` images at 1024², both flips, in one fp32 call held 82 GiB on an
# H200 (more than an 80 GB H100 has); 4 Mpx (four 1024² images) keep the activations near 10 GiB.
ENCODE_PIXELS_PER_CALL = 4 * 1024 * 1024


class SliceEncoder:
    """Posterior means of stacks of same-size images, at most `pixels_per_call` pixels per VAE call (each image is
    encoded on its own: the slices change nothing but peak memory).

    A GPU that runs out of memory in a call (a 12 GB card: 4 Mpx take about 10 GiB in fp32) gets the slice halved and
    the call made again, down to one image per call, and keeps the smaller slice for the rest of the build: the
    build goes on, a little slower, instead of failing halfway. One image that does not fit is one line."""

    def __init__(self, codec, device, pixels_per_call: int = ENCODE_PIXELS_PER_CALL):
        self.codec, self.device, self.pixels_per_call = codec, device, pixels_per_call

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        per_call = max(1, self.pixels_per_call // (width * height))
        encoded, start = [], 0
        while start < len(pixels):
            part = pixels[start : start + per_call]
            try:
                encoded.append(self.codec.encode_mean(part.to(self.device)).cpu())
                start += len(part)
                continue
            except torch.OutOfMemoryError:
                pass  # out of the handler first: its traceback holds the failed call's activations
            if len(part) == 1:
                raise UserError(f"the VAE cannot encode one {width}×{height} image in the memory free on {self.device}: "
                                "build the latent cache on a larger GPU (pgv25 data cache CONFIG), or lower "
                                "train_dataloader.dataset.resolution") from None
            per_call = max(1, len(part) // 2)
            self.pixels_per_call = per_call * width * height
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("the VAE ran out of memory on %s encoding %d images of %d×%d at once; going on with %d per call",
                           self.device, len(part), width, height, per_call)
        return torch.cat(encoded)


def ensure_cache(plan: DataPlan, data_cfg: dict, model_name: str, seed: int, device, encoder_dtype=torch.float32,
                 vae_dtype=torch.float32, rank: int = 0, world_size: int = 1, barrier=lambda: None,
                 decide=lambda value: value, config_name: str = "CFG") -> Path:
    """The complete cache folder for this config, built first (by all ranks) when missing and `build='auto'`.

    `decide` broadcasts rank 0's view of whether the cache exists, so all ranks agree to build.
    """
    from ..models.loading import component_identity, resolve_pretrained

    options = cache_options(data_cfg)
    pipeline = resolve_pretrained(model_name)
    index = json.loads((pipeline / "model_index.json").read_text())
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    key, _ = cache_key(plan, data_cfg, component_identity(pipeline), force_zeros, seed)
    folder = cache_folder(data_cfg, key)
    if decide(is_complete(folder)):
        logger.info("training from the latent cache %s (VAE and text encoders not loaded)", folder)
        return folder
    if options["build"] == "never":
        raise UserError(f"no latent cache for this config and data in {folder.parent}; build it with: pgv25 data cache {config_name}")
    from ..engine.locks import building

    # Rank 0 holds the build lock: another run building the same cache finishes first, and is then used.
    with building(folder, "the latent cache") if rank == 0 else contextlib.nullcontext():
        if decide(is_complete(folder)):
            logger.info("training from the latent cache %s, built by another run", folder)
            return folder
        _build_new(plan, data_cfg, folder, pipeline, seed, device, encoder_dtype, vae_dtype, rank, world_size, barrier)
    return folder


def _build_new(plan, data_cfg, folder, pipeline, seed, device, encoder_dtype, vae_dtype, rank, world_size, barrier):
    from ..models.latent_codec import LatentCodec
    from ..models.loading import load_components
    from ..models.text_conditioner import TextConditioner

    logger.info("building the latent cache (%d images, %d process(es)) in %s", len(plan.index), world_size, folder)
    parts = load_components(str(pipeline), encoder_dtype, encoders=True, unet=False)
    conditioner = TextConditioner([parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2],
                                  parts.force_zeros_for_empty_prompt).to(device)
    codec = LatentCodec(parts.vae.to(device, vae_dtype)).to(device)
    build_cache(plan, data_cfg, folder, codec, conditioner, seed, device, rank, world_size, barrier)
    del parts, conditioner, codec  # the device memory goes to the UNet
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
