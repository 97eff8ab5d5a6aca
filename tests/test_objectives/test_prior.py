"""Prior preservation: mean_instance + w · mean_class of the denoising losses, whatever the batch's mix."""

import pytest
import torch

from pgv25.models.edm_denoiser import Conditioning
from pgv25.objectives import batch_inputs
from pgv25.objectives.denoising import Denoising
from pgv25.objectives.prior import PriorPreservation

from .test_dpo import ToyUNet, schedule

CPU = torch.device("cpu")


def batch(n: int):
    torch.manual_seed(2)
    return torch.randn(n, 4, 8, 8), Conditioning(torch.randn(n, 5, 6), torch.randn(n, 3), torch.rand(n, 6) * 64)


@pytest.mark.parametrize("flags", [[False, False, True, True], [False, False, False, True], [False, False, False, False],
                                   [True, True, False, True]])
def test_mean_is_instance_mean_plus_weighted_class_mean(flags):
    unet = ToyUNet(0)
    x0, cond = batch(len(flags))
    plain = Denoising(unet, schedule(), CPU)(x0, cond, torch.Generator().manual_seed(7)).detach()  # same σ and noise draws
    objective = PriorPreservation(Denoising(unet, schedule(), CPU), 0.7, CPU)
    inputs = batch_inputs(objective, {"prior": torch.tensor(flags)}, CPU)
    assert inputs["n_prior"] == sum(flags)
    loss = objective(x0, cond, torch.Generator().manual_seed(7), **inputs).mean()
    prior = torch.tensor(flags)
    instance = plain[~prior].mean() if (~prior).any() else 0.0
    classes = plain[prior].mean() if prior.any() else 0.0
    assert torch.allclose(loss.detach(), instance + 0.7 * classes, rtol=1e-6)
    objective.commit(keep=True)
    means = objective.metrics()
    if prior.any():
        assert means["loss_prior"] == pytest.approx(float(classes), rel=1e-6)
    if (~prior).any():
        assert means["loss_instance"] == pytest.approx(float(instance), rel=1e-6)
    assert objective.describe().startswith("objective prior_preservation (class loss × 0.7, as many class images")


def test_objectives_without_batch_inputs_take_none():
    assert batch_inputs(Denoising(ToyUNet(0), schedule(), CPU), {"prior": torch.tensor([True])}, CPU) == {}
