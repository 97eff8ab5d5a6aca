"""`pgv25 eval fid`: FID, KID and CLIP score equal torchmetrics' own numbers on the same images, per category and
overall, for each way a reference set is laid out; every bad input is one line or a counted skip.

Nothing downloads: a random-init TorchScript network with the FID Inception's call signature goes where
inception-2015-12-05.pt would, and a random-init CLIP is written where a CLIP folder would be.
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pgv25.cli import main
from pgv25.errors import UserError
from pgv25.eval.fid import evaluate, named_sets
from pgv25.eval.image_sets import MJHQ_CATEGORIES, decode, read_image_set
from pgv25.eval.report import markdown
from pgv25.eval.metrics import MIN_IMAGES, InceptionFeatures, load_clip, load_inception

RESOLUTION = 40
# The library's numbers and ours come from the same float64 features through the same torchmetrics code; what may
# differ is summation order (batches of 32 against one batch) and the float32 network's batch-dependent rounding.
REL = 1e-4


class StandIn(nn.Module):
    """The FID Inception's call (uint8-range images of any size, return_features) with random weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 5, stride=3)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(img / 128 - 1, size=(48, 48), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pgv25.tiny.base_pipeline import train_clip_bpe, write_bpe_files

    folder = tmp_path_factory.mktemp("clip")
    vocab, merges = train_clip_bpe([f"a {c} {s} picture" for c in ("red", "blue", "green") for s in ("big", "small")], 40)
    vocab_file, merges_file = write_bpe_files(folder / "bpe", vocab, merges)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def draw(path, colour, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


COLOURS = {"animals": (200, 60, 30), "food": (30, 60, 200), "logo": (40, 200, 40)}


def write_set(root, shift=0, per_category=6, meta=True, seed=0):
    """`<category>/<id>.png` with MJHQ-30K's meta_data.json (ids, categories, prompts)."""
    records = {}
    for c, (category, colour) in enumerate(COLOURS.items()):
        for i in range(per_category):
            image_id = f"{category[:2]}{i:03d}"
            draw(root / category / f"{image_id}.png", tuple(v + shift for v in colour), seed * 1000 + c * 100 + i)
            records[image_id] = {"category": category, "prompt": f"a {'red' if c == 0 else 'blue'} picture"}
    if meta:
        (root / "meta_data.json").write_text(json.dumps(records))
    return records


def library_fid(inception, real_paths, fake_paths):
    """torchmetrics' FrechetInceptionDistance over the network itself, fed the images directly."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    network = InceptionFeatures(inception)
    metric = FrechetInceptionDistance(feature=network, input_img_size=(3, RESOLUTION, RESOLUTION))
    load = lambda paths: torch.stack([decode_file(p) for p in paths])  # noqa: E731
    metric.update(load(real_paths), real=True)
    metric.update(load(fake_paths), real=False)
    return float(metric.compute())


def decode_file(path):
    """The documented resize, done here with PIL directly: shorter side to R (bicubic), centre crop."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = RESOLUTION / min(rgb.size)
    size = (max(RESOLUTION, round(rgb.width * scale)), max(RESOLUTION, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.BICUBIC)
    left, top = (size[0] - RESOLUTION) // 2, (size[1] - RESOLUTION) // 2
    rgb = rgb.crop((left, top, left + RESOLUTION, top + RESOLUTION))
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def test_fid_kid_and_clip_equal_the_librarys_own_numbers_overall_and_per_category(tmp_path, inception, clip_folder):
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

    write_set(tmp_path / "ref", per_category=20, meta=False, seed=1)
    records = write_set(tmp_path / "gen", shift=25, per_category=20, seed=2)
    report = evaluate(str(tmp_path / "ref"), [f"step8={tmp_path / 'gen'}"], tmp_path / "out", RESOLUTION, str(inception),
                      str(clip_folder), batch_size=7)
    scores = report["models"]["step8"]["scores"]
    assert sorted(scores) == ["animals", "food", "logo", "overall"]
    real = sorted((tmp_path / "ref").rglob("*.png"))
    fake = sorted((tmp_path / "gen").rglob("*.png"))
    assert scores["overall"]["fid"] == pytest.approx(library_fid(inception, real, fake), rel=REL)
    for category in COLOURS:
        pick = lambda paths: [p for p in paths if p.parent.name == category]  # noqa: E731
        assert scores[category]["fid"] == pytest.approx(library_fid(inception, pick(real), pick(fake)), rel=REL)
        assert scores[category]["images"] == scores[category]["reference"] == 20
    # Per category is not overall: the categories differ from each other far more than within.
    assert scores["overall"]["fid"] != pytest.approx(scores["animals"]["fid"], rel=0.01)

    # KID: the library's, over the same subsets (same seed; subsets of half the smaller set, so that they vary).
    network = InceptionFeatures(inception)
    kid = KernelInceptionDistance(feature=network, subset_size=len(fake) // 2)
    kid.update(torch.stack([decode_file(p) for p in real]), real=True)
    kid.update(torch.stack([decode_file(p) for p in fake]), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = kid.compute()
    assert scores["overall"]["kid"] == pytest.approx(float(mean), rel=1e-3, abs=1e-7)
    assert scores["overall"]["kid_std"] == pytest.approx(float(std), rel=1e-3, abs=1e-7) and float(std) > 0

    # CLIP score: torchmetrics' CLIPScore per category, on the same images and prompts (CLIP's crop size: 32).
    model, processor = load_clip(str(clip_folder))
    for category in COLOURS:
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        paths = [p for p in fake if p.parent.name == category]
        images = []
        for p in paths:
            with Image.open(p) as image:
                rgb = image.convert("RGB")
            rgb = rgb.resize((round(rgb.width * 32 / rgb.height), 32), Image.BICUBIC)
            left = (rgb.width - 32) // 2
            images.append(torch.from_numpy(np.asarray(rgb.crop((left, 0, left + 32, 32))).copy()).permute(2, 0, 1))
        metric.update(torch.stack(images), [records[p.stem]["prompt"] for p in paths])
        assert report["models"]["step8"]["clip"][category] == pytest.approx(float(metric.compute()), rel=1e-5)
    assert min(report["models"]["step8"]["clip"].values()) >= 0


def test_the_report_puts_models_side_by_side_and_the_reference_features_are_computed_once(tmp_path, inception, caplog):
    caplog.set_level(logging.INFO)
    write_set(tmp_path / "ref", per_category=5, seed=1)
    write_set(tmp_path / "near", shift=5, per_category=5, seed=2)
    write_set(tmp_path / "far", shift=60, per_category=5, seed=3)
    out = tmp_path / "out"
    command = ["eval", "fid", "--reference", str(tmp_path / "ref"), "--images", f"base={tmp_path / 'far'}",
               f"step800={tmp_path / 'near'}", "--out", str(out), "--resolution", str(RESOLUTION), "--inception", str(inception)]
    assert main(command) == 0
    report = json.loads((out / "fid.json").read_text())
    assert list(report["models"]) == ["base", "step800"]
    assert report["models"]["step800"]["scores"]["overall"]["fid"] < report["models"]["base"]["scores"]["overall"]["fid"]
    table = (out / "fid.md").read_text()
    assert "| category | base | step800 |" in table and "| food |" in table
    assert (out / "fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = sorted(p.name for p in (out / "features").iterdir())
    assert len(cached) == 3
    # A second run reads every set's features from the cache and gives the same numbers.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    assert main(command) == 0
    assert json.loads((out / "fid.json").read_text()) == report
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == stamps
    # A changed set is measured again, not read from a stale cache.
    draw(tmp_path / "near" / "food" / "fo000.png", (255, 255, 255), 9)
    assert main(command) == 0
    assert json.loads((out / "fid.json").read_text())["models"]["step800"] != report["models"]["step800"]


def test_reference_sets_as_mjhq_publishes_them(tmp_path, inception):
    """MJHQ-30K's parquet (image bytes + a ClassLabel or bare integer label), its meta_data.json + <category>/<id>.jpg
    download, and a plain folder give the same images the same categories."""
    import datasets

    write_set(tmp_path / "folder", per_category=3, meta=False)
    rows = {"image": [], "label": []}
    for path in sorted((tmp_path / "folder").rglob("*.png")):
        rows["image"].append({"bytes": path.read_bytes(), "path": None})
        rows["label"].append(MJHQ_CATEGORIES.index(path.parent.name))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(MJHQ_CATEGORIES))})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "named.parquet"))
    bare = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=bare).to_parquet(str(tmp_path / "hub" / "data" / "train-0.parquet"))
    for image in sorted((tmp_path / "folder").rglob("*.png")):  # the download: JPEGs and meta_data.json
        target = tmp_path / "mjhq" / image.parent.name / f"{image.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).save(target, quality=95)
    (tmp_path / "mjhq" / "meta_data.json").write_text(json.dumps(
        {p.stem: {"category": p.parent.name, "prompt": "x"} for p in (tmp_path / "mjhq").rglob("*.jpg")}))
    expected = {"animals": 3, "food": 3, "logo": 3}
    for source in ("folder", "named.parquet", "hub", "mjhq"):
        image_set = read_image_set(str(tmp_path / source))
        assert dict(image_set.categories()) == expected, source
        assert decode(image_set.images[0], RESOLUTION).shape == (3, RESOLUTION, RESOLUTION)
    report = evaluate(str(tmp_path / "named.parquet"), [str(tmp_path / "folder")], tmp_path / "out", RESOLUTION,
                      str(inception), kid=False)
    assert report["models"]["folder"]["scores"]["overall"]["fid"] == pytest.approx(0, abs=1e-3)  # the same images


def test_bad_inputs_are_one_line_or_a_counted_skip(tmp_path, inception, caplog):
    write_set(tmp_path / "ref", per_category=4, seed=1)
    records = write_set(tmp_path / "gen", per_category=4, seed=2)
    # ids without images and images without ids; a damaged image; a category with one image; hidden leftovers
    (tmp_path / "gen" / "food" / "fo000.png").unlink()
    draw(tmp_path / "gen" / "food" / "extra.png", (0, 0, 0), 5)
    (tmp_path / "gen" / "animals" / "an001.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "gen" / "animals" / ".an002.png.tmp77").write_bytes(b"half")
    for image_id in ("lo001", "lo002", "lo003"):
        (tmp_path / "gen" / "logo" / f"{image_id}.png").unlink()
    assert len(records) == 12
    report = evaluate(str(tmp_path / "ref"), [str(tmp_path / "gen")], tmp_path / "out", RESOLUTION, str(inception))
    assert "4 id(s) of meta_data.json without an image" in caplog.text
    assert "1 image(s) that meta_data.json does not list" in caplog.text
    assert "1 image(s) that cannot be decoded left out: an001" in caplog.text
    assert f"FID and KID need at least {MIN_IMAGES}" in caplog.text
    scores = report["models"]["gen"]["scores"]
    assert scores["logo"] == {"images": 1, "reference": 4, "too_few": True}
    assert scores["animals"]["images"] == 3 and scores["overall"]["images"] == 7
    assert "| logo | n=1/4 (too few) |" in markdown(report)

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.pt").write_bytes(b"not torchscript")
    (tmp_path / "all_bad").mkdir()
    (tmp_path / "all_bad" / "a.png").write_bytes(b"no")
    for call, message in [
        (lambda: load_inception(str(tmp_path / "nowhere.pt")), "curl -L --create-dirs -o inception-2015-12-05.pt"),
        (lambda: load_inception(str(tmp_path / "broken.pt")), "cannot be read as the TorchScript FID Inception"),
        (lambda: load_clip(str(tmp_path / "noclip")), "huggingface-cli download openai/clip-vit-large-patch14"),
        (lambda: read_image_set(str(tmp_path / "missing")), "does not exist"),
        (lambda: read_image_set(str(tmp_path / "empty")), "holds no image"),
        (lambda: read_image_set("someone/not-here"), "the Hugging Face Hub cannot be reached"),
        (lambda: named_sets([f"a={tmp_path}", f"a={tmp_path}"]), "names a more than once"),
        (lambda: evaluate(str(tmp_path / "ref"), [str(tmp_path / "all_bad")], tmp_path / "o2", RESOLUTION, str(inception)),
         "none of its 1 images can be decoded"),
    ]:
        with pytest.raises(UserError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_kill_during_generation_then_rerun_gives_the_same_fid(tiny_assets, tmp_path, inception):
    """Generation killed mid-run (an image missing, a half-written temporary file left), then rerun: no image missing
    or doubled, and the same FID as an uninterrupted run."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a {c} circle on a black background", "category": c}) + "\n"
                               for c in ("red", "blue", "green") for _ in range(2)))
    generate = ["eval", "generate", "--model", str(tiny_assets["model"]), "--prompts", str(prompts), "--steps", "2",
                "--width", "64", "--height", "64"]
    assert main(generate + ["--out", str(tmp_path / "whole")]) == 0
    assert main(generate + ["--out", str(tmp_path / "killed")]) == 0
    lost = sorted((tmp_path / "killed").rglob("*.png"))[2]
    lost.unlink()
    (lost.parent / f".{lost.name}.tmp4242").write_bytes(b"half an image")
    assert main(generate + ["--out", str(tmp_path / "killed")]) == 0
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.png"))
    assert sorted(p.relative_to(tmp_path / "killed") for p in (tmp_path / "killed").rglob("*.png")) == whole
    assert not list((tmp_path / "killed").rglob(".*.tmp*"))
    report = evaluate(str(tmp_path / "whole"), [f"whole={tmp_path / 'whole'}", f"killed={tmp_path / 'killed'}"],
                      tmp_path / "out", 64, str(inception), kid=False)
    assert report["models"]["killed"]["scores"] == report["models"]["whole"]["scores"]
