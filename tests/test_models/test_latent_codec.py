import copy

import torch

from pgv25.models.latent_codec import LatentCodec


def test_round_trip_and_pipeline_denormalisation(tiny_pipeline):
    vae = tiny_pipeline.vae
    codec = LatentCodec(vae)
    z = torch.randn(2, 4, 16, 16) * 3 + 1
    assert torch.allclose(codec.denormalize(codec.normalize(z)), z, atol=1e-5)
    # What StableDiffusionXLPipeline does before vae.decode when the config has latents_mean/std:
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    latents = codec.normalize(z)
    assert torch.allclose(latents * std / vae.config.scaling_factor + mean, z, atol=1e-5)
    assert torch.allclose(latents, (z - mean) * vae.config.scaling_factor / std, atol=1e-6)


def test_normalised_latents_have_sigma_data_scale(tiny_pipeline, tiny_assets):
    """latents_mean/std were measured on the data: normalised latents are ≈ zero-mean with std ≈ 0.5 (σ_data)."""
    from pgv25.tiny.base_pipeline import load_images

    codec = LatentCodec(tiny_pipeline.vae)
    latents = codec.encode(load_images(tiny_assets["shapes"])[:64], torch.Generator().manual_seed(0))
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.15
    assert ((per_channel.std(1) - 0.5).abs() < 0.1).all()


def test_without_latent_statistics_it_is_plain_scaling(tiny_pipeline):
    vae = copy.deepcopy(tiny_pipeline.vae)
    vae.register_to_config(latents_mean=None, latents_std=None)
    codec = LatentCodec(vae)
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(codec.normalize(z), z * vae.config.scaling_factor)
    assert torch.allclose(codec.denormalize(codec.normalize(z)), z, atol=1e-6)
