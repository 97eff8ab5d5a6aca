"""The shapes toy's feature network: trained on real shapes images, saved as TorchScript with the FID Inception's
call, it goes through `pgv25 eval fid --inception` and tells a real set from a wrong one."""

import random

import numpy as np
import pytest
import torch

from pgv25.eval.fid import evaluate
from pgv25.eval.metrics import load_inception
from pgv25.eval.shapes_features import FEATURES, drawn_batch, save_features, train_features
from pgv25.tiny.shapes import SHAPES, draw


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net, accuracy = train_features(images=600, epochs=3)
    return net, accuracy, save_features(net, tmp_path_factory.mktemp("net") / "shapes_features.pt")


def write_folder(root, seed, background=None, per_shape=20):
    """A folder set (subfolder = category = shape) of real shapes; `background` forces every image's background."""
    rng = random.Random(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for k in range(per_shape):
            colour, bg = rng.sample(["red", "green", "blue", "yellow"], 2)
            draw(colour, shape, background or bg, 64, rng).save(root / shape / f"{k}.png")
    return root


def test_it_reads_colours_at_once_and_the_saved_file_is_the_same_network(network):
    net, accuracy, path = network
    # colours are learned within a few hundred images (the shape's outline takes thousands: see the experiment)
    assert accuracy["background"] > 0.9 and accuracy["shape_colour"] > 0.9
    images, _ = drawn_batch(8, random.Random(5))
    loaded = load_inception(str(path))  # exactly as `pgv25 eval fid --inception FILE` loads it
    features = loaded(images)
    assert features.shape == (8, FEATURES) and features.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(features.float(), net(images, return_features=True), atol=1e-5)
        # another resolution is resized inside, as the Inception resizes to 299²
        assert loaded(torch.nn.functional.interpolate(images.float(), size=(96, 96))).shape == (8, FEATURES)


def test_a_real_set_is_closer_to_real_images_than_a_set_with_the_wrong_backgrounds(network, tmp_path):
    _, _, path = network
    reference = write_folder(tmp_path / "reference", seed=1)
    real = write_folder(tmp_path / "real", seed=2)
    wrong = write_folder(tmp_path / "wrong", seed=2, background="black")  # same shapes, every background black
    report = evaluate(str(reference), [f"real={real}", f"wrong={wrong}"], tmp_path / "out", resolution=64,
                      inception=str(path), kid=False)
    fid = {name: model["scores"]["overall"]["fid"] for name, model in report["models"].items()}
    assert np.isfinite(list(fid.values())).all()
    assert fid["real"] < fid["wrong"] / 3, fid
    assert set(report["models"]["real"]["scores"]) == {"overall", *SHAPES}
