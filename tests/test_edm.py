import math

import pytest
import torch
from diffusers import EDMEulerScheduler

from pgv25 import edm
from pgv25.tiny.base_pipeline import PLAYGROUND_SCHEDULER_CONFIG

SIGMA_D = 0.5
SIGMAS = torch.logspace(math.log10(0.002), math.log10(80.0), 200, dtype=torch.float64)


@pytest.fixture(scope="module")
def scheduler():
    keys = ("sigma_min", "sigma_max", "sigma_data", "rho", "prediction_type", "num_train_timesteps", "final_sigmas_type")
    return EDMEulerScheduler(**{k: PLAYGROUND_SCHEDULER_CONFIG[k] for k in keys})


def rel_err(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


def test_c_in_matches_scheduler(scheduler):
    x = torch.ones(len(SIGMAS), 1, 1, 1, dtype=torch.float64)
    expected = scheduler.precondition_inputs(x, SIGMAS.view(-1, 1, 1, 1))
    assert rel_err(edm.c_in(SIGMAS, SIGMA_D).view(-1, 1, 1, 1), expected) < 1e-6


def test_c_noise_matches_scheduler(scheduler):
    assert rel_err(edm.c_noise(SIGMAS[SIGMAS != 1]), scheduler.precondition_noise(SIGMAS[SIGMAS != 1])) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_c_skip_c_out_match_scheduler(prediction_type):
    scheduler = EDMEulerScheduler(sigma_data=SIGMA_D, prediction_type=prediction_type)
    s = SIGMAS.view(-1, 1, 1, 1)
    x, F = torch.full_like(s, 0.7), torch.full_like(s, -1.3)
    expected = scheduler.precondition_outputs(x, F, s)
    ours = edm.c_skip(s, SIGMA_D) * x + edm.c_out(s, SIGMA_D, prediction_type) * F
    assert rel_err(ours, expected) < 1e-6


def test_preconditioning_shapes_and_values():
    sigma = torch.tensor([0.5, 2.0])
    c = edm.preconditioning(sigma, SIGMA_D)
    assert c.c_in.shape == (2, 1, 1, 1) and c.c_noise.shape == (2,)
    # at σ = σ_d: c_skip = ½, c_out = σ_d/√2, c_in = 1/(σ_d√2)
    assert abs(float(c.c_skip[0]) - 0.5) < 1e-7
    assert abs(float(c.c_out[0]) - SIGMA_D / math.sqrt(2)) < 1e-7
    assert abs(float(c.c_in[0]) - 1 / (SIGMA_D * math.sqrt(2))) < 1e-6


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        edm.c_out(torch.ones(1), SIGMA_D, "sample")


def test_karras_grid_is_the_schedulers(scheduler):
    ours = edm.karras_sigmas(1001)
    assert torch.allclose(ours, scheduler.sigmas[:-1].float(), rtol=1e-5)  # the scheduler appends σ = 0
    assert abs(float(ours[0]) - 80.0) < 1e-3 and abs(float(ours[-1]) - 0.002) < 1e-6


def test_karras_index_sampler_uses_the_public_training_grid(scheduler):
    """diffusers' --do_edm_style_training: sigmas[randint(0, num_train_timesteps)]."""
    sampler = edm.build_sigma_sampler("karras_index", PLAYGROUND_SCHEDULER_CONFIG)
    assert torch.allclose(sampler.sigmas, scheduler.sigmas[:1000].float(), rtol=1e-5)


def test_karras_index_sampler_draws_only_grid_values_with_median_near_2_5():
    sampler = edm.build_sigma_sampler("karras_index", PLAYGROUND_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    draws = sampler(20000, g)
    assert torch.isin(draws, sampler.sigmas).all()
    assert 2.2 < float(draws.median()) < 2.8  # DESIGN.md: median σ ≈ 2.5


def test_lognormal_sampler_statistics():
    sampler = edm.build_sigma_sampler("lognormal", {}, P_mean=-1.2, P_std=1.2)
    ln_sigma = sampler(50000, torch.Generator().manual_seed(1)).log()
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.03
    assert abs(float(ln_sigma.std()) - 1.2) < 0.03


def test_samplers_are_deterministic_in_the_generator():
    sampler = edm.build_sigma_sampler("karras_index", PLAYGROUND_SCHEDULER_CONFIG)
    a = sampler(8, torch.Generator().manual_seed(3))
    b = sampler(8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="karras_index"):
        edm.build_sigma_sampler("uniform", {})


def test_loss_weights():
    sigma = torch.tensor([0.1, 0.5, 10.0])
    assert torch.equal(edm.loss_weight(sigma, SIGMA_D, "none"), torch.ones(3))
    lam = edm.loss_weight(sigma, SIGMA_D, "edm")
    expected = (sigma**2 + SIGMA_D**2) / (sigma * SIGMA_D) ** 2
    assert torch.allclose(lam, expected)
    # λ(σ)·c_out(σ)² = 1: the weighting makes the network's effective target unit-variance
    assert torch.allclose(lam * edm.c_out(sigma, SIGMA_D) ** 2, torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError):
        edm.loss_weight(sigma, SIGMA_D, "snr")


def test_add_noise_is_edm_forward_process():
    x0, n = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.0, 3.0])
    x = edm.add_noise(x0, sigma, n)
    assert torch.equal(x[0], x0[0]) and torch.allclose(x[1], x0[1] + 3 * n[1])
