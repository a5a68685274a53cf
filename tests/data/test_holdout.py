"""Hold-out validation (lgvq_fast.data.holdout, COCOCaptions(holdout=...), build_dataset(val_holdout=...)) and
the rule of lgvq_fast.training.loaders.make_loaders / val_sources: validation never silently on training images."""
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

from lgvq_fast.data import COCOCaptions, build_dataset, holdout_keys
from lgvq_fast.training.loaders import make_loaders, val_sources


def _coco(root, n=23, name="captions.json", missing=()):
    """``n`` 20x20 images listed in one COCO annotation file, two captions each; returns (image_dir, json)."""
    image_dir = os.path.join(root, "img")
    os.makedirs(image_dir, exist_ok=True)
    images = [{"id": 1000 + i, "file_name": f"COCO_{i:05d}.jpg"} for i in range(n)]
    for im in images:
        if im["file_name"] not in missing:
            Image.new("RGB", (20, 20), (im["id"] % 256, 30, 60)).save(os.path.join(image_dir, im["file_name"]))
    anns = [{"image_id": im["id"], "caption": f"picture {im['id']} take {k}"} for im in images for k in range(2)]
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return image_dir, path


def _names(ds):
    return {os.path.basename(p) for p, _ in ds.entries}


@pytest.mark.parametrize("n,fraction,expected", [(1000, 0.05, 50), (23, 0.1, 2), (23, 0.5, 12), (3, 0.01, 1),
                                                 (2, 0.5, 1)], ids=lambda v: str(v))
def test_holdout_keys_size(n, fraction, expected):
    keys = [f"img_{i}.jpg" for i in range(n)]
    assert len(holdout_keys(keys, fraction, seed=0)) == expected


def test_holdout_keys_deterministic_order_free_seeded():
    keys = [f"img_{i}.jpg" for i in range(1000)]
    a = holdout_keys(keys, 0.1, seed=7)
    assert a == holdout_keys(list(reversed(keys)) + keys[:10], 0.1, seed=7)
    assert a <= set(keys) and a != holdout_keys(keys, 0.1, seed=8)
    # spread over the list, not its first or last names
    assert 30 < sum(int(k[4:-4]) < 500 for k in a) < 70
    with pytest.raises(ValueError, match="from 1 image"):
        holdout_keys(["only.jpg"], 0.1, seed=0)


@pytest.mark.parametrize("seed", [0, 3], ids=lambda s: f"seed{s}")
def test_coco_holdout_disjoint_and_covering(tmp_path, seed):
    image_dir, path = _coco(str(tmp_path))
    full = COCOCaptions(image_dir, path, resolution=8)
    train = COCOCaptions(image_dir, path, resolution=8, seed=seed, holdout=(0.2, seed, "train"))
    val = COCOCaptions(image_dir, path, resolution=8, split="val", seed=seed, holdout=(0.2, seed, "val"))
    assert len(val) == 5 and len(train) == 18
    assert not _names(train) & _names(val) and _names(train) | _names(val) == _names(full)
    again = COCOCaptions(image_dir, path, resolution=8, split="val", seed=seed, holdout=(0.2, seed, "val"))
    assert [p for p, _ in again.entries] == [p for p, _ in val.entries]
    # each image keeps its own captions
    for p, caps in val.entries:
        i = int(os.path.basename(p)[5:10])
        assert caps == [f"picture {1000 + i} take {k}" for k in range(2)]
    assert train.flip and not val.flip


def test_coco_holdout_ignores_missing_files(tmp_path):
    """The split is over the listed names: a missing image is skipped in its own part only."""
    image_dir, path = _coco(str(tmp_path))
    val_names = _names(COCOCaptions(image_dir, path, resolution=8, holdout=(0.2, 0, "val")))
    gone = min(val_names)
    os.remove(os.path.join(image_dir, gone))
    kw = dict(resolution=8, skip_bad_samples=True)
    val = COCOCaptions(image_dir, path, holdout=(0.2, 0, "val"), **kw)
    train = COCOCaptions(image_dir, path, holdout=(0.2, 0, "train"), **kw)
    assert _names(val) == val_names - {gone} and val.skipped == 1 and train.skipped == 0 and len(train) == 18


@pytest.mark.parametrize("holdout,message", [
    ((0.0, 0, "val"), "fraction must be in"), ((0.6, 0, "val"), "fraction must be in"),
    ((0.1, "0", "val"), "seed must be an integer"), ((0.1, 0, "test"), "role must be"),
    (0.1, "holdout must be (fraction, seed, role)"),
], ids=["zero", "too-big", "str-seed", "bad-role", "bare-float"])
def test_coco_holdout_checked(tmp_path, holdout, message):
    image_dir, path = _coco(str(tmp_path), n=3)
    with pytest.raises(ValueError) as err:
        COCOCaptions(image_dir, path, resolution=8, holdout=holdout)
    assert message in str(err.value)


def test_coco_holdout_too_few_images_names_file(tmp_path):
    image_dir, path = _coco(str(tmp_path), n=1)
    with pytest.raises(ValueError, match=r"captions.json: cannot hold out a validation part from 1 image"):
        COCOCaptions(image_dir, path, resolution=8, holdout=(0.1, 0, "val"))


def test_build_dataset_val_holdout_roles(tmp_path):
    image_dir, path = _coco(str(tmp_path))
    kw = dict(image_dir=image_dir, annotation_json=path, seed=4, val_holdout=0.3)
    train, val, test = (build_dataset("coco", s, 8, **kw) for s in ("train", "val", "test"))
    assert len(val) == len(test) == 7 and len(train) == 16 and _names(val) == _names(test)
    assert not _names(train) & _names(val)
    assert _names(val) == holdout_keys([f"COCO_{i:05d}.jpg" for i in range(23)], 0.3, 4)
    with pytest.raises(ValueError, match="val_holdout applies to datasets read from one annotation file"):
        build_dataset("cub", "val", 8, root=str(tmp_path), val_holdout=0.1)


def _cfg(tmp_path, **data):
    image_dir, path = _coco(str(tmp_path))
    d = dict(name="coco", root=None, image_dir=image_dir, annotations=path, val_image_dir=None,
             val_annotations=None, train_size=8, val_size=8, max_words=27, skip_bad_samples=False, num_workers=0)
    d.update(data)
    return SimpleNamespace(
        data=SimpleNamespace(**d), train=SimpleNamespace(seed=1, batch_size=2),
        model=SimpleNamespace(resolution=8, use_text_losses=False, max_text_len=8, mask_ratio_range=(0.1, 0.3)))


def test_make_loaders_refuses_training_images_as_validation(tmp_path):
    cfg = _cfg(tmp_path)  # no val_holdout field at all: a DataConfig from before the field
    with pytest.raises(ValueError) as err:
        make_loaders(cfg, None, 0, 1)
    msg = str(err.value)
    assert "\n" not in msg and "validation would use the training images of" in msg and cfg.data.annotations in msg
    assert "--set data.val_annotations=... --set data.val_image_dir=..." in msg
    assert "--set data.val_holdout=0.05" in msg
    cfg.data.val_holdout = 0.0
    with pytest.raises(ValueError, match="validation would use the training images"):
        make_loaders(cfg, None, 0, 1)
    # the training file named again as the validation file is the same thing
    cfg.data.val_annotations = os.path.join(os.path.dirname(cfg.data.annotations), ".", "captions.json")
    with pytest.raises(ValueError, match="validation would use the training images"):
        make_loaders(cfg, None, 0, 1)


def test_make_loaders_holds_out_validation(tmp_path, capsys):
    cfg = _cfg(tmp_path, val_holdout=0.2)
    train_ds, val_ds, sampler, loader = make_loaders(cfg, None, 0, 1)
    assert len(train_ds) == 18 and len(val_ds) == 5 and not _names(train_ds) & _names(val_ds)
    assert sampler.num_samples == 18
    seen = {c for batch in loader for c in batch["captions"]}
    held = {int(n[5:10]) + 1000 for n in _names(val_ds)}
    assert seen and not any(c.split()[1] in {str(h) for h in held} for c in seen)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "data.val_holdout=0.2" in out[0] and "holds out 5 of the training images" in out[0]
    again = make_loaders(cfg, None, 0, 1)[1]
    assert [p for p, _ in again.entries] == [p for p, _ in val_ds.entries]


def test_make_loaders_own_validation_file(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    val_dir, val_path = _coco(str(tmp_path / "val"), n=4, name="val.json")
    cfg.data.val_annotations, cfg.data.val_image_dir = val_path, val_dir
    train_ds, val_ds, _, _ = make_loaders(cfg, None, 0, 1)
    assert len(train_ds) == 23 and len(val_ds) == 4 and capsys.readouterr().out == ""


@pytest.mark.parametrize("data,message", [
    (dict(val_holdout=0.1, val_annotations="VAL"), "data.val_holdout=0.1 and data.val_annotations="),
    (dict(val_holdout=0.1, val_image_dir="/elsewhere"), "data.val_image_dir=/elsewhere is set without"),
    (dict(val_holdout=0.7), "data.val_holdout must be in (0, 0.5]"),
    (dict(name="celebahq", val_holdout=0.1), "data.val_holdout applies to coco only"),
], ids=["holdout-and-file", "dir-without-file", "too-big", "not-annotation-dataset"])
def test_val_sources_conflicts(tmp_path, data, message):
    d = _cfg(tmp_path, **data).data
    if d.val_annotations == "VAL":
        d.val_annotations = _coco(str(tmp_path / "val"), n=2, name="val.json")[1]
    with pytest.raises(ValueError) as err:
        val_sources(d)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_val_sources_other_datasets_unchanged(tmp_path):
    d = SimpleNamespace(name="cub", image_dir=None, annotations=None, val_image_dir=None, val_annotations=None)
    assert val_sources(d) == (None, None, 0.0)
