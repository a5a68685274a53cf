"""Argument checks of ``lgvq_fast.compat.VectorQuantize``.

The peer checks its arguments with ``assert`` (or not at all); here every rule it asserts, and the
values it would silently mishandle, raise ``ValueError`` naming the argument.
"""
import numbers

import torch

from lgvq_fast._backend import IMPLS

NAME = "VectorQuantize"


def _positive_int(args, key):
    v = args[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{NAME}: {key} must be a positive int, got {v!r}")


def _real(args, key, lo=None, hi=None, lo_open=False):
    v = args[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{NAME}: {key} must be a real number, got {v!r}")
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    if low_bad or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{NAME}: {key} must be in {left}{lo}, {hi if hi is not None else 'inf'}], got {v}")


def check_unsupported(**kwargs):
    """Peer features this class does not implement: an explicit error, never a silent difference."""
    for key, value in kwargs.items():
        if value is not None and value is not False:
            raise ValueError(f"{NAME}: {key} is not supported by lgvq_fast.compat (got {value!r}); "
                             "use vector_quantize_pytorch.VectorQuantize for it")


def check_arguments(a):
    """``a``: the constructor's ``locals()`` after the peer's defaults are resolved."""
    for key in ("dim", "codebook_size", "codebook_dim", "heads"):
        _positive_int(a, key)
    _real(a, "decay", 0.0, 1.0)
    _real(a, "eps", 0.0, lo_open=True)
    _real(a, "threshold_ema_dead_code", 0.0)
    _real(a, "commitment_weight", 0.0)
    _real(a, "orthogonal_reg_weight", 0.0)
    _real(a, "codebook_diversity_loss_weight", 0.0)
    _real(a, "sample_codebook_temp", 0.0)
    _real(a, "sync_update_v", 0.0, 1.0)
    if a["kmeans_init"]:
        _positive_int(a, "kmeans_iters")
    if a["orthogonal_reg_max_codes"] is not None:
        _positive_int(a, "orthogonal_reg_max_codes")
    if a["accept_image_fmap"] and a["accept_3d_fmap"]:
        raise ValueError(f"{NAME}: accept_image_fmap and accept_3d_fmap cannot both be set")
    rules = (
        (a["use_cosine_sim"] and a["learnable_codebook"],
         "use_cosine_sim=True cannot be combined with learnable_codebook=True (the peer does not support it)"),
        (sum(map(bool, (a["straight_through"], a["rotation_trick"], a["directional_reparam"]))) > 1,
         ("at most one of straight_through, rotation_trick and directional_reparam may be set "
          "(rotation_trick defaults to True for dim > 1: pass rotation_trick=False)")),
        (a["directional_reparam"] and a["threshold_ema_dead_code"] == 0,
         "directional_reparam=True needs threshold_ema_dead_code > 0 (periodic dead-code replacement)"),
        (a["straight_through"] and a["learnable_codebook"],
         "straight_through=True cannot be combined with learnable_codebook=True"),
        (a["ema_update"] and a["learnable_codebook"],
         "learnable_codebook=True needs ema_update=False (a codebook is either learned or an EMA)"),
        (a["vq_bridge"] is not None and not a["learnable_codebook"],
         "vq_bridge needs learnable_codebook=True"),
        (a["vq_bridge"] is not None and a["ema_update"], "vq_bridge needs ema_update=False"),
        (a["sync_update_v"] > 0.0 and not a["learnable_codebook"], "sync_update_v > 0 needs learnable_codebook=True"),
        (a["orthogonal_reg_active_codes_only"] and a["heads"] > 1 and a["separate_codebook_per_head"],
         "orthogonal_reg_active_codes_only cannot be combined with separate_codebook_per_head and heads > 1"),
    )
    for bad, message in rules:
        if bad:
            raise ValueError(f"{NAME}: {message}")
    if a["precision"] not in ("exact", "fast"):
        raise ValueError(f"{NAME}: precision must be 'exact' or 'fast', got {a['precision']!r}")


def resolve_arguments(args):
    """The constructor's arguments (its ``locals()``) with the peer's ``None`` defaults resolved, checked.

    Returns a new dict; the order of the checks is the constructor's: unsupported features first, then
    the argument rules (on the resolved values), then ``impl``.
    """
    a = dict(args)
    check_unsupported(affine_param=a["affine_param"])
    if a["ema_update"] is None:
        a["ema_update"] = not a["directional_reparam"] and a["vq_bridge"] is None
    if a["learnable_codebook"] is None:
        a["learnable_codebook"] = a["directional_reparam"] or a["vq_bridge"] is not None
    if a["rotation_trick"] is None:
        a["rotation_trick"] = not a["directional_reparam"] and a["dim"] > 1
    if a["codebook_dim"] is None:
        a["codebook_dim"] = a["dim"]
    check_arguments(a)
    if a["impl"] not in IMPLS:
        raise ValueError(f"{NAME}: impl must be one of {IMPLS}, got {a['impl']!r}")
    if a["sync_codebook"] is None:
        dist = torch.distributed
        a["sync_codebook"] = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return a


def check_input(vq, x, mask, lens):
    """Shapes the peer's forward accepts, with the reason when it would not."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{NAME}: x must be a floating-point tensor, got {got}")
    fmap = vq.accept_image_fmap or vq.accept_3d_fmap
    if vq.accept_image_fmap:
        want, layout = (4,), "[b, dim, h, w] (accept_image_fmap)"
    elif vq.accept_3d_fmap:
        want, layout = (5,), "[b, dim, d, h, w] (accept_3d_fmap)"
    else:
        want = (2, 3)
        layout = "[b, n, dim] or [b, dim]" if vq.channel_last else "[b, dim, n] (channel_last=False) or [b, dim]"
    if x.ndim not in want:
        raise ValueError(f"{NAME}: x must be {layout}, got shape {tuple(x.shape)}")
    channel = -1 if (vq.channel_last and not fmap) or x.ndim == 2 else 1
    if x.shape[channel] != vq.dim:
        raise ValueError(f"{NAME}: x must have dim={vq.dim} features in dim {channel}, got shape {tuple(x.shape)}")
    if mask is not None and lens is not None:
        raise ValueError(f"{NAME}: pass mask or lens, not both")
    if (mask is not None or lens is not None) and (fmap or x.ndim == 2):
        raise ValueError(f"{NAME}: mask/lens need a sequence input [b, n, dim]; got shape {tuple(x.shape)}")
    seq = x.shape[1] if vq.channel_last else x.shape[-1]
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], seq)):
        raise ValueError(f"{NAME}: mask must be a bool tensor of shape {(x.shape[0], seq)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if lens is not None and (lens.ndim != 1 or lens.shape[0] != x.shape[0] or lens.is_floating_point()):
        raise ValueError(f"{NAME}: lens must be an integer tensor of shape ({x.shape[0]},), "
                         f"got {lens.dtype} {tuple(lens.shape)}")
