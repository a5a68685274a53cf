"""Datasets for LG-VQ training: the embedded captioned shapes and local caption folders (CUB, CelebA-HQ, COCO,
TextCaps)."""
from lgvq_fast.data.collate import EpochBatchSampler, KeyedDataset, make_collate, mix_seed
from lgvq_fast.data.folders import CelebAHQCaptions, COCOCaptions, CUBDataset
from lgvq_fast.data.holdout import holdout_keys
from lgvq_fast.data.shapes import ShapesDataset
from lgvq_fast.data.textcaps import TextCapsCaptions

__all__ = [
    "ShapesDataset", "CUBDataset", "CelebAHQCaptions", "COCOCaptions", "TextCapsCaptions",
    "EpochBatchSampler", "KeyedDataset", "make_collate", "mix_seed", "build_dataset", "holdout_keys",
    "ANNOTATION_DATASETS",
]

# datasets read from one annotation file that lists every image; without a separate validation file their
# validation part is held out of the training images (``val_holdout``)
ANNOTATION_DATASETS = ("coco",)


def build_dataset(name, split, resolution, seed=0, root=None, size=None, image_dir=None, annotation_json=None,
                  max_words=27, skip_bad_samples=False, val_holdout=0.0):
    """Dataset by name: "shapes", "cub", "celebahq", "textcaps" (folder ``root``), "coco" (``image_dir`` and
    ``annotation_json``).

    ``val_holdout`` (datasets of ANNOTATION_DATASETS only): a fraction in (0, 0.5] of the images of
    ``annotation_json`` held out by ``seed`` as validation; split "train" then drops them and "val"/"test" holds
    only them.
    """
    folder_kw = dict(resolution=resolution, seed=seed, max_words=max_words, skip_bad_samples=skip_bad_samples)
    if val_holdout and name not in ANNOTATION_DATASETS:
        raise ValueError(f"val_holdout applies to datasets read from one annotation file "
                         f"({', '.join(ANNOTATION_DATASETS)}), not to {name!r}, which has its own validation split")
    if name == "shapes":
        return ShapesDataset(size=size or (2048 if split == "train" else 256), resolution=resolution, seed=seed,
                             split=split)
    if name in ("cub", "celebahq", "textcaps") and not root:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root DIR)")
    if name == "cub":
        return CUBDataset(root, split=split, **folder_kw)
    if name == "celebahq":
        return CelebAHQCaptions(root, split=split, **folder_kw)
    if name == "textcaps":
        return TextCapsCaptions(root, split=split, **folder_kw)
    if name == "coco":
        if not image_dir or not annotation_json:
            raise ValueError("dataset 'coco' needs --image-dir and --annotations "
                             "(val split: --set data.val_image_dir=... --set data.val_annotations=...)")
        holdout = (val_holdout, int(seed), "train" if split == "train" else "val") if val_holdout else None
        return COCOCaptions(image_dir, annotation_json, split=split, holdout=holdout, **folder_kw)
    raise ValueError(f"unknown dataset {name!r}; choose shapes, cub, celebahq, coco or textcaps")
