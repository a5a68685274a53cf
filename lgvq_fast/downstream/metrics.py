"""Exact metrics for the downstream tasks on the captioned-shapes dataset (``lgvq_fast.data.shapes``).

Shapes captions state exactly what is drawn, so both tasks are measured exactly:

* captioning: ``parse_caption`` reads a generated caption back into a ``Scene``; ``caption_scores`` compares it with
  the image's true scene attribute by attribute; ``bleu4`` / ``chrf`` are the usual text overlaps (torchmetrics),
  with both equivalent wordings of a two-object caption as references;
* text to image: ``ShapesProbe``, a tiny segmentation network trained on the renderer's own ground truth
  (``render_labels``), labels each pixel of a generated image; ``read_scene`` turns the label map into objects
  (colour, shape, size from the pixel area, centroid) and ``probe_scores`` compares them with the prompt's scene.
  ``probe_accuracy_on_real`` is the probe's own score on real rendered images, the ceiling of ``probe_scores``.

Attribute scores, shared by both tasks (``n`` images; per image each number is 0 or 1 unless said otherwise):

* ``parsed`` (captions only): the caption is in the shapes grammar;
* ``exact``: the generated scene equals the true one (objects with size, colour and shape, and relation);
* ``count``: as many objects as the truth;
* ``colour``, ``shape``, ``size``, ``colour_shape``, ``object``: the fraction of the image's true objects whose
  colour / shape / size / (colour, shape) pair / (size, colour, shape) triple the generated scene has, each matched
  as a multiset (a generated value serves one true object), then averaged over images. Attributes are matched
  independently, so "a red circle, a blue square" for a true "a red square, a blue circle" has every colour and
  shape (1.0, 1.0) but no (colour, shape) pair and no object (0.0, 0.0);
* ``relation``: averaged over the ``n_relation`` images whose truth has two objects (NaN when there are none).
"""
import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lgvq_fast.data.shapes import (
    COLOURS,
    LABELS,
    RELATIONS,
    SHAPES,
    SIZES,
    geometry,
    pil_to_tensor,
    render,
    render_labels,
    sample_scene,
)

_RELATION_AXIS = {word: (axis, sign) for word, axis, sign in RELATIONS}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# "A right of B" is written "B left of A", "A below B" is "B above A".
_CANONICAL = ("left of", "above")
_SCORE_KEYS = ("count", "colour", "shape", "size", "colour_shape", "object")


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One object (``relation`` None) or two objects and the relation of the first to the second."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.objects) not in (1, 2) or (len(self.objects) == 2) != (self.relation is not None):
            raise ValueError(f"a Scene is one object without a relation or two with one, got {self}")
        if self.relation is not None and self.relation not in _RELATION_AXIS:
            raise ValueError(f"relation must be one of {list(_RELATION_AXIS)}, got {self.relation!r}")

    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].words()
        return f"{self.objects[0].words()} {self.relation} {self.objects[1].words()}"

    def swapped(self) -> "Scene":
        """The same scene told from the other object ("B right of A" for "A left of B"); one object: itself."""
        if self.relation is None:
            return self
        return Scene((self.objects[1], self.objects[0]), _INVERSE[self.relation])

    def canonical(self) -> "Scene":
        """Equivalent captions give equal canonical scenes: relations become "left of" or "above"."""
        return self if self.relation is None or self.relation in _CANONICAL else self.swapped()


@dataclass(frozen=True)
class Seen:
    """An object read from a label map: its class and size, centroid (x, y) in [0, 1] and pixel count."""

    obj: Obj
    centre: tuple[float, float]
    pixels: int


def _parse_object(words):
    if len(words) != 4 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS \
            or words[3] not in SHAPES:
        return None
    return Obj(words[1], words[2], words[3])


def parse_caption(text: str) -> Scene | None:
    """The scene a shapes caption states ("a large red circle left of a small blue square"), or None when ``text``
    is not in the grammar (unknown word, wrong order, missing or extra words). Case and whitespace are free."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = text.lower().split()
    first = _parse_object(words[:4])
    if first is None:
        return None
    if len(words) == 4:
        return Scene((first,))
    for relation in _RELATION_AXIS:
        rel = relation.split()
        if words[4:4 + len(rel)] == rel:
            second = _parse_object(words[4 + len(rel):])
            return None if second is None else Scene((first, second), relation)
    return None


def scene_of(objs, relation) -> Scene:
    """The ``Scene`` of ``sample_scene``'s output (its objects' centres are dropped)."""
    return Scene(tuple(Obj(o["size"], o["colour"], o["shape"]) for o in objs), relation)


def _as_scene(item, name, i):
    if isinstance(item, Scene):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], list):
        return scene_of(*item)
    raise ValueError(f"{name}[{i}] must be a Scene or sample_scene's (objs, relation), got {type(item).__name__}")


def _check_lists(name_a, a, name_b, b):
    for name, seq in ((name_a, a), (name_b, b)):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise ValueError(f"{name} must be a non-empty list, got {seq!r:.80}")
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} vs {len(b)}")


def _attribute_scores(got, truth):
    """Fractions of the ``truth`` objects whose attribute ``got`` has, each attribute matched as a multiset."""
    keys = {"colour": lambda o: o.colour, "shape": lambda o: o.shape, "size": lambda o: o.size,
            "colour_shape": lambda o: (o.colour, o.shape), "object": lambda o: o}
    out = {"count": float(len(got) == len(truth))}
    for name, key in keys.items():
        out[name] = sum((Counter(map(key, got)) & Counter(map(key, truth))).values()) / len(truth)
    return out


def _mean_scores(rows, relations, extra_keys=()):
    """Means of per-image score dicts; ``relation`` over the non-None entries of ``relations`` only."""
    out = {"n": len(rows)}
    for key in (*extra_keys, *_SCORE_KEYS, "exact"):
        out[key] = sum(r[key] for r in rows) / len(rows)
    rel = [r for r in relations if r is not None]
    out["relation"] = sum(rel) / len(rel) if rel else math.nan
    out["n_relation"] = len(rel)
    return out


def caption_scores(generated: list[str], truth: list) -> dict:
    """Attribute scores (module docstring) of generated captions against the images' true scenes.

    ``truth[i]``: a ``Scene`` or ``sample_scene``'s ``(objs, relation)``. Every number is a mean over the images
    (``n``) of a per-image value: ``parsed``, ``exact`` (canonical scenes equal), ``count``, the per-object
    attribute fractions, and ``relation`` over the two-object truths only (``n_relation`` of them): 1 when the
    caption has two objects, the same canonical relation, and its objects' (colour, shape) in the truth's canonical
    order. A caption outside the grammar scores 0 on everything.
    """
    _check_lists("generated", generated, "truth", truth)
    rows, relations = [], []
    for i, (text, item) in enumerate(zip(generated, truth, strict=True)):
        true = _as_scene(item, "truth", i).canonical()
        got = parse_caption(text)
        if got is None:
            rows.append(dict.fromkeys(("parsed", *_SCORE_KEYS, "exact"), 0.0))
            relations.append(None if true.relation is None else 0.0)
            continue
        got = got.canonical()
        rows.append({"parsed": 1.0, **_attribute_scores(got.objects, true.objects), "exact": float(got == true)})
        if true.relation is None:
            relations.append(None)
        else:
            pairs = [[(o.colour, o.shape) for o in s.objects] for s in (got, true)]
            relations.append(float(got.relation == true.relation and pairs[0] == pairs[1]))
    return _mean_scores(rows, relations, extra_keys=("parsed",))


def _text_inputs(generated, truth_captions):
    _check_lists("generated", generated, "truth_captions", truth_captions)
    preds = [" ".join(str(g).lower().split()) for g in generated]
    refs = []
    for i, caps in enumerate(truth_captions):
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps:
            raise ValueError(f"truth_captions[{i}] has no caption")
        row = []
        for cap in caps:
            scene = parse_caption(cap)
            # outside the grammar (another dataset) there is no equivalent wording: the caption alone is a reference
            row += [cap] if scene is None else [scene.caption(), scene.swapped().caption()]
        refs.append(list(dict.fromkeys(row)))
    return preds, refs


def bleu4(generated: list[str], truth_captions: list) -> float:
    """Corpus BLEU-4 (torchmetrics ``BLEUScore(n_gram=4)``: uniform weights, no smoothing) of the generated captions,
    lower-cased with whitespace folded, against each image's true caption (``truth_captions[i]``: one string, or the
    list of all the image's captions, as CUB and COCO have) and, for a two-object shapes caption, its swapped
    wording ("B right of A" for "A left of B"): both are correct."""
    from torchmetrics.text import BLEUScore

    preds, refs = _text_inputs(generated, truth_captions)
    return float(BLEUScore(n_gram=4)(preds, refs))


def chrf(generated: list[str], truth_captions: list[str]) -> float:
    """Corpus chrF++ (torchmetrics ``CHRFScore`` defaults: character 6-grams, word 2-grams, beta 2) in [0, 1], with
    the same predictions and references as ``bleu4``."""
    from torchmetrics.text import CHRFScore

    preds, refs = _text_inputs(generated, truth_captions)
    return float(CHRFScore()(preds, refs))


# The probe trains on its own scene stream: split "test" under a seed offset, never the (seed, "train") stream a
# tokenizer trains on, and it is scored on split "val".
_PROBE_SEED_OFFSET = 7_919_000
_PROBE_KIND = "lgvq_fast.downstream.metrics.ShapesProbe"


class ShapesProbe(nn.Module):
    """Per-pixel classifier of shapes images: ``forward(images [B, 3, R, R] in [-1, 1]) -> logits [B, C, R, R]``,
    C = len(LABELS) (background, or colour x shape).

    A full-resolution 3x3 stem, then a half-resolution context branch (a stride-2 3x3 convolution and 3x3 ones with
    dilations 1, 2, 4) that sees 33 pixels across, more than a large shape at R = 32 (15 pixels), which the shape
    classes need; the pixel's colour, the stem's and the upsampled context features meet in a full-resolution 1x1
    head, which places the edges. The head predicts object-vs-background, colour and shape apart and the class
    logits are their sum (log p(object) + log p(colour) + log p(shape) against the background): each shape is
    learnt from every colour, which at R = 32 halved the object-pixel errors of a 36-way head (5.8 % -> 2.7 %).
    Trains on a CPU in under a minute (``train_probe``).
    """

    def __init__(self, resolution: int = 32, width: int = 16):
        super().__init__()
        self.resolution, self.width = int(resolution), int(width)
        w = self.width

        def conv(cin, cout, stride=1, dilation=1):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        self.stem = nn.Sequential(*conv(3, w // 2))
        self.context = nn.Sequential(*conv(w // 2, w, stride=2), *conv(w, 2 * w), *conv(2 * w, 2 * w, dilation=2),
                                     *conv(2 * w, 2 * w, dilation=4))
        self.head = nn.Sequential(nn.Conv2d(3 + w // 2 + 2 * w, 2 * w, 1), nn.ReLU(),
                                  nn.Conv2d(2 * w, 1 + len(COLOURS) + len(SHAPES), 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        fine = self.stem(images)
        context = F.interpolate(self.context(fine), size=images.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(torch.cat([images, fine, context], dim=1))
        obj, colour, shape = out.split([1, len(COLOURS), len(SHAPES)], dim=1)
        pair = colour.log_softmax(1)[:, :, None] + shape.log_softmax(1)[:, None, :]  # [B, colours, shapes, R, R]
        return torch.cat([torch.zeros_like(obj), obj + pair.flatten(1, 2)], dim=1)


def _rendered(seed, split, indices, resolution):
    """Images [n, 3, R, R] in [-1, 1] and label maps [n, R, R] of ``sample_scene(seed, split, i)``."""
    scenes = [sample_scene(seed, split, i) for i in indices]
    images = torch.stack([pil_to_tensor(render(objs, resolution)) for objs, _ in scenes])
    labels = torch.stack([torch.from_numpy(render_labels(objs, resolution)) for objs, _ in scenes])
    return images, labels, scenes


def train_probe(resolution: int = 32, steps: int = 500, batch_size: int = 24, lr: float = 4e-3, width: int = 16,
                seed: int = 0, device="cpu", progress: bool = True) -> ShapesProbe:
    """A ``ShapesProbe`` trained with Adam and per-pixel cross-entropy on ``steps * batch_size`` freshly rendered
    scenes (split "test", seed ``seed`` + an offset: a stream apart from the tokenizer's training data).

    Learning rate ``lr`` on a one-cycle schedule; the loss weighs background and object pixels equally (the mean of
    the two means), since the background is ~85 % of the pixels. Deterministic for a ``seed`` on one device and
    thread count; the global RNG is left as it was. A tqdm bar when ``progress``. Returned in eval mode.

    The convolutions are tiny, so intra-op threads gain little; on a CPU shared with other work they lose a lot
    (waiting on each other), and ``torch.set_num_threads(1)`` before the call keeps the run under a minute.
    """
    for name, value, least in (("resolution", resolution, 8), ("steps", steps, 1), ("batch_size", batch_size, 1),
                               ("width", width, 2)):
        if int(value) < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = ShapesProbe(resolution, width).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=int(steps), pct_start=0.1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(steps), desc="shapes probe", dynamic_ncols=True, mininterval=1.0)
    probe.train()
    for step in range(int(steps)):
        idx = range(step * batch_size, (step + 1) * batch_size)
        images, labels, _ = _rendered(seed + _PROBE_SEED_OFFSET, "test", idx, resolution)
        images, labels = images.to(device), labels.to(device)
        loss_px = F.cross_entropy(probe(images), labels, reduction="none")  # [B, R, R]
        obj = labels > 0
        loss = 0.5 * (loss_px[~obj].mean() + loss_px[obj].mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return probe.eval()


@lru_cache(maxsize=16)
def _areas(resolution):
    """Pixel areas in ``render_labels`` maps at ``resolution``: {(shape, size): mean area over sub-pixel offsets}."""
    areas = {}
    for shape in SHAPES:
        for size in SIZES:
            counts = [np.count_nonzero(render_labels([{"shape": shape, "colour": next(iter(COLOURS)), "size": size,
                                                       "centre": (0.5 + dx / resolution, 0.5 + dy / resolution)}],
                                                     resolution))
                      for dx, dy in ((0, 0), (0.25, 0.5), (0.5, 0.25), (0.75, 0.75))]
            areas[shape, size] = float(np.mean(counts))
    return areas


def size_thresholds(resolution: int) -> dict[str, float]:
    """Per shape, the pixel area above which a read object is "large": the geometric mean of the small and large
    areas the renderer draws at ``resolution`` (their ratio is (0.24 / 0.17)^2 = 2.0, so each lies a factor ~1.4
    from the threshold). Measured from ``render_labels`` rather than written down, so it follows the geometry."""
    areas = _areas(int(resolution))
    return {shape: math.sqrt(areas[shape, "small"] * areas[shape, "large"]) for shape in SHAPES}


def default_min_pixels(resolution: int) -> int:
    """Half the area of the smallest shape the renderer draws (a small triangle) at ``resolution``, at least 1."""
    return max(1, int(min(_areas(int(resolution)).values()) // 2))


def _components(mask):
    """4-connected components of a boolean [H, W] mask: each pixel of the mask gets its component's smallest flat
    index, pixels outside get H * W (minimum-label propagation: as many passes as the longest path in a part)."""
    outside = mask.size
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    while True:
        nxt = lab.copy()
        np.minimum(nxt[1:], lab[:-1], out=nxt[1:])
        np.minimum(nxt[:-1], lab[1:], out=nxt[:-1])
        np.minimum(nxt[:, 1:], lab[:, :-1], out=nxt[:, 1:])
        np.minimum(nxt[:, :-1], lab[:, 1:], out=nxt[:, :-1])
        nxt[~mask] = outside
        if np.array_equal(nxt, lab):
            return lab
        lab = nxt


def _class_regions(lm):
    """{class: pixel mask} of the objects in label map ``lm``. Each 4-connected part of one colour is one shape, the
    class most of its pixels have (the probe reads part of a small cross as a diamond now and then); parts of one
    class join (the dataset never draws two shapes of one colour and shape). Two shapes of one colour less than a
    pixel apart form one part and read as one shape: 2 in 3000 true label maps at R = 32, 11 at R = 16."""
    colour = np.where(lm > 0, (lm - 1) // len(SHAPES), -1)
    regions = {}
    for c in np.unique(colour[colour >= 0]):
        parts = _components(colour == c)
        for part in np.unique(parts[parts < parts.size]):
            mask = parts == part
            k = int(np.bincount(lm[mask]).argmax())
            regions[k] = regions[k] | mask if k in regions else mask
    return regions


def read_scene(label_map, min_pixels: int | None = None) -> tuple[Seen, ...]:
    """The objects in a label map [R, R] (``render_labels`` or a probe's argmax): one per colour x shape class with
    at least ``min_pixels`` pixels (default ``default_min_pixels(R)``), a connected part of one colour counting as
    its majority class (``_class_regions``), sized by its area against ``size_thresholds(R)``, with its centroid
    (x, y) in [0, 1] (pixel centres, as ``sample_scene``'s centres), in class order.

    A class is one object: the dataset never draws two shapes of one colour and shape.
    """
    lm = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if lm.ndim != 2 or lm.shape[0] != lm.shape[1] or lm.size == 0 or lm.dtype.kind not in "iu":
        raise ValueError(f"label_map must be a square integer [R, R] map, got {lm.dtype} {lm.shape}")
    if lm.min() < 0 or lm.max() >= len(LABELS):
        raise ValueError(f"label_map values must lie in [0, {len(LABELS)}), got {lm.min()}..{lm.max()}")
    res = lm.shape[0]
    min_pixels = max(1, default_min_pixels(res) if min_pixels is None else int(min_pixels))
    thresholds = size_thresholds(res)
    seen = []
    for k, mask in sorted(_class_regions(lm).items()):
        pixels = int(mask.sum())
        if pixels < min_pixels:
            continue
        colour, shape = LABELS[k].split(" ")
        ys, xs = np.nonzero(mask)
        size = "large" if pixels > thresholds[shape] else "small"
        centre = (float(xs.mean() + 0.5) / res, float(ys.mean() + 0.5) / res)
        seen.append(Seen(Obj(size, colour, shape), centre, pixels))
    return tuple(seen)


def relation_holds(seen, scene: Scene) -> bool:
    """Whether both of a two-object ``scene``'s objects are among ``seen`` (by colour and shape: size is scored
    apart) and their centroids are ordered along the relation's axis as it says. False for one-object scenes."""
    if scene.relation is None:
        return False
    by_class = {(s.obj.colour, s.obj.shape): s.centre for s in seen}
    a, b = ((o.colour, o.shape) for o in scene.objects)
    if a not in by_class or b not in by_class or a == b:
        return False
    axis, sign = _RELATION_AXIS[scene.relation]
    return sign * (by_class[a][axis] - by_class[b][axis]) > 0


def _check_images(images, resolution):
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4 \
            or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, R, R] in [-1, 1], got {got}")
    if tuple(images.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"images must be {resolution}x{resolution} (the probe's resolution), got "
                         f"{tuple(images.shape[-2:])}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"images must lie in [-1, 1] (pil_to_tensor's range), got values in [{lo:.3g}, {hi:.3g}]")


@torch.no_grad()
def predict_labels(probe: ShapesProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The probe's label maps [B, R, R] (int64, on the CPU) for ``images`` [B, 3, R, R] in [-1, 1]."""
    _check_images(images, probe.resolution)
    was_training = probe.training
    probe.eval()
    device = next(probe.parameters()).device
    out = [probe(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    probe.train(was_training)
    return torch.cat(out)


def _score_label_maps(label_maps, scenes, min_pixels):
    rows, relations = [], []
    for lm, true in zip(label_maps, scenes, strict=True):
        seen = read_scene(lm, min_pixels)
        row = _attribute_scores([s.obj for s in seen], true.objects)
        rel = None if true.relation is None else relation_holds(seen, true)
        row["exact"] = float(row["count"] == 1.0 and row["object"] == 1.0 and rel in (None, True))
        rows.append(row)
        relations.append(None if rel is None else float(rel))
    return _mean_scores(rows, relations)


def probe_scores(probe: ShapesProbe, images: torch.Tensor, truth: list, min_pixels: int | None = None) -> dict:
    """Attribute scores (module docstring) of images (generated from prompts) as the probe reads them.

    ``truth[i]``: the prompt's ``Scene`` (or ``sample_scene``'s ``(objs, relation)``). Means over the images
    (``n``): ``count`` (objects read, ``read_scene``), the per-object attribute fractions, ``relation`` over the
    two-object prompts (``n_relation``): both prompt objects read (by colour and shape) with centroids in the stated
    order (``relation_holds``), and ``exact``: the read objects are exactly the prompt's (count and every (size,
    colour, shape)) and, for two objects, the relation holds.
    """
    _check_images(images, probe.resolution)
    if not isinstance(truth, (list, tuple)) or len(truth) != len(images):
        got = len(truth) if isinstance(truth, (list, tuple)) else type(truth).__name__
        raise ValueError(f"truth must be a list with one scene per image ({len(images)}), got {got}")
    scenes = [_as_scene(item, "truth", i) for i, item in enumerate(truth)]
    return _score_label_maps(predict_labels(probe, images), scenes, min_pixels)


def probe_accuracy_on_real(probe: ShapesProbe, n: int = 512, resolution: int | None = None, seed: int = 0) -> dict:
    """``probe_scores`` on ``n`` freshly rendered real images (``sample_scene(seed, "val", i)``, i < n) against
    their true scenes: the ceiling any generated image can reach. Adds ``pixel_accuracy`` (all pixels) and
    ``object_pixel_accuracy`` (pixels of the true objects), means over every pixel of the ``n`` images.
    ``resolution`` (default the probe's) must be the probe's: ``predict_labels`` refuses another."""
    resolution = probe.resolution if resolution is None else int(resolution)
    if int(n) <= 0:
        raise ValueError(f"n must be positive, got {n}")
    images, labels, raw = _rendered(seed, "val", range(int(n)), resolution)
    pred = predict_labels(probe, images)
    scores = _score_label_maps(pred, [scene_of(*r) for r in raw], None)
    obj = labels > 0
    scores["pixel_accuracy"] = (pred == labels).float().mean().item()
    scores["object_pixel_accuracy"] = (pred[obj] == labels[obj]).float().mean().item()
    return scores


def save_probe(probe: ShapesProbe, path) -> None:
    """Writes the probe (state dict, resolution, width, the class table ``LABELS`` and the renderer's ``geometry()``
    it was trained on) to ``path`` atomically."""
    if not isinstance(probe, ShapesProbe):
        raise TypeError(f"probe must be a ShapesProbe, got {type(probe).__name__}")
    payload = {"kind": _PROBE_KIND, "version": 2, "resolution": probe.resolution, "width": probe.width,
               "labels": list(LABELS), "geometry": geometry(),
               "state_dict": {k: v.detach().cpu() for k, v in probe.state_dict().items()}}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_probe(path, device="cpu") -> ShapesProbe:
    """The probe ``save_probe`` wrote to ``path`` (eval mode). ValueError naming the file when it is not a probe file,
    was trained for another class table, or on shapes drawn with another geometry than the renderer's now (its
    readings of today's images would be off)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a shapes probe file ({type(e).__name__} while loading)") from None
    if not isinstance(payload, dict) or payload.get("kind") != _PROBE_KIND:
        raise ValueError(f"{path}: not a shapes probe file (no {_PROBE_KIND} payload)")
    if list(payload.get("labels", ())) != list(LABELS):
        raise ValueError(f"{path}: the probe's class table ({len(payload.get('labels', ()))} classes) differs from "
                         f"lgvq_fast.data.shapes.LABELS ({len(LABELS)} classes)")
    drawn, now = payload.get("geometry"), geometry()
    if drawn != now:
        if drawn is None:
            why = "records no drawing geometry (written before probes recorded it)"
        else:
            diff = sorted(k for k in set(drawn) | set(now) if drawn.get(k) != now.get(k))
            why = "was trained on shapes drawn with other " + ", ".join(
                f"{k} ({drawn.get(k)!r}, the renderer now: {now.get(k)!r})" for k in diff)
        raise ValueError(f"{path}: the probe {why}; train a new one (delete the file to have the downstream "
                         "trainer retrain it, or lgvq_fast.downstream.metrics.train_probe)")
    try:
        probe = ShapesProbe(payload["resolution"], payload["width"])
        probe.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: a shapes probe file whose weights do not load ({type(e).__name__})") from None
    return probe.to(device).eval()
