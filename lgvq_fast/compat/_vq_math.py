"""Gradient estimators, regularisers and layout helpers of ``lgvq_fast.compat.VectorQuantize``.

Each follows vector-quantize-pytorch 1.32 operation by operation (same products, same order), so the
values and gradients agree with the peer's to rounding.
"""
from math import sqrt

import torch
import torch.nn.functional as F

from lgvq_fast.compat._vq_codebook import l2norm


def straight_through(src, tgt):
    # the peer's form: its value is src + (tgt - src), not tgt bit for bit
    return src + (tgt - src).detach()


def _safe_div(num, den, eps=1e-6):
    return num / den.clamp(min=eps)


def rotate_to(src, tgt):
    """Rotation-trick estimator (arXiv 2410.06424, section 4.2): value ~ ``tgt``, gradient rotated onto ``src``."""
    shape = src.shape
    src = src.reshape(-1, shape[-1])
    tgt = tgt.reshape(-1, shape[-1])
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = _safe_div(src, norm_src)
    q = _safe_div(tgt, norm_tgt)
    e = src[:, None, :]  # [n, 1, d]
    w = l2norm(u + q, dim=1).detach()
    rotated = (
        e
        - 2 * (e @ w[:, :, None] @ w[:, None, :])
        + 2 * (e @ u[:, :, None].detach() @ q[:, None, :].detach())
    )
    rotated = rotated[:, 0, :] * _safe_div(norm_tgt, norm_src).detach()
    return rotated.reshape(shape)


def directional_reparam(src, tgt, noise_variance=5e-3):
    """DiVeQ: ``src`` plus the quantisation error's length along a noised error direction."""
    error_dir = tgt - src
    error_norm = error_dir.norm(dim=-1, keepdim=True)
    noised = error_dir + sqrt(noise_variance) * torch.randn_like(error_dir)
    return src + l2norm(noised).detach() * error_norm


def orthogonal_loss_fn(t):
    """Eq. (2) of arXiv 2112.00384 over codes ``t [h, n, d]``."""
    h, n = t.shape[:2]
    normed = l2norm(t)
    cosine = torch.einsum("hid,hjd->hij", normed, normed)
    return (cosine ** 2).sum() / (h * n ** 2) - (1 / n)


def neg_entropy_of_mean(distances, temperature):
    prob = (distances * temperature).softmax(dim=-1)
    avg = prob.reshape(-1, *prob.shape[-2:]).mean(dim=0)
    entropy = (-avg * torch.log(avg.clamp(min=1e-5))).sum(dim=-1)
    return -entropy.mean()


def lens_to_mask(lens, max_length):
    return torch.arange(max_length, device=lens.device) < lens[:, None]


def split_heads(x, heads, separate):
    """``[b, n, h*d]`` -> ``[h, b, n, d]`` (separate codebooks) or ``[1, b*h, n, d]`` (one shared)."""
    if heads == 1:
        return x
    b, n, hd = x.shape
    x = x.reshape(b, n, heads, hd // heads)
    if separate:
        return x.permute(2, 0, 1, 3)
    return x.permute(0, 2, 1, 3).reshape(1, b * heads, n, hd // heads)


def merge_heads(t, heads, separate, batch):
    """Inverse of :func:`split_heads` for ``[..., d]`` tensors, or for indices when ``t`` lacks the last dim."""
    if separate:
        t = t.movedim(0, 2)  # [b, n, h, ...]
    else:
        t = t[0].reshape(batch, heads, *t.shape[2:]).movedim(1, 2)
    return t


def head_rows_mask(mask, codebooks, batch_heads):
    """``mask [b, n]`` -> ``[codebooks, b*h, n]`` for per-head losses (the peer's ``'b n -> c (b h) n'``)."""
    b, n = mask.shape
    per = batch_heads // b
    return mask[:, None, :].expand(b, per, n).reshape(b * per, n)[None].expand(codebooks, -1, -1)


def to_tokens(x, image, volume):
    """Feature map ``[b, c, *spatial]`` -> ``[b, prod(spatial), c]``; returns the tokens and ``spatial``."""
    if not (image or volume):
        return x, None
    spatial = tuple(x.shape[2:])
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2), spatial


def from_tokens(t, spatial, channel):
    """Undo :func:`to_tokens`: ``[b, n, ...]`` -> ``[b, *spatial, ...]``, then the channel (last dim) to dim 1."""
    t = t.reshape(t.shape[0], *spatial, *t.shape[2:])
    return t.movedim(-1, 1) if channel else t


def cross_entropy_on_distances(distances, codes, heads, separate, batch):
    """Cross-entropy of ``codes`` under the logits ``distances [h, b', n, K]`` (the peer's layouts)."""
    if heads == 1:
        logits = distances[0].permute(0, 2, 1)  # [b, K, n]
    elif separate:
        logits = distances.permute(1, 3, 2, 0)  # [b, K, n, h]
    else:
        d = distances[0]
        logits = d.reshape(batch, heads, *d.shape[1:]).permute(0, 3, 2, 1)  # [b, K, n, h]
    return F.cross_entropy(logits, codes, ignore_index=-1)
