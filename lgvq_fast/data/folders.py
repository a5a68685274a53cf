"""Caption datasets read from local folders: CUB-200 (Reed captions), CelebA-HQ with captions, COCO captions.

All return ``{"image": [3, R, R] float in [-1, 1], "caption": str}`` with one caption drawn uniformly at each
access from the image's eligible captions (at most ``max_words`` words; when none qualifies, the captions are
truncated to ``max_words`` words instead of failing). Missing files, empty caption files and malformed
annotation entries are found when the dataset is built; unreadable images when they are read. Both raise a
FileNotFoundError / ValueError naming the file, or, with ``skip_bad_samples=True``, are skipped and counted once
per distinct file: ``dataset.skipped_files`` holds what was skipped at build time and ``dataset.skipped`` its
number. A sample whose image cannot be decoded is replaced by the next readable one; each copy of the dataset
(one per DataLoader worker process) remembers the images it found unreadable in ``dataset.unreadable_files`` and
passes over them without reading them again, and a sample's ``"skipped"`` field counts only the images found
unreadable for the first time while drawing it (``"skipped_files"`` names them).
"""
import json
import os
import random

import numpy as np
from PIL import Image

from lgvq_fast.data.holdout import check_holdout, holdout_select
from lgvq_fast.data.shapes import pil_to_tensor

# Matched case-insensitively where a folder is searched for an image id (CelebA-HQ).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path):
    """Open ``path`` as 8-bit RGB; FileNotFoundError / ValueError naming the file when it is missing or unreadable.

    Single-channel images deeper than 8 bits are scaled to 0..255 before the RGB conversion (which would clip
    them): the 16-bit modes ``I;16``, ``I;16B``, ... are divided by 257 (0..65535 -> 0..255); the 32-bit integer
    mode ``I`` is read as 8-bit when its maximum is <= 255, as 16-bit (divided by 257) when it is <= 65535, and
    is otherwise scaled so that its maximum becomes 255; the float mode ``F`` is read as [0, 1] when its maximum
    is <= 1, as [0, 255] when it is <= 255, and is otherwise scaled so that its maximum becomes 255. Negative
    and non-finite values become 0.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                img = _to_8bit(img)
            return img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc


def _to_8bit(img):
    """Mode ``I;16*``, ``I`` or ``F`` image -> mode ``L`` image, scaled by the rule stated in ``load_image``."""
    arr = np.asarray(img, dtype=np.float64)
    arr = np.where(np.isfinite(arr), arr, 0.0).clip(min=0.0)
    hi = float(arr.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and 255 < hi <= 65535):
        scale = 1 / 257
    elif img.mode == "F" and hi <= 1:
        scale = 255.0
    elif hi <= 255:
        scale = 1.0
    else:
        scale = 255.0 / hi
    return Image.fromarray(np.rint(arr * scale).clip(0, 255).astype(np.uint8))


def read_captions(path):
    """Non-empty, lower-cased, stripped lines of ``path``; ValueError naming the file when there are none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip().lower() for line in f]
    except OSError as exc:
        raise ValueError(f"cannot read caption file {path}: {exc}") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"caption file is empty: {path}")
    return lines


def eligible_captions(captions, max_words):
    """Captions with at most ``max_words`` words; if none has, all captions truncated to ``max_words`` words."""
    if max_words is None:
        return list(captions)
    short = [c for c in captions if len(c.split()) <= max_words]
    if short:
        return short
    return [" ".join(c.split()[:max_words]) for c in captions]


def resize_crop(img, resolution, rng=None, random_crop=False, flip=False):
    """Resize the shorter side to ``resolution``, crop a square (random or centre), optionally flip."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if random_crop and rng is not None:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


class FolderCaptionDataset:
    """Shared logic: ``entries`` is a list of (image_path, eligible captions) built by a subclass.

    ``skipped_files``: the set of bad files skipped at build time (for a malformed annotation entry, the JSON
    path and the entry, e.g. ``captions.json: annotations[3]``); ``skipped``: their number.
    ``unreadable_files``: the set of images this copy of the dataset found unreadable while reading.
    """

    random_crop = False
    flip = False

    def __init__(self, resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        self.resolution, self.seed, self.max_words = int(resolution), int(seed), max_words
        self.skip_bad_samples = bool(skip_bad_samples)
        self.skipped_files = set()
        self.unreadable_files = set()
        self.entries = []

    @property
    def skipped(self):
        """Number of distinct bad files (or annotation entries) skipped when the dataset was built."""
        return len(self.skipped_files)

    def _bad(self, exc, source):
        """Raise ``exc``, or with ``skip_bad_samples`` record ``source`` (the file at fault) as skipped."""
        if not self.skip_bad_samples:
            raise exc
        self.skipped_files.add(source)

    def _add(self, image_path, caption_path=None, captions=None):
        """Append an entry after checking the files; captions are read now (small) so bad ones show early.

        A bad entry is skipped under the name of the file at fault: the missing image, the caption file, or
        (``captions`` given) the image that has no non-empty caption.
        """
        if not os.path.isfile(image_path):
            self._bad(FileNotFoundError(f"image file not found: {image_path}"), image_path)
            return
        if captions is None:
            try:
                captions = read_captions(caption_path)
            except (FileNotFoundError, ValueError) as exc:
                self._bad(exc, caption_path)
                return
        else:
            captions = [c.strip().lower() for c in captions if c.strip()]
            if not captions:
                self._bad(ValueError(f"no non-empty caption for image {image_path}"), image_path)
                return
        self.entries.append((image_path, eligible_captions(captions, self.max_words)))

    def _finish(self, what):
        if not self.entries:
            raise ValueError(f"{what}: no usable samples ({self.skipped} skipped)")

    def __len__(self):
        return len(self.entries)

    def get(self, index, rng=None):
        """Sample ``index``; with ``skip_bad_samples`` an unreadable image is replaced by the next readable entry.

        Images found unreadable join ``unreadable_files`` and are passed over from then on without being read;
        when this call found any, the sample's ``"skipped"`` field is their number and ``"skipped_files"`` their
        paths, so the ``"skipped"`` fields of all samples one copy of the dataset draws add up to the number of
        distinct unreadable images it met.
        """
        rng = rng or random.Random(self.seed * 1_000_003 + int(index))
        found = []
        for attempt in range(len(self.entries)):
            path, captions = self.entries[(int(index) + attempt) % len(self.entries)]
            if path in self.unreadable_files:
                continue
            try:
                img = load_image(path)
            except (FileNotFoundError, ValueError):
                if not self.skip_bad_samples:
                    raise
                self.unreadable_files.add(path)
                found.append(path)
                continue
            img = self.transform(img, rng)
            sample = {"image": pil_to_tensor(img), "caption": rng.choice(captions)}
            if found:
                sample["skipped"], sample["skipped_files"] = len(found), tuple(found)
            return sample
        raise ValueError(f"no readable image among the {len(self.entries)} images of the dataset "
                         f"({len(self.unreadable_files)} unreadable, e.g. {path})")

    def __getitem__(self, index):
        return self.get(int(index))

    def transform(self, img, rng):
        """Resize on the shorter side and crop square (random crop and flip where the class enables them)."""
        return resize_crop(img, self.resolution, rng, self.random_crop, self.flip)


class CUBDataset(FolderCaptionDataset):
    """CUB-200-2011 with Reed et al. captions.

    Layout: ``root/images.txt`` ("<id> <class>/<name>.jpg"), ``root/train_test_split.txt`` ("<id> <1=train|0>"),
    ``root/images/<class>/<name>.jpg``, ``root/text/<class>/<name>.txt`` (captions, one per line).
    Train: resize + random crop + horizontal flip; val/test: resize + centre crop.
    """

    def __init__(self, root, split="train", resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.random_crop = self.flip = split == "train"
        images_txt = os.path.join(root, "images.txt")
        split_txt = os.path.join(root, "train_test_split.txt")
        for p in (images_txt, split_txt):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"CUB split file not found: {p}")
        names = dict(_read_pairs(images_txt))
        want = "1" if split == "train" else "0"
        for img_id, flag in _read_pairs(split_txt):
            if flag != want:
                continue
            if img_id not in names:
                raise ValueError(f"{split_txt}: image id {img_id} is not listed in {images_txt}")
            rel = names[img_id]
            stem = os.path.splitext(rel)[0]
            self._add(os.path.join(root, "images", rel), os.path.join(root, "text", stem + ".txt"))
        self._finish(f"CUB {split} split in {root}")


class CelebAHQCaptions(FolderCaptionDataset):
    """CelebA-HQ with the Multi-Modal-CelebA-HQ captions.

    Layout: ``root/images/<id>.<ext>`` (any extension of IMAGE_EXTS, in any case; the first of IMAGE_EXTS
    wins when several exist), ``root/celeba-caption/<id>.txt``, and the split as a list of ids (one per line,
    with or without extension) in ``root/<split>.txt``. Resize + centre crop (no flip).
    """

    def __init__(self, root, split="train", resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        split_file = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"CelebA-HQ split file not found: {split_file} (one image id per line)")
        with open(split_file, encoding="utf-8") as f:
            ids = [os.path.splitext(os.path.basename(line.strip()))[0] for line in f if line.strip()]
        folder = os.path.join(root, "images")
        index = _image_index(folder)
        for i in ids:
            try:
                image = _find_image(index, folder, i)
            except FileNotFoundError as exc:
                self._bad(exc, os.path.join(folder, i))
                continue
            self._add(image, os.path.join(root, "celeba-caption", f"{i}.txt"))
        self._finish(f"CelebA-HQ {split} split in {root}")


class COCOCaptions(FolderCaptionDataset):
    """COCO captions: one sample per image, one of its captions drawn at every access.

    The image path is ``image_dir/<file_name>`` from the annotation JSON's ``images`` list (never rebuilt from
    the id). Every ``images`` entry needs a string ``file_name`` and an int or string ``id``, every
    ``annotations`` entry an int or string ``image_id`` and a string ``caption``; a malformed entry raises a
    ValueError naming the JSON, the list, the entry's index and the key, or with ``skip_bad_samples`` is skipped
    (``skipped_files`` then holds e.g. ``captions.json: annotations[3]``). Resize + centre crop, horizontal flip
    on the train split only.

    ``holdout=(fraction, seed, role)`` splits the images of one annotation file into a training and a validation
    part (``holdout_keys``, keyed by ``file_name``): role "train" keeps the images not held out, role "val" only
    the held-out ones, so two datasets built with the same fraction and seed never share an image.
    """

    def __init__(self, image_dir, annotation_json, resolution=256, split="train", seed=0, max_words=27,
                 skip_bad_samples=False, holdout=None):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        check_holdout(holdout)
        self.flip = split == "train"
        if not os.path.isfile(annotation_json):
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_json}")
        try:
            with open(annotation_json, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot parse COCO annotation file {annotation_json}: {exc}") from exc
        for key in ("images", "annotations"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"COCO annotation file {annotation_json} has no {key!r} list")
        by_image = {}
        for n, ann in enumerate(data["annotations"]):
            where = f"{annotation_json}: annotations[{n}]"
            try:
                image_id, caption = _entry_fields(where, ann, ("image_id", (int, str)), ("caption", str))
            except ValueError as exc:
                self._bad(exc, where)
                continue
            by_image.setdefault(image_id, []).append(caption)
        images = []
        for n, im in enumerate(data["images"]):
            where = f"{annotation_json}: images[{n}]"
            try:
                images.append(_entry_fields(where, im, ("file_name", str), ("id", (int, str))))
            except ValueError as exc:
                self._bad(exc, where)
        what = f"COCO captions {annotation_json}"
        keep = holdout_select([file_name for file_name, _ in images], holdout, what)
        for file_name, image_id in images:
            if file_name in keep:
                self._add(os.path.join(image_dir, file_name), captions=by_image.get(image_id, []))
        if holdout is not None:
            what += f" ({holdout[2]} part of a {holdout[0]:g} hold-out)"
        self._finish(what)


def _entry_fields(where, entry, *fields):
    """Values of ``fields`` ((key, allowed types) pairs) in the JSON object ``entry``; ValueError naming
    ``where`` and the key when ``entry`` is not an object, lacks a key or holds a value of another type."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object: {json.dumps(entry)[:60]}")
    values = []
    for key, types in fields:
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}")
        if not isinstance(entry[key], types):
            expected = "a string" if types is str else "an integer or a string"
            raise ValueError(f"{where}: {key!r} must be {expected}, got {json.dumps(entry[key])[:60]}")
        values.append(entry[key])
    return values


def _read_pairs(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                yield parts[0], parts[1]


def _image_index(folder):
    """``{stem: {lower-case extension: file name}}`` for the files of ``folder`` with an extension in IMAGE_EXTS
    (any case; of names differing only in the extension's case, the first in sorted order is kept)."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    except FileNotFoundError:
        raise FileNotFoundError(f"image folder not found: {folder}") from None
    except OSError as exc:
        raise ValueError(f"cannot list image folder {folder}: {exc}") from exc
    index = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            index.setdefault(stem, {}).setdefault(ext.lower(), name)
    return index


def _find_image(index, folder, stem):
    """Path of image ``stem`` in ``folder`` (indexed by ``_image_index``), trying IMAGE_EXTS in order;
    FileNotFoundError naming the folder, the stem and the extensions tried when none exists."""
    found = index.get(stem, {})
    for ext in IMAGE_EXTS:
        if ext in found:
            return os.path.join(folder, found[ext])
    raise FileNotFoundError(f"no image {stem!r} in {folder} (tried the extensions {', '.join(IMAGE_EXTS)}, "
                            "in any case)")
