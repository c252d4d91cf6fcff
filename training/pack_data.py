"""Carry a Keras-layout .npz to a machine that takes only so many bytes per transfer, losslessly, and check it there.

    python -m training.pack_data pack --out runs/data_pack              # ../shared/data/cifar10.npz, parts of 40 MiB
    python -m training.pack_data unpack runs/data_pack --out runs/cifar10.npz

Image arrays (uint8, N x H x W or N x H x W x 3) become mosaics of up to --tile images, stored as lossless WebP
(CIFAR-10: about 16 MB per 10,000 images against 31 MB raw); every other array is kept as .npy. The files are
grouped into folders part-000, part-001, ... of at most --part-mib each, with manifest.json beside them naming
every file's part and sha256 and every array's shape, dtype and sha256, so the parts can travel one transfer at a
time. `unpack` reads whatever parts are there, names any file that is missing or altered, and writes the .npz
(atomically) only when every array's sha256 matches the original's. The rebuilt .npz holds the same arrays but is
another file, so a checkpoint trained on it records another data_sha256 than the original archive's.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from generators.checkpoint import atomic_write_bytes
from generators.imaging import grid, grid_layout, grid_size
from training.data import DEFAULT_PATHS

MANIFEST = "manifest.json"
WEBP_MAX_SIDE = 16383  # pixels, the format's limit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True)
pack_parser = commands.add_parser("pack", help="write an .npz as parts of WebP mosaics and .npy files")
pack_parser.add_argument("--data", type=Path, default=DEFAULT_PATHS["cifar10"], help="Keras-layout .npz to pack")
pack_parser.add_argument("--out", type=Path, required=True, help="folder for manifest.json and the parts")
pack_parser.add_argument("--part-mib", type=float, default=40.0,
                         help="most MiB per part folder (leave room for whatever travels beside it)")
pack_parser.add_argument("--tile", type=int, default=10000, help="most images per WebP mosaic")
unpack_parser = commands.add_parser("unpack", help="check the parts against the manifest and write the .npz")
unpack_parser.add_argument("pack", type=Path, help="folder holding manifest.json and the parts")
unpack_parser.add_argument("--out", type=Path, required=True, help=".npz to write")


def array_sha256(array: np.ndarray) -> str:
    """Of the dtype, shape and bytes, so equal hashes mean equal arrays."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def is_image_array(array: np.ndarray) -> bool:
    return array.dtype == np.uint8 and (array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 3))


def check_tile(tile: int, shape: tuple[int, ...], key: str) -> None:
    """Refuse a --tile whose mosaics of `shape`-d images would be wider than WebP allows."""
    side = max(grid_size(min(tile, shape[0]), shape[1], shape[2], padding=0))
    if side > WEBP_MAX_SIDE:
        raise SystemExit(f"--tile {tile}: a mosaic of {key} would be {side} pixels wide, over WebP's "
                         f"{WEBP_MAX_SIDE}; lower --tile")


def mosaic_webp(images: np.ndarray) -> bytes:
    """The images as one lossless WebP: the sample grids' near-square layout (generators/imaging.py), no padding."""
    mosaic = grid(images if images.ndim == 4 else images[..., None], padding=0)
    buffer = io.BytesIO()
    Image.fromarray(mosaic[..., 0] if images.ndim == 3 else mosaic).convert("RGB").save(
        buffer, "WEBP", lossless=True, quality=100, method=4)
    return buffer.getvalue()


def mosaic_images(data: bytes, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of mosaic_webp for n images of `shape` (H x W or H x W x 3)."""
    h, w = shape[:2]
    rows, cols = grid_layout(n)
    mosaic = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    images = mosaic.reshape(rows, h, cols, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, 3)[:n]
    return np.ascontiguousarray(images[..., 0] if len(shape) == 2 else images)


def pack(data: Path, out: Path, part_mib: float, tile: int) -> dict:
    """Write the parts and the manifest; returns the manifest."""
    limit = part_mib * 2**20
    part, used = 0, 0

    def store(name: str, content: bytes) -> dict:
        """Write one file into the current part, or the next one when it would overflow; its manifest entry."""
        nonlocal part, used
        if len(content) > limit:
            raise SystemExit(f"{name} alone is {len(content) / 2**20:.1f} MiB, over --part-mib {part_mib}: "
                             "lower --tile")
        if used and used + len(content) > limit:
            part, used = part + 1, 0
        used += len(content)
        atomic_write_bytes(out / f"part-{part:03d}" / name, content)
        return {"name": name, "part": part, "sha256": hashlib.sha256(content).hexdigest()}

    arrays = {}
    with np.load(data, allow_pickle=False) as archive:
        for key in archive.files:
            array = archive[key]
            entry = {"shape": list(array.shape), "dtype": array.dtype.str, "sha256": array_sha256(array), "files": []}
            if is_image_array(array) and len(array):
                check_tile(tile, array.shape, key)
                for start in range(0, len(array), tile):
                    images = array[start:start + tile]
                    entry["files"].append({**store(f"{key}-{start:06d}.webp", mosaic_webp(images)),
                                           "images": len(images)})
            else:
                buffer = io.BytesIO()
                np.save(buffer, array, allow_pickle=False)
                entry["files"].append(store(f"{key}.npy", buffer.getvalue()))
            arrays[key] = entry
    manifest = {"source": data.name, "arrays": arrays}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def unpack(folder: Path, out: Path) -> dict[str, np.ndarray]:
    """Rebuild every array, check it, and write the .npz; SystemExit naming what is missing or wrong."""
    manifest = json.loads((folder / MANIFEST).read_text())
    arrays, problems = {}, []
    for key, entry in manifest["arrays"].items():
        pieces = []
        for file in entry["files"]:
            path = folder / f"part-{file['part']:03d}" / file["name"]
            if not path.exists():
                problems.append(f"{path} missing")
                continue
            content = path.read_bytes()
            if hashlib.sha256(content).hexdigest() != file["sha256"]:
                problems.append(f"{path} altered (sha256 differs from the manifest's)")
                continue
            if "images" in file:
                pieces.append(mosaic_images(content, file["images"], tuple(entry["shape"][1:])))
            else:
                pieces.append(np.load(io.BytesIO(content), allow_pickle=False))
        if len(pieces) != len(entry["files"]):
            continue
        array = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if array_sha256(array) != entry["sha256"]:
            problems.append(f"array {key}: rebuilt contents differ from the original's")
        arrays[key] = array
    if problems:
        raise SystemExit("cannot unpack " + str(folder) + ":\n  " + "\n  ".join(problems))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(out, buffer.getvalue())
    return arrays


def main() -> None:
    args = parser.parse_args()
    if args.command == "pack":
        manifest = pack(args.data, args.out, args.part_mib, args.tile)
        parts = sorted({f["part"] for entry in manifest["arrays"].values() for f in entry["files"]})
        print(f"{args.data} -> {args.out}: {len(parts)} part(s), each at most {args.part_mib} MiB")
    else:
        arrays = unpack(args.pack, args.out)
        print(f"{args.out}: " + ", ".join(f"{key} {tuple(a.shape)}" for key, a in arrays.items())
              + "; every array's sha256 equals the original's")


if __name__ == "__main__":
    main()
