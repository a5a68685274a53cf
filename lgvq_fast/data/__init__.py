"""Datasets for LG-VQ training: the embedded captioned shapes and local caption folders (CUB, CelebA-HQ, COCO)."""
from lgvq_fast.data.collate import EpochBatchSampler, KeyedDataset, make_collate, mix_seed
from lgvq_fast.data.folders import CelebAHQCaptions, COCOCaptions, CUBDataset
from lgvq_fast.data.shapes import ShapesDataset

__all__ = [
    "ShapesDataset", "CUBDataset", "CelebAHQCaptions", "COCOCaptions",
    "EpochBatchSampler", "KeyedDataset", "make_collate", "mix_seed", "build_dataset",
]


def build_dataset(name, split, resolution, seed=0, root=None, size=None, image_dir=None, annotation_json=None,
                  max_words=27, skip_bad_samples=False):
    """Dataset by name: "shapes", "cub", "celebahq", "coco" (COCO: ``image_dir`` and ``annotation_json``)."""
    folder_kw = dict(resolution=resolution, seed=seed, max_words=max_words, skip_bad_samples=skip_bad_samples)
    if name == "shapes":
        return ShapesDataset(size=size or (2048 if split == "train" else 256), resolution=resolution, seed=seed,
                             split=split)
    if name in ("cub", "celebahq") and not root:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root DIR)")
    if name == "cub":
        return CUBDataset(root, split=split, **folder_kw)
    if name == "celebahq":
        return CelebAHQCaptions(root, split=split, **folder_kw)
    if name == "coco":
        if not image_dir or not annotation_json:
            raise ValueError("dataset 'coco' needs --image-dir and --annotations "
                             "(val split: --set data.val_image_dir=... --set data.val_annotations=...)")
        return COCOCaptions(image_dir, annotation_json, split=split, **folder_kw)
    raise ValueError(f"unknown dataset {name!r}; choose shapes, cub, celebahq or coco")
