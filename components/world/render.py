"""Procedural captioned scenes: flat shapes on a flat background, and a pixel-level judge.

A scene is a background colour plus 1..N objects, each with a shape, colour, size and position.
Positions are cells of a 2x2 grid ("top left", ...), so objects never overlap and each object can
be judged inside its own cell. ``attribute_accuracy`` measures from pixels alone whether images show
what their captions say; on ground-truth renders it is exactly 1.0 for every attribute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.45, "large": 0.85}  # object extent as a fraction of a cell
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (row, column) of the 2x2 grid cell
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges
JITTER = 0.06  # largest random shift of an object centre, as a fraction of the cell
_MASK_DISTANCE = 70.0  # RGB distance from the background that makes a pixel part of an object
_MIN_MASS = 0.05  # least object area, as a fraction of the cell, to count a cell as occupied
_SIZE_SPLIT = (SIZES["small"] * SIZES["large"]) ** 0.5
_FILL_SPLITS = (0.68, 0.9)  # mask area / bounding-box area: triangle ~0.5, circle ~0.79, square 1


@dataclass(frozen=True)
class SceneSpace:
    """The attribute space a world draws scenes from (names refer to the tables above)."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = tuple(POSITIONS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    min_objects: int = 1
    max_objects: int = 1

    def validate(self) -> None:
        for names, table in [
            (self.shapes, SHAPES),
            (self.colours, COLOURS),
            (self.sizes, SIZES),
            (self.positions, POSITIONS),
            (self.backgrounds, BACKGROUNDS),
        ]:
            unknown = [n for n in names if n not in table]
            if unknown or not names:
                raise ValueError(f"unknown or empty names {unknown}; valid: {list(table)}")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.positions):
            raise ValueError("need 1 <= min_objects <= max_objects <= number of positions")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str


def sample_scene(space: SceneSpace, rng: np.random.Generator) -> Scene:
    """One random scene; objects take distinct positions, listed in the space's position order."""
    n = int(rng.integers(space.min_objects, space.max_objects + 1))
    cells = sorted(rng.choice(len(space.positions), size=n, replace=False))
    objects = tuple(
        Obj(
            shape=space.shapes[rng.integers(len(space.shapes))],
            colour=space.colours[rng.integers(len(space.colours))],
            size=space.sizes[rng.integers(len(space.sizes))],
            position=space.positions[c],
        )
        for c in cells
    )
    return Scene(objects, space.backgrounds[rng.integers(len(space.backgrounds))])


def caption(scene: Scene) -> str:
    """'a large red circle in the top left and a small blue square in the bottom right, on a ...'"""
    parts = [f"a {o.size} {o.colour} {o.shape} in the {o.position}" for o in scene.objects]
    return f"{' and '.join(parts)}, on a {scene.background} background"


_OBJ_RE = re.compile(r"a (\w+) (\w+) (\w+) in the (\w+ \w+)")


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption``; raises ValueError on text it did not write."""
    head, sep, tail = text.rpartition(", on a ")
    if not sep or not tail.endswith(" background"):
        raise ValueError(f"not a world caption: {text!r}")
    objects = []
    for part in head.split(" and "):
        m = _OBJ_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"not a world caption: {text!r}")
        size, colour, shape, position = m.groups()
        objects.append(Obj(shape, colour, size, position))
    return Scene(tuple(objects), tail[: -len(" background")])


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3); ``rng`` only jitters object centres."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = big / 2
    for obj in scene.objects:
        row, col = POSITIONS[obj.position]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2) * cell
        cx, cy = (col + 0.5) * cell + dx, (row + 0.5) * cell + dy
        r = SIZES[obj.size] * cell / 2
        _draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def chance_levels(space: SceneSpace) -> dict[str, float]:
    """Accuracy of guessing each attribute uniformly at random (position: for one object)."""
    return {
        "shape": 1 / len(space.shapes),
        "colour": 1 / len(space.colours),
        "size": 1 / len(space.sizes),
        "position": 1 / len(space.positions),
        "background": 1 / len(space.backgrounds),
    }


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> list[str]:
    names = list(table)
    ref = np.asarray([table[n] for n in names], dtype=np.float32)  # (K, 3)
    d = ((rgb[..., None, :].astype(np.float32) - ref) ** 2).sum(-1)
    return [names[i] for i in np.atleast_1d(d.argmin(-1)).ravel()]


def judge_background(image: np.ndarray) -> str:
    """Background name: the background colour that most pixels are closest to."""
    pixels = image.reshape(-1, 3)
    labels = _nearest(pixels, {**BACKGROUNDS, **COLOURS})
    counts = {b: labels.count(b) for b in BACKGROUNDS}
    return max(counts, key=counts.get)


def _cells(image: np.ndarray, background: str) -> dict[str, np.ndarray]:
    """Per grid cell, the boolean object mask (pixels far from the background colour)."""
    h = image.shape[0] // 2
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    dist = np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1))
    mask = dist > _MASK_DISTANCE
    return {p: mask[r * h : (r + 1) * h, c * h : (c + 1) * h] for p, (r, c) in POSITIONS.items()}


def judge_object(image: np.ndarray, position: str, mask: np.ndarray, background: str) -> dict:
    """Colour, size and shape of whatever sits in ``position``'s cell ('none' when empty).

    Size and shape use a soft coverage map (how far each pixel has moved from the background
    towards the object colour), so anti-aliased edges of small shapes count fractionally.
    """
    h = image.shape[0] // 2
    if mask.sum() < _MIN_MASS * h * h:
        return {"colour": "none", "size": "none", "shape": "none"}
    r, c = POSITIONS[position]
    patch = image[r * h : (r + 1) * h, c * h : (c + 1) * h].astype(np.float32)
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    pixels = patch[mask]
    dist = ((pixels - bg) ** 2).sum(-1)
    core = pixels[dist >= np.median(dist)]  # the inner half: edges blend into the background
    colour = _nearest(np.median(core, axis=0), COLOURS)[0]
    axis = np.asarray(COLOURS[colour], dtype=np.float32) - bg
    alpha = np.clip((patch - bg) @ axis / (axis @ axis), 0.0, 1.0)  # (h, h)
    alpha[alpha < 0.2] = 0.0  # ignore faint noise far from the object
    height, width = alpha.max(1).sum(), alpha.max(0).sum()
    size = "large" if max(height, width) / h > _SIZE_SPLIT else "small"
    fill = alpha.sum() / max(height * width, 1e-6)
    shape = (
        "triangle" if fill < _FILL_SPLITS[0] else "circle" if fill < _FILL_SPLITS[1] else "square"
    )
    return {"colour": colour, "size": size, "shape": shape}


def judge(image: np.ndarray, n_objects: int) -> tuple[str, dict[str, dict[str, str]]]:
    """Background plus the ``n_objects`` most occupied cells and what each holds."""
    background = judge_background(image)
    masks = _cells(image, background)
    occupied = sorted(masks, key=lambda p: -int(masks[p].sum()))[:n_objects]
    return background, {p: judge_object(image, p, masks[p], background) for p in occupied}


def score_image(image: np.ndarray, scene: Scene) -> dict[str, list[bool]]:
    """Per attribute, one hit/miss per object (background: one per image)."""
    background, found = judge(image, len(scene.objects))
    wanted = {o.position for o in scene.objects}
    spare = [p for p in found if p not in wanted]
    hits: dict[str, list[bool]] = {"background": [background == scene.background]}
    for obj in scene.objects:
        # an object found in the wrong cell is still judged for colour, size and shape
        where = obj.position if obj.position in found else (spare.pop(0) if spare else None)
        seen = found.get(where, {"colour": "none", "size": "none", "shape": "none"})
        hits.setdefault("position", []).append(obj.position in found)
        for key in ("colour", "size", "shape"):
            hits.setdefault(key, []).append(seen[key] == getattr(obj, key))
    return hits


def attribute_accuracy(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Fraction of objects (images, for background) whose attribute the pixels show.

    images: uint8 (N, H, W, 3); captions: N world captions. Keys: shape, colour, size, position,
    background, and ``all`` (objects with every attribute right, on the right background).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    totals: dict[str, list[bool]] = {}
    for image, text in zip(images, captions):
        hits = score_image(np.asarray(image), parse_caption(text))
        for key, values in hits.items():
            totals.setdefault(key, []).extend(values)
        per_obj = zip(*(hits[k] for k in ("shape", "colour", "size", "position")))
        totals.setdefault("all", []).extend(all(h) and hits["background"][0] for h in per_obj)
    return {key: float(np.mean(values)) for key, values in sorted(totals.items())}
