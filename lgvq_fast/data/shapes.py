"""Procedural captioned-shapes dataset: the embedded default for training and for alignment checks.

Every image holds one or two shapes on a plain background and its caption states exactly what is
drawn, e.g. "a large red circle left of a small blue square". Because the captions are exact, text
alignment is measurable (caption retrieval, masked-attribute prediction). Each sample is a pure
function of (seed, split, index), so runs and resumed runs see identical data.
"""
import hashlib
import json
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Radii as fractions of the image side. At 32x32 a small shape spans about 11 pixels: drawn smaller (0.13, about 8
# pixels), the default tokenizer's 16x16 codes gave small crosses back as blobs (docs/training.md has the measurements).
SIZES = {"small": 0.17, "large": 0.24}
# A cross's arms are 2 x CROSS_ARM x radius wide; a square's half side is SQUARE_HALF x radius.
CROSS_ARM = 0.38
SQUARE_HALF = 0.88
# (word, axis, sign): "left of" means the first shape lies entirely at smaller x than the second.
RELATIONS = (("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1))
BACKGROUND = (28, 28, 36)
# Draw at this multiple of the target resolution and downsample, so edges are anti-aliased.
_SUPERSAMPLE = 4
# Val indices come from a seed stream far from the train one.
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_006}


def geometry() -> dict:
    """Everything that fixes how a scene is drawn: a model trained on rendered images (the downstream stage's probe)
    or codes extracted from them are only valid for the geometry they record."""
    return {"sizes": dict(SIZES), "cross_arm": CROSS_ARM, "square_half": SQUARE_HALF, "supersample": _SUPERSAMPLE,
            "colours": {k: list(v) for k, v in COLOURS.items()}, "background": list(BACKGROUND), "shapes": list(SHAPES)}


def geometry_tag() -> str:
    """A 12-hex-digit digest of ``geometry()``."""
    return hashlib.sha256(json.dumps(geometry(), sort_keys=True).encode()).hexdigest()[:12]


def _sample_rng(seed, split, index):
    return random.Random((int(seed) * 0x9E3779B1 + _SPLIT_OFFSET[split] + int(index) * 7919) & 0xFFFFFFFFFFFF)


def _draw_shape(draw, shape, centre, radius, fill):
    cx, cy = centre
    r = radius
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * SQUARE_HALF
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r * CROSS_ARM
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def describe(obj):
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def sample_scene(seed, split, index, two_prob=0.7):
    """Scene description of sample ``index``: list of objects (shape, colour, size, centre in [0,1]) and relation."""
    rng = _sample_rng(seed, split, index)
    n = 2 if rng.random() < two_prob else 1
    objs = []
    for _ in range(n):
        objs.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": rng.choice(list(SIZES))})
    if n == 2 and objs[0]["colour"] == objs[1]["colour"] and objs[0]["shape"] == objs[1]["shape"]:
        objs[1]["colour"] = rng.choice([c for c in COLOURS if c != objs[0]["colour"]])
    relation = None
    if n == 1:
        r = SIZES[objs[0]["size"]]
        objs[0]["centre"] = (rng.uniform(r, 1 - r), rng.uniform(r, 1 - r))
    else:
        relation, axis, sign = rng.choice(RELATIONS)
        ra, rb = SIZES[objs[0]["size"]], SIZES[objs[1]["size"]]
        # Along the relation axis the two shapes do not overlap, so the caption is unambiguous.
        gap = rng.uniform(0.02, max(0.02, 1 - 2 * ra - 2 * rb))
        start = rng.uniform(0, max(0.0, 1 - 2 * ra - 2 * rb - gap))
        first = start + ra
        second = start + 2 * ra + gap + rb
        a_pos, b_pos = (first, second) if sign < 0 else (1 - first, 1 - second)
        other_a = rng.uniform(ra, 1 - ra)
        other_b = rng.uniform(rb, 1 - rb)
        objs[0]["centre"] = (a_pos, other_a) if axis == 0 else (other_a, a_pos)
        objs[1]["centre"] = (b_pos, other_b) if axis == 0 else (other_b, b_pos)
    return objs, relation


def caption_of(objs, relation):
    if relation is None:
        return describe(objs[0])
    return f"{describe(objs[0])} {relation} {describe(objs[1])}"


def render(objs, resolution):
    size = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        cx, cy = obj["centre"]
        _draw_shape(draw, obj["shape"], (cx * size, cy * size), SIZES[obj["size"]] * size, COLOURS[obj["colour"]])
    return img.resize((resolution, resolution), Image.LANCZOS)


# Per-pixel classes of ``render_labels``: 0 is the background, then one per (colour, shape), colours in COLOURS
# order, shapes in SHAPES order within each colour.
LABELS = ("background", *(f"{c} {s}" for c in COLOURS for s in SHAPES))


def label_of(colour, shape):
    """Class index in ``LABELS`` of a ``colour`` ``shape`` (1 .. len(LABELS) - 1; 0 is the background)."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}; colours {list(COLOURS)}, shapes {list(SHAPES)}")
    return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def render_labels(objs, resolution):
    """Ground-truth class map of ``render(objs, resolution)``: int64 [R, R], values indices into ``LABELS``.

    Each object is drawn as its class index with ``render``'s geometry at the same supersampled size; each output
    pixel then takes the class covering most of its supersample block (ties go to the lower index, background
    first). A majority vote rather than NEAREST: NEAREST keeps one sub-sample of the block, so an edge pixel's label
    would follow that one point instead of the area that decides the pixel's anti-aliased colour.
    """
    size = resolution * _SUPERSAMPLE
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        cx, cy = obj["centre"]
        _draw_shape(draw, obj["shape"], (cx * size, cy * size), SIZES[obj["size"]] * size,
                    label_of(obj["colour"], obj["shape"]))
    blocks = np.asarray(img).reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE)
    present = np.array(sorted({0, *(label_of(o["colour"], o["shape"]) for o in objs)}), dtype=np.int64)
    counts = np.stack([(blocks == k).sum((1, 3)) for k in present], axis=-1)  # [R, R, n present]
    return present[counts.argmax(-1)]


def pil_to_tensor(img):
    """PIL RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` captioned shape images at ``resolution``; sample i is a pure function of (seed, split, i)."""

    def __init__(self, size=2048, resolution=32, seed=0, split="train"):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        if int(size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        self.size, self.resolution, self.seed, self.split = int(size), int(resolution), int(seed), split
        self.skipped = 0

    def __len__(self):
        return self.size

    def scene(self, index):
        return sample_scene(self.seed, self.split, index)

    def get(self, index, rng=None):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        objs, relation = self.scene(index)
        return {"image": pil_to_tensor(render(objs, self.resolution)), "caption": caption_of(objs, relation)}

    def __getitem__(self, index):
        return self.get(int(index))
