"""plot.py: the PNG's size, and the lines drawn where the data puts them (found by their colour)."""

import numpy as np
from PIL import Image

from plot import COLOURS, Panel, save_line_plot, save_panels


def pixels_of(image: Image.Image, colour) -> np.ndarray:
    """(row, column) of every pixel of (nearly) `colour`."""
    a = np.asarray(image.convert("RGB")).astype(int)
    return np.argwhere(np.abs(a - np.array(colour)).sum(-1) <= 30)


def test_line_plot_is_a_png_of_the_requested_size_with_the_line_where_the_data_goes(tmp_path):
    path = tmp_path / "loss.png"
    xs = list(range(50))
    save_line_plot(str(path), {"rising": (xs, [float(x) for x in xs])}, "t", "x", "y", size=(640, 400))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (640, 400)
    line = pixels_of(image, COLOURS[0])
    line = line[line[:, 1] < 500]  # leave out the legend swatch in the top-right corner
    assert len(line) > 200
    # A rising series: the leftmost line pixels sit low in the image, the rightmost high.
    left = line[line[:, 1] < line[:, 1].min() + 20][:, 0].mean()
    right = line[line[:, 1] > line[:, 1].max() - 20][:, 0].mean()
    assert left > right + 150
    assert line[:, 1].max() - line[:, 1].min() > 400  # spans most of the width


def test_panels_stack_top_to_bottom_each_with_its_own_series(tmp_path):
    path = tmp_path / "panels.png"
    xs = [0.0, 1.0, 2.0]
    save_panels(str(path), [Panel({"a": (xs, [1.0, 2.0, 3.0])}, "top"),
                            Panel({"b": (xs, [5.0, 5.0, 5.0]), "c": (xs, [1.0, 0.0, 1.0])}, "bottom")], size=(500, 600))
    image = Image.open(path)
    assert image.size == (500, 600)
    first_colour, second_colour = pixels_of(image, COLOURS[0]), pixels_of(image, COLOURS[1])
    assert len(first_colour[first_colour[:, 0] < 300]) > 50  # "a" in the upper half
    assert len(first_colour[first_colour[:, 0] >= 300]) > 50  # "c": each panel starts the palette anew
    assert len(second_colour) > 50 and second_colour[:, 0].min() >= 300  # "b" only in the lower half
