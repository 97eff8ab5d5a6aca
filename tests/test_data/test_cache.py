import random

import pytest
import torch

from pgv25.data import cache as cache_module
from pgv25.data.cache import CachedLatentDataset, SliceEncoder, ensure_cache
from pgv25.data.dataset import collate, plan_data
from pgv25.data.transforms import BucketTransform, decode
from pgv25.errors import UserError
from pgv25.models.latent_codec import LatentCodec

from conftest import tiny_cfg


def cached(tmp_path, *options):
    cfg = tiny_cfg(tmp_path / "w", "train_dataloader.dataset.cache.enabled=True", *options)
    data_cfg = cfg.train_dataloader.dataset
    plan = plan_data(data_cfg, 4)
    return cfg, data_cfg, plan


def build(cfg, data_cfg, plan):
    return ensure_cache(plan, data_cfg, cfg.model.pretrained_model_name_or_path, 0, torch.device("cpu"))


def test_cached_latents_are_the_vae_encoding_of_the_transformed_pixels(tmp_path, tiny_assets, tiny_pipeline):
    cfg, data_cfg, plan = cached(tmp_path)
    folder = build(cfg, data_cfg, plan)
    dataset = CachedLatentDataset(folder, plan, 0.0, seed=0)
    codec = LatentCodec(tiny_pipeline.vae)
    position = 5
    image = decode(plan.rows.open(int(plan.index.rows[position])), 10**8)
    target = plan.sizes[plan.bucket_of[position]]
    transform = BucketTransform(center_crop=False, random_flip=False)
    expected = []
    for flip in (False, True):  # the same seeded crop, plain and mirrored
        pixels, _ = transform(image, target, random.Random(f"0/cache/{position}"), flip=flip)
        expected.append(codec.encode_mean(pixels[None])[0])
    seen = set()
    for step in range(20):
        latents = dataset[(step, 0, position)]["latents"].float()
        errors = [(latents - e).abs().max() / e.abs().max() for e in expected]
        assert min(errors) < 2e-3  # fp16 storage
        seen.add(int(errors[1] < errors[0]))
    assert seen == {0, 1}, "both the plain and the mirrored latent are drawn"


def test_caption_embeddings_and_dropout(tmp_path, tiny_assets, tiny_pipeline):
    cfg, data_cfg, plan = cached(tmp_path)
    dataset = CachedLatentDataset(build(cfg, data_cfg, plan), plan, caption_dropout=0.5, seed=0)
    caption = plan.rows.captions[int(plan.index.rows[3])][0]
    with torch.no_grad():
        embeds, pooled = tiny_pipeline.encode_prompt(caption, do_classifier_free_guidance=False)[0::2]
    items = [dataset[(step, 0, 3)] for step in range(16)]
    kept = [i for i in items if i["pooled"].abs().sum() > 0]
    dropped = [i for i in items if i["pooled"].abs().sum() == 0]
    assert kept and dropped and all(i["prompt_embeds"].abs().sum() == 0 for i in dropped)  # force_zeros_for_empty_prompt
    assert torch.allclose(kept[0]["prompt_embeds"].float(), embeds[0], atol=2e-3 * float(embeds.abs().max()))
    assert torch.allclose(kept[0]["pooled"].float(), pooled[0], atol=2e-3 * float(pooled.abs().max()))
    batch = collate([dataset[(0, s, p)] for s, p in enumerate(range(4))])
    assert batch["latents"].shape[0] == 4 and batch["prompt_embeds"].shape[:2] == (4, 77)


def test_cache_is_reused_and_a_changed_setting_gets_its_own(tmp_path, tiny_assets, monkeypatch):
    calls = []
    real = cache_module.build_cache
    monkeypatch.setattr(cache_module, "build_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    unique = "train_dataloader.dataset.max_image_pixels=12345678"  # a key no other test builds
    first = build(*cached(tmp_path, unique))
    assert build(*cached(tmp_path, unique)) == first and len(calls) == 1
    flipless = build(*cached(tmp_path, unique, "train_dataloader.dataset.random_flip=False"))
    centred = build(*cached(tmp_path, unique, "train_dataloader.dataset.center_crop=True"))
    assert len({first, flipless, centred}) == 3 and len(calls) == 3


def test_a_changed_image_invalidates_the_cache(tmp_path, tiny_assets):
    import shutil

    shapes = tmp_path / "shapes"
    shutil.copytree(tiny_assets["shapes"], shapes)
    first = build(*cached(tmp_path, f"train_dataloader.dataset.path={shapes}"))
    image = sorted(shapes.glob("*.png"))[0]
    image.write_bytes(image.read_bytes())  # same bytes, new modification time
    assert build(*cached(tmp_path, f"train_dataloader.dataset.path={shapes}")) != first


def test_missing_cache_with_build_never_is_one_line(tmp_path, tiny_assets):
    with pytest.raises(UserError, match="no latent cache for this config and data in .*; build it with: pgv25 data cache"):
        build(*cached(tmp_path, "train_dataloader.dataset.cache.build=never", "train_dataloader.dataset.random_flip=False",
                      "train_dataloader.dataset.center_crop=True", "randomness.seed=99"))


@pytest.mark.slow
def test_preference_pairs_cache_both_images_with_one_flip(tmp_path, tiny_assets, tiny_pipeline):
    cfg = tiny_cfg(tmp_path / "w", "train_dataloader.dataset.cache.enabled=True", config="playgroundv2_5_dpo_tiny_shapes")
    from pgv25.tiny import ensure_tiny_assets

    ensure_tiny_assets(**cfg.tiny_assets)
    data_cfg = cfg.train_dataloader.dataset
    plan = plan_data(data_cfg, 4)
    dataset = CachedLatentDataset(build(cfg, data_cfg, plan), plan, 0.0, seed=0)
    codec = LatentCodec(tiny_pipeline.vae)
    position = 3
    row = int(plan.index.rows[position])
    transform = BucketTransform(center_crop=False, random_flip=False)
    expected = {}  # (flip, loser) → the VAE encoding of that image
    for loser in (False, True):
        image = decode(plan.rows.open(row, loser), 10**8)
        for flip in (False, True):
            pixels, _ = transform(image, plan.sizes[plan.bucket_of[position]], random.Random(0), flip=flip, crop=(0.5, 0.5))
            expected[flip, loser] = codec.encode_mean(pixels[None])[0]
    items = [dataset[(step, 0, position)] for step in range(12)]
    flips = set()
    for item in items:
        assert item["latents"].shape == (2, 4, 16, 16) and item["time_ids"].shape == (2, 6)
        def error(flip, loser):
            return float((item["latents"][int(loser)].float() - expected[flip, loser]).abs().max() / expected[flip, loser].abs().max())

        # winner and loser come from one variant: both plain or both mirrored (fp16 storage: 2e-3)
        matches = [flip for flip in (False, True) if error(flip, False) < 2e-3 and error(flip, True) < 2e-3]
        assert matches, [(f, l, error(f, l)) for f in (False, True) for l in (False, True)]
        flips.update(matches)
    assert flips == {False, True}
    batch = collate(items[:3])
    assert batch["latents"].shape == (6, 4, 16, 16) and batch["prompt_embeds"].shape[0] == 6
    assert torch.equal(batch["latents"][3], items[0]["latents"][1])  # the losers follow the winners


def test_large_stacks_are_encoded_in_slices(tiny_pipeline):
    codec = LatentCodec(tiny_pipeline.vae)
    calls = []
    encode_mean = codec.encode_mean
    codec.encode_mean = lambda pixels: calls.append(len(pixels)) or encode_mean(pixels)
    pixels = torch.rand(7, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = SliceEncoder(codec, "cpu")(pixels)
    assert calls == [7]
    sliced = SliceEncoder(codec, "cpu", pixels_per_call=3 * 64 * 48 + 5)(pixels)
    assert calls[1:] == [3, 3, 1]  # three images per call, the rest in the last
    # each image is encoded on its own either way: only the batch size of the convolutions differs
    assert torch.allclose(sliced, whole, atol=1e-5, rtol=1e-5)


class OutOfMemoryAbove:
    """A codec whose device holds at most `most` images per call: more raise the CUDA allocator's error."""

    def __init__(self, codec, most: int):
        self.codec, self.most, self.calls = codec, most, []

    def encode_mean(self, pixels):
        self.calls.append(len(pixels))
        if len(pixels) > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.50 GiB")
        return self.codec.encode_mean(pixels)


def test_a_vae_out_of_memory_halves_the_slice_for_the_rest_of_the_build(tiny_pipeline, caplog):
    codec = LatentCodec(tiny_pipeline.vae)
    pixels = torch.rand(7, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = codec.encode_mean(pixels)
    small = OutOfMemoryAbove(codec, most=2)
    encode = SliceEncoder(small, "cpu")
    with caplog.at_level("WARNING", logger="pgv25"):
        first = encode(pixels)
    # all 7 at once fail, then 3, then one image per call; the same means as one call
    assert small.calls == [7, 3, 1, 1, 1, 1, 1, 1, 1]
    assert torch.allclose(first, whole, atol=1e-5, rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(warnings) == 2 and "going on with 3 per call" in warnings[0]
    # the next stack of the build starts at the smaller slice: no failed call again
    small.calls.clear()
    assert torch.allclose(encode(pixels[:4]), whole[:4], atol=1e-5, rtol=1e-5)
    assert small.calls == [1, 1, 1, 1]


def test_one_image_the_vae_cannot_hold_is_one_line(tiny_pipeline):
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    with pytest.raises(UserError, match=r"cannot encode one 48×64 image in the memory free on cpu: build the latent cache on a larger GPU"):
        SliceEncoder(OutOfMemoryAbove(LatentCodec(tiny_pipeline.vae), most=0), "cpu")(pixels)
