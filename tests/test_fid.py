"""The standard FID's pieces: the pinned Inception file, its preprocessing, and the distances."""
import numpy as np
import pytest
import torch

from training.fid import (INCEPTION_SHA256, frechet_distance, inception_features, inception_path,
                          kernel_inception_distance, load_inception, pixel_statistics, precision_recall, preprocess,
                          resize_299, within_class_spread)


def bilinear_tf_legacy(image: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres), the resize inside the
    original FID graph, written out pixel by pixel: output pixel i samples the input at i * in / out,
    with the neighbour clamped to the border."""
    h, w = image.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0 = int(np.floor(y)); y1 = min(y0 + 1, h - 1); fy = y - y0
        for j in range(size):
            x = j * w / size
            x0 = int(np.floor(x)); x1 = min(x0 + 1, w - 1); fx = x - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_resize_is_tensorflow_1_bilinear():
    fixture = torch.arange(48, dtype=torch.float32).reshape(1, 3, 4, 4) * 5  # a tiny ramp per channel
    resized = resize_299(fixture)
    assert resized.shape == (1, 3, 299, 299)
    for c in range(3):
        expected = bilinear_tf_legacy(fixture[0, c].numpy().astype(np.float64), 299)
        assert np.abs(resized[0, c].numpy() - expected).max() < 1e-3


def test_resize_differs_from_interpolate_which_is_why_it_is_not_used():
    image = torch.randint(0, 256, (1, 3, 32, 32)).float()
    ours = resize_299(image)
    interpolated = torch.nn.functional.interpolate(image, size=(299, 299), mode="bilinear", align_corners=True)
    assert (ours - interpolated).abs().mean() > 1.0


def test_preprocess_maps_uint8_to_the_inception_range():
    x = preprocess(torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert x.shape == (1, 3, 299, 299)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 0.0, 127 / 128]), atol=1e-6)


def test_the_pinned_inception_file_gives_2048_features():
    assert inception_path().name == "default_1.pt" and len(INCEPTION_SHA256) == 64
    network = load_inception()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = inception_features(network, images, batch_size=2)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    grey = inception_features(network, images[:, :1], batch_size=2)  # greyscale is repeated to RGB
    assert torch.allclose(grey, inception_features(network, images[:, :1].expand(-1, 3, -1, -1), batch_size=2))


def test_frechet_distance_is_zero_against_itself_and_grows_with_a_shift():
    torch.manual_seed(0)
    a = torch.randn(2000, 8, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, torch.randn(2000, 8, dtype=torch.float64)) < 0.1
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-3)  # |mean shift|^2; covariances unchanged
    assert frechet_distance(a, 2 * a) == pytest.approx(8.0 * 1.0, rel=0.1)  # tr(S + 4S - 2*2S) = tr(S) ~ 8


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    torch.manual_seed(0)
    a, b = torch.randn(600, 16, dtype=torch.float64), torch.randn(600, 16, dtype=torch.float64)
    same, _ = kernel_inception_distance(a, b, subset_size=300, subsets=20)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subset_size=300, subsets=20)
    assert abs(same) < 0.01 and shifted > 10 * max(abs(same), 1e-3)


def test_precision_recall_tell_a_dropped_mode_from_unrealistic_samples():
    torch.manual_seed(0)
    centres = torch.zeros(2, 4, dtype=torch.float64)
    centres[1, 0] = 50.0  # two clusters far apart
    real = centres[torch.arange(800) % 2] + torch.randn(800, 4, dtype=torch.float64)
    assert precision_recall(real, real) == (1.0, 1.0)
    same_kind = centres[torch.arange(800) % 2] + torch.randn(800, 4, dtype=torch.float64)
    assert min(precision_recall(real, same_kind)) > 0.9
    one_mode = centres[0] + torch.randn(800, 4, dtype=torch.float64)  # realistic, but half the data never drawn
    precision, recall = precision_recall(real, one_mode, chunk=7)  # chunking must not change the answer
    assert precision > 0.9 and 0.4 < recall <= 0.5
    assert (precision, recall) == precision_recall(real, one_mode)
    assert precision_recall(real, real + 5.0) == (0.0, 0.0)  # every kind drawn, none where real images lie


def test_a_collapsed_generator_has_full_precision_and_no_recall():
    torch.manual_seed(0)
    real = torch.randn(500, 16, dtype=torch.float64)
    copies = real[:1].expand(500, -1)  # one real image drawn every time: its balls have radius 0
    assert precision_recall(real, copies) == (1.0, 1 / 500)
    assert precision_recall(real, copies[:100]) == (1.0, 1 / 100)  # equal sets: the first 100 real points


def test_pixel_statistics_see_flat_and_clipped_images():
    flat = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    assert pixel_statistics(flat) == {"pixel_std": 0.0, "clipped_fraction": 0.0}
    half_clipped = flat.clone()
    half_clipped[:, 1, :2] = 255  # one channel saturated in half the pixels
    assert pixel_statistics(half_clipped)["clipped_fraction"] == 0.5


def test_within_class_spread_is_zero_for_one_image_per_class_and_ignores_other_classes():
    black, white = torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
    copies = torch.cat([black, black, white, white])
    assert within_class_spread(copies, torch.tensor([0, 0, 1, 1])) == 0.0  # black and white apart, but per class
    assert within_class_spread(copies, torch.tensor([0, 1, 0, 1])) == 1.0  # black against white in each class


def test_the_small_sample_bias_fit_recovers_a_line_and_ignores_sizes_below_its_range():
    from training.fid_references import extrapolate
    a, c = 1.5, 20000.0
    by_size = {str(n): {"fid": a + c * 2 / n} for n in (2500, 5000, 10000)} | {"1000": {"fid": 99.0}}
    fit = extrapolate(by_size)
    assert fit["fitted_sizes"] == [2500, 5000, 10000]
    assert fit["a"] == pytest.approx(a) and fit["c"] == pytest.approx(c)
    assert fit["fid"] == pytest.approx(a + c * (1 / 50000 + 1 / 10000))
    assert extrapolate({"10000": {"fid": 5.0}}) == {}
