"""`pgv25 eval fid`: several image sets (the base, step N, step M, ...) against one reference set, overall and per
category, as the model card measures on MJHQ-30K."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ..errors import UserError
from .image_sets import read_image_set
from .metrics import OVERALL, clip_scores, compare, extract, load_clip, load_inception

logger = logging.getLogger("pgv25")


def named_sets(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` (named after its folder) per model; names must differ, as they head the report's columns."""
    named = []
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        named.append((name or Path(path).name or path, path))
    names = [name for name, _ in named]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"--images names {', '.join(repeated)} more than once; name each set: --images base=DIR step800=DIR")
    return named


def evaluate(reference: str, images: list[str], out: Path, resolution: int = 299, inception: str | None = None,
             clip: str | None = None, kid: bool = True, batch_size: int = 32, device: str | None = None) -> dict:
    """The report (see report.py) of every set in `images` against `reference`; features cached under out/features."""
    if resolution < 16:
        raise UserError(f"--resolution must be at least 16, got {resolution}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    named = named_sets(images)
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise UserError('pgv25 eval fid needs torchmetrics: pip install "pgv25[eval]" (or pip install torchmetrics)') from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = load_inception(inception)  # first: a missing weights file is one line before any image is read
    clip_model = load_clip(clip) if clip else None
    reference_set = read_image_set(reference, Path(reference).name or reference)
    generated_sets = [read_image_set(path, name) for name, path in named]
    cache = out / "features"
    real = extract(reference_set, network, resolution, cache, batch_size, device)
    report = {
        "reference": {"name": reference_set.name, "source": str(reference), "images": len(real.ids),
                      "categories": {OVERALL: len(real.ids), **{c: n for c, n in sorted(Counter(real.categories).items(),
                                                                                           key=str) if c is not None}}},
        "resolution": resolution,
        "feature_network": {"file": str(network.path), "sha256": network.sha256},
        "models": {},
    }
    if clip:
        report["clip_model"] = str(clip)
    for image_set in generated_sets:
        fake = extract(image_set, network, resolution, cache, batch_size, device)
        model = {"source": image_set.source, "scores": compare(real, fake, kid=kid)}
        if clip_model is not None:
            model["clip"] = clip_scores(image_set, clip_model, batch_size, device)
        report["models"][image_set.name] = model
        logger.info("%s: FID %s over %d images", image_set.name,
                    f"{model['scores'][OVERALL]['fid']:.3f}" if "fid" in model["scores"][OVERALL] else "(too few)", len(fake.ids))
    return report
