import json

import pytest

from pgv25.data.rows import EMPTY_CAPTION, NO_CAPTION, NOT_UTF8
from pgv25.data.sources import load_rows
from pgv25.errors import UserError

from .files import png, write_folder


def test_folder_with_metadata_jsonl(tmp_path):
    rows = load_rows({"type": "folder", "path": str(write_folder(tmp_path / "d"))})
    assert len(rows) == 4 and rows.captions[2] == ["caption 2"]
    assert rows.open(1) == str(tmp_path / "d" / "1.png")


def test_folder_with_sidecar_captions(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "sub/d"):
        png(folder / f"{name}.png")
    (folder / "a.txt").write_text("  a cat \n")
    (folder / "b.txt").write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    (folder / "sub" / "d.txt").write_text("")
    rows = load_rows({"type": "folder", "path": str(folder)})
    by_name = {p.split("/")[-1]: c for p, c in zip(rows.images, rows.captions)}
    assert by_name == {"a.png": ["a cat"], "b.png": NOT_UTF8, "c.png": NO_CAPTION, "d.png": EMPTY_CAPTION}


def test_csv_manifest_paths_relative_to_it_and_a_non_utf8_row(tmp_path):
    (tmp_path / "img").mkdir()
    png(tmp_path / "img" / "x.png")
    text = b"path,caption\nimg/x.png,a red square\nimg/y.png,caf\xe9\nimg/z.png,\n"
    (tmp_path / "m.csv").write_bytes(text)
    rows = load_rows({"type": "manifest", "path": str(tmp_path / "m.csv"), "image_column": "path", "caption_column": "caption"})
    assert rows.images[0] == str(tmp_path / "img" / "x.png")
    assert rows.captions == [["a red square"], NOT_UTF8, EMPTY_CAPTION]


def test_jsonl_manifest_with_caption_lists_and_a_broken_line(tmp_path):
    lines = [json.dumps({"image": "a.png", "text": ["one", "two", ""]}), "{not json", json.dumps({"image": "b.png", "text": None})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    rows = load_rows({"type": "manifest", "path": str(tmp_path / "m.jsonl")})
    assert rows.captions == [["one", "two"], "unreadable manifest line", NO_CAPTION]
    assert rows.label(1) == f"{tmp_path / 'm.jsonl'}:2"


def test_parquet_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"file": ["a.png", "b.png"], "captions": [["x", "y"], ["z"]]}), tmp_path / "m.parquet")
    rows = load_rows({"type": "manifest", "path": str(tmp_path / "m.parquet"), "image_column": "file", "caption_column": "captions"})
    assert rows.captions == [["x", "y"], ["z"]] and rows.images[1] == str(tmp_path / "b.png")


@pytest.mark.parametrize("cfg, message", [
    ({"type": "manifest", "path": "nowhere.csv"}, "manifest nowhere.csv does not exist"),
    ({"type": "folder", "path": "nowhere"}, "image folder nowhere does not exist"),
    ({"type": "manifest", "path": "{tmp}/m.txt"}, "unknown format"),
    ({"type": "manifest", "path": "{tmp}/m.csv", "caption_column": "caption"}, "no column 'caption'; its columns are ['image', 'text']"),
    ({"type": "folder", "path": "{tmp}"}, "holds no images"),
    ({"type": "sql", "path": "x"}, "type must be 'hub', 'folder' or 'manifest'"),
    ({"type": "hub"}, "set train_dataloader.dataset.path"),
])
def test_whole_source_mistakes_are_one_line_errors(tmp_path, cfg, message):
    (tmp_path / "m.txt").write_text("x")
    (tmp_path / "m.csv").write_text("image,text\na.png,b\n")
    cfg = {k: v.replace("{tmp}", str(tmp_path)) for k, v in cfg.items()}
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        load_rows(cfg)
    assert "\n" not in str(error.value)


def saved_hub_dataset(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (32, 16), (i * 40, 0, 0)) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": images, "text": ["a", "", "c"]}, features=features)
    data.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_local_saved_dataset_is_read_undecoded(tmp_path):
    from PIL import Image

    rows = load_rows({"type": "hub", "path": str(saved_hub_dataset(tmp_path))})
    assert rows.captions == [["a"], EMPTY_CAPTION, ["c"]]
    assert Image.open(rows.open(2)).getpixel((0, 0)) == (80, 0, 0)


def test_a_fixed_caption_needs_no_caption_column_and_keeps_filtered_rows_out(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (32, 16), (i * 40, 0, 0)) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "score": datasets.Value("float32")})
    datasets.Dataset.from_dict({"image": images, "score": [1.0, 5.0, 9.0]}, features=features).save_to_disk(str(tmp_path / "d"))
    rows = load_rows({"type": "hub", "path": str(tmp_path / "d"), "caption": "a photo of sks dog"})  # image-only dataset
    assert rows.captions == [["a photo of sks dog"]] * 3
    kept = load_rows({"type": "hub", "path": str(tmp_path / "d"), "caption": "a photo of sks dog", "filters": {"score": {"min": 4}}})
    assert kept.captions[0] != ["a photo of sks dog"] and kept.captions[1:] == [["a photo of sks dog"]] * 2


def test_hub_dataset_wrong_column(tmp_path):
    with pytest.raises(UserError, match="no column 'caption'"):
        load_rows({"type": "hub", "path": str(saved_hub_dataset(tmp_path)), "caption_column": "caption"})


def test_unreachable_hub_dataset_is_one_line_with_the_fix():
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*train_dataloader.dataset.path=DIR"):
        load_rows({"type": "hub", "path": "someone/some-dataset"})
