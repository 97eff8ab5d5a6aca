"""`pgv25 data pairs` (preference pairs from a model's own samples) and the shapes toy where a caption leaves the
background open: pairing, scorers (a callable, human labels), skips, resume, and the manifests the configs read."""

import json
from collections import Counter

import pytest
from PIL import Image

from pgv25.data import sample_pairs as sp
from pgv25.data.sources import load_rows
from pgv25.errors import UserError
from pgv25.eval.shapes import read_image
from pgv25.tiny.shapes import (
    OPEN_BACKGROUNDS,
    draw,
    open_combinations,
    parse_open_caption,
    write_open_dataset,
)


def test_the_open_dataset_draws_each_background_equally_often_under_one_caption(tmp_path):
    count = write_open_dataset(tmp_path, size=32, per_caption=6, seed=1, spread=0.3)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert count == len(rows) == 6 * len(open_combinations()) and len(open_combinations()) == 9
    per_caption = Counter((row["text"], row["background"]) for row in rows)
    assert set(per_caption.values()) == {2} and {bg for _, bg in per_caption} == set(OPEN_BACKGROUNDS)
    for row in rows[:12]:
        colour, _ = parse_open_caption(row["text"])
        reading = read_image(Image.open(tmp_path / row["file_name"]))
        assert (reading.background, reading.shape_colour) == (row["background"], colour)
        assert row["background"] not in row["text"] and colour not in OPEN_BACKGROUNDS
    with pytest.raises(ValueError, match="must be a multiple of the 3 backgrounds"):
        write_open_dataset(tmp_path / "x", per_caption=4)
    with pytest.raises(ValueError, match="two or more different colours"):
        write_open_dataset(tmp_path / "y", backgrounds=("black", "black"))


def test_open_assets_are_built_and_cached_by_their_parameters(tmp_path):
    from pgv25.tiny import _read_stamp, ensure_tiny_assets

    extra = {"open_k3": {"open_backgrounds": ["black", "white", "blue"], "per_caption": 3},
             "open_k2": {"open_backgrounds": ["black", "white"], "per_caption": 2}}
    ensure_tiny_assets(tmp_path, image_size=32, per_caption=1, vae_steps=2, text_steps=2, extra_datasets=extra)
    for name, options in extra.items():
        stamp = _read_stamp(tmp_path / name)
        assert stamp["params"]["open_backgrounds"] == options["open_backgrounds"]
        assert stamp["images"] == options["per_caption"] * len(open_combinations(tuple(options["open_backgrounds"])))


def scored(prompt_id, *values):
    return [sp.Scored(f"{prompt_id}_s{k}", prompt_id, f"prompt {prompt_id}", f"images/{prompt_id}/{k}.png", v)
            for k, v in enumerate(values)]


def test_pairs_are_best_against_worst_or_every_pair_above_the_margin():
    items = scored("a", 0.2, 0.9, 0.5) + scored("b", 0.4, 0.4) + scored("c", 1.0, 0.0)
    pairs, without = sp.make_pairs(items, "best-worst", 0.0)
    assert [(c.id, r.id) for c, r in pairs] == [("a_s1", "a_s0"), ("c_s0", "c_s1")] and without == 1  # b: a tie
    pairs, without = sp.make_pairs(items, "all", 0.35)  # a's 0.5 against 0.2 is within the margin
    assert [(c.id, r.id) for c, r in pairs] == [("a_s1", "a_s2"), ("a_s1", "a_s0"), ("c_s0", "c_s1")] and without == 1
    pairs, _ = sp.make_pairs(items, "all", 0.0)
    assert len(pairs) == 3 + 1  # a: three ordered pairs; c: one
    top = sp.top_samples(items, 2, min_score=0.45)
    assert [s.id for s in top] == ["a_s1", "a_s2", "c_s0"]


def test_scorer_specs_load_from_a_module_or_a_file_and_fail_in_one_line(tmp_path):
    score = sp.load_scorer("pgv25.eval.shapes:preference", {"background": "black"})
    image = draw("red", "circle", "black", 32, __import__("random").Random(0), 0.3)
    assert score([image], ["a red circle"]) == [pytest.approx(1.2)]  # black, and red circle right
    (tmp_path / "mine.py").write_text("def brightness(images, prompts, scale=1.0):\n"
                                      "    return [scale * sum(i.convert('L').getdata()) for i in images]\n")
    assert sp.load_scorer(f"{tmp_path / 'mine.py'}:brightness", {"scale": 0.0})([image], ["x"]) == [0.0]
    with pytest.raises(UserError, match=r"cannot be imported: ModuleNotFoundError: No module named 'no_such_reward'"):
        sp.load_scorer("no_such_reward.model:score", {})
    with pytest.raises(UserError, match="has no function 'missing'"):
        sp.load_scorer(f"{tmp_path / 'mine.py'}:missing", {})
    with pytest.raises(UserError, match="give module:function"):
        sp.load_scorer("justaname", {})
    (tmp_path / "broken.py").write_text("import numpy as np\nraise RuntimeError('weights not found\\nmore')\n")
    with pytest.raises(UserError, match=r"cannot be imported: RuntimeError: weights not found$"):
        sp.load_scorer(f"{tmp_path / 'broken.py'}:f", {})


def test_an_image_the_scorer_fails_on_is_a_counted_skip(tmp_path):
    from pgv25.eval.prompts import EvalPrompt

    samples = sp.sample_prompts([EvalPrompt("p", "a red circle"), EvalPrompt("q", "a blue square")], 3)
    for k, item in enumerate(samples):
        (tmp_path / item.category).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(tmp_path / item.category / f"{item.id}.png")
    (tmp_path / "q" / "q_s2.png").write_bytes(b"not a png")

    def fussy(images, prompts):  # fails on one image, gives NaN for another
        values = []
        for image in images:
            red = image.getpixel((0, 0))[0]
            if red == 40:
                raise ValueError("cannot score this one")
            values.append(float("nan") if red == 80 else red)
        return values

    skipped = Counter()
    scores = sp.score_images(fussy, samples, tmp_path, skipped)
    assert scores == {"p_s0": 0.0, "p_s1": None, "p_s2": None, "q_s0": 120.0, "q_s1": 160.0, "q_s2": None}
    assert skipped == {"scorer failed": 1, "no finite score": 1, "unreadable image": 1}
    assert sp.score_images(lambda images, prompts: [1.0], samples[3:5], tmp_path, Counter()) == {"q_s0": 1.0, "q_s1": 1.0}


def test_human_labels_are_read_by_image_id(tmp_path):
    (tmp_path / "l.csv").write_text("id,score\np_s0,1\np_s1,0.5\np_s2,oops\n")
    assert sp.read_labels(str(tmp_path / "l.csv")) == {"p_s0": 1.0, "p_s1": 0.5}
    (tmp_path / "bad.csv").write_text("image,rating\n")
    with pytest.raises(UserError, match=r"needs columns id and score \(or label\)"):
        sp.read_labels(str(tmp_path / "bad.csv"))


def test_pgv25_data_pairs_end_to_end_resumes_and_feeds_the_dpo_and_curated_manifests(tiny_assets, tmp_path, capsys):
    from pgv25.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n"
                               for i, text in enumerate(["a red circle", "a green square on a white background"])))
    calls = tmp_path / "calls.txt"
    (tmp_path / "reward.py").write_text(
        "from pgv25.eval.shapes import preference\n"
        f"def score(images, prompts, **options):\n    open({str(calls)!r}, 'a').write(f'{{len(images)}}\\n')\n"
        "    return preference(images, prompts, **options)\n")
    out = tmp_path / "pairs"
    args = ["data", "pairs", "--model", str(tiny_assets["model"]), "--prompts", str(prompts), "--out", str(out),
            "--samples", "3", "--steps", "2", "--scorer", f"{tmp_path / 'reward.py'}:score",
            "--scorer-option", "background=black", "--top", "2", "--pairs", "all"]
    assert main(args) == 0
    said = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["scored"] == 6 and summary["options"] == {"background": "black"}
    assert f"{summary['pairs']} pairs from 2 prompts × 3 samples" in said
    meta = json.loads((out / "images" / "meta_data.json").read_text())
    assert sorted(meta) == ["p0_s0", "p0_s1", "p0_s2", "p1_s0", "p1_s1", "p1_s2"]
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"] and (out / row["chosen"]).is_file()
    top = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    assert len(top) == 4 and all((out / row["image"]).is_file() for row in top)
    assert calls.read_text().split() == ["3", "3"]  # one call per prompt
    # a rerun makes no image and scores nothing again
    stamp = (out / "images" / "p0" / "p0_s0.png").stat().st_mtime_ns
    assert main(args) == 0
    assert calls.read_text().split() == ["3", "3"] and (out / "images" / "p0" / "p0_s0.png").stat().st_mtime_ns == stamp
    # the curated fine-tune's manifest reads as an image/caption dataset
    curated = load_rows({"type": "manifest", "path": str(out / "top.jsonl"), "image_column": "image", "caption_column": "text"})
    assert len(curated) == 4
    # human labels instead of a scorer: the same images, joined by id; an unlabelled one is skipped and counted
    (tmp_path / "labels.csv").write_text("id,score\np0_s0,0\np0_s1,2\np1_s0,1\np1_s2,0\n")
    labelled = args[:args.index("--scorer")] + ["--labels", str(tmp_path / "labels.csv")]
    assert main(labelled) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 4 and summary["skipped"] == {"no label": 2} and summary["pairs"] == 2
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("images/p0/p0_s1.png", "images/p0/p0_s0.png"),
                                                             ("images/p1/p1_s0.png", "images/p1/p1_s2.png")]
    # and the pairs as the DPO configs read them
    pairs = load_rows({"type": "manifest", "path": str(out / "pairs.jsonl"), "caption_column": "text",
                       "pairs": {"format": "chosen_rejected"}})
    assert pairs.images == [str(out / r["chosen"]) for r in rows] and pairs.losers == [str(out / r["rejected"]) for r in rows]


def test_pgv25_data_pairs_refuses_bad_options_in_one_line(tmp_path, capsys):
    from pgv25.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    base = ["data", "pairs", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    for extra, message in [([], "give one of --scorer module:function"),
                           (["--scorer", "x:y", "--labels", "l.csv"], "give one of --scorer"),
                           (["--scorer", "no_such_reward:score"], "cannot be imported"),
                           (["--scorer", "pgv25.eval.shapes:preference", "--samples", "1"], "--samples must be at least 2"),
                           (["--scorer", "pgv25.eval.shapes:preference", "--margin", "-1"], "--margin must be"),
                           (["--scorer", "pgv25.eval.shapes:preference", "--steps", "0"], "--steps must be positive")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
