import random

import numpy as np
import pytest
import torch
from PIL import Image

from pgv25.data.transforms import BucketTransform, ImageProblem, decode, to_rgb

from .files import BAD_FILES, jpeg


def gradient_image(width, height):
    """Red channel encodes x, green encodes y: crops and flips can be read back from pixels."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def test_time_ids_record_original_size_crop_and_target():
    pixels, time_ids = BucketTransform(center_crop=True, random_flip=False)(gradient_image(200, 100), (64, 64), random.Random(0))
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    # 200×100 → 128×64, centre crop of 64 from 128 wide: left = 32
    assert time_ids.tolist() == [100, 200, 0, 32, 64, 64]


def test_random_crop_coordinates_match_the_pixels():
    transform = BucketTransform(center_crop=False, random_flip=False)
    resized = np.asarray(gradient_image(256, 64).resize((256, 64), Image.BICUBIC), dtype=np.float32)
    for seed in range(5):
        pixels, time_ids = transform(gradient_image(256, 64), (64, 64), random.Random(seed))
        left = int(time_ids[3])
        expected = torch.from_numpy(resized[:, left:left + 64]).permute(2, 0, 1) / 127.5 - 1
        assert torch.allclose(pixels, expected, atol=1e-5)


def test_flip_mirrors_pixels_and_crop_left():
    image = gradient_image(256, 64)
    plain, plain_ids = BucketTransform(center_crop=True, random_flip=False)(image, (64, 64), random.Random(0))
    flips = [BucketTransform(center_crop=True, random_flip=True)(image, (64, 64), random.Random(s)) for s in range(20)]
    flipped = [(p, t) for p, t in flips if not torch.equal(p, plain)]
    assert flipped, "no sample was flipped in 20 draws"
    pixels, time_ids = flipped[0]
    assert torch.equal(pixels, plain.flip(-1))
    assert int(time_ids[3]) == 256 - int(plain_ids[3]) - 64


def test_same_rng_same_result():
    t = BucketTransform()
    a, b = t(gradient_image(300, 90), (48, 80), random.Random(7)), t(gradient_image(300, 90), (48, 80), random.Random(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_non_square_bucket_covers_then_crops():
    # 200×100 into a 128×32 bucket: scale 0.64 → 128×64, centre crop top = 16
    pixels, time_ids = BucketTransform(center_crop=True, random_flip=False)(gradient_image(200, 100), (128, 32), random.Random(0))
    assert pixels.shape == (3, 32, 128)
    assert time_ids.tolist() == [100, 200, 16, 0, 32, 128]


def test_smaller_image_is_upscaled_and_its_original_size_recorded():
    pixels, time_ids = BucketTransform(center_crop=True, random_flip=False)(gradient_image(20, 10), (64, 64), random.Random(0))
    assert pixels.shape == (3, 64, 64) and time_ids[:2].tolist() == [10, 20]


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # 16-bit white stays white
    (lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    (lambda: palette_with_transparency(), (255, 255, 255)),
])
def test_modes_become_8_bit_rgb(make, expected):
    image = to_rgb(make())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == expected


def palette_with_transparency():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


def test_exif_rotation_is_honoured(tmp_path):
    image = decode(jpeg(tmp_path / "r.jpg", size=(60, 20), orientation=6), 10**6)
    assert to_rgb(image).size == (20, 60)


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_an_image_problem_with_the_reason(tmp_path, name):
    writer, _ = BAD_FILES[name]
    writer(tmp_path / name)
    with pytest.raises(ImageProblem, match="truncated or corrupt image"):
        decode(str(tmp_path / name), 10**6)


def test_pixel_limit_and_missing_file(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(ImageProblem, match="too many pixels"):
        decode(str(tmp_path / "a.png"), 9999)
    with pytest.raises(ImageProblem, match="file not found"):
        decode(str(tmp_path / "b.png"), 9999)


def test_reduced_jpeg_decode_gives_nearly_the_same_crop(tmp_path):
    """A 1600×1200 photo into a 64² bucket: decoded at 1/8 scale, the result matches a full decode."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    smooth.save(tmp_path / "big.jpg", quality=95)
    transform = BucketTransform(center_crop=True, random_flip=False)
    fast = transform(decode(str(tmp_path / "big.jpg"), 10**8, cover=(85, 64)), (64, 64), random.Random(0), (1600, 1200))
    full = transform(decode(str(tmp_path / "big.jpg"), 10**8), (64, 64), random.Random(0))
    assert decode(str(tmp_path / "big.jpg"), 10**8, cover=(85, 64)).size == (200, 150)  # decoded at 1/8
    assert torch.equal(fast[1], full[1])  # same micro-conditioning: original size 1200×1600
    assert (fast[0] - full[0]).abs().mean() < 0.02
