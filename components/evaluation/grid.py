"""Image grids for eyeballing samples: captions under their cells or under their columns, and
labels for the rows.

Text is drawn with Pillow's built-in font (``ImageFont.load_default``: an embedded FreeType font
when Pillow has FreeType, else a bitmap font), so grids render the same offline on any machine.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.io import atomic_write_bytes

PAD = 2
FONT_SIZE = 10
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def image_grid(images: np.ndarray, cols: int, upscale: int = 1,
               captions: Sequence[str] | None = None, caption_lines: int = 3,
               column_captions: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None) -> Image.Image:
    """Tile uint8 images ``(N, H, W, 3)`` row-major into ``cols`` columns.

    ``upscale`` enlarges each cell by an integer factor (nearest neighbour, so 32x32 pixels stay
    sharp). ``captions`` (one per image) are wrapped under their cell; ``column_captions`` (one
    per column: the prompt every row of that column was asked to draw) under the last row;
    both at most ``caption_lines`` lines. ``row_labels`` (one per row) go left of the rows.
    Empty cells of the last row are white.
    """
    images = _check(images, cols, upscale)
    n, h, w = images.shape[:3]
    cols = min(cols, n)
    rows = -(-n // cols)
    _check_lengths(n, cols, rows, captions, column_captions, row_labels)
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = _line_height(font)
    cell_w, cell_h = w * upscale, h * upscale
    text_h = caption_lines * line_h + PAD if captions is not None else 0
    foot_h = caption_lines * line_h + PAD if column_captions is not None else 0
    left = 3 * PAD + max((int(font.getlength(s)) for s in row_labels), default=0) if row_labels else 0
    grid = Image.new("RGB", (left + cols * (cell_w + PAD) + PAD,
                             rows * (cell_h + text_h + PAD) + PAD + foot_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x = left + PAD + (i % cols) * (cell_w + PAD)
        y = PAD + (i // cols) * (cell_h + text_h + PAD)
        cell = Image.fromarray(image)
        grid.paste(cell.resize((cell_w, cell_h), Image.NEAREST) if upscale > 1 else cell, (x, y))
        if captions is not None:
            _text(draw, (x, y + cell_h + 1), captions[i], cell_w, caption_lines, font)
    bottom = rows * (cell_h + text_h + PAD) + 1
    for c, text in enumerate(column_captions or ()):
        _text(draw, (left + PAD + c * (cell_w + PAD), bottom), text, cell_w, caption_lines, font)
    for r, label in enumerate(row_labels or ()):
        y = PAD + r * (cell_h + text_h + PAD) + (cell_h - line_h) // 2
        draw.text((PAD, y), label, fill=TEXT_COLOUR, font=font)
    return grid


def wrap_caption(caption: str, width_px: int, max_lines: int,
                 font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> list[str]:
    """Wrap ``caption`` into lines that fit ``width_px`` in ``font``; an ellipsis marks text that
    did not fit in ``max_lines``."""
    font = font or ImageFont.load_default(size=FONT_SIZE)
    fits = lambda text: font.getlength(text) <= width_px
    lines: list[str] = []
    for word in caption.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and not fits(lines[-1] + "..."):
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], caption: str, width: int,
          max_lines: int, font) -> None:
    lines = wrap_caption(caption, width - 2 * PAD, max_lines, font)  # a gap between columns
    draw.multiline_text(xy, "\n".join(lines), fill=TEXT_COLOUR, font=font, spacing=1)


def _line_height(font) -> int:
    """At least the line advance ``multiline_text`` uses (the height of "A" plus spacing 1)."""
    return font.getbbox("Ag")[3] + 1


def _check(images: np.ndarray, cols: int, upscale: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if cols < 1 or upscale < 1:
        raise ValueError("cols and upscale must be >= 1")
    return images


def _check_lengths(n: int, cols: int, rows: int, captions, column_captions, row_labels) -> None:
    for what, given, want, unit in (("captions", captions, n, "images"),
                                    ("column captions", column_captions, cols, "columns"),
                                    ("row labels", row_labels, rows, "rows")):
        if given is not None and len(given) != want:
            raise ValueError(f"{len(given)} {what} for {want} {unit}")
