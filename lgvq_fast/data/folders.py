"""Caption datasets read from local folders: CUB-200 (Reed captions), CelebA-HQ with captions, COCO captions.

All return ``{"image": [3, R, R] float in [-1, 1], "caption": str}`` with one caption drawn uniformly at each
access from the image's eligible captions (at most ``max_words`` words; when none qualifies, the captions are
truncated to ``max_words`` words instead of failing). Missing files and empty caption files are found when the
dataset is built; unreadable images when they are read. Both raise an error naming the file, or, with
``skip_bad_samples=True``, are skipped and counted (``dataset.skipped`` at build time; a sample whose image
cannot be decoded is replaced by the next readable one and its ``"skipped"`` field counts the replacements).
"""
import json
import os
import random

from PIL import Image

from lgvq_fast.data.shapes import pil_to_tensor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path):
    """Open ``path`` as RGB; FileNotFoundError / ValueError naming the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc


def read_captions(path):
    """Non-empty, lower-cased, stripped lines of ``path``; ValueError naming the file when there are none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip().lower() for line in f]
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
    """Shared logic: ``entries`` is a list of (image_path, caption_source) built by a subclass."""

    random_crop = False
    flip = False

    def __init__(self, resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        self.resolution, self.seed, self.max_words = int(resolution), int(seed), max_words
        self.skip_bad_samples = bool(skip_bad_samples)
        self.skipped = 0
        self.skipped_files = []
        self.entries = []

    def _bad(self, exc):
        if not self.skip_bad_samples:
            raise exc
        self.skipped += 1
        self.skipped_files.append(str(exc))

    def _add(self, image_path, caption_path=None, captions=None):
        """Append an entry after checking the files; captions are read now (small) so bad ones show early."""
        try:
            if not os.path.isfile(image_path):
                raise FileNotFoundError(f"image file not found: {image_path}")
            if captions is None:
                captions = read_captions(caption_path)
            else:
                captions = [c.strip().lower() for c in captions if c and c.strip()]
                if not captions:
                    raise ValueError(f"no non-empty caption for image {image_path}")
        except (FileNotFoundError, ValueError) as exc:
            self._bad(exc)
            return
        self.entries.append((image_path, eligible_captions(captions, self.max_words)))

    def _finish(self, what):
        if not self.entries:
            raise ValueError(f"{what}: no usable samples ({self.skipped} skipped)")

    def __len__(self):
        return len(self.entries)

    def get(self, index, rng=None):
        rng = rng or random.Random(self.seed * 1_000_003 + int(index))
        replaced = 0
        for attempt in range(len(self.entries)):
            path, captions = self.entries[(int(index) + attempt) % len(self.entries)]
            try:
                img = load_image(path)
            except (FileNotFoundError, ValueError):
                if not self.skip_bad_samples:
                    raise
                replaced += 1
                continue
            img = resize_crop(img, self.resolution, rng, self.random_crop, self.flip)
            sample = {"image": pil_to_tensor(img), "caption": rng.choice(captions)}
            if replaced:
                sample["skipped"] = replaced
            return sample
        raise ValueError(f"no readable image in the dataset (last tried: {path})")

    def __getitem__(self, index):
        return self.get(int(index))


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

    Layout: ``root/images/<id>.jpg``, ``root/celeba-caption/<id>.txt``, and the split as a list of ids
    (one per line, with or without extension) in ``root/<split>.txt``. Resize + centre crop (no flip).
    """

    def __init__(self, root, split="train", resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        split_file = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"CelebA-HQ split file not found: {split_file} (one image id per line)")
        with open(split_file, encoding="utf-8") as f:
            ids = [os.path.splitext(os.path.basename(line.strip()))[0] for line in f if line.strip()]
        for i in ids:
            image = _find_image(os.path.join(root, "images"), i)
            self._add(image, os.path.join(root, "celeba-caption", f"{i}.txt"))
        self._finish(f"CelebA-HQ {split} split in {root}")


class COCOCaptions(FolderCaptionDataset):
    """COCO captions: one sample per image, one of its captions drawn at every access.

    The image path is ``image_dir/<file_name>`` from the annotation JSON's ``images`` list (never rebuilt from
    the id). Resize + centre crop, horizontal flip on the train split only.
    """

    def __init__(self, image_dir, annotation_json, resolution=256, split="train", seed=0, max_words=27,
                 skip_bad_samples=False):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        self.flip = split == "train"
        if not os.path.isfile(annotation_json):
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_json}")
        try:
            with open(annotation_json, encoding="utf-8") as f:
                data = json.load(f)
            images, annotations = data["images"], data["annotations"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot parse COCO annotation file {annotation_json}: {exc}") from exc
        by_image = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append(ann.get("caption", ""))
        for im in images:
            self._add(os.path.join(image_dir, im["file_name"]), captions=by_image.get(im["id"], []))
        self._finish(f"COCO captions {annotation_json}")


def _read_pairs(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                yield parts[0], parts[1]


def _find_image(folder, stem):
    for ext in IMAGE_EXTS:
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return os.path.join(folder, stem + ".jpg")
