"""Hold-out validation split for datasets that list their images in one annotation file (COCO captions).

A fraction of the listed images is held out, chosen by a hash of (seed, image name), so that a training dataset
(role "train", the images not held out) and a validation dataset (role "val", the held-out images) built apart
from the same file with the same fraction and seed are disjoint and together cover the file.
"""
import hashlib
import numbers


def check_holdout(holdout):
    """ValueError unless ``holdout`` is None or ``(fraction, seed, role)`` with 0 < fraction <= 0.5, an int seed
    and role "train" or "val"."""
    if holdout is None:
        return
    if not (isinstance(holdout, (tuple, list)) and len(holdout) == 3):
        raise ValueError(f"holdout must be (fraction, seed, role), got {holdout!r}")
    fraction, seed, role = holdout
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"holdout fraction must be in (0, 0.5], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"holdout seed must be an integer, got {seed!r}")
    if role not in ("train", "val"):
        raise ValueError(f"holdout role must be 'train' or 'val', got {role!r}")


def holdout_keys(keys, fraction, seed):
    """The held-out subset of the distinct strings ``keys``: the ``round(fraction * n)`` of them (at least 1, at
    most n - 1) whose BLAKE2b hash of (seed, key) is smallest.

    The choice depends on the set of keys and the seed only, not on their order, so a training and a validation
    dataset built apart from the same list agree on it; which images are missing or unreadable does not change
    it either, when the keys are the listed names rather than the files found.
    """
    distinct = sorted(set(keys))
    n = len(distinct)
    if n < 2:
        raise ValueError(f"cannot hold out a validation part from {n} image(s)")
    k = min(n - 1, max(1, int(fraction * n + 0.5)))

    def rank(key):
        return hashlib.blake2b(f"{int(seed)}\0{key}".encode(), digest_size=8).digest(), key

    return set(sorted(distinct, key=rank)[:k])


def holdout_select(keys, holdout, what):
    """The set of ``keys`` a dataset of ``holdout``'s role keeps (all of them when ``holdout`` is None);
    ValueError naming ``what`` (the annotation file) when too few images are listed to split."""
    if holdout is None:
        return set(keys)
    fraction, seed, role = holdout
    try:
        held = holdout_keys(keys, fraction, seed)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return held if role == "val" else set(keys) - held
