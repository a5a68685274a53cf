"""Codes caches (``lgvq_fast.downstream.codes``): ``CodeCache.build`` / ``open`` / ``get`` against the tokenizer's own
``encode`` and text tokenizer, reuse without the encoder, the checks of ``expect``, corrupt and half-written folders,
``CodeDataset`` items with their caption choice, and ``collate_codes``."""
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _fixtures import one_thread  # noqa: F401 (autouse)
from PIL import Image

from lgvq_fast.data import EpochBatchSampler, ShapesDataset
from lgvq_fast.data.folders import load_image, resize_crop
from lgvq_fast.data.shapes import pil_to_tensor
from lgvq_fast.downstream import codes as codes_mod
from lgvq_fast.downstream import make_batch
from lgvq_fast.downstream.codes import (
    CodeCache,
    caption_choice,
    codes_dtype,
    collate_codes,
    tokenize_unmasked,
    tokenizer_identity,
)
from lgvq_fast.eval import load_checkpoint_model
from lgvq_fast.models import LGVQ, LGVQConfig, TextEncoder
from lgvq_fast.training.checkpoint import CheckpointIO

# a 16x16-pixel tokenizer with a 4x4 grid (f = 4) and 37 codes; captions of at most 12 tokens
TINY = {"resolution": 16, "ch": 32, "ch_mult": (1, 1, 1), "num_res_blocks": 1, "attn_resolutions": (),
        "z_channels": 8, "embed_dim": 8, "codebook_size": 37, "text_encoder": "tiny-random", "max_text_len": 12,
        "vt_layers": 1, "mtp_layers": 1, "mtp_ffn_hidden": 16}
SHAPES = {"name": "shapes", "size": 24, "seed": 3}


def _tokenizer_ckpt(out, seed, **overrides):
    """A tokenizer training checkpoint (``CheckpointIO.save`` of what train.py stores) of a freshly drawn LGVQ."""
    cfg = LGVQConfig(**{**TINY, **overrides})
    text_encoder = TextEncoder.build(cfg.text_encoder, max_len=cfg.max_text_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LGVQ(cfg, text_encoder.input_embeddings)
        # codebook vectors spread like the encoder's outputs, so that the images use many codes
        with torch.no_grad():
            z = model.quant_conv(model.encoder(torch.rand(8, 3, cfg.resolution, cfg.resolution) * 2 - 1))
            pick = z.permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
            model.quantizer.embed.copy_(pick[torch.randperm(len(pick))[:cfg.codebook_size]])
    state = {"model": model.state_dict(), "step": 1, "epoch": 0, "batch_in_epoch": 1,
             "config": {"model": cfg.to_dict(), "data": {"name": "shapes"}, "train": {"seed": seed}}}
    return CheckpointIO(str(out)).save(state, 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _tokenizer_ckpt(tmp_path_factory.mktemp("tok"), seed=1)


@pytest.fixture(scope="module")
def shapes_cache(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    return CodeCache.get(str(root), ckpt, SHAPES, "val", batch_size=5, progress=False, log=lambda msg: None)


def _cub_folder(root, captions):
    """A CUB-style folder of non-square images, all in the train split; ``captions``: one list per image."""
    os.makedirs(os.path.join(root, "images", "c"))
    os.makedirs(os.path.join(root, "text", "c"))
    with open(os.path.join(root, "images.txt"), "w") as f, open(os.path.join(root, "train_test_split.txt"), "w") as s:
        for i, caps in enumerate(captions):
            pixels = np.random.default_rng(i).integers(0, 256, (20, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "images", "c", f"{i}.png"))
            with open(os.path.join(root, "text", "c", f"{i}.txt"), "w") as t:
                t.write("\n".join(caps) + "\n")
            f.write(f"{i + 1} c/{i}.png\n")
            s.write(f"{i + 1} 1\n")
    return str(root)


def test_build_equals_direct_encode_and_tokenizer(ckpt, shapes_cache):
    cache = shapes_cache
    model, text_encoder, _ = load_checkpoint_model(ckpt, "cpu")
    ds = ShapesDataset(size=24, resolution=16, seed=3, split="val")
    images = torch.stack([ds[i]["image"] for i in range(24)])
    with torch.no_grad():
        _, want = model.encode(images)
    assert cache.n == 24 and cache.grid == (4, 4) and cache.codebook_size == 37
    assert cache.codes.dtype == np.uint16 and cache.codes.shape == (24, 4, 4)
    assert torch.equal(torch.from_numpy(np.array(cache.codes, dtype=np.int64)), want)
    assert len(np.unique(cache.codes)) > 3, "the test tokenizer should use several codes"
    text = text_encoder.tokenize([ds[i]["caption"] for i in range(24)], 12)
    assert cache.text_ids.shape == (24, 1, 12) and cache.text_ids.dtype == np.int32
    assert torch.equal(torch.from_numpy(np.array(cache.text_ids[:, 0], dtype=np.int64)), text.input_ids)
    assert torch.equal(torch.from_numpy(np.array(cache.text_mask[:, 0])), text.pad_mask)
    assert (np.array(cache.n_captions) == 1).all() and cache.n_captions.dtype == np.int16
    assert np.array_equal(cache.index, np.arange(24))
    again = CodeCache.open(cache.folder)
    for name in ("codes", "text_ids", "text_mask", "n_captions", "index"):
        arr = getattr(again, name)
        assert isinstance(arr, np.memmap) and arr.mode == "r", name
        assert np.array_equal(arr, getattr(cache, name)), name
    assert os.path.basename(cache.folder).startswith(f"shapes-val-{tokenizer_identity(ckpt)['checksum'][:12]}-")
    assert not [p for p in os.listdir(os.path.dirname(cache.folder)) if ".tmp" in p]


def test_tokenize_unmasked_equals_tokenize_with_truncation():
    enc = TextEncoder.tiny_random(max_len=7)
    caps = ["a red circle", "a large red circle left of a small blue square above the green star", "two"]
    ids, pad = tokenize_unmasked(enc, caps, 7)
    want = enc.tokenize(caps, 7)
    assert torch.equal(ids, want.input_ids) and torch.equal(pad, want.pad_mask)
    assert ids[1, -1] == enc.eos_token_id and bool(pad[1].all())
    with pytest.raises(ValueError, match="max_len"):
        tokenize_unmasked(enc, caps, 2)


def _cut_tokenizer(captions, max_length, **kwargs):
    """A tokenizer whose truncation cuts the end token off (start 1, words 10.., end 2, padding 0)."""
    rows = [([1] + [10 + len(w) for w in c.split()] + [2])[:max_length] for c in captions]
    ids = torch.tensor([r + [0] * (max_length - len(r)) for r in rows])
    real = torch.tensor([[1] * len(r) + [0] * (max_length - len(r)) for r in rows])
    special = ((ids == 1) | (ids == 2) | (ids == 0)).long()
    return {"input_ids": ids, "attention_mask": real, "special_tokens_mask": special}


def test_tokenize_unmasked_keeps_the_end_token_on_truncation():
    stand_in = SimpleNamespace(tokenizer=_cut_tokenizer, eos_token_id=2, max_len=5)
    caps = ["a bird", "a small bird with a red head"]
    ids, pad = tokenize_unmasked(stand_in, caps, 5)
    want = TextEncoder.tokenize(stand_in, caps, 5)
    assert torch.equal(ids, want.input_ids) and torch.equal(pad, want.pad_mask)
    assert ids.tolist() == [[1, 11, 14, 2, 0], [1, 11, 15, 14, 2]]


def test_get_again_does_not_run_the_encoder(ckpt, shapes_cache, monkeypatch):
    root = os.path.dirname(shapes_cache.folder)
    meta = os.path.join(shapes_cache.folder, "meta.json")
    before = os.stat(meta).st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete cache must be opened, not extracted again")

    monkeypatch.setattr(LGVQ, "encode", must_not_run)
    monkeypatch.setattr(codes_mod, "load_checkpoint_model", must_not_run)
    again = CodeCache.get(root, ckpt, dict(SHAPES), "val", progress=False)
    assert again.folder == shapes_cache.folder and os.stat(meta).st_mtime_ns == before
    assert np.array_equal(again.codes, shapes_cache.codes)
    # other ranks wait for rank 0, then open
    calls = []
    other = CodeCache.get(root, ckpt, SHAPES, "val", rank=1, world=2, barrier=lambda: calls.append(1))
    assert calls == [1] and other.folder == shapes_cache.folder
    with pytest.raises(ValueError, match="barrier"):
        CodeCache.get(root, ckpt, SHAPES, "val", rank=1, world=2)


def test_expect_mismatch_names_the_folder(ckpt, shapes_cache, tmp_path):
    folder = shapes_cache.folder
    other = _tokenizer_ckpt(tmp_path / "other", seed=2)
    with pytest.raises(ValueError, match="tokenizer checksum") as info:
        CodeCache.open(folder, {"tokenizer": tokenizer_identity(other)})
    assert folder in str(info.value) and tokenizer_identity(other)["checksum"][:12] in str(info.value)
    with pytest.raises(ValueError, match="seed=3.*seed=4") as info:
        CodeCache.open(folder, {"data": {**SHAPES, "seed": 4}})
    assert folder in str(info.value)
    with pytest.raises(ValueError, match="grid"):
        CodeCache.open(folder, {"tokenizer": {"grid": [8, 8]}})
    with pytest.raises(ValueError, match="split 'val'"):
        CodeCache.open(folder, {"split": "train"})
    # another tokenizer or data seed is another folder; a wrong cache put in its place is extracted again
    identity = tokenizer_identity(other)
    assert codes_mod.cache_folder("r", identity, codes_mod.data_spec(SHAPES), "val") != \
        codes_mod.cache_folder("r", tokenizer_identity(ckpt), codes_mod.data_spec(SHAPES), "val")
    planted = codes_mod.cache_folder(tmp_path / "root", identity, codes_mod.data_spec(SHAPES), "val")
    shutil.copytree(folder, planted)
    logged = []
    rebuilt = CodeCache.get(tmp_path / "root", other, SHAPES, "val", progress=False, log=logged.append)
    assert rebuilt.meta["tokenizer"]["checksum"] == identity["checksum"] and "tokenizer checksum" in logged[0]
    assert not np.array_equal(rebuilt.codes, shapes_cache.codes)


def test_shapes_drawn_otherwise_are_another_cache(ckpt, shapes_cache, tmp_path, monkeypatch):
    """The shapes are drawn by code: a change of the drawing gives another folder, and a cache extracted from the old
    images is refused naming the geometry, whatever geometry the caller's spec claims."""
    import lgvq_fast.data.shapes as shapes

    spec = codes_mod.data_spec(SHAPES)
    assert spec["geometry"] == shapes.geometry_tag()
    assert codes_mod.data_spec({**SHAPES, "geometry": "0" * 12})["geometry"] == shapes.geometry_tag()
    assert codes_mod.data_spec({"name": "cub", "root": str(tmp_path)})["geometry"] is None
    before = codes_mod.cache_folder("r", tokenizer_identity(ckpt), spec, "val")
    monkeypatch.setitem(shapes.SIZES, "small", shapes.SIZES["small"] * 0.9)
    assert codes_mod.data_spec(SHAPES)["geometry"] != spec["geometry"]
    assert codes_mod.cache_folder("r", tokenizer_identity(ckpt), codes_mod.data_spec(SHAPES), "val") != before
    with pytest.raises(ValueError, match="geometry=") as info:
        CodeCache.open(shapes_cache.folder, {"data": SHAPES})
    assert shapes_cache.folder in str(info.value) and "\n" not in str(info.value)


def test_corrupt_arrays_name_the_file(shapes_cache, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(shapes_cache.folder, folder)
    path = os.path.join(folder, "codes.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match="codes.npy"):
        CodeCache.open(folder)
    np.save(path, np.zeros((23, 4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"codes\.npy holds \[23, 4, 4\]"):
        CodeCache.open(folder)
    shutil.copy(os.path.join(shapes_cache.folder, "codes.npy"), path)
    assert np.array_equal(CodeCache.open(folder).codes, shapes_cache.codes)
    os.remove(os.path.join(folder, "text_mask.npy"))
    with pytest.raises(ValueError, match="text_mask.npy"):
        CodeCache.open(folder)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write('{"version": 1, ')
    with pytest.raises(ValueError, match="meta.json"):
        CodeCache.open(folder)


def test_half_written_folders_are_never_a_cache(ckpt, shapes_cache, tmp_path, monkeypatch):
    root = tmp_path / "root"
    folder = codes_mod.cache_folder(root, tokenizer_identity(ckpt), codes_mod.data_spec(SHAPES), "val")
    with pytest.raises(FileNotFoundError, match="codes cache not found"):
        CodeCache.open(folder)
    # a complete-looking temp folder of a process that is gone: not opened, removed by the next extraction
    dead = 2 ** 22 + 12345
    assert codes_mod._alive(dead) is False
    shutil.copytree(shapes_cache.folder, f"{folder}.tmp{dead}")
    with pytest.raises(FileNotFoundError, match=os.path.basename(folder)):
        CodeCache.open(folder)
    # an extraction that fails mid-way leaves no folder
    calls = []

    def fail_second(self, images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, images)

    real = LGVQ.encode
    monkeypatch.setattr(LGVQ, "encode", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        CodeCache.get(root, ckpt, SHAPES, "val", batch_size=16, progress=False)
    assert os.listdir(root) == []
    monkeypatch.setattr(LGVQ, "encode", real)
    # a folder without meta.json is incomplete: open refuses it, get extracts into it
    os.makedirs(folder)
    np.save(os.path.join(folder, "codes.npy"), np.zeros((24, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="incomplete"):
        CodeCache.open(folder)
    shutil.copytree(shapes_cache.folder, f"{folder}.tmp{dead}")
    cache = CodeCache.get(root, ckpt, SHAPES, "val", progress=False, log=lambda msg: None)
    assert np.array_equal(cache.codes, shapes_cache.codes)
    assert sorted(os.listdir(root)) == [os.path.basename(folder)]


def test_dataset_items_and_collate(shapes_cache):
    ds = shapes_cache.dataset(seed=5)
    item = ds[3]
    assert item["codes"].dtype == torch.int64 and item["codes"].shape == (4, 4)
    assert item["ids"].dtype == torch.int64 and item["ids"].shape == (12,)
    assert item["mask"].dtype == torch.bool and item["index"] == 3
    assert torch.equal(item["codes"], torch.from_numpy(shapes_cache.codes[3].astype(np.int64)))
    # items are copies, not views of the read-only map
    item["codes"].add_(1)
    assert not torch.equal(ds[3]["codes"], item["codes"])
    sampler = EpochBatchSampler(len(ds), 7, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_codes)
    batches = list(loader)
    assert len(batches) == 3
    codes, text = batches[0]
    index = text.index
    assert codes.shape == (7, 4, 4) and codes.dtype == torch.int64
    assert text.input_ids.shape == (7, 12) and text.input_ids.dtype == torch.int64
    assert text.pad_mask.dtype == torch.bool and not text.mlm_mask.any() and text.mlm_mask.shape == (7, 12)
    assert index.dtype == torch.int64 and index.tolist() == [k[0] for k in next(iter(sampler))]
    for task in ("caption", "t2i"):
        make_batch(task, codes, text)
    moved = text.to("cpu")
    assert torch.equal(moved.index, index) and torch.equal(moved.input_ids, text.input_ids)
    assert shapes_cache.scene_index(5) == 5
    # a DataLoader worker started by spawn gets the dataset pickled: the cache travels as its folder, mapped again
    copy = pickle.loads(pickle.dumps(ds))
    assert isinstance(copy.cache.codes, np.memmap) and torch.equal(copy[(4, 2, 0)]["ids"], ds[(4, 2, 0)]["ids"])
    with pytest.raises(IndexError):
        ds[24]
    with pytest.raises(ValueError, match="empty"):
        collate_codes([])


def test_folder_dataset_centre_crop_and_caption_choice(ckpt, tmp_path):
    long = "a small bird with a red head and a long black beak standing on a thick branch of a tree"
    captions = [["a red bird", "a bird with a red face", long], ["one blue bird"], ["a bird", "two birds"]] * 2
    root = _cub_folder(tmp_path / "cub", captions)
    data = {"name": "cub", "root": root}
    cache = CodeCache.build(tmp_path / "cache", ckpt, data, "train", batch_size=4, progress=False)
    model, text_encoder, _ = load_checkpoint_model(ckpt, "cpu")
    images = [pil_to_tensor(resize_crop(load_image(os.path.join(root, "images", "c", f"{i}.png")), 16))
              for i in range(6)]
    with torch.no_grad():
        _, want = model.encode(torch.stack(images))
    assert torch.equal(torch.from_numpy(cache.codes.astype(np.int64)), want)
    assert cache.n_captions.tolist() == [3, 1, 2] * 2 and cache.text_ids.shape == (6, 3, 12)
    for i, caps in enumerate(captions):
        ids = text_encoder.tokenize(caps, 12)
        assert np.array_equal(cache.text_ids[i, :len(caps)], ids.input_ids.numpy())
        assert np.array_equal(cache.text_mask[i, :len(caps)], ids.pad_mask.numpy())
        assert not cache.text_mask[i, len(caps):].any()
        assert (cache.text_ids[i, len(caps):] == text_encoder.pad_token_id).all()
        assert cache.captions(i, text_encoder) == [text_encoder.tokenizer.decode(r[m], skip_special_tokens=True)
                                                   for r, m in zip(ids.input_ids, ids.pad_mask)]
    assert cache.captions(0, text_encoder)[:2] == ["a red bird", "a bird with a red face"]
    # the caption of a row: a pure function of (seed, epoch, row), by key or by set_epoch
    ds, same = cache.dataset(seed=7), cache.dataset(seed=7)
    for epoch in range(4):
        same.set_epoch(epoch)
        for row in range(6):
            a, b = ds[(row, epoch, 0)], same[row]
            assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["mask"], b["mask"])
            pick = caption_choice(7, epoch, row, len(captions[row]))
            assert torch.equal(a["ids"], torch.from_numpy(cache.text_ids[row, pick].astype(np.int64)))
    picks = {caption_choice(7, e, 0, 3) for e in range(30)}
    assert picks == {0, 1, 2}
    assert [caption_choice(7, e, 0, 3) for e in range(30)] != [caption_choice(8, e, 0, 3) for e in range(30)]
    assert caption_choice(7, 5, 1, 1) == 0
    with open(os.path.join(cache.folder, "meta.json")) as f:
        assert json.load(f)["captions_per_image"] == 3


def test_unreadable_images_fail_or_are_left_out(ckpt, tmp_path):
    root = _cub_folder(tmp_path / "cub", [["a red bird"], ["a blue bird"], ["a bird"]])
    with open(os.path.join(root, "images", "c", "1.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match="1.png"):
        CodeCache.build(tmp_path / "a", ckpt, {"name": "cub", "root": root}, "train", progress=False)
    assert not os.path.exists(tmp_path / "a")
    cache = CodeCache.build(tmp_path / "b", ckpt, {"name": "cub", "root": root, "skip_bad_samples": True}, "train",
                            progress=False)
    assert cache.n == 2 and cache.index.tolist() == [0, 2] and cache.codes.shape == (2, 4, 4)
    assert "1.png" in cache.meta["skipped"][0]
    assert cache.dataset()[1]["index"] == 2


def test_bad_inputs_name_the_culprit(ckpt, tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        CodeCache.get(tmp_path, missing, SHAPES, "val")
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a lgvq_fast training checkpoint"):
        tokenizer_identity(foreign)
    with pytest.raises(ValueError, match="empty dataset"):
        CodeCache.get(tmp_path, ckpt, {**SHAPES, "size": 0}, "val")
    with pytest.raises(ValueError, match="unknown key"):
        CodeCache.get(tmp_path, ckpt, {**SHAPES, "resolution": 32}, "val")
    with pytest.raises(ValueError, match="needs a data root"):
        CodeCache.build(tmp_path / "c", ckpt, {"name": "cub"}, "train")
    assert codes_dtype(37) == np.uint16 and codes_dtype(2 ** 16) == np.uint16 and codes_dtype(2 ** 16 + 1) == np.int32
