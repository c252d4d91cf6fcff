"""What the repo's PNG plots share, drawn with PIL (no plotting library in the environment)."""
from __future__ import annotations

from typing import Callable

from PIL import ImageDraw, ImageFont


def dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: tuple[int, int, int]) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + 6, x1), y)], fill=colour)
        x += 10


def axes(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, left: int, box: tuple[float, float, float, float],
         top: float, y_of: Callable[[float], float], x_ticks: list[tuple[float, str]], x_label: str,
         value_format: str = ".3g") -> None:
    """The L of the axes in box (x0, y1 top, x1, y0 bottom), five value ticks from 0 to `top`, and labelled
    x ticks at their pixel positions."""
    x0, y1, x1, y0 = box
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    for tick in range(5):
        value = top * tick / 4
        draw.line([(x0 - 4, y_of(value)), (x0, y_of(value))], fill="black")
        draw.text((left + 4, y_of(value) - 6), format(value, value_format), fill="black", font=font)
    for x, label in x_ticks:
        draw.text((x - 4, y0 + 6), label, fill="black", font=font)
    draw.text((x1 - 7 * len(x_label), y0 + 22), x_label, fill="black", font=font)
