"""Caption handling: a template once per row, tag shuffling and dropout per (seed, step, slot)."""

import json
import random

import pytest

from pgv25.data.cache import cache_key
from pgv25.data.captions import CaptionOptions, caption_options
from pgv25.data.dataset import build_dataset, plan_data
from pgv25.errors import UserError

from .files import png


def tagged_folder(root, n=3):
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        png(root / f"{i}.png", size=(32, 32), color=(i * 40, 0, 0))
        rows.append({"file_name": f"{i}.png", "text": f"dog, grass, ball {i}, sunny, photo"})
    rows.append({"file_name": "blank.png", "text": ""})
    png(root / "blank.png", size=(32, 32))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_template_prefix_and_the_unconditional_caption():
    assert caption_options({"captions": {"prefix": "TOK, "}}).fixed("a dog") == "TOK, a dog"
    options = caption_options({"captions": {"template": "a photo of TOK, {caption}"}})
    assert options.fixed("on grass") == "a photo of TOK, on grass"
    assert options.fixed("") == ""  # the unconditional input stays unconditional
    assert caption_options({}).default and not options.default


def test_shuffle_keeps_the_leading_tags_and_dropout_never_drops_them():
    options = CaptionOptions(shuffle_tags=True, keep_tokens=2, tag_dropout=0.3)
    caption = "TOK, dog, a, b, c, d, e, f"
    seen_orders, lengths = set(), set()
    for seed in range(200):
        out = options(caption, random.Random(seed)).split(", ")
        assert out[:2] == ["TOK", "dog"] and set(out[2:]) <= set("abcdef") and len(set(out)) == len(out)
        seen_orders.add(tuple(out))
        lengths.add(len(out))
    assert len(seen_orders) > 50 and min(lengths) < 8 and max(lengths) == 8  # shuffled, sometimes shorter
    assert options(caption, random.Random(7)) == options(caption, random.Random(7))
    assert CaptionOptions(shuffle_tags=True)("", random.Random(0)) == ""


@pytest.mark.parametrize("captions, message", [
    ({"template": "no placeholder"}, "exactly once"),
    ({"template": "{caption}", "prefix": "TOK "}, "not both"),
    ({"keep_tokens": -1}, "keep_tokens"),
    ({"tag_dropout": 1.0}, "tag_dropout"),
    ({"shuffle": True}, "unknown option"),
])
def test_bad_options_are_one_line(captions, message):
    with pytest.raises(UserError, match=message):
        caption_options({"captions": captions})


def test_per_step_captions_refuse_the_latent_cache():
    with pytest.raises(UserError, match="cache.enabled=False"):
        caption_options({"captions": {"shuffle_tags": True}, "cache": {"enabled": True}})
    caption_options({"captions": {"prefix": "TOK, "}, "cache": {"enabled": True}})  # a template is encoded once: fine


def test_dataset_items_are_seeded_by_step_and_slot(tmp_path):
    options = {"type": "folder", "path": str(tagged_folder(tmp_path / "d")), "resolution": 16,
               "captions": {"prefix": "TOK, ", "shuffle_tags": True, "keep_tokens": 2}, "keep_uncaptioned": True}
    plan = plan_data(options)
    assert [""] in plan.rows.captions  # the blank caption (trained unconditional) untouched by the prefix
    dataset = build_dataset(options, plan, seed=0)
    position = next(p for p in range(len(plan.index)) if plan.rows.captions[int(plan.index.rows[p])][0])
    items = [dataset[(step, 0, position)]["caption"] for step in range(30)]
    assert all(c.startswith("TOK, dog, ") for c in items) and len(set(items)) > 5
    again = build_dataset(options, plan_data(options), seed=0)  # a resumed run builds it anew
    assert [again[(step, 0, position)]["caption"] for step in range(30)] == items


def test_the_template_is_part_of_the_cache_key(tmp_path):
    root = tagged_folder(tmp_path / "d")
    plain = {"type": "folder", "path": str(root), "resolution": 16}
    prefixed = {**plain, "captions": {"prefix": "TOK, "}}
    key = cache_key(plan_data(plain), plain, "enc", True, 0)[0]
    assert cache_key(plan_data(prefixed), prefixed, "enc", True, 0)[0] != key
    assert cache_key(plan_data(plain), {**plain, "captions": {}}, "enc", True, 0)[0] == key  # old caches keep their key


def test_a_prefix_split_by_the_command_line_says_why():
    from pgv25.config import parse_cfg_options

    value = parse_cfg_options(["captions.prefix=TOK, a"])["captions.prefix"]
    with pytest.raises(UserError, match="set one with a comma in the config file"):
        caption_options({"captions": {"prefix": value}})
