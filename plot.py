"""Tiny line plots with Pillow only (loss curves from train.py, queue/latency from infer_async.py).

    save_line_plot("loss.png", {"train": (steps, losses)}, "loss", "step", "loss")
    save_panels("queue.png", [Panel({...}, "queue size"), Panel({...}, "latency", ylabel="ms")])
"""

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

Series = dict[str, tuple[list[float], list[float]]]

BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (225, 225, 225)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 30, 45


@dataclass
class Panel:
    series: Series
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    # Optional fixed y range; by default the data's range.
    ylim: tuple[float, float] | None = field(default=None)


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw_step = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def data_range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi == lo:  # a flat line sits mid-panel instead of on an edge
        return lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    return lo, hi


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel) -> None:
    """Draws one panel into the pixel box (left, top, right, bottom) of the image."""
    font = ImageFont.load_default()
    left, top = box[0] + MARGIN_LEFT, box[1] + MARGIN_TOP
    right, bottom = box[2] - MARGIN_RIGHT, box[3] - MARGIN_BOTTOM
    xs = [x for xs_, _ in panel.series.values() for x in xs_]
    ys = [y for _, ys_ in panel.series.values() for y in ys_]
    x_lo, x_hi = data_range(xs)
    y_lo, y_hi = panel.ylim or data_range(ys)
    if panel.ylim is None:  # 5% headroom so extremes do not sit on the frame
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return px, py

    for x in nice_ticks(x_lo, x_hi):
        px, _ = to_pixel(x, y_lo)
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=AXIS)
        draw.text((px, bottom + 6), format_tick(x), fill=AXIS, font=font, anchor="ma")
    for y in nice_ticks(y_lo, y_hi):
        _, py = to_pixel(x_lo, y)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.line([(left - 4, py), (left, py)], fill=AXIS)
        draw.text((left - 6, py), format_tick(y), fill=AXIS, font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    draw.text(((left + right) / 2, box[1] + 8), panel.title, fill=AXIS, font=font, anchor="ma")
    draw.text(((left + right) / 2, bottom + 22), panel.xlabel, fill=AXIS, font=font, anchor="ma")
    draw.text((box[0] + 4, top - 16), panel.ylabel, fill=AXIS, font=font)

    colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(panel.series)}
    for name, (series_x, series_y) in panel.series.items():
        points = [to_pixel(x, y) for x, y in zip(series_x, series_y) if math.isfinite(y)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colours[name])
        elif points:
            draw.line(points, fill=colours[name], width=2)

    # Legend: a boxed list in the top-right corner, one row per series.
    text_width = max((draw.textlength(name, font=font) for name in panel.series), default=0)
    legend_left = right - 8 - 30 - text_width - 6
    draw.rectangle([legend_left, top + 4, right - 4, top + 8 + 14 * len(panel.series)], fill=BACKGROUND, outline=GRID)
    for i, (name, colour) in enumerate(colours.items()):
        row = top + 7 + 14 * i
        draw.line([(legend_left + 4, row + 6), (legend_left + 24, row + 6)], fill=colour, width=2)
        draw.text((legend_left + 30, row), name, fill=AXIS, font=font)


def save_panels(path: str, panels: list[Panel], size: tuple[int, int] = (800, 600)) -> None:
    """Stacks the panels vertically (sharing the image width) and writes a PNG of `size`."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    panel_height = height // len(panels)
    for i, panel in enumerate(panels):
        draw_panel(draw, (0, i * panel_height, width, (i + 1) * panel_height), panel)
    image.save(path, format="PNG")


def save_line_plot(path: str, series: Series, title: str = "", xlabel: str = "", ylabel: str = "",
                   size: tuple[int, int] = (800, 500)) -> None:
    """One panel of one or more named (xs, ys) lines."""
    save_panels(path, [Panel(series, title, xlabel, ylabel)], size)
