"""From model output in [-1, 1] to PNG bytes: one image or a grid."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generators.checkpoint import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_layout(n: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the grid for n images: near-square unless the columns are given."""
    cols = min(columns or math.ceil(math.sqrt(n)), n)
    return math.ceil(n / cols), cols


def grid(images: np.ndarray, padding: int = 2, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images row by row into one image (near-square unless `columns` is given) with
    `padding` black pixels between."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    width, height = grid_size(n, h, w, padding, columns)
    _, cols = grid_layout(n, columns)
    out = np.zeros((height, width, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        out[y:y + h, x:x + w] = img
    return out


def grid_size(n: int, h: int, w: int, padding: int = 2, columns: int | None = None) -> tuple[int, int]:
    """(width, height) of the PNG that `grid` makes for n images of h x w."""
    if n == 1:
        return w, h
    rows, cols = grid_layout(n, columns)
    return cols * (w + padding) + padding, rows * (h + padding) + padding


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes; single-channel images become greyscale PNGs."""
    mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    mode_image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> None:
    atomic_write_bytes(Path(path), encode_png(grid(to_uint8(images), columns=columns)))
