"""How an optimizer's update reaches trained weights that live in bf16, and the update made inside backward.

bf16 trained weights (`model.trained_dtype='bf16'`) halve the weights' memory and their gradients', but bf16 keeps 8
bits of mantissa: an update smaller than half the spacing around a weight (about 2⁻⁹ of it; most updates at
fine-tuning learning rates) rounds back to the old value and is lost. So the optimizer never steps a bf16 weight
directly: each parameter in turn is copied to fp32, stepped there with an fp32 gradient (so the optimizer's state is
fp32 too, whatever the weights' dtype), and written back with stochastic rounding — up or down with probabilities
that make the expected value the fp32 result (`stochastic_round`), so small updates survive on average. The random
bits come from a generator of their own, saved in every checkpoint, so a resumed run rounds exactly as an
uninterrupted one. `rounding='nearest'` writes back with round-to-nearest instead: plain bf16, to compare against.

One parameter at a time (the optimizer's group narrowed to that parameter for one `step()`) keeps a single fp32 copy
alive, and it is what lets the update run inside backward (`optim_wrapper.fused_backward`): a parameter is updated in
its post-accumulate-grad hook and its gradient freed at once, so a full set of gradients never exists (PyTorch's
"optimizer step in backward" recipe). The optimizer and its state dict are the ordinary ones — checkpoints do not
depend on how the update was applied.

Stepping one parameter at a time is the same update for optimizers whose step is per parameter (AdamW, Adafactor,
AdamW8bit, Lion, CAME); Prodigy's step-size estimate and schedule-free's counters span the whole group, so those
are refused (engine/options.py says so before anything loads).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("pgv25")
ROUNDINGS = ("stochastic", "nearest")


def stochastic_round(value: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 → bf16, rounded up or down at random with P(up) = the distance from the value below, over the spacing:
    unbiased. bf16 is fp32's upper 16 bits, so: add 16 random low bits to the bit pattern and cut them off. Works for
    negative values too (sign and magnitude: the carry moves the magnitude away from zero)."""
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32, got {value.dtype}")
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class ParamUpdates:
    """Applies `optimizer`'s update to `params`: all at once, or per parameter in fp32 and rounded back when they are
    bf16 (`rounding`), and optionally inside backward (`fuse_into_backward`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], rounding: str | None,
                 generator: torch.Generator | None):
        if rounding is not None and rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS} or None, got {rounding!r}")
        self.optimizer, self.params, self.rounding, self.generator = optimizer, params, rounding, generator
        self._group_of, self._groups = {}, None
        self.fused = False
        device = params[0].device if params else torch.device("cpu")
        # inside backward: Σ‖g‖² of the gradients seen and how many tensors had a non-finite one (device tensors, no sync)
        self.grad_square = torch.zeros((), device=device, dtype=torch.float32)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)

    @property
    def per_parameter(self) -> bool:
        return self.rounding is not None or self.fused

    def step(self) -> None:
        """The whole model's update from the gradients in `.grad` (not used when fused into backward)."""
        if not self.per_parameter:
            self.optimizer.step()
            return
        for p in self.params:
            if p.grad is not None:
                self.step_param(p)

    def group_of(self, p: torch.nn.Parameter) -> dict:
        """The optimizer's group that holds `p`. Looked up afresh whenever the groups are new dicts: loading a state
        dict replaces them (accelerate's prepare does, on every resume too)."""
        groups = [id(group) for group in self.optimizer.param_groups]
        if groups != self._groups:
            self._group_of = {id(q): group for group in self.optimizer.param_groups for q in group["params"]}
            self._groups = groups
        return self._group_of[id(p)]

    @torch.no_grad()
    def step_param(self, p: torch.nn.Parameter) -> None:
        group = self.group_of(p)
        everyone = group["params"]
        group["params"] = [p]  # one parameter: one fp32 copy alive at a time
        try:
            if self.rounding is None or p.dtype == torch.float32:
                self.optimizer.step()
                return
            kept, grad = p.data, p.grad
            p.data, p.grad = kept.float(), grad.float()  # the optimizer (and its state) sees fp32
            try:
                self.optimizer.step()
                stepped = p.data
            finally:
                p.data, p.grad = kept, grad
            kept.copy_(stochastic_round(stepped, self.generator) if self.rounding == "stochastic" else stepped)
        finally:
            group["params"] = everyone

    def fuse_into_backward(self) -> None:
        """Each parameter is updated as soon as its gradient is complete, and the gradient freed."""
        self.fused = True
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.nn.Parameter) -> None:
        grad = p.grad
        finite = torch.isfinite(grad).all()
        self.nonfinite += (~finite).long()
        # A non-finite gradient cannot skip the update the other parameters already had: it counts as zero, and the
        # step says so in the log (runner). A mask, not a branch: no host sync per parameter.
        grad.masked_fill_(~finite, 0.0)
        self.grad_square += grad.float().square().sum()
        self.step_param(p)
        p.grad = None

    def take_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient norm, tensors with a non-finite gradient) of the backward just run; the counters restart."""
        norm, bad = self.grad_square.sqrt(), self.nonfinite.clone()
        self.grad_square.zero_()
        self.nonfinite.zero_()
        return norm, bad



def keep_fp32_state_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Optimizers cast floating state to each parameter's dtype when they load a state dict (torch's and bitsandbytes'
    alike): for bf16 weights that would round the fp32 moments to bf16 on every resume. Wrapped on this instance, the
    load puts the loaded fp32 tensors back afterwards."""
    load = optimizer.load_state_dict

    def load_keeping_fp32(state_dict: dict) -> None:
        load(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):  # the pairing Optimizer.load_state_dict makes
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32 and p.dtype != torch.float32:
                    optimizer.state[p][key] = value.to(p.device, copy=True)

    optimizer.load_state_dict = load_keeping_fp32
