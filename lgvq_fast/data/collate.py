"""Batching: a resumable, rank-sharded batch sampler and the collate function that tokenises in the workers.

Every random choice of a batch (crop, flip, caption pick, mask ratio and masked tokens) is a pure function of
(seed, epoch, batch number, sample index), so a run resumed at batch b of epoch e sees exactly the batches an
uninterrupted run would, whatever the number of DataLoader workers.
"""
import random
import zlib

import torch


def mix_seed(*parts):
    """Deterministic 63-bit seed from integers (no Python ``hash``: it is salted per process for str)."""
    h = 0x345678
    for p in parts:
        h = (h * 1_000_003) ^ (int(p) & 0xFFFFFFFFFFFF)
        h &= 0x7FFFFFFFFFFFFFFF
    return h


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields one epoch of batches of keys ``(index, epoch, batch)`` for this rank.

    The permutation depends on (seed, epoch) only, so every rank sees the same order and takes its own slice
    of each global batch (``batch_size`` per rank, ``batch_size * world_size`` per step). Incomplete global
    batches are dropped, so all ranks run the same number of steps. ``set_position(epoch, batch)`` makes the
    next iteration start there (used when resuming).
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_samples} samples, fewer than one global batch ({batch_size} x {world_size} ranks)")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self):
        return self.num_samples // (self.batch_size * self.world_size)

    def set_position(self, epoch, batch=0):
        self.epoch, self.start_batch = int(epoch), int(batch)

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        gbs = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            lo = b * gbs + self.rank * self.batch_size
            yield [(i, self.epoch, b) for i in order[lo:lo + self.batch_size]]


class KeyedDataset(torch.utils.data.Dataset):
    """Wraps a dataset with ``get(index, rng)`` so that key ``(index, epoch, batch)`` gives a seeded sample."""

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, batch = key
        rng = random.Random(mix_seed(self.seed, epoch, index, 17))
        sample = dict(self.dataset.get(int(index), rng))
        sample["_key"] = (int(epoch), int(batch))
        return sample


def make_collate(text_encoder, max_len, seed=0, mask_ratio_range=(0.1, 0.3)):
    """collate_fn: ``{"image": [B,3,H,W], "captions": list[str], "text": TextBatch | None, "skipped": int}``.

    Tokenisation and the masked-text masks are drawn here (in the DataLoader workers) from a generator seeded
    by (seed, epoch, batch) when the samples come from ``KeyedDataset``, else by the captions themselves.
    """

    def collate(samples):
        if not samples:
            raise ValueError("collate received an empty batch")
        images = torch.stack([s["image"] for s in samples])
        captions = [s["caption"] for s in samples]
        skipped = sum(int(s.get("skipped", 0)) for s in samples)
        key = samples[0].get("_key")
        if key is None:
            key = (zlib.crc32(" | ".join(captions).encode("utf-8")), 0)
        batch = {"image": images, "captions": captions, "text": None, "skipped": skipped}
        if text_encoder is not None:
            g = torch.Generator().manual_seed(mix_seed(seed, key[0], key[1], 29))
            batch["text"] = text_encoder.tokenize(captions, max_len, mask_ratio_range=mask_ratio_range, generator=g)
        return batch

    return collate
