"""A feature network for FID on the shapes toy: the toy's counterpart of the FID Inception.

FID compares the pool features of a classifier trained on real photographs (Inception, ImageNet). For 64² shapes the
counterpart is a small CNN trained to name the shape colour, the shape and the background of real shapes images;
its penultimate layer is the feature vector. It is saved as TorchScript with the FID Inception's call
(`net(images, return_features=True)`, images [N, 3, H, W] with values 0–255), so that

    pgv25 eval fid --inception shapes_features.pt --resolution 64 ...

measures the toy through exactly the code that measures MJHQ-30K. It also stands in where the Inception's weights
cannot be fetched (no network): FID is only comparable within one feature network, so its numbers are never set
beside Inception FIDs. Trained on freshly drawn images (its own seed), never on a model's samples.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..tiny.shapes import COLOURS, SHAPES, combinations, draw

SIDE = 64  # every image is resized to this inside the network, as the Inception resizes to 299²
FEATURES = 128


class ShapesFeatures(nn.Module):
    """Three stride-2 conv blocks, global average pooling, a FEATURES-wide layer, and one head per attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, FEATURES), nn.ReLU())
        self.heads = nn.Linear(FEATURES, 2 * len(COLOURS) + len(SHAPES))  # shape colour | shape | background logits
        self.side = SIDE  # an attribute: TorchScript does not read module globals

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-2] != self.side or x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False, antialias=True)
        features = self.features(self.body(x))
        return features if return_features else self.heads(features)


def drawn_batch(count: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` real images of random combinations (held-out ones included: the network must read every picture)
    as uint8 [N, 3, 64, 64], and their labels [N, 3] (colour, shape, background indices)."""
    names, every = list(COLOURS), combinations()
    images, labels = [], []
    for _ in range(count):
        colour, shape, background = rng.choice(every)
        images.append(np.asarray(draw(colour, shape, background, SIDE, rng)))
        labels.append((names.index(colour), SHAPES.index(shape), names.index(background)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = len(COLOURS)
    return logits[:, :k], logits[:, k:k + len(SHAPES)], logits[:, k + len(SHAPES):]


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        heads = split_logits(net(images))
    return {name: float((head.argmax(1) == labels[:, i]).float().mean())
            for i, (name, head) in enumerate(zip(("shape_colour", "shape", "background"), heads))}


def train_features(images: int = 4000, epochs: int = 6, seed: int = 0, batch_size: int = 64) -> tuple[ShapesFeatures, dict]:
    """A trained network and its accuracies on 500 fresh real images (drawn with another seed)."""
    torch.manual_seed(seed)
    net = ShapesFeatures().train()
    train_x, train_y = drawn_batch(images, random.Random(seed))
    test_x, test_y = drawn_batch(500, random.Random(seed + 10_000))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    steps = epochs * -(-images // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)  # warm up, then anneal
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(images, generator=order).split(batch_size):
            heads = split_logits(net(train_x[batch]))
            loss = sum(F.cross_entropy(head, train_y[batch, i]) for i, head in enumerate(heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval(), accuracy(net, test_x, test_y)


def save_features(net: ShapesFeatures, path: str | Path) -> Path:
    """The network as TorchScript, loadable by `pgv25 eval fid --inception` (torch.jit.load alone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(net.eval()).save(str(path))
    return path
