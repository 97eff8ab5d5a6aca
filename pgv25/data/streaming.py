"""Hub datasets too large to download first: rows read as they stream, bucketed on arrival.

Without a scan there are no sizes up front, so each row's bucket is decided when its image
arrives: a buffer per bucket, a batch emitted when one fills (bucket frequencies are therefore
proportional to the data; balanced weighting needs the scanned, map-style path). The stream is
split over ranks × loader workers with `datasets.distributed.split_dataset_by_node`, shuffled
with a seeded buffer, and restarted with a new epoch seed when it ends, so it never runs dry.

Every batch carries its worker's position (epoch, rows read); a checkpoint stores the latest per
worker and a resume skips that many rows. Rows that sat in bucket buffers at the checkpoint are
not replayed, so a streaming resume is exact up to at most (buckets × batch size) rows per worker.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import torch

from ..errors import UserError
from .buckets import bucket_sizes, nearest_buckets
from .dataset import collate
from .captions import caption_options
from .masks import mask_options
from .rows import EMPTY_CAPTION, NO_CAPTION, parse_captions
from .tables import check_columns, open_hub_dataset
from .transforms import DEFAULT_MAX_PIXELS, BucketTransform, ImageProblem, cover_size, decode, header_size

logger = logging.getLogger("pgv25")
SHUFFLE_BUFFER = 1000  # rows; the datasets default


def check_streaming(cfg: dict, key: str = "train_dataloader.dataset") -> None:
    """Streaming needs a hub (or local) dataset and no latent cache; say so before anything loads."""
    if cfg.get("type", "hub") != "hub":
        raise UserError(f"{key}.streaming applies to type='hub' datasets; a {cfg.get('type')} is read from local files already")
    if (cfg.get("cache") or {}).get("enabled"):
        raise UserError(f"{key}.cache needs the whole dataset scanned first; set {key}.streaming=False to use it")
    if cfg.get("filters"):
        raise UserError(f"{key}.filters is applied by the scan of the whole dataset; set {key}.streaming=False to use it")
    mask_options(cfg, key)  # masks are refused in streaming mode, in one line


class StreamingBucketDataset(torch.utils.data.IterableDataset):
    """Yields collated batches (each from one bucket) forever; use with DataLoader(batch_size=None)."""

    def __init__(self, cfg: dict, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 resume: dict | None = None, key: str = "train_dataloader.dataset"):
        import datasets

        self.name, self.split = cfg["path"], cfg.get("split", "train")
        self.image_column, self.caption_column = cfg.get("image_column", "image"), cfg.get("caption_column", "text")
        stream = open_hub_dataset(self.name, self.split, key, streaming=True)
        if isinstance(stream, datasets.Dataset):  # a saved local dataset: stream it all the same
            stream = stream.to_iterable_dataset(num_shards=max(1, min(64, len(stream))))
        columns = stream.column_names or list((stream.features or {}).keys())
        if columns:
            check_columns(columns, self.image_column, self.caption_column, self.name, key)
        if isinstance((stream.features or {}).get(self.image_column), datasets.Image):
            stream = stream.cast_column(self.image_column, datasets.Image(decode=False))
        self.stream = stream
        resolution = int(cfg["resolution"])
        buckets = cfg.get("buckets") or {}
        try:
            self.sizes = bucket_sizes(resolution, buckets)
        except ValueError as error:
            raise UserError(f"{key}.buckets: {error}") from None
        self.transform = BucketTransform(cfg.get("center_crop", False), cfg.get("random_flip", True))
        self.caption_dropout = float(cfg.get("caption_dropout", 0.0))
        self.keep_uncaptioned = bool(cfg.get("keep_uncaptioned", False))
        self.captions = caption_options(cfg)
        self.max_pixels = int(cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.resume = resume or {}  # worker id → (epoch, rows read)

    def _worker_stream(self, worker: int, workers: int, epoch: int):
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(self.stream, rank=worker, world_size=workers)
        stream = stream.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        stream.set_epoch(epoch)
        return stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local, per_rank = (info.id, info.num_workers) if info else (0, 1)
        worker, workers = self.rank * per_rank + local, self.world_size * per_rank
        epoch, read = self.resume.get(str(worker), (0, 0))
        buffers = [[] for _ in self.sizes]
        problems = []
        while True:
            stream = self._worker_stream(worker, workers, epoch)
            if read:
                stream = stream.skip(read)
            for row in stream:
                read += 1
                item = self._item(row, f"{self.name}[worker {worker}, epoch {epoch}, row {read}]", epoch, worker, read)
                if "problem" in item:
                    problems.append((item["label"], item["problem"]))
                    continue
                bucket = item.pop("bucket")
                buffers[bucket].append(item)
                if len(buffers[bucket]) == self.batch_size:
                    batch = collate(buffers[bucket])
                    batch["problems"], problems, buffers[bucket] = problems + batch["problems"], [], []
                    batch["stream_position"] = (worker, epoch, read)
                    yield batch
            epoch, read = epoch + 1, 0

    def _item(self, row: dict, label: str, epoch: int, worker: int, read: int) -> dict:
        rng = random.Random(f"{self.seed}/stream/{worker}/{epoch}/{read}")
        captions = parse_captions(row.get(self.caption_column))
        if isinstance(captions, str):
            if not (self.keep_uncaptioned and captions in (NO_CAPTION, EMPTY_CAPTION)):
                return {"problem": captions, "label": label}
            captions = [""]
        value = row.get(self.image_column)
        if isinstance(value, dict):  # an undecoded datasets.Image: bytes, or a path
            label = value.get("path") or label
            value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        if not value:
            return {"problem": "missing image", "label": label}
        original = header_size(value, self.max_pixels)
        if isinstance(original, str):
            return {"problem": original, "label": label}
        if hasattr(value, "seek"):
            value.seek(0)
        bucket = int(nearest_buckets(np.array([original[0]]), np.array([original[1]]), self.sizes)[0])
        target = self.sizes[bucket]
        try:
            image = decode(value, self.max_pixels, cover_size(*original, target))
            pixels, time_ids = self.transform(image, target, rng, original)
        except ImageProblem as problem:
            return {"problem": str(problem), "label": label}
        return {"pixels": pixels, "time_ids": time_ids, "caption": self.captions(self.captions.fixed(rng.choice(captions)), rng),
                "drop_caption": rng.random() < self.caption_dropout, "bucket": bucket}
