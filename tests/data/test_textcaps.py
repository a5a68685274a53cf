"""TextCapsCaptions (lgvq_fast.data.textcaps) and build_dataset("textcaps"): both folder layouts, the captions of
each image, the aspect-free resize, the safe id pickle, bad files named or skipped."""
import json
import os
import pickle
import random

import pytest
import torch
from PIL import Image

from lgvq_fast.data import KeyedDataset, TextCapsCaptions, build_dataset
from lgvq_fast.data.textcaps import read_id_pickle

TRAIN_IDS = ["0a1b2c3d", "1f2e3d4c", "77aa00ff"]
VAL_IDS = ["9c9c9c9c", "abcdef01"]


def _image(root, image_id, size=(20, 20), ext="jpg"):
    os.makedirs(os.path.join(root, "train_images"), exist_ok=True)
    colour = (sum(map(ord, image_id)) % 256, 40, 200)
    Image.new("RGB", size, colour).save(os.path.join(root, "train_images", f"{image_id}.{ext}"))


def _official(root, train=TRAIN_IDS, val=VAL_IDS, protocol=pickle.HIGHEST_PROTOCOL):
    """Official LG-VQ layout: id pickles, train_images/<id>.jpg (val too), text/<id>.txt."""
    root = str(root)
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    for ids, name in ((train, "train_filenames.pickle"), (val, "valid_filenames.pickle")):
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(list(ids), f, protocol=protocol)
        for n, i in enumerate(ids):
            _image(root, i, size=(20 + 7 * n, 20))
            with open(os.path.join(root, "text", f"{i}.txt"), "w") as f:
                f.write(f"A sign that says {i}\n\nthe text {i} on a wall\n")
    return root


def _release(root, train=TRAIN_IDS, val=VAL_IDS):
    """TextCaps release layout: TextCaps_0.1_{train,val}.json with one entry per caption."""
    root = str(root)
    for ids, name in ((train, "TextCaps_0.1_train.json"), (val, "TextCaps_0.1_val.json")):
        data = []
        for k in range(3):
            for i in ids:
                _image(root, i)
                data.append({"image_id": i, "image_path": f"train/{i}.jpg", "caption_id": len(data),
                             "caption_str": f"Caption {k} of {i}"})
        with open(os.path.join(root, name), "w") as f:
            json.dump({"dataset_type": "train", "data": data}, f)
    return root


def test_official_layout_splits_and_captions(tmp_path):
    root = _official(tmp_path)
    train, val = TextCapsCaptions(root, "train", resolution=13), TextCapsCaptions(root, "val", resolution=13)
    test = TextCapsCaptions(root, "test", resolution=13)
    assert train.layout == val.layout == "official"
    assert len(train) == 3 and len(val) == len(test) == 2
    assert [p for p, _ in test.entries] == [p for p, _ in val.entries]
    for ds, ids in ((train, TRAIN_IDS), (val, VAL_IDS)):
        for n, i in enumerate(ids):
            path, caps = ds.entries[n]
            assert path == os.path.join(root, "train_images", f"{i}.jpg")
            assert caps == [f"a sign that says {i}", f"the text {i} on a wall"]
            seen = {ds.get(n, random.Random(s))["caption"] for s in range(20)}
            assert seen == set(caps)


def test_release_layout_groups_captions_per_image(tmp_path):
    root = _release(tmp_path)
    train, val = TextCapsCaptions(root, "train", resolution=11), TextCapsCaptions(root, "val", resolution=11)
    assert train.layout == "release" and len(train) == 3 and len(val) == 2
    for ds, ids in ((train, TRAIN_IDS), (val, VAL_IDS)):
        assert [os.path.basename(p) for p, _ in ds.entries] == [f"{i}.jpg" for i in ids]
        for (_, caps), i in zip(ds.entries, ids):
            assert caps == [f"caption {k} of {i}" for k in range(3)]
    assert len(TextCapsCaptions(root, "test", resolution=11)) == 2


def test_official_layout_wins_when_both_are_present(tmp_path):
    root = _release(tmp_path)
    _official(tmp_path, train=TRAIN_IDS[:2])
    ds = TextCapsCaptions(root, "train", resolution=8)
    assert ds.layout == "official" and len(ds) == 2


@pytest.mark.parametrize("size", [(20, 20), (37, 21), (9, 30)], ids=["square", "wide", "tall"])
def test_resize_ignores_aspect_no_crop_no_flip(tmp_path, size):
    """The whole image is squeezed to R x R: a left/right colour split stays at the same columns, never flipped."""
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "train_images"))
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    # PNG content under the .jpg name the layout wants: exact colours, PIL reads by content
    img.save(os.path.join(root, "train_images", "x.jpg"), format="PNG")
    os.makedirs(os.path.join(root, "text"))
    with open(os.path.join(root, "text", "x.txt"), "w") as f:
        f.write("red and blue\n")
    with open(os.path.join(root, "train_filenames.pickle"), "wb") as f:
        pickle.dump(["x"], f)
    ds = TextCapsCaptions(root, "train", resolution=16)
    for seed in range(6):
        s = ds.get(0, random.Random(seed))
        image = s["image"]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert float(image[0, :, :6].mean()) > 0.9 and float(image[2, :, :6].mean()) < -0.9
        assert float(image[2, :, -6:].mean()) > 0.9 and float(image[0, :, -6:].mean()) < -0.9


def test_deterministic_per_seed_and_key(tmp_path):
    root = _official(tmp_path)
    a = KeyedDataset(TextCapsCaptions(root, "train", resolution=8, seed=3), seed=3)
    b = KeyedDataset(TextCapsCaptions(root, "train", resolution=8, seed=3), seed=3)
    keys = [(i, e, 0) for i in range(3) for e in range(4)]
    assert [a[k]["caption"] for k in keys] == [b[k]["caption"] for k in keys]
    assert all(torch.equal(a[k]["image"], b[k]["image"]) for k in keys[:3])
    assert len({a[(0, e, 0)]["caption"] for e in range(12)}) == 2


def test_max_words_filters_captions(tmp_path):
    root = _official(tmp_path)
    ds = TextCapsCaptions(root, "train", resolution=8, max_words=5)
    assert all(caps == [f"a sign that says {i}"] for (_, caps), i in zip(ds.entries, TRAIN_IDS))


def test_missing_split_file_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        TextCapsCaptions(str(tmp_path), "val", resolution=8)
    msg = str(err.value)
    assert "valid_filenames.pickle" in msg and "TextCaps_0.1_val.json" in msg
    with pytest.raises(ValueError, match="split must be"):
        TextCapsCaptions(str(tmp_path), "dev", resolution=8)


@pytest.mark.parametrize("content,message", [
    ({"ids": TRAIN_IDS}, "holds a dict, not a list"),
    (TRAIN_IDS[:1] + [7], "item 1 is a int"),
    ([b"0a1b2c3d"], "item 0 is a bytes"),
    (None, "holds a NoneType"),
], ids=["dict", "int-item", "bytes-item", "none"])
def test_pickle_other_than_list_of_str_is_named(tmp_path, content, message):
    root = _official(tmp_path)
    path = os.path.join(root, "train_filenames.pickle")
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(ValueError) as err:
        TextCapsCaptions(root, "train", resolution=8)
    assert path in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL], ids=lambda p: f"protocol{p}")
def test_pickle_protocols_read(tmp_path, protocol):
    root = _official(tmp_path, protocol=protocol)
    assert read_id_pickle(os.path.join(root, "train_filenames.pickle")) == TRAIN_IDS


class _Loud:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_never_loads_a_class_or_calls_a_function(tmp_path):
    root = _official(tmp_path)
    path = os.path.join(root, "train_filenames.pickle")
    for payload, message in (([_Loud()], "getcwd is not allowed"), ([random.Random(0)], "Random is not allowed"),
                             (b"not a pickle at all", "")):
        with open(path, "wb") as f:
            f.write(payload if isinstance(payload, bytes) else pickle.dumps(payload))
        with pytest.raises(ValueError) as err:
            TextCapsCaptions(root, "train", resolution=8)
        assert f"cannot read image id pickle {path}" in str(err.value) and message in str(err.value)


def test_missing_image_or_caption_file_named_or_skipped(tmp_path):
    root = _official(tmp_path)
    os.remove(os.path.join(root, "train_images", f"{TRAIN_IDS[1]}.jpg"))
    os.remove(os.path.join(root, "text", f"{TRAIN_IDS[2]}.txt"))
    with pytest.raises(FileNotFoundError, match=f"{TRAIN_IDS[1]}.jpg"):
        TextCapsCaptions(root, "train", resolution=8)
    ds = TextCapsCaptions(root, "train", resolution=8, skip_bad_samples=True)
    assert len(ds) == 1 and ds.skipped_files == {os.path.join(root, "train_images", f"{TRAIN_IDS[1]}.jpg"),
                                                 os.path.join(root, "text", f"{TRAIN_IDS[2]}.txt")}
    os.remove(os.path.join(root, "train_images", f"{TRAIN_IDS[0]}.jpg"))
    with pytest.raises(ValueError, match=r"no usable samples \(3 skipped\)"):
        TextCapsCaptions(root, "train", resolution=8, skip_bad_samples=True)


def test_empty_caption_file_named_or_skipped(tmp_path):
    root = _official(tmp_path)
    with open(os.path.join(root, "text", f"{VAL_IDS[0]}.txt"), "w") as f:
        f.write("\n  \n")
    with pytest.raises(ValueError, match=f"caption file is empty: .*{VAL_IDS[0]}.txt"):
        TextCapsCaptions(root, "val", resolution=8)
    ds = TextCapsCaptions(root, "val", resolution=8, skip_bad_samples=True)
    assert len(ds) == 1 and ds.skipped == 1


def test_unreadable_image_named_or_replaced(tmp_path):
    root = _release(tmp_path)
    bad = os.path.join(root, "train_images", f"{TRAIN_IDS[0]}.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match=f"{TRAIN_IDS[0]}.jpg"):
        TextCapsCaptions(root, "train", resolution=8)[0]
    ds = TextCapsCaptions(root, "train", resolution=8, skip_bad_samples=True)
    s = ds[0]
    assert s["skipped"] == 1 and s["skipped_files"] == (bad,) and s["caption"].endswith(TRAIN_IDS[1])
    assert "skipped" not in ds[0] and ds.unreadable_files == {bad}


@pytest.mark.parametrize("entry,message", [
    ({"image_path": "train/x.jpg", "caption_str": "a sign"}, "has no 'image_id'"),
    ({"image_id": TRAIN_IDS[0]}, "has no 'caption_str'"),
    ({"image_id": TRAIN_IDS[0], "caption_str": ["a sign"]}, "'caption_str' must be a string"),
    ("a sign", "is not an object"),
], ids=["no-image_id", "no-caption_str", "caption-list", "not-object"])
def test_release_malformed_entry_named_or_skipped(tmp_path, entry, message):
    root = _release(tmp_path)
    path = os.path.join(root, "TextCaps_0.1_train.json")
    with open(path) as f:
        data = json.load(f)
    data["data"][4] = entry
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError) as err:
        TextCapsCaptions(root, "train", resolution=8)
    assert "TextCaps_0.1_train.json: data[4]" in str(err.value) and message in str(err.value)
    ds = TextCapsCaptions(root, "train", resolution=8, skip_bad_samples=True)
    assert ds.skipped_files == {f"{path}: data[4]"} and len(ds) == 3
    assert sum(len(caps) for _, caps in ds.entries) == 8


def test_release_without_data_list(tmp_path):
    path = os.path.join(str(tmp_path), "TextCaps_0.1_val.json")
    with open(path, "w") as f:
        json.dump({"annotations": []}, f)
    with pytest.raises(ValueError, match="TextCaps_0.1_val.json has no 'data' list"):
        TextCapsCaptions(str(tmp_path), "val", resolution=8)


def test_build_dataset_textcaps(tmp_path):
    root = _release(tmp_path)
    ds = build_dataset("textcaps", "val", 12, seed=1, root=root, max_words=3, skip_bad_samples=True)
    assert isinstance(ds, TextCapsCaptions) and len(ds) == 2 and ds.skip_bad_samples and ds.max_words == 3
    assert ds[1]["image"].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="data root"):
        build_dataset("textcaps", "train", 12)
    with pytest.raises(ValueError, match="val_holdout applies to"):
        build_dataset("textcaps", "train", 12, root=root, val_holdout=0.1)
