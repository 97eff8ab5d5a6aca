"""Exponential moving average of the trained weights, kept by parameter name.

θ_ema ← d·θ_ema + (1 − d)·θ after an update, every `every` iterations once past `update_after`.
With warm-up, d = 1 − (1 + n/inv_gamma)^(−power) (capped at `decay`) for the n-th EMA update — the
schedule of diffusers' EMAModel — so an EMA started from pretrained weights is not dragged back to them
for thousands of steps. The shadow weights can live on the CPU (`device='cpu'`) to spare device memory.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True, inv_gamma: float = 1.0,
                 power: float = 2 / 3, update_after: int = 0, every: int = 1, device: str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"ema.every must be at least 1, got {every}")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.update_after, self.every = update_after, every
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # fp32 whatever the weights' dtype: bf16 trained weights still average without rounding each small step away
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for _, p in self.params]
        self.updates = 0  # EMA updates so far (drives the warm-up)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1.0 - (1.0 + self.updates / self.inv_gamma) ** -self.power))

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Call after the optimizer update of `iteration` (1-based)."""
        if iteration <= self.update_after or iteration % self.every:
            return
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(s.device, s.dtype, non_blocking=True) for (_, p), s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, weight)  # s += w·(θ − s)
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name, on the CPU (what checkpoints and exports store)."""
        return {name: s.detach().cpu() for (name, _), s in zip(self.params, self.shadow)}

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """Inside the block the model holds the EMA weights; its own come back afterwards (for sampling)."""
        raw = [p.detach().clone() for _, p in self.params]
        for (_, p), s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for (_, p), r in zip(self.params, raw):
                p.copy_(r)

    @torch.no_grad()
    def load_state(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        names = [name for name, _ in self.params]
        if sorted(weights) != sorted(names):
            raise ValueError("the checkpoint's EMA weights do not match the model's trainable parameters")
        for name, shadow in zip(names, self.shadow):
            shadow.copy_(weights[name])
        self.updates = updates


def build_ema(model: torch.nn.Module, cfg: dict | None) -> EMA | None:
    """An EMA from the config's `ema` dict, or None when it is absent or not enabled."""
    if not cfg or not cfg.get("enabled"):
        return None
    options = {k: v for k, v in cfg.items() if k not in ("enabled", "export")}
    try:
        return EMA(model, **options)
    except (TypeError, ValueError) as error:
        from ..errors import UserError

        raise UserError(f"ema: {error}") from None
