"""The loss on held-out images, to see a run start to overfit (`validation.loss`).

Every measurement uses the same images, the same fixed grid of σ and the same noise per image and σ (drawn from
the configured seed and the image's position, never from the training RNG), so the number moves only when the
model does, and a resumed run measures exactly what an uninterrupted one would. The loss is what training
minimises, λ(σ)·mean‖D(x0 + σn; σ) − x0‖², per σ and as the mean over the grid. Each process measures every
`world_size`-th image; the sums are added over processes. The runner logs the numbers (val_loss, val_loss/sigma_<σ>)
to the trackers and scalars.jsonl, and `plot` draws them from there at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import collate
from ..models.edm_denoiser import weighted_error
from . import distributed

logger = logging.getLogger("pgv25")
PLOT = "validation_loss.png"
DESCRIPTION = {"val_loss": "held-out images", "val_loss_class": "class images"}


def sigma_key(sigma: float, name: str = "val_loss") -> str:
    return f"{name}/sigma_{sigma:g}"


@dataclass
class HeldOutSet:
    """One set of measured images: `name` prefixes its scalars ('val_loss': held-out instance images; 'val_loss_class':
    DreamBooth's class images, whose loss rises as the model drifts from its base); this rank's batches of positions."""

    name: str
    dataset: object
    batches: list
    images: int


class ValidationLoss:
    def __init__(self, options, sets: list[tuple[str, object, object]], model, schedule, device: torch.device, autocast,
                 work_dir: Path):
        """`options`: engine.options.ValidationLossOptions; `sets`: (name, dataset, plan) of each set of images
        (engine.build.DataParts.held_out); `model`: engine.build.ModelParts (turns a batch into latents and
        conditioning); `schedule`: the objective's noise schedule."""
        self.options, self.model, self.device, self.autocast = options, model, device, autocast
        self.denoiser, self.weighting = schedule.denoiser(model.unet), schedule.weighting
        self.work_dir = work_dir
        self.sets = [self._held_out_set(name, dataset, plan) for name, dataset, plan in sets]
        logger.info("validation loss: %s; %d σ from %g to %g, every %d iterations",
                    ", ".join(f"{s.images} {DESCRIPTION.get(s.name, s.name)}" for s in self.sets), len(options.sigmas),
                    min(options.sigmas), max(options.sigmas), options.interval)

    def _held_out_set(self, name: str, dataset, plan) -> HeldOutSet:
        rank, world_size = distributed.world()
        count = min(len(plan.index), self.options.max_images)
        by_bucket = {}
        for position in range(rank, count, world_size):  # every world_size-th image; a batch holds one bucket's
            by_bucket.setdefault(int(plan.bucket_of[position]), []).append(position)
        size = self.options.batch_size
        batches = [group[i:i + size] for _, group in sorted(by_bucket.items()) for i in range(0, len(group), size)]
        return HeldOutSet(name, dataset, batches, count)

    @property
    def enabled(self) -> bool:
        return self.options.enabled

    def due(self, iteration: int) -> bool:
        return self.enabled and iteration % self.options.interval == 0

    def _noise(self, positions: list[int], shape, sigma_index: int) -> torch.Tensor:
        """Fixed noise per image and σ: a generator seeded by (seed, position, σ index), on the CPU for every device."""
        draws = []
        for position in positions:
            generator = torch.Generator().manual_seed(hash_seed(self.options.seed, position, sigma_index))
            draws.append(torch.randn(shape, generator=generator))
        return torch.stack(draws).to(self.device)

    @torch.no_grad()
    def measure(self, iteration: int) -> dict[str, float]:
        """The losses at `iteration` of every set: overall, per σ, and the images measured (a collective)."""
        metrics, said = {}, []
        for held in self.sets:
            values, unreadable = self._measure(held)
            metrics.update(values)
            said.append(f"{values[held.name]:.4f} on {values[held.name + '/images']} {DESCRIPTION.get(held.name, held.name)}"
                        + (f" ({unreadable} unreadable, skipped)" if unreadable else ""))
        logger.info("iteration %d: validation loss %s", iteration, "; ".join(said))
        return metrics

    def _measure(self, held: HeldOutSet) -> tuple[dict[str, float], int]:
        sigmas = self.options.sigmas
        # per σ, then images measured and images unreadable; on the device, so the batches run without a host sync
        sums = torch.zeros(len(sigmas) + 2, dtype=torch.float64, device=self.device)
        for positions in held.batches:
            items = [held.dataset[(0, position, position)] for position in positions]  # (step, slot, position): fixed
            good = [position for position, item in zip(positions, items) if "problem" not in item]
            sums[-1] += len(positions) - len(good)
            if not good:
                continue
            batch = collate(items)
            generator = torch.Generator(self.device).manual_seed(hash_seed(self.options.seed, good[0], -1))
            x0, cond = self.model.inputs(batch, self.device, generator)
            for j, sigma in enumerate(sigmas):
                noise = self._noise(good, x0.shape[1:], j)
                sigma_t = torch.full((len(x0),), float(sigma), device=self.device)
                with self.autocast():
                    loss = weighted_error(self.denoiser, x0, sigma_t, noise, cond, self.weighting)
                sums[j] += loss.double().sum()
            sums[-2] += len(x0)
        sums = distributed.sum_over_ranks(sums).cpu()
        measured = int(sums[-2])
        per_sigma = (sums[:-2] / max(measured, 1)).tolist()
        name = held.name
        return {name: sum(per_sigma) / len(per_sigma), **{sigma_key(s, name): v for s, v in zip(sigmas, per_sigma)},
                f"{name}/images": measured}, int(sums[-1])

    def plot(self, scalars: Path) -> Path | None:
        """work_dir/validation_loss.png from the measurements in `scalars` (scalars.jsonl): per σ and overall (rank 0)."""
        if distributed.world()[0] != 0 or not scalars.is_file():
            return None
        rows = [row for row in map(json.loads, scalars.read_text().splitlines()) if self.sets[0].name in row]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        iterations = [r["iteration"] for r in rows]
        first = self.sets[0].name
        for sigma in self.options.sigmas:  # the first set per σ; every set's mean over σ in bold
            axis.plot(iterations, [r[sigma_key(sigma, first)] for r in rows], label=f"σ = {sigma:g}", linewidth=1)
        for held, style in zip(self.sets, ("-", "--")):
            axis.plot(iterations, [r[held.name] for r in rows], style, color="black", linewidth=2.5,
                      label=f"{DESCRIPTION.get(held.name, held.name)}: mean over σ")
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss λ(σ)·‖D − x0‖²")
        axis.set_yscale("log")
        axis.set_title("validation loss: " + ", ".join(f"{rows[-1][s.name + '/images']} {DESCRIPTION.get(s.name, s.name)}"
                                                       for s in self.sets))
        axis.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        out = self.work_dir / PLOT
        figure.savefig(out, dpi=110)
        plt.close(figure)
        return out


def hash_seed(seed: int, position: int, sigma_index: int) -> int:
    """A 63-bit seed per (seed, image, σ): independent streams without one generator's order mattering."""
    digest = hashlib.sha256(f"{seed}/{position}/{sigma_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
