"""The data side of a run: the training loader (the epoch sampler that resumes mid-epoch), the fixed validation
batch, and batches read so that a data error loses nothing."""
import os

import torch

from lgvq_fast.errors import one_line_error
from lgvq_fast.training.distributed import print0


def make_loaders(cfg, text_encoder, rank, world):
    """(train dataset, val dataset, sampler, loader) of ``cfg``; the loader's batches hold ``image`` and ``text``
    (tokenized, masked for MTP) and ``skipped`` (bad samples skipped)."""
    from lgvq_fast.data import EpochBatchSampler, KeyedDataset, build_dataset, make_collate

    d, t, m = cfg.data, cfg.train, cfg.model
    val_image_dir, val_annotations, holdout = val_sources(d)
    common = dict(resolution=m.resolution, seed=t.seed, root=d.root, max_words=d.max_words,
                  skip_bad_samples=d.skip_bad_samples, val_holdout=holdout)
    train_ds = build_dataset(d.name, "train", size=d.train_size, image_dir=d.image_dir,
                             annotation_json=d.annotations, **common)
    val_ds = build_dataset(d.name, "val" if d.name != "cub" else "test", size=d.val_size,
                           image_dir=val_image_dir, annotation_json=val_annotations, **common)
    if holdout:
        print0(f"warning: no data.val_annotations, so data.val_holdout={holdout:g} holds out {len(val_ds)} of the "
               f"training images of {d.annotations} (seed {t.seed}) for validation; training uses the other "
               f"{len(train_ds)}")
    sampler = EpochBatchSampler(len(train_ds), t.batch_size, seed=t.seed, rank=rank, world_size=world)
    collate = make_collate(text_encoder if m.use_text_losses else None, m.max_text_len, seed=t.seed,
                           mask_ratio_range=tuple(m.mask_ratio_range))
    loader = torch.utils.data.DataLoader(KeyedDataset(train_ds, seed=t.seed), batch_sampler=sampler,
                                         collate_fn=collate, num_workers=d.num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         # its own generator: creating an iterator must not draw from the global
                                         # RNG, or a resumed run's dropout stream would drift from an
                                         # uninterrupted run's
                                         generator=torch.Generator())
    return train_ds, val_ds, sampler, loader


def val_sources(d):
    """(image dir, annotation file, hold-out fraction) of the validation set the data config ``d`` asks for.

    A dataset read from one annotation file (``ANNOTATION_DATASETS``: coco) never validates on its training
    images: without a ``data.val_annotations`` of its own, ``data.val_holdout`` (a fraction in (0, 0.5]; read
    with getattr so a config without the field means 0) holds that fraction of the training images out of the
    training set; with neither, a one-line ValueError names both ways out.
    """
    from lgvq_fast.data import ANNOTATION_DATASETS

    holdout = float(getattr(d, "val_holdout", 0.0) or 0.0)
    if not 0 <= holdout <= 0.5:
        raise ValueError(f"data.val_holdout must be in (0, 0.5] (0: off), got {holdout:g}")
    if d.name not in ANNOTATION_DATASETS:
        if holdout:
            raise ValueError(f"data.val_holdout applies to {', '.join(ANNOTATION_DATASETS)} only; dataset "
                             f"{d.name!r} has its own validation split")
        return d.val_image_dir or d.image_dir, d.val_annotations or d.annotations, 0.0
    if d.val_annotations and not _same_file(d.val_annotations, d.annotations):
        if holdout:
            raise ValueError(f"data.val_holdout={holdout:g} and data.val_annotations={d.val_annotations} both "
                             "choose the validation set: keep one")
        return d.val_image_dir or d.image_dir, d.val_annotations, 0.0
    if holdout and not d.val_image_dir:
        return d.image_dir, d.annotations, holdout
    if holdout:
        raise ValueError(f"data.val_image_dir={d.val_image_dir} is set without data.val_annotations: give both, "
                         f"or neither with data.val_holdout={holdout:g}")
    raise ValueError(f"dataset {d.name!r}: validation would use the training images of {d.annotations}; give a "
                     "validation set (--set data.val_annotations=... --set data.val_image_dir=...) or hold out "
                     "part of the training images (--set data.val_holdout=0.05)")


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def fixed_val_batch(val_ds, n):
    n = min(n, len(val_ds))
    return torch.stack([val_ds[i]["image"] for i in range(n)])


def saving_on_data_error(loader, save):
    """Iterate ``loader``; when reading a batch fails (an unreadable image, an empty caption file: a ValueError or
    OSError naming the file), call ``save`` (a checkpoint at the current step) first, so fixing the file (or
    passing --skip-bad-samples) and resuming loses nothing. ``save=None`` (several processes) only re-raises.
    The error is one line whatever ``num_workers`` is: a worker's exception carries its whole traceback, of which
    only the last line (the cause, naming the file) is kept."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ValueError, OSError) as e:
            cause = one_line_error(e)
            if save is None:  # several processes: the others are inside collectives, no checkpoint possible
                raise ValueError(cause) from None
            save("data error")
            raise ValueError(f"{cause} (a checkpoint of the steps so far was written: fix the file or pass "
                             "--skip-bad-samples, then --resume auto)") from None
        yield batch
