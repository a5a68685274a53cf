"""Triton GroupNorm with an optional fused SiLU, forward and backward, for NCHW or channels_last (NHWC) tensors.

The input is viewed as ``[N, HW, C]`` through its strides, so one set of kernels serves both memory formats
(Triton specialises a stride of 1, which gives the contiguous loads of either layout) and the output keeps
the input's format: a channels_last network never converts to NCHW for its norms. A tile is
``[BLOCK_HW, BLOCK_C]``: rows of spatial positions, every channel. Channels are mapped to groups with a
``[BLOCK_C, BLOCK_G]`` one-hot matrix, so any C divisible by G works (C/G need not be a power of two).

Forward, three launches:

1. ``_group_norm_fwd_stats_kernel`` (grid (tiles, N)): for each group, the mean and the centred sum of
   squares M2 of the program's ``ITERS * BLOCK_HW`` rows: per channel, each ``BLOCK_HW`` sub-tile is centred
   on its own mean and merged with Chan's formula, then the group's channels are merged the same way, so
   there is no ``E[x^2] - E[x]^2`` cancellation;
2. ``_group_norm_fwd_finalize_kernel`` (grid (N,)): merges the tiles' partials in tile order into
   ``mean`` and ``rstd = 1 / sqrt(M2 / count + eps)`` per (n, group), fp32;
3. ``_group_norm_fwd_kernel`` (grid (tiles, N)): ``y = (x - mean) * rstd * w + b``, then ``y * sigmoid(y)``
   when ``ACT``, stored in the input dtype. This kernel and the backward's last are autotuned over the tile's
   rows and warps (``LGVQ_FAST_TRITON_AUTOTUNE=0``: the default only).

Backward, three launches and one sum: with ``g`` the gradient before the SiLU (recomputed from x), and
``xhat = (x - mean) * rstd``,

1. ``_group_norm_bwd_partial_kernel``: per tile and channel ``sum(g * xhat)`` and ``sum(g)``;
2. ``_group_norm_bwd_finalize_kernel`` (grid (N,)): their per-(n, channel) totals, and per (n, group)
   ``c1 = sum(g * w) / count`` and ``c2 = sum(g * w * xhat) / count`` from those totals;
3. ``_group_norm_bwd_kernel``: ``dx = rstd * (g * w - c1 - xhat * c2)``;

then ``dw, db`` are the per-(n, channel) totals summed over n. All sums are in fp32 and in a fixed order
(no atomics), so results are bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc
from lgvq_fast._backend import env_flag, triton_interpret as _interpret
from lgvq_fast.kernels._layout import hw_strides, load_tile, store_tile

# elements per [BLOCK_HW, BLOCK_C] tile; BLOCK_HW follows from C
TILE_ELEMS = 4096
# the finalize kernels read [BLOCK_T, BLOCK_*] chunks of partials
FINALIZE_ELEMS = 4096
# a reducing program takes up to 8 sub-tiles, as long as at least this many programs remain
ITERS_MIN_PROGRAMS = 2048
# warps for the reducing [BLOCK_HW, BLOCK_C] tile kernels: 16 elements a thread (at 4 warps the sm_90 build of
# the backward kernel needed up to 255 registers)
NUM_WARPS = 8


def _tile_configs():
    """Candidates for the two elementwise kernels (forward y, backward dx): rows per tile and warps. The
    first one kept is the untuned default: TILE_ELEMS elements, NUM_WARPS warps."""
    if _interpret():
        return [triton.Config({"BLOCK_HW": 32}, num_warps=NUM_WARPS)]
    return [triton.Config({"BLOCK_HW": hw}, num_warps=w) for hw in (4, 8, 16, 32, 64, 128) for w in (8, 4)]


def _prune_tile_configs(configs, named_args, **kwargs):
    """Keep tiles of 2048 to 4096 elements (at most 16 a thread) with no more rows than H*W needs; the default
    config first."""
    args = {**named_args, **kwargs}
    block_c, hw = args["BLOCK_C"], args["HW"]
    if _interpret():
        return configs[:1]
    rows_needed = max(4, triton.next_power_of_2(hw))
    default = max(4, min(128, TILE_ELEMS // block_c))
    # at most 16 elements a thread: larger tiles spill (sm_90 build, Triton 3.6: up to 3.4 KB of stack at 64)
    kept = [c for c in configs
            if 2048 <= c.kwargs["BLOCK_HW"] * block_c <= min(8192, 16 * 32 * c.num_warps)
            and c.kwargs["BLOCK_HW"] <= rows_needed]
    kept.sort(key=lambda c: (c.kwargs["BLOCK_HW"] != min(default, rows_needed), c.num_warps != NUM_WARPS))
    kept = kept or [c for c in configs if c.kwargs["BLOCK_HW"] == 4 and c.num_warps == NUM_WARPS]
    # each config is a compile the first time a shape is seen (LGVQ_FAST_TRITON_AUTOTUNE=0: the default only)
    if not env_flag("LGVQ_FAST_TRITON_AUTOTUNE", default=True):
        kept = kept[:1]
    return kept


_TILE_AUTOTUNE = dict(configs=_tile_configs(), prune_configs_by={"early_config_prune": _prune_tile_configs})


@triton.jit
def _silu_grad(dy, z):
    s = 1.0 / (1.0 + tl.exp(-z))
    return dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def _group_sum(v, offs_c, offs_g, C, CG, RESHAPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_C] per-channel values -> [BLOCK_G] per-group sums. RESHAPE (C and G powers of two): the groups
    are the rows of a [BLOCK_G, C/G] view; otherwise a one-hot [BLOCK_C, BLOCK_G] map (any C divisible by G)."""
    if RESHAPE:
        return tl.sum(tl.reshape(v, [BLOCK_G, BLOCK_C // BLOCK_G]), axis=1)
    else:
        onehot = ((offs_c[:, None] // CG) == offs_g[None, :]) & (offs_c < C)[:, None]
        return tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)


@triton.jit
def _group_bcast(g, offs_c, offs_g, CG, RESHAPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_G] per-group values -> [BLOCK_C] per-channel values (the inverse map of ``_group_sum``)."""
    if RESHAPE:
        return tl.reshape(tl.broadcast_to(g[:, None], [BLOCK_G, BLOCK_C // BLOCK_G]), [BLOCK_C])
    else:
        onehot = (offs_c[:, None] // CG) == offs_g[None, :]
        return tl.sum(tl.where(onehot, g[None, :], 0.0), axis=1)


@triton.jit
def _tile_offsets(pid_t, i, ITERS: tl.constexpr, BLOCK_HW: tl.constexpr, OFFS_64: tl.constexpr):
    offs_hw = (pid_t * ITERS + i) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    if OFFS_64:
        offs_hw = offs_hw.to(tl.int64)
    return offs_hw


@triton.jit
def _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, pid_n, G, CG, offs_c, mask_c):
    """Per channel of sample ``pid_n``: its group's mean and rstd, and the affine weight and bias (fp32)."""
    grp = pid_n * G + offs_c // CG
    mean_c = tl.load(mean_ptr + grp, mask=mask_c, other=0.0)
    rstd_c = tl.load(rstd_ptr + grp, mask=mask_c, other=0.0)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return mean_c, rstd_c, w, b


@triton.jit
def _group_norm_fwd_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    HW, C, G, CG, T,
    stride_xn, stride_xhw, stride_xc,
    RESHAPE: tl.constexpr, OFFS_64: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, ITERS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_G)
    mask_c = offs_c < C
    # per channel: mean and centred sum of squares of this program's rows, each sub-tile centred on its own
    # column means and merged with Chan's formula (only the last valid sub-tile can be partial, and the ones
    # after it are empty: n_b = 0 leaves the run unchanged)
    col_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    col_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ITERS):
        offs_hw = _tile_offsets(pid_t, i, ITERS, BLOCK_HW, OFFS_64)
        mask = (offs_hw < HW)[:, None] & mask_c[None, :]
        x = load_tile(x_ptr, pid_n, offs_hw, offs_c, mask, stride_xn, stride_xhw, stride_xc)
        n_b = tl.maximum(tl.minimum(HW - (pid_t * ITERS + i) * BLOCK_HW, BLOCK_HW), 0).to(tl.float32)
        m_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - m_b[None, :], 0.0)
        n_a = tl.cast(i * BLOCK_HW, tl.float32)
        frac = n_b / tl.maximum(n_a + n_b, 1.0)
        delta = m_b - col_mean
        col_mean = col_mean + delta * frac
        col_m2 = col_m2 + tl.sum(d * d, axis=0) + delta * delta * n_a * frac
    # merge the group's C/G columns (each over the same rows) into the group's mean and M2
    rows = tl.maximum(tl.minimum(HW - pid_t * ITERS * BLOCK_HW, ITERS * BLOCK_HW), 0).to(tl.float32)
    gmean = _group_sum(tl.where(mask_c, col_mean, 0.0), offs_c, offs_g, C, CG, RESHAPE, BLOCK_C, BLOCK_G) / CG
    dev = col_mean - _group_bcast(gmean, offs_c, offs_g, CG, RESHAPE, BLOCK_C, BLOCK_G)
    gm2 = _group_sum(tl.where(mask_c, col_m2 + rows * dev * dev, 0.0), offs_c, offs_g, C, CG, RESHAPE,
                     BLOCK_C, BLOCK_G)
    mask_g = offs_g < G
    out = (pid_n * T + pid_t) * G + offs_g
    tl.store(pmean_ptr + out, gmean, mask=mask_g)
    tl.store(pm2_ptr + out, gm2, mask=mask_g)


@triton.jit
def _group_norm_fwd_finalize_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
    HW, G, CG, T, ROWS_PER_T, eps,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    total = (HW * CG).to(tl.float32)
    base = pid_n * T * G
    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_g[None, :]
        cnt = (tl.maximum(tl.minimum(HW - offs_t * ROWS_PER_T, ROWS_PER_T), 0) * CG).to(tl.float32)
        pm = tl.load(pmean_ptr + base + offs_t[:, None] * G + offs_g[None, :], mask=mask, other=0.0)
        acc += tl.sum(pm * cnt[:, None], axis=0)
    mean = acc / total
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_g[None, :]
        cnt = (tl.maximum(tl.minimum(HW - offs_t * ROWS_PER_T, ROWS_PER_T), 0) * CG).to(tl.float32)
        pm = tl.load(pmean_ptr + base + offs_t[:, None] * G + offs_g[None, :], mask=mask, other=0.0)
        pm2 = tl.load(pm2_ptr + base + offs_t[:, None] * G + offs_g[None, :], mask=mask, other=0.0)
        d = pm - mean[None, :]
        m2 += tl.sum(tl.where(mask, pm2 + cnt[:, None] * d * d, 0.0), axis=0)
    rstd = 1.0 / tl.sqrt_rn(m2 / total + eps)
    tl.store(mean_ptr + pid_n * G + offs_g, mean, mask=mask_g)
    tl.store(rstd_ptr + pid_n * G + offs_g, rstd, mask=mask_g)


@triton.autotune(key=["C", "HW", "stride_xc", "stride_yc"], **_TILE_AUTOTUNE)
@triton.jit
def _group_norm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    HW, C, G, CG,
    stride_xn, stride_xhw, stride_xc, stride_yn, stride_yhw, stride_yc,
    ACT: tl.constexpr, OFFS_64: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean_c, rstd_c, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, pid_n, G, CG, offs_c, mask_c)
    scale = rstd_c * w
    offs_hw = _tile_offsets(pid_t, 0, 1, BLOCK_HW, OFFS_64)
    mask = (offs_hw < HW)[:, None] & mask_c[None, :]
    x = load_tile(x_ptr, pid_n, offs_hw, offs_c, mask, stride_xn, stride_xhw, stride_xc)
    y = (x - mean_c[None, :]) * scale[None, :] + b[None, :]
    if ACT:
        y = y / (1.0 + tl.exp(-y))
    store_tile(y_ptr, y, pid_n, offs_hw, offs_c, mask, stride_yn, stride_yhw, stride_yc)


@triton.jit
def _group_norm_bwd_partial_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pds_ptr, pdb_ptr,
    HW, C, G, CG, T,
    stride_xn, stride_xhw, stride_xc, stride_dn, stride_dhw, stride_dc,
    ACT: tl.constexpr, OFFS_64: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean_c, rstd_c, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, pid_n, G, CG, offs_c, mask_c)
    acc_ds = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ITERS):
        offs_hw = _tile_offsets(pid_t, i, ITERS, BLOCK_HW, OFFS_64)
        mask = (offs_hw < HW)[:, None] & mask_c[None, :]
        x = load_tile(x_ptr, pid_n, offs_hw, offs_c, mask, stride_xn, stride_xhw, stride_xc)
        g = load_tile(dy_ptr, pid_n, offs_hw, offs_c, mask, stride_dn, stride_dhw, stride_dc)
        xhat = (x - mean_c[None, :]) * rstd_c[None, :]
        if ACT:
            g = _silu_grad(g, xhat * w[None, :] + b[None, :])
        g = tl.where(mask, g, 0.0)
        acc_ds += tl.sum(g * xhat, axis=0)
        acc_db += tl.sum(g, axis=0)
    out = (pid_n * T + pid_t) * C + offs_c
    tl.store(pds_ptr + out, acc_ds, mask=mask_c)
    tl.store(pdb_ptr + out, acc_db, mask=mask_c)


@triton.jit
def _group_norm_bwd_finalize_kernel(
    pds_ptr, pdb_ptr, w_ptr, sums_ptr, coef_ptr,
    N, HW, C, G, CG, T,
    RESHAPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_G)
    mask_c = offs_c < C
    base = pid_n * T * C
    ds = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_c[None, :]
        ptrs = base + offs_t[:, None] * C + offs_c[None, :]
        ds += tl.sum(tl.load(pds_ptr + ptrs, mask=mask, other=0.0), axis=0)
        db += tl.sum(tl.load(pdb_ptr + ptrs, mask=mask, other=0.0), axis=0)
    # sums: [2, N, C] (sum g * xhat, sum g); coef: [2, N, G] (c1, c2)
    tl.store(sums_ptr + pid_n * C + offs_c, ds, mask=mask_c)
    tl.store(sums_ptr + (N + pid_n) * C + offs_c, db, mask=mask_c)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    total = (HW * CG).to(tl.float32)
    c1 = _group_sum(w * db, offs_c, offs_g, C, CG, RESHAPE, BLOCK_C, BLOCK_G) / total
    c2 = _group_sum(w * ds, offs_c, offs_g, C, CG, RESHAPE, BLOCK_C, BLOCK_G) / total
    mask_g = offs_g < G
    tl.store(coef_ptr + pid_n * G + offs_g, c1, mask=mask_g)
    tl.store(coef_ptr + (N + pid_n) * G + offs_g, c2, mask=mask_g)


@triton.autotune(key=["C", "HW", "stride_xc", "stride_dc", "stride_oc"], **_TILE_AUTOTUNE)
@triton.jit
def _group_norm_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coef_ptr,
    N, HW, C, G, CG,
    stride_xn, stride_xhw, stride_xc, stride_dn, stride_dhw, stride_dc, stride_on, stride_ohw, stride_oc,
    ACT: tl.constexpr, OFFS_64: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean_c, rstd_c, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, pid_n, G, CG, offs_c, mask_c)
    grp = pid_n * G + offs_c // CG
    c1 = tl.load(coef_ptr + grp, mask=mask_c, other=0.0)
    c2 = tl.load(coef_ptr + N * G + grp, mask=mask_c, other=0.0)
    offs_hw = _tile_offsets(pid_t, 0, 1, BLOCK_HW, OFFS_64)
    mask = (offs_hw < HW)[:, None] & mask_c[None, :]
    x = load_tile(x_ptr, pid_n, offs_hw, offs_c, mask, stride_xn, stride_xhw, stride_xc)
    g = load_tile(dy_ptr, pid_n, offs_hw, offs_c, mask, stride_dn, stride_dhw, stride_dc)
    xhat = (x - mean_c[None, :]) * rstd_c[None, :]
    if ACT:
        g = _silu_grad(g, xhat * w[None, :] + b[None, :])
    dx = rstd_c[None, :] * (g * w[None, :] - c1[None, :] - xhat * c2[None, :])
    store_tile(dx_ptr, dx, pid_n, offs_hw, offs_c, mask, stride_on, stride_ohw, stride_oc)


def _offs_64(*tensors):
    """Whether an in-sample element offset can pass 2**31 - 1 (then the kernels index in int64)."""
    return any((t.shape[2] * t.shape[3] - 1) * abs(t.stride(3)) + (t.shape[1] - 1) * abs(t.stride(1)) >= 2**31
               for t in tensors)


def _blocks(C, G):
    block_c = triton.next_power_of_2(C)
    block_hw = max(1, min(128, TILE_ELEMS // block_c))
    return block_hw, block_c, triton.next_power_of_2(G)


def _reshape_groups(C, G):
    """The groups are the rows of a [G, C/G] view of a [next_pow2(C)] vector: C and G powers of two."""
    return C == triton.next_power_of_2(C) and G == triton.next_power_of_2(G)


def _iters(N, HW, block_hw):
    """Sub-tiles per program for the reducing kernels: fewer, longer programs when there are plenty of tiles,
    so the partials stay small next to the tensor."""
    tiles = N * triton.cdiv(HW, block_hw)
    iters = 1
    while iters < 8 and tiles // (iters * 2) >= ITERS_MIN_PROGRAMS:
        iters *= 2
    return iters


def _plan(x, num_groups):
    """Sizes and tiling shared by the forward and the backward launches."""
    N, C, H, W = x.shape
    HW, G = H * W, num_groups
    block_hw, block_c, block_g = _blocks(C, G)
    iters = _iters(N, HW, block_hw)
    return N, C, HW, G, C // G, block_hw, block_c, block_g, iters, triton.cdiv(HW, block_hw * iters)


# CUDA caps a grid's second dimension at 65535: the launches take the batch there in chunks of at most this
MAX_GRID_Y = 65535


def _batch_chunks(n):
    return [(n0, min(n, n0 + MAX_GRID_Y)) for n0 in range(0, n, MAX_GRID_Y)]


def group_norm_fwd(x, weight, bias, num_groups, eps, act):
    """x: [N, C, H, W] with H and W foldable (NCHW- or channels_last-contiguous); weight, bias: [C].

    Returns ``(y, mean, rstd)``: y like x (same dtype and memory format), mean and rstd fp32 [N, G]."""
    N, C, HW, G, CG, block_hw, block_c, block_g, iters, T = _plan(x, num_groups)
    dev = x.device
    pmean = _alloc.empty((N, T, G), torch.float32, dev)
    pm2 = _alloc.empty((N, T, G), torch.float32, dev)
    mean = _alloc.empty((N, G), torch.float32, dev)
    rstd = _alloc.empty((N, G), torch.float32, dev)
    y = _alloc.empty_like(x)
    offs_64 = _offs_64(x, y)
    for n0, n1 in _batch_chunks(N):
        xc, yc, n = x[n0:n1], y[n0:n1], n1 - n0
        sx = hw_strides(xc)
        _group_norm_fwd_stats_kernel[(T, n)](
            xc, pmean[n0:n1], pm2[n0:n1], HW, C, G, CG, T, *sx, RESHAPE=_reshape_groups(C, G), OFFS_64=offs_64,
            BLOCK_HW=block_hw, BLOCK_C=block_c, BLOCK_G=block_g, ITERS=iters, num_warps=NUM_WARPS)
        _group_norm_fwd_finalize_kernel[(n,)](
            pmean[n0:n1], pm2[n0:n1], mean[n0:n1], rstd[n0:n1], HW, G, CG, T, block_hw * iters, eps,
            BLOCK_T=max(1, FINALIZE_ELEMS // block_g), BLOCK_G=block_g)
        _group_norm_fwd_kernel[lambda meta: (triton.cdiv(HW, meta["BLOCK_HW"]), n)](
            xc, yc, weight, bias, mean[n0:n1], rstd[n0:n1], HW, C, G, CG, *sx, *hw_strides(yc),
            ACT=act, OFFS_64=offs_64, BLOCK_C=block_c)
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, act):
    """Gradients of :func:`group_norm_fwd`: ``(dx, dwb)``, dx like x, dwb fp32 [2, C] = (dweight, dbias)."""
    N, C, HW, G, CG, block_hw, block_c, block_g, iters, T = _plan(x, num_groups)
    dev = x.device
    dx = _alloc.empty_like(x)
    offs_64 = _offs_64(x, dy, dx)
    dwb = None
    for n0, n1 in _batch_chunks(N):
        xc, dyc, dxc, n = x[n0:n1], dy[n0:n1], dx[n0:n1], n1 - n0
        pds = _alloc.empty((n, T, C), torch.float32, dev)
        pdb = _alloc.empty((n, T, C), torch.float32, dev)
        sums = _alloc.empty((2, n, C), torch.float32, dev)
        coef = _alloc.empty((2, n, G), torch.float32, dev)
        sx, sd = hw_strides(xc), hw_strides(dyc)
        _group_norm_bwd_partial_kernel[(T, n)](
            xc, dyc, weight, bias, mean[n0:n1], rstd[n0:n1], pds, pdb, HW, C, G, CG, T, *sx, *sd,
            ACT=act, OFFS_64=offs_64, BLOCK_HW=block_hw, BLOCK_C=block_c, ITERS=iters, num_warps=NUM_WARPS)
        _group_norm_bwd_finalize_kernel[(n,)](
            pds, pdb, weight, sums, coef, n, HW, C, G, CG, T, RESHAPE=_reshape_groups(C, G),
            BLOCK_T=max(1, FINALIZE_ELEMS // block_c), BLOCK_C=block_c, BLOCK_G=block_g)
        _group_norm_bwd_kernel[lambda meta: (triton.cdiv(HW, meta["BLOCK_HW"]), n)](
            xc, dyc, dxc, weight, bias, mean[n0:n1], rstd[n0:n1], coef, n, HW, C, G, CG, *sx, *sd,
            *hw_strides(dxc), ACT=act, OFFS_64=offs_64, BLOCK_C=block_c)
        part = sums.sum(1)
        dwb = part if dwb is None else dwb.add_(part)
    return dx, dwb
