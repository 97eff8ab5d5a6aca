from PIL import Image

from pgv25.generate import labelled_grid


def test_wide_images_leave_no_empty_band():
    wide = [Image.new("RGB", (96, 48), (255, 0, 0)) for _ in range(5)]
    grid = labelled_grid(wide, ["a red square"] * 5, columns=4, cell=192)
    assert grid.size == (4 * 192, 2 * (96 + 28))
    assert grid.getpixel((10, 95)) == (255, 0, 0)  # last image row
    assert grid.getpixel((10, 96 + 28 + 10)) == (255, 0, 0)  # second grid row starts right after the label


def test_square_and_tall_images_keep_square_cells():
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (48, 96))]
    assert labelled_grid(images, ["a", "b"], columns=2, cell=192).size == (2 * 192, 192 + 28)
