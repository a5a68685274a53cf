"""Datasets, sampler and collate of lgvq_fast.data: determinism, exact captions, folder layouts, bad files."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lgvq_fast.data import (
    CelebAHQCaptions, COCOCaptions, CUBDataset, EpochBatchSampler, KeyedDataset, ShapesDataset, build_dataset,
    make_collate,
)
from lgvq_fast.data.folders import eligible_captions
from lgvq_fast.data.shapes import COLOURS, caption_of, sample_scene


@pytest.mark.parametrize("resolution", [24, 37, 64], ids=lambda r: f"res{r}")
def test_shapes_deterministic_any_resolution(resolution):
    a = ShapesDataset(50, resolution, seed=3)
    b = ShapesDataset(50, resolution, seed=3)
    for i in (0, 7, 49):
        sa, sb = a[i], b[i]
        assert sa["image"].shape == (3, resolution, resolution)
        assert sa["image"].dtype == torch.float32
        assert -1.0 <= float(sa["image"].min()) and float(sa["image"].max()) <= 1.0
        assert torch.equal(sa["image"], sb["image"]) and sa["caption"] == sb["caption"]


def test_shapes_seed_and_split_change_samples():
    base = [ShapesDataset(40, 32, seed=0, split="train")[i]["caption"] for i in range(40)]
    other_seed = [ShapesDataset(40, 32, seed=1, split="train")[i]["caption"] for i in range(40)]
    val = [ShapesDataset(40, 32, seed=0, split="val")[i]["caption"] for i in range(40)]
    assert base != other_seed and base != val
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(4, 32, split="bogus")


def _colour_centroid(img, rgb):
    arr = np.asarray(img, dtype=np.float32)
    dist = np.abs(arr - np.array(rgb, dtype=np.float32)).sum(-1)
    ys, xs = np.nonzero(dist < 60)
    return (xs.mean(), ys.mean()) if len(xs) else None


def test_shapes_captions_match_pixels():
    """The colours named are drawn, and the relation holds between the two shapes' pixel centroids."""
    from lgvq_fast.data.shapes import render

    checked = 0
    for i in range(60):
        objs, relation = sample_scene(5, "train", i)
        cap = caption_of(objs, relation)
        words = cap.split()
        assert words[0] == "a" and words[1] in ("small", "large") and words[2] in COLOURS
        if relation is None or objs[0]["colour"] == objs[1]["colour"]:
            continue
        img = render(objs, 96)
        ca, cb = (_colour_centroid(img, COLOURS[o["colour"]]) for o in objs)
        assert ca is not None and cb is not None, cap
        axis = 0 if relation in ("left of", "right of") else 1
        sign = -1 if relation in ("left of", "above") else 1
        assert sign * (ca[axis] - cb[axis]) > 0, (cap, ca, cb)
        assert relation in cap
        checked += 1
    assert checked > 10


def test_sampler_shards_ranks_and_resumes():
    n, bs, world = 53, 4, 2
    full = [list(EpochBatchSampler(n, bs, seed=9, rank=r, world_size=world)) for r in range(world)]
    assert len(full[0]) == n // (bs * world)
    for b0, b1 in zip(*full):
        assert not {k[0] for k in b0} & {k[0] for k in b1}
    s = EpochBatchSampler(n, bs, seed=9, rank=1, world_size=world)
    s.set_position(0, 3)
    assert list(s) == full[1][3:]
    s.set_position(1, 0)
    assert [k[0] for b in s for k in b] != [k[0] for b in full[1] for k in b]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(5, 4, world_size=2)


class _FakeTokenizer:
    """Stands in for TextEncoder.tokenize: records the generator's first draw."""

    def tokenize(self, captions, max_len, mask_ratio_range=(0.1, 0.3), generator=None):
        return torch.rand(len(captions), max_len, generator=generator)


def test_collate_is_deterministic_per_epoch_and_batch():
    ds = KeyedDataset(ShapesDataset(30, 16, seed=2), seed=2)
    collate = make_collate(_FakeTokenizer(), 7, seed=4)
    keys = [(i, 1, 5) for i in (3, 11, 17)]
    a = collate([ds[k] for k in keys])
    b = collate([ds[k] for k in keys])
    c = collate([ds[(i, 2, 5)] for i in (3, 11, 17)])
    assert a["image"].shape == (3, 3, 16, 16) and a["captions"] == b["captions"]
    assert torch.equal(a["text"], b["text"]) and not torch.equal(a["text"], c["text"])
    assert a["skipped"] == 0


def test_collate_with_real_tokenizer_masks():
    from lgvq_fast.models import TextEncoder

    enc = TextEncoder.tiny_random(max_len=16)
    ds = KeyedDataset(ShapesDataset(12, 16), seed=0)
    batch = make_collate(enc, 16, seed=0)([ds[(i, 0, 0)] for i in range(6)])
    t = batch["text"]
    assert t.input_ids.shape == (6, 16) and t.mlm_mask.any()
    assert not (t.mlm_mask & ~t.pad_mask).any()


def _img(path, size=(40, 30), colour=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _cub(root, n=5, bad=None):
    names = []
    for i in range(1, n + 1):
        cls = "001.Bird" if i % 2 else "002.Other"
        rel = f"{cls}/img_{i}.jpg"
        names.append(f"{i} {rel}")
        _img(os.path.join(root, "images", rel), colour=(10 * i, 50, 90))
        cap = os.path.join(root, "text", cls, f"img_{i}.txt")
        os.makedirs(os.path.dirname(cap), exist_ok=True)
        with open(cap, "w") as f:
            f.write("" if bad == ("empty", i) else f"This bird number {i} is red\nshort caption {i}\n")
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "train_test_split.txt"), "w") as f:
        f.write("\n".join(f"{i} {1 if i <= n - 2 else 0}" for i in range(1, n + 1)) + "\n")


def test_cub_split_and_transforms(tmp_path):
    _cub(str(tmp_path))
    train = CUBDataset(str(tmp_path), "train", resolution=19)
    test = CUBDataset(str(tmp_path), "test", resolution=19)
    assert len(train) == 3 and len(test) == 2
    s = train.get(0, random.Random(1))
    assert s["image"].shape == (3, 19, 19) and s["caption"] in ("this bird number 1 is red", "short caption 1")
    assert train.random_crop and train.flip and not test.random_crop and not test.flip


def test_cub_empty_caption_names_file_or_is_skipped(tmp_path):
    _cub(str(tmp_path), bad=("empty", 2))
    with pytest.raises(ValueError, match="img_2.txt"):
        CUBDataset(str(tmp_path), "train", resolution=16)
    ds = CUBDataset(str(tmp_path), "train", resolution=16, skip_bad_samples=True)
    assert len(ds) == 2 and ds.skipped == 1


def test_unreadable_image_names_file_or_is_replaced(tmp_path):
    _cub(str(tmp_path))
    bad = os.path.join(str(tmp_path), "images", "001.Bird", "img_1.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    ds = CUBDataset(str(tmp_path), "train", resolution=16)
    with pytest.raises(ValueError, match="img_1.jpg"):
        ds[0]
    ds = CUBDataset(str(tmp_path), "train", resolution=16, skip_bad_samples=True)
    s = ds[0]
    assert s["skipped"] == 1 and s["image"].shape == (3, 16, 16)
    batch = make_collate(None, 8)([s, ds[1]])
    assert batch["skipped"] == 1 and batch["text"] is None


def test_missing_image_file(tmp_path):
    _cub(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), "images", "002.Other", "img_2.jpg"))
    with pytest.raises(FileNotFoundError, match="img_2.jpg"):
        CUBDataset(str(tmp_path), "train", resolution=16)
    assert CUBDataset(str(tmp_path), "train", resolution=16, skip_bad_samples=True).skipped == 1


def test_celebahq_captions(tmp_path):
    root = str(tmp_path)
    for i in range(4):
        _img(os.path.join(root, "images", f"{i}.jpg"), size=(33, 33))
        os.makedirs(os.path.join(root, "celeba-caption"), exist_ok=True)
        with open(os.path.join(root, "celeba-caption", f"{i}.txt"), "w") as f:
            f.write(f"The woman {i} has black hair.\n")
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("0.jpg\n1\n2\n")
    ds = CelebAHQCaptions(root, "train", resolution=21)
    assert len(ds) == 3 and ds[1]["caption"] == "the woman 1 has black hair."
    with pytest.raises(FileNotFoundError, match="val.txt"):
        CelebAHQCaptions(root, "val", resolution=21)


def test_coco_uses_file_name_and_random_caption(tmp_path):
    root = str(tmp_path)
    images = [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg"},
              {"id": 123456, "file_name": "COCO_train2014_000000123456.jpg"}]
    for im in images:
        _img(os.path.join(root, "img", im["file_name"]), size=(50, 20))
    anns = [{"image_id": 42, "caption": f"a dog {j}"} for j in range(5)] + [{"image_id": 123456, "caption": "a cat"}]
    ann_path = os.path.join(root, "captions.json")
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    ds = COCOCaptions(os.path.join(root, "img"), ann_path, resolution=12)
    assert len(ds) == 2
    seen = {ds.get(0, random.Random(s))["caption"] for s in range(30)}
    assert len(seen) > 1 and seen <= {f"a dog {j}" for j in range(5)}
    assert ds[1]["image"].shape == (3, 12, 12)
    bad = dict(images=images + [{"id": 7, "file_name": "missing.jpg"}], annotations=anns)
    with open(ann_path, "w") as f:
        json.dump(bad, f)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        COCOCaptions(os.path.join(root, "img"), ann_path, resolution=12)
    assert COCOCaptions(os.path.join(root, "img"), ann_path, resolution=12, skip_bad_samples=True).skipped == 1


def _coco(root, images, anns, missing=()):
    for im in images:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and im["file_name"] not in missing:
            _img(os.path.join(root, "img", im["file_name"]), size=(20, 20))
    ann_path = os.path.join(root, "captions.json")
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return os.path.join(root, "img"), ann_path


_COCO_IMAGES = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
_COCO_ANNS = [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"},
              {"image_id": 2, "caption": "a cat again"}]


@pytest.mark.parametrize("lst,index,entry,message", [
    ("images", 1, {"id": 2}, "has no 'file_name'"),
    ("images", 1, {"file_name": "b.jpg"}, "has no 'id'"),
    ("images", 0, "a.jpg", "is not an object"),
    ("annotations", 2, {"caption": "a cat again"}, "has no 'image_id'"),
    ("annotations", 2, {"image_id": 2}, "has no 'caption'"),
    ("annotations", 2, {"image_id": 2, "caption": 5}, "'caption' must be a string, got 5"),
    ("annotations", 2, {"image_id": [2], "caption": "x"}, "'image_id' must be an integer or a string"),
], ids=["no-file_name", "no-id", "image-not-object", "no-image_id", "no-caption", "caption-int", "image_id-list"])
def test_coco_malformed_entry_names_json_list_index_key(tmp_path, lst, index, entry, message):
    """A malformed entry is a ValueError naming the JSON, the list, the index and the key, or is skipped."""
    images, anns = [dict(im) for im in _COCO_IMAGES], [dict(a) for a in _COCO_ANNS]
    (images if lst == "images" else anns)[index] = entry
    image_dir, ann_path = _coco(str(tmp_path), images, anns)
    with pytest.raises(ValueError) as err:
        COCOCaptions(image_dir, ann_path, resolution=12)
    assert f"captions.json: {lst}[{index}]" in str(err.value) and message in str(err.value)
    ds = COCOCaptions(image_dir, ann_path, resolution=12, skip_bad_samples=True)
    assert ds.skipped == 1 and ds.skipped_files == {f"{ann_path}: {lst}[{index}]"}
    assert len(ds) == (1 if lst == "images" else 2)


def test_coco_without_images_list(tmp_path):
    ann_path = os.path.join(str(tmp_path), "captions.json")
    with open(ann_path, "w") as f:
        json.dump({"images": {}, "annotations": []}, f)
    with pytest.raises(ValueError, match="captions.json has no 'images' list"):
        COCOCaptions(str(tmp_path), ann_path, resolution=12)


@pytest.mark.parametrize("kind,ext", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("I wide", "tif"),
                                      ("F", "tif")])
def test_deep_images_load_like_8bit(tmp_path, kind, ext):
    """16-bit, 32-bit int and float images are scaled to 8 bits, not clipped to white (or black)."""
    from lgvq_fast.data.folders import load_image
    from lgvq_fast.data.shapes import pil_to_tensor

    g8 = np.arange(256, dtype=np.int64).reshape(16, 16)
    g16 = np.clip(g8 * 257 + (g8 % 7) * 10 - 30, 0, 65535)  # rounds back to g8 when divided by 257
    if kind == "I;16":
        img = Image.fromarray(g16.astype(np.uint16))
    elif kind == "I;16B":
        img = Image.frombytes("I;16B", (16, 16), g16.astype(">u2").tobytes())
    elif kind == "I":
        img = Image.fromarray(g16.astype(np.int32))
    elif kind == "I wide":
        img = Image.fromarray((g8 << 20).astype(np.int32))
    else:
        img = Image.fromarray((g8 / 255).astype(np.float32))
    deep, ref = str(tmp_path / f"deep.{ext}"), str(tmp_path / "ref.png")
    img.save(deep)
    assert Image.open(deep).mode == kind.split(" ")[0]
    Image.fromarray(g8.astype(np.uint8)).save(ref)
    a, b = pil_to_tensor(load_image(deep)), pil_to_tensor(load_image(ref))
    assert a.shape == b.shape == (3, 16, 16)
    assert float((a - b).abs().max()) <= 2 / 255 + 1e-6  # one 8-bit step in [-1, 1] units


def test_celebahq_extensions_any_case(tmp_path):
    root = str(tmp_path)
    names = ["0.JPG", "1.tiff", "2.Tif", "3.png"]
    os.makedirs(os.path.join(root, "celeba-caption"))
    for n in names:
        _img(os.path.join(root, "images", n), size=(12, 12))
    Image.new("RGB", (12, 12)).save(os.path.join(root, "images", "4.jpeg.txt"), format="JPEG")  # not an image name
    for i in range(5):
        with open(os.path.join(root, "celeba-caption", f"{i}.txt"), "w") as f:
            f.write("a face\n")
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("0\n1.jpg\n2\n3\n")
    ds = CelebAHQCaptions(root, "train", resolution=8)
    assert [os.path.basename(p) for p, _ in ds.entries] == names
    assert ds[1]["image"].shape == (3, 8, 8)
    with open(os.path.join(root, "train.txt"), "a") as f:
        f.write("4\n")
    with pytest.raises(FileNotFoundError) as err:
        CelebAHQCaptions(root, "train", resolution=8)
    msg = str(err.value)
    assert "'4'" in msg and os.path.join(root, "images") in msg and ".tiff" in msg and "4.jpg" not in msg
    ds = CelebAHQCaptions(root, "train", resolution=8, skip_bad_samples=True)
    assert len(ds) == 4 and ds.skipped_files == {os.path.join(root, "images", "4")}


def test_skipped_counts_distinct_files(tmp_path):
    """Two adjacent unreadable images are counted twice in all, over any number of epochs."""
    _cub(str(tmp_path))
    bad = [os.path.join(str(tmp_path), "images", "001.Bird", "img_1.jpg"),
           os.path.join(str(tmp_path), "images", "002.Other", "img_2.jpg")]
    for p in bad:
        with open(p, "wb") as f:
            f.write(b"not a jpeg")
    ds = KeyedDataset(CUBDataset(str(tmp_path), "train", resolution=16, skip_bad_samples=True))
    collate = make_collate(None, 8)
    total = sum(collate([ds[(i, epoch, 0)] for i in range(3)])["skipped"] for epoch in range(3))
    assert total == 2 and ds.dataset.unreadable_files == set(bad)
    assert "3" in ds[(0, 5, 0)]["caption"].split() and "skipped" not in ds[(0, 5, 0)]
    fresh = CUBDataset(str(tmp_path), "train", resolution=16, skip_bad_samples=True)
    assert fresh.get(0)["skipped_files"] == tuple(bad)
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}, {"id": 3, "file_name": "gone.jpg"}]
    anns = [{"image_id": i, "caption": "x"} for i in (1, 2, 3)]
    image_dir, ann_path = _coco(str(tmp_path / "coco"), images, anns, missing=("gone.jpg",))
    ds = COCOCaptions(image_dir, ann_path, resolution=8, skip_bad_samples=True)
    assert len(ds) == 1 and ds.skipped == 1 and ds.skipped_files == {os.path.join(image_dir, "gone.jpg")}


def test_caption_filter_falls_back_to_truncation():
    caps = ["one two three four five six", "a b c d e f g"]
    assert eligible_captions(caps + ["short one"], max_words=3) == ["short one"]
    assert eligible_captions(caps, max_words=3) == ["one two three", "a b c"]


def test_build_dataset_errors():
    with pytest.raises(ValueError, match="data root"):
        build_dataset("cub", "train", 16)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train", 16)
    assert len(build_dataset("shapes", "val", 16, size=10)) == 10
