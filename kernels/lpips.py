"""Triton LPIPS distance of one feature layer (forward and backward), NCHW or channels_last through strides.

``fx, fy [n, C, H, W]`` are the two batches' features; a tile is ``[BLOCK_P, BLOCK_C]``: pixels of image i
in both, every channel, so each pixel's channel norms, the normalised difference and its head-weighted square
are computed in registers from one read of the features (PyTorch's formulation writes and reads several
full-size tensors for the square, the norm, the division, the difference and the head).

1. ``_lpips_fwd_kernel`` (grid (pixel tiles, n)): per tile the sum over its pixels of
   ``sum_c w_c (u_c - v_c)^2``, stored per (i, tile); the host sums the tiles (fixed order) and divides by H*W.
2. ``_lpips_bwd_kernel`` (same grid): with ``r = 2 w (u - v) * grad[i] / (H*W)``,
   ``d fx = (r - u (x . r) / ||x||) / (||x|| + eps)`` (with ``DX``) and
   ``d fy = (-r + v (y . r) / ||y||) / (||y|| + eps)`` (with ``DY``), the norm's gradient taken as 0 where a
   norm is 0, written in the features' dtype; with ``WGRAD`` also per (i, tile) and channel
   ``sum over pixels of (u - v)^2 * grad[i] / (H*W)`` for the head weights' gradient.

Sums are fp32 and in a fixed order (no atomics).
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc
from lgvq_fast.kernels._layout import hw_strides, load_tile, store_tile

# elements of fx per tile (the fy tile doubles it)
TILE_ELEMS = 2048
NUM_WARPS = 8


@triton.jit
def _lpips_fwd_kernel(
    x_ptr, y_ptr, w_ptr, part_ptr,
    HW, C, T, eps,
    stride_xn, stride_xp, stride_xc, stride_yn, stride_yp, stride_yc,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = (pid_t * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask = (offs_p < HW)[:, None] & (offs_c < C)[None, :]
    a = load_tile(x_ptr, pid_i, offs_p, offs_c, mask, stride_xn, stride_xp, stride_xc)
    b = load_tile(y_ptr, pid_i, offs_p, offs_c, mask, stride_yn, stride_yp, stride_yc)
    w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    na = tl.sqrt_rn(tl.sum(a * a, axis=1)) + eps  # [BLOCK_P]
    nb = tl.sqrt_rn(tl.sum(b * b, axis=1)) + eps
    diff = a / na[:, None] - b / nb[:, None]
    dist = tl.sum(diff * diff * w[None, :], axis=1)  # [BLOCK_P]; masked pixels are 0
    tl.store(part_ptr + pid_i * T + pid_t, tl.sum(dist, axis=0))


@triton.jit
def _lpips_bwd_kernel(
    x_ptr, y_ptr, w_ptr, grad_ptr, dx_ptr, dy_ptr, wpart_ptr,
    HW, C, T, eps,
    stride_xn, stride_xp, stride_xc, stride_yn, stride_yp, stride_yc,
    stride_dxn, stride_dxp, stride_dxc, stride_dyn, stride_dyp, stride_dyc,
    DX: tl.constexpr, DY: tl.constexpr, WGRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_p = (pid_t * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask = (offs_p < HW)[:, None] & mask_c[None, :]
    a = load_tile(x_ptr, pid_i, offs_p, offs_c, mask, stride_xn, stride_xp, stride_xc)
    b = load_tile(y_ptr, pid_i, offs_p, offs_c, mask, stride_yn, stride_yp, stride_yc)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(grad_ptr + pid_i).to(tl.float32) / HW
    la = tl.sqrt_rn(tl.sum(a * a, axis=1))
    lb = tl.sqrt_rn(tl.sum(b * b, axis=1))
    u = a / (la + eps)[:, None]
    v = b / (lb + eps)[:, None]
    diff = u - v
    r = 2.0 * scale * diff * w[None, :]
    if DX:
        # (x . r) / ||x||, 0 where the feature vector is 0 (then u = 0 too)
        pa = tl.where(la > 0, tl.sum(a * r, axis=1) / tl.where(la > 0, la, 1.0), 0.0)
        da = (r - u * pa[:, None]) / (la + eps)[:, None]
        store_tile(dx_ptr, da, pid_i, offs_p, offs_c, mask, stride_dxn, stride_dxp, stride_dxc)
    if DY:
        pb = tl.where(lb > 0, tl.sum(b * r, axis=1) / tl.where(lb > 0, lb, 1.0), 0.0)
        db = (v * pb[:, None] - r) / (lb + eps)[:, None]
        store_tile(dy_ptr, db, pid_i, offs_p, offs_c, mask, stride_dyn, stride_dyp, stride_dyc)
    if WGRAD:
        tl.store(wpart_ptr + (pid_i * T + pid_t) * C + offs_c, tl.sum(diff * diff, axis=0) * scale, mask=mask_c)


def _blocks(C):
    block_c = triton.next_power_of_2(C)
    return max(1, min(128, TILE_ELEMS // block_c)), block_c


# CUDA caps a grid's second dimension at 65535: the launches take the batch there in chunks of at most this
MAX_GRID_Y = 65535


def _batch_chunks(n):
    return [(n0, min(n, n0 + MAX_GRID_Y)) for n0 in range(0, n, MAX_GRID_Y)]


def lpips_fwd(fx, fy, weight, eps):
    """fx, fy [n, C, H, W] (H, W foldable), weight [C] -> distances fp32 [n]."""
    n, C, H, W = fx.shape
    HW = H * W
    block_p, block_c = _blocks(C)
    T = triton.cdiv(HW, block_p)
    part = _alloc.empty((n, T), torch.float32, fx.device)
    for n0, n1 in _batch_chunks(n):
        a, b = fx[n0:n1], fy[n0:n1]
        _lpips_fwd_kernel[(T, n1 - n0)](a, b, weight, part[n0:n1], HW, C, T, eps, *hw_strides(a), *hw_strides(b),
                                        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return part.sum(1).div_(HW)


def lpips_bwd(grad, fx, fy, weight, eps, dx, dy, wgrad):
    """Gradients of :func:`lpips_fwd`: ``(dfx, dfy, dweight)``, each None unless asked for (``dx``, ``dy``,
    ``wgrad``); dfx/dfy like the features, dweight fp32 [C]. ``grad`` is fp32 [n]."""
    n, C, H, W = fx.shape
    HW = H * W
    block_p, block_c = _blocks(C)
    T = triton.cdiv(HW, block_p)
    dfx = _alloc.empty_like(fx) if dx else None
    dfy = _alloc.empty_like(fy) if dy else None
    wpart = _alloc.empty((n, T, C), torch.float32, fx.device) if wgrad else None
    for n0, n1 in _batch_chunks(n):
        a, b = fx[n0:n1], fy[n0:n1]
        da = dfx[n0:n1] if dx else None
        db = dfy[n0:n1] if dy else None
        # unused outputs get a pointer that is never written
        sdx = hw_strides(da) if dx else (0, 0, 0)
        sdy = hw_strides(db) if dy else (0, 0, 0)
        _lpips_bwd_kernel[(T, n1 - n0)](
            a, b, weight, grad[n0:n1], da if dx else a, db if dy else b, wpart[n0:n1] if wgrad else a,
            HW, C, T, eps, *hw_strides(a), *hw_strides(b), *sdx, *sdy,
            DX=dx, DY=dy, WGRAD=wgrad, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return dfx, dfy, (wpart.sum((0, 1)) if wgrad else None)
