"""Shared fixtures: one small set of tiny assets per test session, built locally (never the Hub)."""

from __future__ import annotations

import os

import pytest

# Small enough to build in seconds; the VAE need not reconstruct well for plumbing tests.
# Everything the tiny config sets that the assets' parameters include is here too (spread), or every test that goes
# through the config would rebuild the assets the fixtures hold.
TINY = dict(image_size=64, per_caption=2, vae_steps=20, text_steps=40, seed=0, spread=0.3)
TINY_OPTIONS = [f"tiny_assets.{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Point the configs' cache at a session folder and make any hub access fail fast."""
    cache = tmp_path_factory.mktemp("pgv25_cache")
    os.environ["PGV25_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_assets(offline_cache):
    from pgv25.tiny import ensure_tiny_assets

    root = offline_cache / "tiny_shapes"
    stamp = ensure_tiny_assets(root, **TINY)
    return {"root": root, "model": root / "playground-v2.5-tiny", "shapes": root / "shapes", "stamp": stamp}


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_assets):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_assets["model"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cfg(work_dir, *options: str, config: str = "playgroundv2_5_tiny_shapes"):
    """The embedded default's config (or another tiny one), shrunk for tests, with extra `key=value` overrides."""
    from pgv25.config import load_config, parse_cfg_options

    # the shipped config caches latents; tests train through the per-step VAE and text encoders unless they ask
    base = TINY_OPTIONS + ["train_dataloader.batch_size=4", "default_hooks.logger.interval=1", "sample_grid.steps=4",
                           "validation.interval=0", "validation.steps=3", "train_dataloader.dataset.cache.enabled=False"]
    cfg = load_config(config, parse_cfg_options(base + list(options)))
    cfg.work_dir = str(work_dir)
    return cfg


def straight_and_resumed(tmp_path, *options: str) -> tuple[dict, dict, dict]:
    """Train 4 iterations straight (checkpoints every 2), and again resumed from the straight run's iteration-2
    checkpoint: (weights at 2, at 4 straight, at 4 resumed). `options` must set max_iters=4 and checkpoint interval 2."""
    import shutil

    from safetensors.torch import load_file

    from pgv25.engine.runner import train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(straight, *options))
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    train(tiny_cfg(resumed, *options), resume=True)
    return tuple(load_file(run / "checkpoints" / name / "model.safetensors")
                 for run, name in ((straight, "iter_0000002"), (straight, "iter_0000004"), (resumed, "iter_0000004")))


def wait_for_logged_iterations(process, work_dir, count: int, timeout: float = 240) -> None:
    """Block until a training subprocess has logged `count` iterations to scalars.jsonl."""
    import time

    scalars, deadline = work_dir / "scalars.jsonl", time.time() + timeout
    while not (scalars.is_file() and len(scalars.read_text().splitlines()) >= count):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)


def assert_near(actual, expected, rel: float) -> None:
    """max|actual − expected| ≤ rel · max|expected|, for float32 results that reach the same value by different paths.

    Batch shape, thread count and the CPU's SIMD kernels change the order of the sums inside matmuls,
    convolutions and norms; the rounding that follows scales with the magnitude of the tensor (an element
    near zero carries the error of the large terms summed into it), so the bound is relative to the largest
    element, not elementwise. Each caller states why its `rel` fits its computation.
    """
    import torch

    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rel * scale, f"max difference {error:.3g} exceeds {rel:g} of the largest value {scale:.3g}"
