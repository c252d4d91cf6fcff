"""Grid layout: where each image lands, and that grid_size predicts the PNG's size."""
import numpy as np
import pytest

from generators.imaging import grid, grid_size


def numbered_images(n: int, side: int = 3) -> np.ndarray:
    """n single-channel images, image i filled with the value i + 1 (0 is the padding)."""
    return np.stack([np.full((side, side, 1), i + 1, dtype=np.uint8) for i in range(n)])


@pytest.mark.parametrize("n, columns, rows_cols", [(40, None, (6, 7)), (40, 10, (4, 10)), (3, 10, (1, 3)), (16, None, (4, 4))])
def test_grid_places_images_row_by_row(n, columns, rows_cols):
    side, padding = 3, 2
    out = grid(numbered_images(n, side), padding, columns)
    rows, cols = rows_cols
    assert (out.shape[1], out.shape[0]) == grid_size(n, side, side, padding, columns)
    assert out.shape[:2] == (rows * (side + padding) + padding, cols * (side + padding) + padding)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = padding + r * (side + padding), padding + c * (side + padding)
        assert (out[y:y + side, x:x + side] == i + 1).all()
    assert (out == 0).sum() == out.size - n * side * side  # everything else is padding


def test_single_image_is_returned_as_is():
    image = numbered_images(1)
    out = grid(image, columns=10)
    assert out.shape == image.shape[1:] and (out == image[0]).all()
