"""How images reach the FID network and the CLIP scorer: the preprocessing of a protocol.

Two steps, both applied to generated and reference images alike:

1. ``crop_size``: crop the centred short-side square and PIL-LANCZOS-resize it to ``crop_size``
   (the GigaGAN COCO protocol uses 256; the crop offsets round like torchvision's
   ``center_crop``, which GigaGAN's evaluation calls). CLIP scores are computed on these images.
2. ``to_299``: how the (cropped) uint8 image becomes Inception's 299x299 input:
   ``"clean"`` is clean-fid's ``clean`` mode (Parmar et al. 2022, arXiv 2104.11222v3): PIL bicubic
   per channel on float32 pixels, no quantisation; ``"tf-bilinear"`` is torch-fidelity's
   TF1-compatible bilinear resize inside the extractor, on uint8 pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

INCEPTION_SIZE = 299
RESIZES: tuple[str, ...] = ("clean", "tf-bilinear")


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing half of a protocol (see the module docstring)."""

    crop_size: int | None = None
    to_299: Literal["clean", "tf-bilinear"] = "tf-bilinear"

    def validate(self) -> None:
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError("crop_size must be positive (or null for no crop)")
        if self.to_299 not in RESIZES:
            raise ValueError(f"to_299 {self.to_299!r} is not one of {', '.join(RESIZES)}")

    def describe(self) -> str:
        """One line for the eval card and the reference-statistics key."""
        crop = (f"centre crop to the short side + PIL LANCZOS to {self.crop_size}x{self.crop_size}"
                if self.crop_size else "no crop")
        to_299 = {"clean": "clean-fid 'clean' resize (PIL bicubic on float32) to 299x299",
                  "tf-bilinear": "torch-fidelity TF1-compatible bilinear resize to 299x299"}
        return f"{crop}; {to_299[self.to_299]}"

    def crop(self, images: np.ndarray) -> np.ndarray:
        """Step 1 on uint8 ``(N, H, W, 3)``; the images unchanged when ``crop_size`` is None."""
        images = check_images(images)
        if self.crop_size is None:
            return images
        size = self.crop_size
        if images.shape[1:3] == (size, size):
            return images  # a square image of the target size is its own crop and resize
        crop = lambda im: np.asarray(center_crop_resize(Image.fromarray(im), size))
        return np.stack(parallel_map(crop, list(images)))


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the centred short-side square, then LANCZOS-resize it to ``size`` x ``size``.

    Offsets are ``round((w - s) / 2)`` with Python's rounding, as in torchvision's
    ``center_crop`` (a floor would shift odd margins by one pixel).
    """
    w, h = image.size
    s = min(w, h)
    left, top = round((w - s) / 2.0), round((h - s) / 2.0)
    image = image.crop((left, top, left + s, top + s))
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.LANCZOS)


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's ``clean`` resize of one uint8 ``(H, W, 3)`` image -> float32 ``(size, size, 3)``.

    Each channel is resized as a 32-bit float PIL image with the bicubic filter and clipped to
    [0, 255], without rounding back to uint8 (the quantisation clean-fid's paper warns about).
    """
    channels = []
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # mode F
        plane = plane.resize((size, size), resample=Image.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255))
    return np.stack(channels, axis=-1).astype(np.float32)


def clean_resize_batch(images: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """``clean_resize`` of uint8 ``(N, H, W, 3)`` -> float32 ``(N, size, size, 3)``."""
    return np.stack(parallel_map(lambda im: clean_resize(im, size), list(check_images(images))))


def parallel_map(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a thread pool (PIL's resize and decode release the GIL)."""
    workers = workers or min(16, os.cpu_count() or 1)
    if workers == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
