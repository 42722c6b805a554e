"""Image grids for eyeballing samples, with optional captions under the cells."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.io import atomic_write_bytes

PAD = 2
LINE_HEIGHT = 11  # PIL's built-in bitmap font is about 11 px tall
CHAR_WIDTH = 6
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def image_grid(images: np.ndarray, cols: int, upscale: int = 1,
               captions: Sequence[str] | None = None, caption_lines: int = 3) -> Image.Image:
    """Tile uint8 images ``(N, H, W, 3)`` row-major into ``cols`` columns.

    ``upscale`` enlarges each cell by an integer factor (nearest neighbour, so 32x32 pixels stay
    sharp). ``captions`` (one per image) are wrapped under their cell, at most ``caption_lines``
    lines. Empty cells of the last row are white.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if cols < 1 or upscale < 1:
        raise ValueError("cols and upscale must be >= 1")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n, h, w = images.shape[:3]
    cell_w, cell_h = w * upscale, h * upscale
    text_h = caption_lines * LINE_HEIGHT + PAD if captions is not None else 0
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * (cell_w + PAD) + PAD, rows * (cell_h + text_h + PAD) + PAD),
                     BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images):
        x = PAD + (i % cols) * (cell_w + PAD)
        y = PAD + (i // cols) * (cell_h + text_h + PAD)
        cell = Image.fromarray(image)
        if upscale > 1:
            cell = cell.resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(cell, (x, y))
        if captions is not None:
            lines = wrap_caption(captions[i], cell_w, caption_lines)
            draw.multiline_text((x, y + cell_h + 1), "\n".join(lines), fill=TEXT_COLOUR, font=font,
                                spacing=0)
    return grid


def wrap_caption(caption: str, width_px: int, max_lines: int) -> list[str]:
    """Wrap to the cell width; an ellipsis marks text that did not fit."""
    width = max(1, width_px // CHAR_WIDTH)
    lines = textwrap.wrap(caption, width=width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return lines


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
