"""TextCaps captions read from a local folder, in the official LG-VQ layout or the TextCaps release layout.

A file of its own beside ``folders.py`` (whose conventions it follows: ``FolderCaptionDataset``) because the two
layouts and the safe pickle reader are a responsibility of their own.
"""
import json
import os
import pickle

from PIL import Image

from lgvq_fast.data.folders import FolderCaptionDataset, _entry_fields

# split -> (official LG-VQ id list, TextCaps release annotation file); "test" reads the val files, as the
# official loader does (TextCaps' own test annotations hold no captions)
TEXTCAPS_FILES = {
    "train": ("train_filenames.pickle", "TextCaps_0.1_train.json"),
    "val": ("valid_filenames.pickle", "TextCaps_0.1_val.json"),
    "test": ("valid_filenames.pickle", "TextCaps_0.1_val.json"),
}


class TextCapsCaptions(FolderCaptionDataset):
    """TextCaps: one sample per image, one of its captions drawn at every access (spec §6.1).

    The layout is read from what ``root`` holds for the split, the official LG-VQ layout first:

    * official LG-VQ layout: ``root/train_filenames.pickle`` / ``root/valid_filenames.pickle`` hold a list of
      image ids (str), read with ``read_id_pickle`` (no class is ever loaded); images ``root/train_images/<id>.jpg``
      for both splits (the TextVQA/TextCaps image folder, where the val images sit too); captions
      ``root/text/<id>.txt``, one per line.
    * TextCaps release layout: ``root/TextCaps_0.1_train.json`` / ``root/TextCaps_0.1_val.json``, an object whose
      ``data`` list holds one entry per caption; each entry's ``image_id`` (str or int) and ``caption_str`` (str)
      are read and the captions grouped per image, images in the order of their first caption; the image is
      ``root/train_images/<image_id>.jpg`` (the entries' ``image_path``, "train/<id>.jpg", names a folder the
      release does not ship, so it is not used). A malformed entry raises a ValueError naming the JSON, the
      index and the key, or with ``skip_bad_samples`` is skipped (``skipped_files`` then holds e.g.
      ``TextCaps_0.1_train.json: data[3]``).

    Splits "train" and "val"; "test" reads the val files, as the official loader does. Every image is resized to
    ``resolution`` x ``resolution`` without keeping its aspect ratio (the official ``Resize([256, 256])``), no crop
    or flip; bicubic like the other folder datasets.
    """

    def __init__(self, root, split="train", resolution=256, seed=0, max_words=27, skip_bad_samples=False):
        super().__init__(resolution, seed, max_words, skip_bad_samples)
        if split not in TEXTCAPS_FILES:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        official, release = (os.path.join(root, name) for name in TEXTCAPS_FILES[split])
        images = os.path.join(root, "train_images")
        if os.path.isfile(official):
            self.layout = "official"
            for image_id in read_id_pickle(official):
                self._add(os.path.join(images, f"{image_id}.jpg"), os.path.join(root, "text", f"{image_id}.txt"))
        elif os.path.isfile(release):
            self.layout = "release"
            for image_id, captions in self._read_release(release).items():
                self._add(os.path.join(images, f"{image_id}.jpg"), captions=captions)
        else:
            raise FileNotFoundError(f"TextCaps {split} split not found in {root}: neither {official} (official "
                                    f"LG-VQ layout) nor {release} (TextCaps release layout)")
        self._finish(f"TextCaps {split} split in {root}")

    def _read_release(self, path):
        """``{image_id: [captions]}`` of a TextCaps release annotation file, malformed entries raised or skipped."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot parse TextCaps annotation file {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"TextCaps annotation file {path} has no 'data' list")
        by_image = {}
        for n, entry in enumerate(data["data"]):
            where = f"{path}: data[{n}]"
            try:
                image_id, caption = _entry_fields(where, entry, ("image_id", (int, str)), ("caption_str", str))
            except ValueError as exc:
                self._bad(exc, where)
                continue
            by_image.setdefault(str(image_id), []).append(caption)
        return by_image

    def transform(self, img, rng):
        """Resize to ``resolution`` x ``resolution``, aspect ratio not kept (no crop, no flip)."""
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.BICUBIC)
        return img


class _NoClassUnpickler(pickle.Unpickler):
    """Unpickler that builds only what the pickle opcodes build themselves (lists, strings, numbers, ...) and
    the builtins ``list`` and ``str``; any other global (a class, a function) is refused, so reading a pickle
    cannot run code."""

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in ("list", "str"):
            return list if name == "list" else str
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only a list of str)")


def read_id_pickle(path):
    """The list of image ids (str) pickled in ``path``, read without loading any class; ValueError naming the
    file when it cannot be read or holds anything other than a list of str. Python 2 byte strings are decoded as
    latin-1."""
    try:
        with open(path, "rb") as f:
            ids = _NoClassUnpickler(f, encoding="latin1").load()
    # a damaged pickle can fail in many ways (EOFError, UnpicklingError, KeyError, struct.error, ...)
    except Exception as exc:
        raise ValueError(f"cannot read image id pickle {path}: {exc}") from exc
    if not isinstance(ids, list):
        raise ValueError(f"image id pickle {path} holds a {type(ids).__name__}, not a list of image ids (str)")
    for n, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            raise ValueError(f"image id pickle {path}: item {n} is a {type(image_id).__name__} "
                             f"({image_id!r:.60}), not an image id (str)")
    return ids
