"""FID, KID and CLIP score of image sets, overall and per category, from torchmetrics.

The Fréchet and kernel distances are torchmetrics' own (`FrechetInceptionDistance`, `KernelInceptionDistance`); the
features are the standard FID Inception's 2,048 pool features, from NVIDIA's TorchScript port of TensorFlow's
`inception-2015-12-05` graph, the network clean-fid, StyleGAN and EDM measure with (torch-fidelity's default is a
port of the same graph). It loads with `torch.jit.load` alone: torch-fidelity, clean-fid and pytorch-fid all import
torchvision, whose PyPI wheel for torch 2.13 is a CUDA build that cannot load beside torch's CPU wheel.

Features are extracted once per image and kept in `<out>/features/`, keyed by the set's files, the resolution and
the network's bytes, so the reference set's (MJHQ-30K: 30,000 images) are computed once for every model compared.
CLIP score is torchmetrics' `CLIPScore` with a local CLIP folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.tables import first_line
from ..errors import UserError
from ..files import atomic_file
from .image_sets import ImageSet, decode
from .prompts import UNSAFE

logger = logging.getLogger("pgv25")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
MIN_IMAGES = 2  # a covariance needs two samples per set; below the feature count (2,048) FID is biased high: read KID
KID_SUBSET = 1000  # torchmetrics' default subset size; half the smaller set below 2,000 images (see kid_subset)
OVERALL = "overall"
NO_CATEGORY = ""  # the stored category of an image that has none (numpy drops a trailing NUL)


def weights_folder() -> Path:
    """Where evaluation weights are looked for: $PGV25_EVAL_WEIGHTS, else ~/.cache/pgv25/eval."""
    return Path(os.environ.get("PGV25_EVAL_WEIGHTS") or Path.home() / ".cache" / "pgv25" / "eval").expanduser()


class Precomputed(nn.Module):
    """torchmetrics' custom feature extractor for features already extracted: they pass through unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class InceptionFeatures(nn.Module):
    """The FID Inception as a function of uint8 images [N, 3, H, W]: its 2,048 pool features (resized to 299² inside,
    with TensorFlow's bilinear filter, as the original FID code does)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as error:
            raise UserError(f"{path} cannot be read as the TorchScript FID Inception ({first_line(error)[:160]}); "
                            f"fetch it again: curl -L --create-dirs -o {path} {INCEPTION_URL}") from None
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float(), return_features=True).double()


def load_inception(path: str | None = None) -> InceptionFeatures:
    path = Path(path).expanduser() if path else weights_folder() / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"the FID Inception weights are not at {path}: on a machine with network run "
                        f"`curl -L --create-dirs -o {INCEPTION_FILE} {INCEPTION_URL}`, copy the file to {path} "
                        "(or set PGV25_EVAL_WEIGHTS to its folder, or pass --inception FILE)")
    return InceptionFeatures(path)


def load_clip(folder: str):
    """(model, processor) from a local CLIP folder, for torchmetrics' CLIPScore."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"no CLIP model at {path} (a folder with config.json, weights and processor files); on a machine "
                        f"with network: huggingface-cli download openai/clip-vit-large-patch14 --local-dir {path}")
    from transformers import CLIPModel, CLIPProcessor

    try:
        return ProjectedCLIP(CLIPModel.from_pretrained(str(path)).eval()), CLIPProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load CLIP from {path}: {first_line(error)[:200]}") from None


class ProjectedCLIP(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors, as
    torchmetrics 1.9's CLIPScore expects: since transformers 5 they return an output object holding them as
    `pooler_output` (Lightning-AI/torchmetrics#3407)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class SetFeatures:
    """An image set's features (one row per image), with ids and categories; images that fail to decode left out."""

    def __init__(self, ids: list[str], categories: list[str | None], features: np.ndarray):
        self.ids, self.categories, self.features = ids, categories, features

    def rows(self, category: str | None = OVERALL) -> torch.Tensor:
        if category == OVERALL:
            return torch.from_numpy(self.features)
        keep = [i for i, c in enumerate(self.categories) if c == category]
        return torch.from_numpy(self.features[keep])


def extract(image_set: ImageSet, network: InceptionFeatures, resolution: int, cache: Path | None,
            batch_size: int = 32, device: str = "cpu") -> SetFeatures:
    """The set's features, from the cache when its files, the resolution and the network are unchanged."""
    key = hashlib.sha256(f"{image_set.fingerprint}/{resolution}/{network.sha256}".encode()).hexdigest()[:16]
    cached = cache / f"{UNSAFE.sub('_', image_set.name)[:60]}-{key}.npz" if cache else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as stored:
            categories = [None if c == NO_CATEGORY else str(c) for c in stored["categories"]]
            return SetFeatures([str(i) for i in stored["ids"]], categories, stored["features"])
    network.to(device)
    ids, categories, chunks = [], [], []
    for images, pixels in decoded_batches(image_set, resolution, batch_size, "features"):
        ids += [image.id for image in images]
        categories += [image.category for image in images]
        chunks.append(network(pixels.to(device)).cpu().numpy())
    features = SetFeatures(ids, categories, np.concatenate(chunks))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cached) as tmp, open(tmp, "wb") as file:
            np.savez(file, ids=np.array(ids), features=features.features,
                     categories=np.array([NO_CATEGORY if c is None else c for c in categories]))
    return features


def decoded_batches(image_set: ImageSet, resolution: int, batch_size: int, what: str):
    """(images, uint8 pixels [B, 3, R, R]) batches of the set; an image that cannot be decoded is a counted skip,
    named (the first three) in one log line at the end."""
    from tqdm import tqdm

    unreadable, batch = [], []
    for image in tqdm(image_set.images, unit="img", desc=f"{what} of {image_set.name}", leave=False):
        try:
            batch.append((image, decode(image, resolution)))
        except Exception as error:  # noqa: BLE001 — PIL raises many kinds on a damaged file; each is one counted skip
            unreadable.append(f"{image.id} ({type(error).__name__})")
            continue
        if len(batch) == batch_size:
            yield [image for image, _ in batch], torch.stack([pixels for _, pixels in batch])
            batch = []
    if batch:
        yield [image for image, _ in batch], torch.stack([pixels for _, pixels in batch])
    if unreadable:
        logger.warning("image set %s: %d image(s) that cannot be decoded left out: %s%s", image_set.name, len(unreadable),
                       ", ".join(unreadable[:3]), " ..." if len(unreadable) > 3 else "")
    if len(unreadable) == len(image_set.images):
        raise UserError(f"image set {image_set.name}: none of its {len(image_set.images)} images can be decoded")


def clip_scores(image_set: ImageSet, clip, batch_size: int = 32, device: str = "cpu") -> dict:
    """torchmetrics' CLIP score of each image against its prompt, per category and overall: {category: score}.
    Images without a prompt are left out (counted)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    with_prompt = ImageSet(image_set.name, image_set.source, [i for i in image_set.images if i.prompt])
    if len(with_prompt.images) < len(image_set.images):
        logger.warning("image set %s: %d image(s) without a prompt left out of the CLIP score", image_set.name,
                       len(image_set.images) - len(with_prompt.images))
    if not with_prompt.images:
        return {}
    metrics = {}
    size = processor.image_processor.crop_size.get("height", 224)
    for images, pixels in decoded_batches(with_prompt, size, batch_size, "CLIP score"):
        for category in dict.fromkeys(image.category for image in images):
            pick = [i for i, image in enumerate(images) if image.category == category]
            if category not in metrics:
                metrics[category] = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
            metrics[category].update(pixels[pick].to(device), [images[i].prompt for i in pick])
    scores = {category: float(metric.compute()) for category, metric in metrics.items() if category is not None}
    # Overall from the per-category sums, as one metric over every image would have it (no second CLIP pass).
    total = sum(float(metric.score) for metric in metrics.values())
    scores[OVERALL] = max(total / sum(int(metric.n_samples) for metric in metrics.values()), 0.0)
    return scores


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_subset(real: int, fake: int) -> int:
    """KID's subset size: 1,000 (torchmetrics' default) from 2,000 images on; below, half the smaller set. A subset
    of a whole set is the same subset every time: its KID std over subsets would read 0 however few images there are."""
    return min(KID_SUBSET, max(MIN_IMAGES, min(real, fake) // 2))


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over 100 subsets of kid_subset images, drawn from `seed`)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=kid_subset(len(real), len(fake)))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def compare(reference: SetFeatures, generated: SetFeatures, kid: bool = True) -> dict:
    """FID (and KID) overall and per category present in both sets: {category: {fid, kid, kid_std, images, reference}}.
    A category with fewer than MIN_IMAGES images on either side gets its counts and `too_few`."""
    results = {}
    real_count, fake_count = Counter(reference.categories), Counter(generated.categories)
    categories = [OVERALL] + sorted((c for c in fake_count if c is not None and c in real_count), key=str)
    missing = sorted(str(c) for c in fake_count if c is not None and c not in real_count)
    if missing:
        logger.warning("no reference images for categor%s %s: left out of the per-category scores",
                       "y" if len(missing) == 1 else "ies", ", ".join(missing))
    for category in categories:
        real, fake = reference.rows(category), generated.rows(category)
        row = {"images": len(fake), "reference": len(real)}
        if min(len(real), len(fake)) < MIN_IMAGES:
            row["too_few"] = True
            logger.warning("%s: %d generated and %d reference image(s); FID and KID need at least %d on each side",
                           category, len(fake), len(real), MIN_IMAGES)
        else:
            row["fid"] = frechet_distance(real, fake)
            if kid:
                row["kid"], row["kid_std"] = kernel_distance(real, fake)
        results[category] = row
    return results
