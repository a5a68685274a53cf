"""The data side of a run: the training loader (the epoch sampler that resumes mid-epoch), the fixed validation
batch, and batches read so that a data error loses nothing."""
import torch

from lgvq_fast.errors import one_line_error


def make_loaders(cfg, text_encoder, rank, world):
    """(train dataset, val dataset, sampler, loader) of ``cfg``; the loader's batches hold ``image`` and ``text``
    (tokenized, masked for MTP) and ``skipped`` (bad samples skipped)."""
    from lgvq_fast.data import EpochBatchSampler, KeyedDataset, build_dataset, make_collate

    d, t, m = cfg.data, cfg.train, cfg.model
    common = dict(resolution=m.resolution, seed=t.seed, root=d.root, max_words=d.max_words,
                  skip_bad_samples=d.skip_bad_samples)
    train_ds = build_dataset(d.name, "train", size=d.train_size, image_dir=d.image_dir,
                             annotation_json=d.annotations, **common)
    val_ds = build_dataset(d.name, "val" if d.name != "cub" else "test", size=d.val_size,
                           image_dir=d.val_image_dir or d.image_dir,
                           annotation_json=d.val_annotations or d.annotations, **common)
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
