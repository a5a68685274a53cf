"""A frozen tokenizer's codes of a dataset, extracted once per (tokenizer checkpoint, dataset, split), memory-mapped.

A downstream epoch never runs the tokenizer's encoder: ``CodeCache.get`` opens the cache of a (tokenizer, data spec,
split), or extracts it once. A cache is a folder of

* ``meta.json``: the tokenizer's identity (``tokenizer_identity``), the data spec (``data_spec``), the split and the
  shape and dtype of every array; written last, so a folder without it is never taken for a cache;
* ``codes.npy`` [N, h, w]: the code indices ``LGVQ.encode`` gives (uint16 when the codebook fits, else int32);
* ``text_ids.npy`` [N, C, L] int32 and ``text_mask.npy`` [N, C, L] bool: every eligible caption of each image (C: the
  most any image has), tokenised as ``TextEncoder.tokenize`` does but unmasked; the captions past an image's
  ``n_captions.npy`` [N] int16 are padding;
* ``index.npy`` [N] int64: each row's dataset index (for shapes the scene index, from which metrics regenerate the
  ground truth); it equals the row unless ``skip_bad_samples`` dropped unreadable images.

Extraction is deterministic: the model in eval mode under ``no_grad`` with cuDNN's deterministic algorithms, and images
without augmentation. Shapes are a pure function of (seed, split, index); a folder dataset's images go through the
dataset's own resize and crop with no random generator (centre crop, no flip), not through ``get``, which draws a
random crop and flip on CUB's train split. The folder is written as ``<folder>.tmp<pid>`` and renamed into place once
complete; such temp folders of processes that no longer run are removed by the next extraction.
"""
import contextlib
import copy
import functools
import glob
import hashlib
import json
import numbers
import os
import random
import shutil
from dataclasses import dataclass, fields

import numpy as np
import torch

from lgvq_fast.data.collate import mix_seed
from lgvq_fast.data.shapes import geometry_tag
from lgvq_fast.errors import EvalError, one_line_error
from lgvq_fast.eval import _read_checkpoint, load_checkpoint_model
from lgvq_fast.models.text import TextBatch

VERSION = 1
META = "meta.json"
ARRAYS = ("codes", "text_ids", "text_mask", "n_captions", "index")
# the tokenizer-independent description of a dataset: its keys, with the value an absent key takes
DATA_DEFAULTS = {"name": None, "size": None, "root": None, "image_dir": None, "annotations": None, "seed": 0,
                 "max_words": 27, "val_holdout": 0.0, "skip_bad_samples": False, "geometry": None}
# the identity entries that must agree for a cache to serve a tokenizer (its path may change)
_TOKENIZER_KEYS = ("checksum", "grid", "codebook_size", "resolution", "max_text_len", "text_encoder")


def tokenizer_identity(ckpt_path) -> dict:
    """What a cache records of the tokenizer checkpoint ``ckpt_path``: ``path``, ``checksum`` (the checkpoint's stored
    checksum, else the SHA-256 of its model weights), ``grid`` [h, w], ``codebook_size``, ``text_encoder`` (its
    config's name), ``max_text_len`` and ``resolution``. FileNotFoundError / EvalError naming the file when it is
    missing or not a tokenizer training checkpoint. Read once per file version (path, modification time, size):
    a run asks for it per split and again when it loads the tokenizer."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {ckpt_path}")
    st = os.stat(ckpt_path)
    return copy.deepcopy(_cached_identity(os.path.abspath(ckpt_path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _cached_identity(path, mtime_ns, size):
    return _identity(path, _read_tokenizer(path))


def _read_tokenizer(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    return _read_checkpoint(path)


def _identity(path, state):
    from lgvq_fast.models import LGVQConfig
    from lgvq_fast.training.checkpoint import state_sha256

    try:
        mcfg = LGVQConfig.from_dict(state["config"]["model"])
        grid = mcfg.grid
    except (TypeError, ValueError) as exc:
        raise EvalError(f"checkpoint {path}: its model config cannot be used: {one_line_error(exc)}") from exc
    checksum = state.get("checksum") or state_sha256(state["model"])
    return {"path": os.path.abspath(path), "checksum": str(checksum), "grid": [int(g) for g in grid],
            "codebook_size": int(mcfg.codebook_size), "text_encoder": str(mcfg.text_encoder),
            "max_text_len": int(mcfg.max_text_len), "resolution": int(mcfg.resolution)}


def data_spec(data) -> dict:
    """``data`` with every key of ``DATA_DEFAULTS`` (absent ones at their default), absolute paths and, for shapes, the
    renderer's ``geometry_tag()``; ValueError for an unknown key, a missing name or a size below 1 (an empty
    dataset)."""
    if not isinstance(data, dict) or not data.get("name"):
        raise ValueError(f"data must be a dict naming the dataset ('name': 'shapes', 'cub', ...), got {data!r}")
    unknown = sorted(set(data) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; known keys: {sorted(DATA_DEFAULTS)}")
    spec = {**DATA_DEFAULTS, **data}
    for key in ("root", "image_dir", "annotations"):
        if spec[key] is not None:
            spec[key] = os.path.abspath(os.fspath(spec[key]))
    size = spec["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise ValueError(f"data size must be a positive number of images or None (all), got {size!r}: "
                         "an empty dataset has no codes")
    spec["size"] = None if size is None else int(size)
    spec.update(seed=int(spec["seed"]), val_holdout=float(spec["val_holdout"] or 0.0),
                skip_bad_samples=bool(spec["skip_bad_samples"]))
    # shapes are drawn by code: the drawing's digest is part of the spec, so a change of the renderer never serves
    # codes extracted from the old images (always the renderer's own, whatever the caller passed)
    spec["geometry"] = geometry_tag() if spec["name"] == "shapes" else None
    return spec


def cache_folder(root, identity, spec, split) -> str:
    """``root/<dataset>-<split>-<tokenizer checksum[:12]>-<digest of the data spec[:12]>``."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return os.path.join(os.path.abspath(os.fspath(root)),
                        f"{spec['name']}-{split}-{identity['checksum'][:12]}-{digest[:12]}")


def codes_dtype(codebook_size):
    """uint16 when every index of the codebook fits, else int32."""
    return np.dtype(np.uint16) if codebook_size <= 2 ** 16 else np.dtype(np.int32)


def tokenize_unmasked(text_encoder, captions, max_len):
    """(input_ids int64 [B, L], pad_mask bool [B, L]) of ``captions`` exactly as ``TextEncoder.tokenize`` builds them
    (start token, words, end token, padding; a truncated caption keeps the end token last), with no masked tokens."""
    if not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"max_len must be an integer >= 3 (start and end tokens and one word), got {max_len!r}")
    enc = text_encoder.tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                                 return_tensors="pt")
    ids, pad_mask = enc["input_ids"].long(), enc["attention_mask"].bool()
    full = pad_mask[:, -1]
    if text_encoder.eos_token_id is not None and bool(full.any()):
        ids[full, -1] = text_encoder.eos_token_id
    return ids, pad_mask


def caption_choice(seed, epoch, index, n_captions) -> int:
    """Which of an image's ``n_captions`` captions row ``index`` gives in ``epoch`` (a pure function of the
    arguments)."""
    if n_captions <= 1:
        return 0
    return random.Random(mix_seed(seed, epoch, index, 41)).randrange(int(n_captions))


def _source_dataset(spec, split, resolution):
    """The dataset ``spec`` names, images at ``resolution``; ``spec['size']`` images at most (the first ones)."""
    from lgvq_fast.data import build_dataset

    size = spec["size"] if spec["name"] == "shapes" else None
    ds = build_dataset(spec["name"], split, resolution, seed=spec["seed"], root=spec["root"], size=size,
                       image_dir=spec["image_dir"], annotation_json=spec["annotations"], max_words=spec["max_words"],
                       skip_bad_samples=spec["skip_bad_samples"], val_holdout=spec["val_holdout"])
    n = len(ds) if spec["size"] is None else min(len(ds), spec["size"])
    if n == 0:
        raise ValueError(f"dataset {spec['name']!r} split {split!r} is empty: no codes to extract")
    return ds, n


def _captions_of(ds, index):
    """Every eligible caption of sample ``index``: a folder dataset's caption list, the shapes' one caption."""
    entries = getattr(ds, "entries", None)
    if entries is not None:
        return list(entries[index][1])
    if hasattr(ds, "scene"):
        from lgvq_fast.data.shapes import caption_of

        return [caption_of(*ds.scene(index))]
    return [ds.get(index)["caption"]]


class _Images(torch.utils.data.Dataset):
    """``(index, image [3, R, R] or None, error or None)`` of the first ``n`` samples of ``ds``, deterministic."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        try:
            return index, self._image(index), None
        except (OSError, ValueError) as exc:
            return index, None, one_line_error(exc)

    def _image(self, index):
        entries = getattr(self.ds, "entries", None)
        if entries is None:
            return self.ds.get(index)["image"]
        from lgvq_fast.data.folders import load_image
        from lgvq_fast.data.shapes import pil_to_tensor

        # the dataset's own resize and crop with no generator: centre crop and no flip, whatever the split
        return pil_to_tensor(self.ds.transform(load_image(entries[index][0]), None))


def _as_list(items):
    return items


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN's deterministic convolution algorithms (no benchmark pick), so that the codes of a GPU extraction do not
    depend on which algorithm a run happened to choose."""
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


class _Writer:
    """The arrays of a cache being written, as .npy files filled row by row (``open_memmap``)."""

    def __init__(self, folder, n, grid, n_cap, max_len, dtype, pad_id):
        self.folder, self.rows, self.pad_id = folder, 0, pad_id
        shapes = {"codes": ((n, *grid), dtype), "text_ids": ((n, n_cap, max_len), np.int32),
                  "text_mask": ((n, n_cap, max_len), np.bool_), "n_captions": ((n,), np.int16),
                  "index": ((n,), np.int64)}
        self.arrays = {name: np.lib.format.open_memmap(self._path(name), "w+", dt, shape)
                       for name, (shape, dt) in shapes.items()}

    def _path(self, name):
        return os.path.join(self.folder, f"{name}.npy")

    def write(self, index, codes, captions, text_encoder):
        """Rows for dataset indices ``index``: their codes [B, h, w] and caption lists."""
        lo, hi = self.rows, self.rows + len(index)
        a = self.arrays
        a["codes"][lo:hi] = codes
        a["index"][lo:hi] = index
        a["n_captions"][lo:hi] = [len(c) for c in captions]
        ids, mask = tokenize_unmasked(text_encoder, [c for cs in captions for c in cs], a["text_ids"].shape[2])
        ids_b = np.full((hi - lo, *a["text_ids"].shape[1:]), self.pad_id, np.int32)
        mask_b = np.zeros(ids_b.shape, np.bool_)
        k = 0
        for row, cs in enumerate(captions):
            ids_b[row, :len(cs)], mask_b[row, :len(cs)] = ids[k:k + len(cs)].numpy(), mask[k:k + len(cs)].numpy()
            k += len(cs)
        a["text_ids"][lo:hi], a["text_mask"][lo:hi] = ids_b, mask_b
        self.rows = hi

    def finish(self):
        """Flush and close the files, cut to the rows written; ``{name: {"shape", "dtype"}}``."""
        files = {}
        for name in list(self.arrays):
            arr = self.arrays.pop(name)
            arr.flush()
            shape, dtype = (self.rows, *arr.shape[1:]), arr.dtype
            if self.rows < arr.shape[0]:
                # rows dropped (unreadable images): a new file of the rows kept replaces it
                kept = np.array(arr[:self.rows])
                del arr
                np.save(self._path(f"{name}.kept"), kept)
                os.replace(self._path(f"{name}.kept"), self._path(name))
            files[name] = {"shape": [int(s) for s in shape], "dtype": str(dtype)}
        return files


def _extract(folder, model, text_encoder, ds, n, spec, batch_size, progress, num_workers, desc):
    """Codes and captions of the first ``n`` samples of ``ds`` into ``folder``; ``(files, n_captions, skipped)``."""
    captions = [_captions_of(ds, i) for i in range(n)]
    n_cap = max(len(c) for c in captions)
    if n_cap > np.iinfo(np.int16).max:
        raise ValueError(f"an image of the dataset has {n_cap} captions, more than the cache's int16 count holds")
    model.eval()
    device = next(model.parameters()).device
    size = int(model.quantizer.codebook_size)
    out = _Writer(folder, n, tuple(model.cfg.grid), n_cap, int(text_encoder.max_len), codes_dtype(size),
                  int(text_encoder.pad_token_id))
    loader = torch.utils.data.DataLoader(_Images(ds, n), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_as_list)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True)
    skipped = []
    try:
        with torch.no_grad(), _deterministic_cudnn():
            for items in loader:
                for _, _, error in items:
                    if error is not None and not spec["skip_bad_samples"]:
                        raise ValueError(f"{error} (data 'skip_bad_samples': True leaves unreadable images out)")
                    if error is not None:
                        skipped.append(error)
                good = [(i, image) for i, image, error in items if error is None]
                if good:
                    _, codes = model.encode(torch.stack([image for _, image in good]).to(device))
                    codes = codes.cpu().numpy()
                    assert 0 <= codes.min() and codes.max() < size, "code index outside the codebook"
                    index = [i for i, _ in good]
                    out.write(index, codes, [captions[i] for i in index], text_encoder)
                if bar is not None:
                    bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
    if out.rows == 0:
        raise ValueError(f"no readable image among the {n} images of dataset {spec['name']!r}")
    return out.finish(), n_cap, skipped


def _remove_stale_temps(folder):
    """Delete ``<folder>.tmp<pid>`` / ``<folder>.old<pid>`` left by this process or by processes no longer running."""
    for path in glob.glob(glob.escape(folder) + ".tmp*") + glob.glob(glob.escape(folder) + ".old*"):
        pid = path[len(folder) + 4:]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _put_in_place(tmp, folder):
    """Rename the finished ``tmp`` to ``folder``, replacing what was there."""
    if not os.path.lexists(folder):
        os.replace(tmp, folder)
        return
    old = f"{folder}.old{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _write_meta(folder, meta):
    path = os.path.join(folder, META)
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_meta(folder):
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        raise ValueError(f"codes cache {folder} is incomplete: it has no {META} (an extraction cut short?)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {one_line_error(exc)}") from exc
    if not isinstance(meta, dict) or meta.get("version") != VERSION or not meta.get("complete") \
            or not all(name in meta.get("files", {}) for name in ARRAYS):
        raise ValueError(f"{path} is not the meta.json of a complete version-{VERSION} codes cache")
    return meta


def _load_arrays(folder, meta):
    """Every array of the cache, memory-mapped; ValueError naming the file that is missing, unreadable or of another
    shape or dtype than meta.json records."""
    arrays = {}
    for name in ARRAYS:
        path = os.path.join(folder, f"{name}.npy")
        want = meta["files"][name]
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as exc:  # missing, truncated or foreign file: name it
            raise ValueError(f"cannot read {path} of codes cache {folder}: {type(exc).__name__}: "
                             f"{one_line_error(exc)}") from exc
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise ValueError(f"{path} holds {list(arr.shape)} {arr.dtype}, but {META} records {want['shape']} "
                             f"{want['dtype']}: the file is corrupt")
        arrays[name] = arr
    return arrays


def _check_expect(folder, meta, expect):
    """ValueError naming ``folder`` and the first difference between the cache and ``expect``."""
    unknown = sorted(set(expect) - {"tokenizer", "data", "split"})
    if unknown:
        raise ValueError(f"expect: unknown key(s) {unknown}; it takes 'tokenizer', 'data' and 'split'")
    have, want = meta["tokenizer"], expect.get("tokenizer") or {}
    for key in _TOKENIZER_KEYS:
        if key not in want:
            continue
        a, b = have.get(key), want[key]
        if key == "checksum" and a != b:
            raise ValueError(f"codes cache {folder} was extracted with tokenizer checksum {str(a)[:12]}…, this run's "
                             f"tokenizer is {str(b)[:12]}…")
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ValueError(f"codes cache {folder} was extracted with a tokenizer of {key} {a!r}, this run's "
                             f"tokenizer has {b!r}")
    if "split" in expect and expect["split"] != meta["split"]:
        raise ValueError(f"codes cache {folder} holds split {meta['split']!r}, this run asks for {expect['split']!r}")
    if expect.get("data") is not None:
        spec = data_spec(expect["data"])
        for key in DATA_DEFAULTS:
            if spec[key] != meta["data"].get(key):
                raise ValueError(f"codes cache {folder} was extracted from data with {key}={meta['data'].get(key)!r}, "
                                 f"this run's data has {key}={spec[key]!r}")


class CodeCache:
    """One (tokenizer, dataset, split) extraction in a folder (see the module's docstring), arrays memory-mapped
    (``np.load(mmap_mode="r")``). ``build`` extracts, ``open`` reads, ``get`` does whichever is needed."""

    def __init__(self, folder, meta, arrays):
        self.folder, self.meta, self._arrays = folder, meta, arrays

    n = property(lambda self: int(self.meta["n"]))
    grid = property(lambda self: tuple(self.meta["grid"]))
    codebook_size = property(lambda self: int(self.meta["codebook_size"]))
    codes = property(lambda self: self._arrays["codes"])  # [N, h, w]
    text_ids = property(lambda self: self._arrays["text_ids"])  # [N, C, L]
    text_mask = property(lambda self: self._arrays["text_mask"])  # [N, C, L]
    n_captions = property(lambda self: self._arrays["n_captions"])  # [N]
    index = property(lambda self: self._arrays["index"])  # [N]

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"CodeCache({self.folder!r}, n={self.n}, grid={self.grid}, codebook_size={self.codebook_size})"

    # pickled for DataLoader workers as its folder: each process maps the files itself
    def __getstate__(self):
        return {"folder": self.folder, "meta": self.meta}

    def __setstate__(self, state):
        self.folder, self.meta = state["folder"], state["meta"]
        self._arrays = _load_arrays(self.folder, self.meta)

    @classmethod
    def open(cls, folder, expect: dict | None = None) -> "CodeCache":
        """The complete cache in ``folder``. ``expect`` (keys ``tokenizer``: an identity, ``data``: a data spec,
        ``split``) is checked against what it was extracted from. FileNotFoundError when the folder does not exist;
        ValueError naming the folder or file when it is incomplete, does not match or holds a corrupt array."""
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"codes cache not found: {folder}")
        meta = _read_meta(folder)
        if expect:
            _check_expect(folder, meta, expect)
        return cls(folder, meta, _load_arrays(folder, meta))

    @classmethod
    def build(cls, folder, tokenizer_ckpt, data: dict, split, device="cpu", batch_size=64, progress=True,
              num_workers=0) -> "CodeCache":
        """Extract the codes and captions of the ``data`` spec's ``split`` with the tokenizer ``tokenizer_ckpt`` into
        ``folder`` (replacing what is there), ``batch_size`` images per encoder call, images read by
        ``num_workers`` DataLoader workers; a tqdm bar unless ``progress`` is False."""
        identity = tokenizer_identity(tokenizer_ckpt)
        return cls._build(folder, tokenizer_ckpt, identity, data_spec(data), split, device, batch_size, progress,
                          num_workers)

    @classmethod
    def _build(cls, folder, ckpt, identity, spec, split, device, batch_size, progress, num_workers):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        folder = os.path.abspath(os.fspath(folder))
        # the data first: a bad spec fails before the model is loaded
        ds, n = _source_dataset(spec, split, identity["resolution"])
        model, text_encoder, _ = load_checkpoint_model(ckpt, device)
        _remove_stale_temps(folder)
        tmp = f"{folder}.tmp{os.getpid()}"
        os.makedirs(tmp)
        try:
            files, n_cap, skipped = _extract(tmp, model, text_encoder, ds, n, spec, batch_size, progress, num_workers,
                                             f"codes {spec['name']}/{split}")
            meta = {"version": VERSION, "complete": True, "tokenizer": identity, "data": spec, "split": split,
                    "n": files["codes"]["shape"][0], "grid": identity["grid"],
                    "codebook_size": identity["codebook_size"], "captions_per_image": n_cap,
                    "max_text_len": identity["max_text_len"], "pad_token_id": int(text_encoder.pad_token_id),
                    "skipped": skipped, "files": files}
            _write_meta(tmp, meta)
            _put_in_place(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(folder, {"tokenizer": identity, "data": spec, "split": split})

    @classmethod
    def get(cls, root, tokenizer_ckpt, data: dict, split, device="cpu", batch_size=64, progress=True, num_workers=0,
            rank=0, world=1, barrier=None, log=print) -> "CodeCache":
        """The cache of (tokenizer, ``data``, ``split``) under ``root`` (folder ``cache_folder``): opened when it is
        complete and matches, else extracted (``build``'s arguments) by rank 0 while the other ranks wait on
        ``barrier()`` (needed when ``world`` > 1) and then open it. A failure on rank 0 is raised there after the
        barrier, so the other ranks fail too, on the missing folder, instead of waiting."""
        if world > 1 and barrier is None:
            raise ValueError(f"CodeCache.get with world={world} needs barrier (rank 0 extracts, the others wait)")
        identity, spec = tokenizer_identity(tokenizer_ckpt), data_spec(data)
        folder = cache_folder(root, identity, spec, split)
        expect = {"tokenizer": identity, "data": spec, "split": split}
        cache, failure = None, None
        if rank == 0:
            try:
                cache = cls.open(folder, expect)
            except FileNotFoundError:
                pass
            except ValueError as exc:
                log(f"extracting the codes again: {one_line_error(exc)}")
            try:
                if cache is None:
                    cache = cls._build(folder, tokenizer_ckpt, identity, spec, split, device, batch_size, progress,
                                       num_workers)
            # any failure: raised below, after the barrier the other ranks wait on
            except Exception as exc:  # noqa: BLE001
                failure = exc
        if world > 1:
            barrier()
        if failure is not None:
            raise failure
        return cache if rank == 0 else cls.open(folder, expect)

    def scene_index(self, row) -> int:
        """The dataset index of ``row`` (for shapes the scene index: ``sample_scene(seed, split, it)``)."""
        return int(self.index[row])

    def captions(self, row, text_encoder) -> list[str]:
        """The captions of ``row`` decoded from their cached token ids (special tokens dropped), as
        ``tasks.decode_captions`` decodes generated ones: the tokenizer's normalised text (lower case for BERT's)."""
        out = []
        for c in range(int(self.n_captions[row])):
            ids = np.asarray(self.text_ids[row, c])[np.asarray(self.text_mask[row, c])].tolist()
            out.append(text_encoder.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out

    def dataset(self, seed=0) -> "CodeDataset":
        """A Dataset of this cache's rows (``CodeDataset``); ``seed`` picks the caption of images with several."""
        return CodeDataset(self, seed)


class CodeDataset(torch.utils.data.Dataset):
    """Rows of a ``CodeCache``: ``{"codes": int64 [h, w], "ids": int64 [L], "mask": bool [L], "index": int}``.

    ``index`` is the row's dataset index (``CodeCache.index``). An image with several captions gives the one
    ``caption_choice(seed, epoch, row)`` picks. Items are fetched by key ``(row, epoch, batch)`` as
    ``EpochBatchSampler`` yields them (so a resumed run sees the same captions, whatever the workers), or by a plain
    row number, with the epoch of ``set_epoch``. Each item copies its row out of the memory map."""

    def __init__(self, cache, seed=0):
        self.cache, self.seed, self.epoch = cache, int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.cache.n

    def __getitem__(self, key):
        row, epoch = (key[0], key[1]) if isinstance(key, (tuple, list)) else (key, self.epoch)
        row = int(row)
        if not 0 <= row < self.cache.n:
            raise IndexError(f"row {row} out of range for a codes cache of {self.cache.n} images")
        c = self.cache
        pick = caption_choice(self.seed, epoch, row, int(c.n_captions[row]))
        return {"codes": torch.from_numpy(np.array(c.codes[row], dtype=np.int64)),
                "ids": torch.from_numpy(np.array(c.text_ids[row, pick], dtype=np.int64)),
                "mask": torch.from_numpy(np.array(c.text_mask[row, pick], dtype=np.bool_)),
                "index": int(c.index[row])}


@dataclass
class CodeTextBatch(TextBatch):
    """A ``TextBatch`` of cached captions that also carries ``index`` int64 [B], each row's dataset index (kept by
    ``to`` and ``pin_memory``)."""

    index: torch.Tensor | None = None

    def apply(self, fn) -> "CodeTextBatch":
        base = super().apply(fn)
        return CodeTextBatch(**{f.name: getattr(base, f.name) for f in fields(TextBatch)},
                             index=None if self.index is None else fn(self.index))


def collate_codes(items):
    """``(codes int64 [B, h, w], text)`` of ``CodeDataset`` items, what ``tasks.make_batch(task, codes, text)`` takes:
    ``text`` a ``CodeTextBatch`` (input_ids int64 [B, L], pad_mask bool [B, L], mlm_mask all False, index int64
    [B])."""
    if not items:
        raise ValueError("collate_codes received an empty batch")
    codes = torch.stack([it["codes"] for it in items])
    ids = torch.stack([it["ids"] for it in items])
    mask = torch.stack([it["mask"] for it in items])
    index = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    return codes, CodeTextBatch(input_ids=ids, pad_mask=mask, mlm_mask=torch.zeros_like(mask), index=index)
