"""The training loss split by noise level, so a user sees which σ range is (not) learning.

Low σ carries fine detail, high σ (up to Playground's σ_max 80) composition and colour — the range that
separates an EDM schedule from an ε-prediction one. Sums and counts accumulate on the device (no host
sync per step) and are reduced over ranks only when a log line is written.
"""

from __future__ import annotations

import math

import torch

from . import distributed

SIGMA_EDGES = (0.5, 2.0, 10.0)  # bins [0, 0.5), [0.5, 2), [2, 10), [10, ∞)


def _label(name: str, lo: float, hi: float) -> str:
    return f"{name}/{lo:g}-{hi:g}" if math.isfinite(hi) else f"{name}/{lo:g}+"


class _Window:
    """Sums and counts per label: this update's (pending) and since the last log line (window)."""

    def __init__(self, labels: list[str], device: torch.device):
        self.labels = labels
        self.pending = torch.zeros(2, len(labels), device=device)
        self.window = torch.zeros_like(self.pending)

    def commit(self, keep: bool) -> None:
        """End of a step: count it unless its update was skipped (a non-finite loss would poison the means)."""
        if keep:
            self.window += self.pending
        self.pending.zero_()

    def means(self) -> dict[str, float]:
        """Mean per label over all ranks since the last call (a collective); labels with no values are left out."""
        sums, counts = distributed.sum_over_ranks(self.window).tolist()
        self.window.zero_()
        return {label: s / c for label, s, c in zip(self.labels, sums, counts) if c > 0}


class SigmaBinnedLoss(_Window):
    """A per-sample quantity (the loss, by default) averaged per σ bin."""

    def __init__(self, device: torch.device, edges: tuple[float, ...] = SIGMA_EDGES, name: str = "loss_sigma"):
        bounds = (0.0, *edges, math.inf)
        super().__init__([_label(name, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])], device)
        self.edges = torch.tensor(edges, device=device)

    def add(self, sigma: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        bins = torch.bucketize(sigma.detach().float().flatten(), self.edges, right=True)
        self.pending[0].index_add_(0, bins, per_sample_loss.detach().float().flatten())
        self.pending[1].index_add_(0, bins, torch.ones_like(bins, dtype=self.pending.dtype))


class RunningMeans(_Window):
    """Named per-sample quantities (accuracy, margin, ...) averaged over samples."""

    def __init__(self, names: list[str], device: torch.device):
        super().__init__(list(names), device)
        self.column = {name: i for i, name in enumerate(names)}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float().flatten()
            self.pending[0, self.column[name]] += value.sum()
            self.pending[1, self.column[name]] += len(value)
