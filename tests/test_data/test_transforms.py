import random

import numpy as np
import torch
from PIL import Image

from pgv25.data.transforms import SDXLTransform, to_rgb


def gradient_image(width, height):
    """Red channel encodes x, green encodes y: crops and flips can be read back from pixels."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def test_time_ids_record_original_size_crop_and_target():
    pixels, time_ids = SDXLTransform(64, center_crop=True, random_flip=False)(gradient_image(200, 100), random.Random(0))
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    # 200×100 → 128×64, centre crop of 64 from 128 wide: left = 32
    assert time_ids.tolist() == [100, 200, 0, 32, 64, 64]


def test_random_crop_coordinates_match_the_pixels():
    transform = SDXLTransform(64, center_crop=False, random_flip=False)
    resized = np.asarray(gradient_image(256, 64).resize((256, 64), Image.BICUBIC), dtype=np.float32)
    for seed in range(5):
        pixels, time_ids = transform(gradient_image(256, 64), random.Random(seed))
        left = int(time_ids[3])
        expected = torch.from_numpy(resized[:, left:left + 64]).permute(2, 0, 1) / 127.5 - 1
        assert torch.allclose(pixels, expected, atol=1e-5)


def test_flip_mirrors_pixels_and_crop_left():
    image = gradient_image(256, 64)
    plain, plain_ids = SDXLTransform(64, center_crop=True, random_flip=False)(image, random.Random(0))
    flips = [SDXLTransform(64, center_crop=True, random_flip=True)(image, random.Random(s)) for s in range(20)]
    flipped = [(p, t) for p, t in flips if not torch.equal(p, plain)]
    assert flipped, "no sample was flipped in 20 draws"
    pixels, time_ids = flipped[0]
    assert torch.equal(pixels, plain.flip(-1))
    assert int(time_ids[3]) == 256 - int(plain_ids[3]) - 64


def test_same_rng_same_result():
    t = SDXLTransform(64)
    a, b = t(gradient_image(300, 90), random.Random(7)), t(gradient_image(300, 90), random.Random(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
