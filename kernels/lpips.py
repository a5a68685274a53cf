"""Triton LPIPS distance of one feature layer (forward and backward), NCHW or channels_last through strides.

``feats [2n, C, H, W]`` holds the x features then the y features; a tile is ``[BLOCK_P, BLOCK_C]``: pixels of
image i and of image n + i, every channel, so each pixel's channel norms, the normalised difference and its
head-weighted square are computed in registers from one read of the features (PyTorch's formulation writes
and reads several full-size tensors for the square, the norm, the division, the difference and the head).

1. ``_lpips_fwd_kernel`` (grid (pixel tiles, n)): per tile the sum over its pixels of
   ``sum_c w_c (u_c - v_c)^2``, stored per (i, tile); the host sums the tiles (fixed order) and divides by H*W.
2. ``_lpips_bwd_kernel`` (same grid): with ``r = 2 w (u - v) * grad[i] / (H*W)``,
   ``d f_x = (r - u (x . r) / ||x||) / (||x|| + eps)`` and ``d f_y = (-r + v (y . r) / ||y||) / (||y|| + eps)``
   (0 where a norm is 0), written in the features' dtype; with ``WGRAD`` also per (i, tile) and channel
   ``sum over pixels of (u - v)^2 * grad[i] / (H*W)`` for the head weights' gradient.

Sums are fp32 and in a fixed order (no atomics).
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc

# elements of x per tile (the y tile doubles it)
TILE_ELEMS = 2048
NUM_WARPS = 8


@triton.jit
def _load_pair(f_ptr, pid_i, n, offs_p, offs_c, mask, stride_n, stride_p, stride_c):
    offs = offs_p[:, None] * stride_p + offs_c[None, :] * stride_c
    a = tl.load(f_ptr + pid_i * stride_n + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(f_ptr + (pid_i + n) * stride_n + offs, mask=mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _lpips_fwd_kernel(
    f_ptr, w_ptr, part_ptr,
    n, HW, C, T, eps,
    stride_n, stride_p, stride_c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = (pid_t * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask = (offs_p < HW)[:, None] & (offs_c < C)[None, :]
    a, b = _load_pair(f_ptr, pid_i, n, offs_p, offs_c, mask, stride_n, stride_p, stride_c)
    w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    na = tl.sqrt_rn(tl.sum(a * a, axis=1)) + eps  # [BLOCK_P]
    nb = tl.sqrt_rn(tl.sum(b * b, axis=1)) + eps
    diff = a / na[:, None] - b / nb[:, None]
    dist = tl.sum(diff * diff * w[None, :], axis=1)  # [BLOCK_P]; masked pixels are 0
    tl.store(part_ptr + pid_i * T + pid_t, tl.sum(dist, axis=0))


@triton.jit
def _lpips_bwd_kernel(
    f_ptr, w_ptr, grad_ptr, df_ptr, wpart_ptr,
    n, HW, C, T, eps,
    stride_n, stride_p, stride_c, stride_dn, stride_dp, stride_dc,
    WGRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_p = (pid_t * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask = (offs_p < HW)[:, None] & mask_c[None, :]
    a, b = _load_pair(f_ptr, pid_i, n, offs_p, offs_c, mask, stride_n, stride_p, stride_c)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(grad_ptr + pid_i).to(tl.float32) / HW
    la = tl.sqrt_rn(tl.sum(a * a, axis=1))
    lb = tl.sqrt_rn(tl.sum(b * b, axis=1))
    u = a / (la + eps)[:, None]
    v = b / (lb + eps)[:, None]
    diff = u - v
    r = 2.0 * scale * diff * w[None, :]
    # (x . r) / ||x||, 0 where the feature vector is 0 (then u = 0 too)
    pa = tl.where(la > 0, tl.sum(a * r, axis=1) / tl.where(la > 0, la, 1.0), 0.0)
    pb = tl.where(lb > 0, tl.sum(b * r, axis=1) / tl.where(lb > 0, lb, 1.0), 0.0)
    da = (r - u * pa[:, None]) / (la + eps)[:, None]
    db = (v * pb[:, None] - r) / (lb + eps)[:, None]
    offs = offs_p[:, None] * stride_dp + offs_c[None, :] * stride_dc
    tl.store(df_ptr + pid_i * stride_dn + offs, da.to(df_ptr.dtype.element_ty), mask=mask)
    tl.store(df_ptr + (pid_i + n) * stride_dn + offs, db.to(df_ptr.dtype.element_ty), mask=mask)
    if WGRAD:
        tl.store(wpart_ptr + (pid_i * T + pid_t) * C + offs_c, tl.sum(diff * diff, axis=0) * scale, mask=mask_c)


def _strides(t):
    """(stride_n, stride_pixel, stride_c) of a [N, C, H, W] tensor whose H, W fold into one index."""
    return t.stride(0), t.stride(3), t.stride(1)


def _blocks(C):
    block_c = triton.next_power_of_2(C)
    return max(1, min(128, TILE_ELEMS // block_c)), block_c


def lpips_fwd(feats, weight, eps):
    """feats [2n, C, H, W] (H, W foldable), weight [C] -> distances fp32 [n]."""
    N2, C, H, W = feats.shape
    n, HW = N2 // 2, H * W
    block_p, block_c = _blocks(C)
    T = triton.cdiv(HW, block_p)
    part = _alloc.empty((n, T), torch.float32, feats.device)
    _lpips_fwd_kernel[(T, n)](feats, weight, part, n, HW, C, T, eps, *_strides(feats),
                              BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return part.sum(1).div_(HW)


def lpips_bwd(grad, feats, weight, eps, wgrad):
    """Gradients of :func:`lpips_fwd`: ``dfeats`` like feats, and the weight's gradient fp32 [C] when ``wgrad``
    (else None). ``grad`` is fp32 [n]."""
    N2, C, H, W = feats.shape
    n, HW = N2 // 2, H * W
    block_p, block_c = _blocks(C)
    T = triton.cdiv(HW, block_p)
    dfeats = torch.empty_like(feats)
    if _alloc.poison_enabled():
        dfeats.fill_(float("nan"))
    wpart = _alloc.empty((n, T, C), torch.float32, feats.device) if wgrad else dfeats
    _lpips_bwd_kernel[(T, n)](feats, weight, grad, dfeats, wpart, n, HW, C, T, eps, *_strides(feats),
                              *_strides(dfeats), WGRAD=wgrad, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return dfeats, (wpart.sum((0, 1)) if wgrad else None)
