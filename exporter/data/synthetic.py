"""A built-in visual question answering task whose one-word answers need the image.

Each image is a 3x3 grid of cells on a black canvas; 1-5 cells hold a coloured shape (circle,
square, triangle, cross), big or small, at the cell's centre (jittered by a pixel or so). Seven question kinds ask for a colour,
a shape, a count, a row, a column, yes/no existence or a size; for every kind the question alone
leaves the answer open (answers are drawn uniformly before the scene is built around them).

Determinism and disjoint splits: sample `i` of a split is drawn from an RNG seeded with
(seed, split, i). Every scene (its objects, jitter aside) hashes to a bucket; `eval` keeps only
scenes of buckets 0-1 and `train` only the others, so no evaluation scene is ever a training
scene, whatever the split sizes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from exporter.data import VQASample
from engines.core.errors import DyVTEError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 205),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("big", "small")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("color", "shape", "count", "row", "column", "exists", "size")

SPLITS = {"train": 1, "eval": 2}
EVAL_BUCKETS = 2  # of 10: the share of scene space reserved for evaluation
DEFAULT_SIZES = {"train": 20000, "eval": 500}
DEFAULT_IMAGE_SIZE = 104
MAX_OBJECTS = 5


@dataclass(frozen=True)
class Shape:
    cell: int  # 0..8, row-major
    colour: str
    shape: str
    size: str

    @property
    def row(self) -> str:
        return ROWS[self.cell // 3]

    @property
    def column(self) -> str:
        return COLUMNS[self.cell % 3]


def scene_bucket(objects: list[Shape]) -> int:
    """0..9 from the scene's content (cells, colours, shapes, sizes), stable across runs."""
    text = ";".join(f"{o.cell},{o.colour},{o.shape},{o.size}" for o in sorted(objects, key=lambda o: o.cell))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10


def split_of(objects: list[Shape]) -> str:
    return "eval" if scene_bucket(objects) < EVAL_BUCKETS else "train"


# --------------------------------------------------------------------------- scenes and questions


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _others(rng, count: int, allowed) -> list[tuple[str, str, str]]:
    """`count` random (colour, shape, size) triples for which allowed(colour, shape) holds."""
    out = []
    while len(out) < count:
        colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if allowed(colour, shape):
            out.append((colour, shape, _pick(rng, SIZES)))
    return out


def _question(kind: str, rng: np.random.Generator, max_objects: int = MAX_OBJECTS):
    """(objects without cells, question, answer, cell of the first object or None)."""
    colour, shape, size = _pick(rng, list(COLOURS)), _pick(rng, SHAPES), _pick(rng, SIZES)
    extra = int(rng.integers(0, max_objects))  # further objects besides the one asked about
    target = [(colour, shape, size)]
    if kind == "color":
        objs = target + _others(rng, extra, lambda c, s: s != shape)
        return objs, f"what color is the {shape}?", colour, None
    if kind == "shape":
        objs = target + _others(rng, extra, lambda c, s: c != colour)
        return objs, f"what shape is the {colour} object?", shape, None
    if kind == "count":
        count = int(rng.integers(0, min(max_objects + 1, MAX_OBJECTS)))  # zero..four
        rest = max(0, int(rng.integers(1, max_objects + 1)) - count)
        if rng.random() < 0.5:
            objs = [(_pick(rng, list(COLOURS)), shape, _pick(rng, SIZES)) for _ in range(count)]
            objs += _others(rng, rest, lambda c, s: s != shape)
            return objs, f"how many {PLURAL[shape]} are there?", NUMBERS[count], None
        objs = [(colour, _pick(rng, SHAPES), _pick(rng, SIZES)) for _ in range(count)]
        objs += _others(rng, rest, lambda c, s: c != colour)
        return objs, f"how many {colour} shapes are there?", NUMBERS[count], None
    unique = target + _others(rng, extra, lambda c, s: (c, s) != (colour, shape))
    if kind in ("row", "column"):
        cell = int(rng.integers(9))
        answer = ROWS[cell // 3] if kind == "row" else COLUMNS[cell % 3]
        return unique, f"which {kind} is the {colour} {shape} in?", answer, cell
    if kind == "size":
        return unique, f"what size is the {colour} {shape}?", size, None
    if kind == "exists":
        if rng.random() < 0.5:
            return unique, f"is there a {colour} {shape}?", "yes", None
        return unique[1:] or _others(rng, 1, lambda c, s: (c, s) != (colour, shape)), \
            f"is there a {colour} {shape}?", "no", None
    raise DyVTEError(f"unknown question kind {kind!r}; choose from {', '.join(KINDS)}")


def _place(rng, objs, first_cell: int | None) -> list[Shape]:
    cells = [int(c) for c in rng.permutation(9)]
    if first_cell is not None:
        cells.remove(first_cell)
        cells.insert(0, first_cell)
    return [Shape(cell, c, s, z) for cell, (c, s, z) in zip(cells, objs)]


CAPTION_QUESTION = "describe the image."


def describe(objects: list[Shape]) -> str:
    """A caption listing the objects in reading order: "big red circle top left , small ..."."""
    return " , ".join(f"{o.size} {o.colour} {o.shape} {o.row} {o.column}"
                      for o in sorted(objects, key=lambda o: o.cell))


# --------------------------------------------------------------------------- rendering


def cell_centre(cell: int, image_size: int) -> tuple[float, float]:
    """Pixel centre (x, y) of a cell: at 3/13, 7/13 and 11/13 of the side, so that at 104 px with
    8-px patches each cell's object lies inside one 16x16 block, i.e. one visual token after VILA's
    2x2 down-sampling (a shape is then read from one token, as a real tower's features allow)."""
    unit = image_size / 13
    return (3 + 4 * (cell % 3)) * unit, (3 + 4 * (cell // 3)) * unit


def _geometry(objects: list[Shape], image_size: int, rng: np.random.Generator):
    """(object, centre x, centre y, radius) per object; each sits at its cell's centre, jittered
    by up to a tenth of a patch width (seeded), and stays inside its 2x2-patch block."""
    unit = image_size / 13
    out = []
    for o in objects:
        jx, jy = rng.uniform(-0.1, 0.1, size=2) * unit
        r = (0.8 if o.size == "big" else 0.55) * unit
        cx, cy = cell_centre(o.cell, image_size)
        out.append((o, cx + jx, cy + jy, r))
    return out


def _paint(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        a = 0.85 * r
        draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:  # cross
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def render(objects: list[Shape], image_size: int, rng: np.random.Generator, with_labels: bool = False):
    """The scene on a black canvas; with `with_labels` also a map [H, W] of which object (index + 1,
    0 for none) each pixel shows, for dense supervision of a vision tower."""
    img = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    labels = Image.new("L", (image_size, image_size), 0) if with_labels else None
    draw = ImageDraw.Draw(img)
    label_draw = ImageDraw.Draw(labels) if with_labels else None
    for i, (o, cx, cy, r) in enumerate(_geometry(objects, image_size, rng)):
        _paint(draw, o.shape, cx, cy, r, COLOURS[o.colour])
        if label_draw is not None:
            _paint(label_draw, o.shape, cx, cy, r, i + 1)
    return (img, np.asarray(labels)) if with_labels else img


# --------------------------------------------------------------------------- samples


def _draw(split: str, index: int, seed: int, max_objects: int = MAX_OBJECTS):
    if split not in SPLITS:
        raise DyVTEError(f"unknown synthetic split {split!r}; choose from {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    kind = KINDS[index % len(KINDS)]
    while True:
        objs, question, answer, first_cell = _question(kind, rng, max_objects)
        objects = _place(rng, objs, first_cell)
        if split_of(objects) == split:
            return objects, question, answer, kind, rng


def synthetic_sample(split: str, index: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                     max_objects: int = MAX_OBJECTS) -> VQASample:
    """Sample `index` of `split`; the same arguments always give the same sample. A smaller
    `max_objects` gives easier scenes (a curriculum for training from scratch)."""
    objects, question, answer, kind, rng = _draw(split, index, seed, max_objects)
    return VQASample(id=f"synthetic-{split}-{seed}-{index}", question=question, answer=answer,
                     image=render(objects, image_size, rng), kind=kind)


def synthetic_split(split: str, size: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                    start: int = 0, max_objects: int = MAX_OBJECTS) -> list[VQASample]:
    """Samples `start .. start+size-1` of `split` (kinds cycle, so any 7 consecutive cover all)."""
    if size < 1:
        raise DyVTEError("the synthetic split size must be at least 1")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise DyVTEError(f"max_objects must be in 1..{MAX_OBJECTS}")
    return [synthetic_sample(split, i, seed, image_size, max_objects) for i in range(start, start + size)]


def scene_of(split: str, index: int, seed: int = 0, max_objects: int = MAX_OBJECTS) -> list[Shape]:
    """The objects that sample `index` of `split` shows (for tests and diagnostics)."""
    return _draw(split, index, seed, max_objects)[0]


def labelled_sample(split: str, index: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                    max_objects: int = MAX_OBJECTS) -> tuple[VQASample, list[Shape], np.ndarray]:
    """`synthetic_sample` plus its objects and the per-pixel object map (0 = background)."""
    objects, question, answer, kind, rng = _draw(split, index, seed, max_objects)
    image, labels = render(objects, image_size, rng, with_labels=True)
    sample = VQASample(id=f"synthetic-{split}-{seed}-{index}", question=question, answer=answer, image=image,
                       kind=kind)
    return sample, objects, labels
