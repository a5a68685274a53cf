"""Output allocation for the ops.

Every output an op allocates goes through :func:`empty`. With the environment
variable ``LGVQ_FAST_POISON=1`` (set by the test suite) outputs start as NaN
(floating point) or the most negative integer, so a kernel that forgets to
write an element fails the comparison instead of passing on leftover memory.
"""
import torch

from lgvq_fast._backend import env_flag

_POISON = env_flag("LGVQ_FAST_POISON")


def poison_enabled():
    return _POISON


def set_poison(enabled):
    """Turn poisoning on or off for this process (the tests use the env var)."""
    global _POISON
    _POISON = bool(enabled)


def empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.numel() > 0:
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


def empty_like(t):
    """``torch.empty_like(t)`` (same dtype, device and memory format), poisoned like :func:`empty`."""
    out = torch.empty_like(t)
    if _POISON and out.numel() > 0 and out.is_floating_point():
        out.fill_(float("nan"))
    return out
