"""DreamBooth class images: sizes after the instance buckets, drawn once, resumable, split over ranks, reused."""

import numpy as np
import pytest
from PIL import Image

from pgv25.data.class_images import ClassImages, assign_sizes, file_name, generate_class_images, missing_indices
from pgv25.errors import UserError


def test_sizes_follow_the_instance_buckets():
    sizes = assign_sizes(10, [((64, 64), 3), ((96, 48), 1), ((48, 96), 0)])
    assert sizes == [(64, 64)] * 7 + [(96, 48)] * 3  # one each, then 8 split 6:2, remainders to the largest
    assert assign_sizes(1, [((64, 64), 3), ((96, 48), 1)]) == [(64, 64)]  # fewer images than buckets: the largest
    assert sorted(set(assign_sizes(7, [((64, 64), 5), ((96, 48), 2), ((32, 32), 1)]))) == [(32, 32), (64, 64), (96, 48)]
    with pytest.raises(UserError, match="no instance images"):
        assign_sizes(3, [((64, 64), 0)])


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(UserError, match="class_prompt must be a non-empty string"):
        ClassImages(" ", tmp_path, 4)
    with pytest.raises(UserError, match="num_class_images must be an integer ≥ 1"):
        ClassImages("a dog", tmp_path, 0)


class CountingLoader:
    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __call__(self):
        self.calls += 1
        return self.pipe


def test_generated_once_resumable_split_over_ranks_and_reused(tiny_pipeline, tmp_path):
    options = ClassImages("a red circle on a white background", tmp_path / "class", 5, steps=2, batch_size=2, seed=3)
    sizes = assign_sizes(5, [((64, 64), 2), ((96, 48), 1)])
    loader = CountingLoader(tiny_pipeline)
    # two processes: each draws every second missing image; together they fill the folder
    todo = missing_indices(options)  # taken once, before any process writes (rank 0's, broadcast)
    written = [generate_class_images(options, sizes, loader, todo, rank, 2) for rank in (0, 1)]
    assert written == [3, 2] and loader.calls == 2
    names = sorted(p.name for p in options.folder.iterdir())
    assert names == [file_name(i) for i in range(5)]  # no temporary files left
    assert [Image.open(options.folder / file_name(i)).size for i in range(5)] == sizes
    first = np.asarray(Image.open(options.folder / file_name(1)))
    # resumable: a lost image is drawn again, the same pixels (its own seed), nothing else redrawn
    (options.folder / file_name(1)).unlink()
    assert missing_indices(options) == [1]
    assert generate_class_images(options, sizes, loader) == 1
    assert np.array_equal(np.asarray(Image.open(options.folder / file_name(1))), first)
    # reused: a complete folder loads no pipeline
    calls = loader.calls
    assert generate_class_images(options, sizes, loader) == 0 and loader.calls == calls
    # the user's own images count: a folder with enough of them needs nothing drawn
    own = ClassImages("a dog", tmp_path / "own", 2)
    own.folder.mkdir()
    for name in ("dog1.jpg", "dog2.jpg"):
        Image.new("RGB", (64, 64)).save(own.folder / name)
    assert missing_indices(own) == []
    own.count = 3
    assert missing_indices(own) == [0]
