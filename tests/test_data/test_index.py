import pytest
from PIL import Image

from pgv25.data import index as index_module
from pgv25.data.index import scan
from pgv25.data.sources import load_rows

from .files import BAD_FILES, jpeg, png, write_folder


def folder_with_problems(root):
    extra = [{"file_name": name, "text": "bad file"} for name in BAD_FILES]
    extra += [{"file_name": "missing.png", "text": "gone"}, {"file_name": "0.png"}, {"file_name": "1.png", "text": "  "},
              {"file_name": "big.png", "text": "huge"}, {"file_name": "rotated.jpg", "text": "portrait"}]
    write_folder(root, n=4, extra_rows=extra)
    for name, (writer, _) in BAD_FILES.items():
        writer(root / name)
    png(root / "big.png", size=(300, 250))
    jpeg(root / "rotated.jpg", size=(60, 20), orientation=6)  # stored landscape, displayed portrait
    return root


def test_scan_keeps_good_rows_and_names_every_problem(tmp_path):
    rows = load_rows({"type": "folder", "path": str(folder_with_problems(tmp_path / "d"))})
    index = scan(rows, max_pixels=250 * 250)
    reasons = dict(index.problems)
    assert reasons == {
        str(tmp_path / "d" / "zero.png"): "empty file",
        str(tmp_path / "d" / "notes.png"): "not an image",
        str(tmp_path / "d" / "missing.png"): "file not found",
        str(tmp_path / "d" / "0.png"): "missing caption",
        str(tmp_path / "d" / "1.png"): "empty caption",
        str(tmp_path / "d" / "big.png"): "too many pixels",
    }
    kept = {rows.label(int(r)): (int(w), int(h)) for r, w, h in zip(index.rows, index.widths, index.heights)}
    # the truncated JPEG has a good header: only decoding finds it (counted during training)
    assert kept[str(tmp_path / "d" / "cut.jpg")] == (64, 48)
    assert kept[str(tmp_path / "d" / "rotated.jpg")] == (20, 60)  # EXIF rotation honoured
    assert kept[str(tmp_path / "d" / "2.png")] == (40, 30)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # PIL would refuse this one itself at open; the scan reports it like any oversized image
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    (tmp_path / "bomb.txt").write_text("a bomb")
    index = scan(load_rows({"type": "folder", "path": str(tmp_path)}), max_pixels=1000)
    assert index.problems == [(str(path), "too many pixels")] and len(index) == 0


def test_scan_is_cached_and_a_changed_file_rescans(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "d")
    cfg = {"type": "folder", "path": str(folder)}
    first = scan(load_rows(cfg), tmp_path / "cache")
    calls = []
    real_probe = index_module.probe
    monkeypatch.setattr(index_module, "probe", lambda *a: calls.append(1) or real_probe(*a))
    again = scan(load_rows(cfg), tmp_path / "cache")
    assert not calls and again.rows.tolist() == first.rows.tolist() and again.widths.tolist() == first.widths.tolist()
    png(folder / "2.png", size=(50, 10))
    changed = scan(load_rows(cfg), tmp_path / "cache")
    assert calls and changed.widths.tolist() == [40, 40, 50, 40]


@pytest.mark.parametrize("threads", [1, 8])
def test_scan_order_does_not_depend_on_threads(tmp_path, threads):
    folder = write_folder(tmp_path / "d", n=30)
    index = scan(load_rows({"type": "folder", "path": str(folder)}), threads=threads)
    assert index.rows.tolist() == list(range(30))
