"""Triton codebook EMA update: per-code counts and sums without a one-hot matrix, fused with the
decay, the Laplace smoothing and the normalisation.

Deterministic path (default): the host sorts ``indices`` once (stable) and finds each code's
segment of sorted rows with ``searchsorted``. Then two launches:

1. ``_ema_cluster_size_kernel`` (one program): counts from the segment bounds,
   ``cluster_size = decay*cluster_size + (1-decay)*counts`` and ``n = cluster_size.sum()``, summed
   in a fixed order;
2. ``_ema_embed_kernel`` (one program per (code, D block)): sums the code's contiguous segment of
   sorted rows in a fixed order, then ``embed_avg = decay*embed_avg + (1-decay)*sums`` and
   ``embed = embed_avg / s`` with ``s = (cluster_size + eps) / (n + K*eps) * n``.

No float atomics, so two runs give bitwise-equal buffers. One program walks a whole segment, so a
code that takes most of the rows serialises them in one program (correct, slower); uniform-ish
assignments, the VQ case, keep segments short. ``deterministic=False`` scatters rows
with ``tl.atomic_add`` instead of sorting (float sums then depend on the order the atomics land).

For a distributed caller the same kernels run as three stages: ``ema_counts_sums`` (the embed
kernel in its sums-only mode), an all-reduce done by the caller, then ``ema_finish_``.
Everything accumulates in fp32.
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc


@triton.jit
def _ema_cluster_size_kernel(
    cs_ptr,
    offsets_ptr,
    counts_ptr,
    n_ptr,
    K,
    decay,
    FROM_OFFSETS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if FROM_OFFSETS:
            lo = tl.load(offsets_ptr + offs_k, mask=mask_k, other=0)
            hi = tl.load(offsets_ptr + offs_k + 1, mask=mask_k, other=0)
            counts = (hi - lo).to(tl.float32)
        else:
            counts = tl.load(counts_ptr + offs_k, mask=mask_k, other=0.0)
        cs = tl.load(cs_ptr + offs_k, mask=mask_k, other=0.0)
        cs = cs * decay + counts * (1.0 - decay)
        tl.store(cs_ptr + offs_k, cs, mask=mask_k)
        acc += tl.where(mask_k, cs, 0.0)
    tl.store(n_ptr, tl.sum(acc, axis=0))


@triton.jit
def _ema_embed_kernel(
    z_ptr,
    perm_ptr,
    offsets_ptr,
    sums_ptr,
    cs_ptr,
    n_ptr,
    embed_avg_ptr,
    embed_ptr,
    K,
    D,
    decay,
    eps,
    SORTED: tl.constexpr,
    FINISH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if SORTED:
        lo = tl.load(offsets_ptr + pid_k)
        hi = tl.load(offsets_ptr + pid_k + 1)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # The segment is visited in order and reduced by one fixed tree: the same bits every run.
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            rows = tl.load(perm_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
            x = tl.load(
                z_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
            )
            acc += x.to(tl.float32)
        total = tl.sum(acc, axis=0)
    else:
        total = tl.load(sums_ptr + pid_k * D + offs_d, mask=mask_d, other=0.0)
    if FINISH:
        cs = tl.load(cs_ptr + pid_k)
        n = tl.load(n_ptr)
        avg = tl.load(embed_avg_ptr + pid_k * D + offs_d, mask=mask_d, other=0.0)
        avg = avg * decay + total * (1.0 - decay)
        tl.store(embed_avg_ptr + pid_k * D + offs_d, avg, mask=mask_d)
        smoothed = (cs + eps) / (n + K * eps) * n
        # n = 0 makes every smoothed size 0: leave embed as it is (the masked-off load costs nothing otherwise)
        keep = (tl.zeros([BLOCK_D], dtype=tl.float32) + smoothed) <= 0.0
        old = tl.load(embed_ptr + pid_k * D + offs_d, mask=mask_d & keep, other=0.0).to(tl.float32)
        out = tl.where(keep, old, avg / smoothed)
        tl.store(embed_ptr + pid_k * D + offs_d, out.to(embed_ptr.dtype.element_ty), mask=mask_d)
    else:
        tl.store(sums_ptr + pid_k * D + offs_d, total, mask=mask_d)


@triton.jit
def _ema_scatter_kernel(z_ptr, idx_ptr, counts_ptr, sums_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    codes = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    mask = mask_n[:, None] & mask_d[None, :]
    x = tl.load(z_ptr + offs_n[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(sums_ptr + codes[:, None] * D + offs_d[None, :], x, mask=mask)
    if pid_d == 0:
        # Adding 1.0 is exact below 2**24 per code, so the counts do not depend on the order.
        tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_N], 1.0, tl.float32), mask=mask_n)


def _block_d(D):
    return min(128, max(16, triton.next_power_of_2(D)))


def _segments(indices, K):
    """Stable sort of ``indices`` and the ``[K + 1]`` bounds of each code's segment of sorted rows.

    The keys are sorted as int32 (codes and row counts are below 2**31): a radix sort then has half the
    passes of int64 keys, and a stable sort gives the same permutation for either width.
    """
    keys = indices.to(torch.int32) if K < 2**31 and indices.shape[0] < 2**31 else indices
    sorted_idx, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(K + 1, dtype=sorted_idx.dtype, device=indices.device)
    offsets = torch.searchsorted(sorted_idx, bounds)
    return perm, offsets


def _scatter(z, indices, K):
    N, D = z.shape
    counts = torch.zeros((K,), dtype=torch.float32, device=z.device)
    sums = torch.zeros((K, D), dtype=torch.float32, device=z.device)
    if N:
        BLOCK_N, BLOCK_D = 32, _block_d(D)
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
        _ema_scatter_kernel[grid](z, indices, counts, sums, N, D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return counts, sums


def ema_counts_sums(z, indices, K, deterministic=True):
    """Stage 1: per-code counts ``[K]`` and sums ``[K, D]`` (fp32) of ``z [N, D]`` (contiguous)."""
    N, D = z.shape
    if not deterministic:
        return _scatter(z, indices, K)
    perm, offsets = _segments(indices, K)
    counts = (offsets[1:] - offsets[:-1]).to(torch.float32)
    sums = _alloc.empty((K, D), torch.float32, z.device)
    BLOCK_D = _block_d(D)
    _ema_embed_kernel[(K, triton.cdiv(D, BLOCK_D))](
        z, perm, offsets, sums, sums, sums, sums, sums, K, D, 0.0, 1.0,
        SORTED=True, FINISH=False, BLOCK_N=16, BLOCK_D=BLOCK_D,
    )
    return counts, sums


def _finish(cluster_size, embed_avg, embed, z, perm, offsets, counts, sums, decay, eps):
    K, D = embed_avg.shape
    n = _alloc.empty((1,), torch.float32, cluster_size.device)
    from_offsets = counts is None
    _ema_cluster_size_kernel[(1,)](
        cluster_size, offsets if from_offsets else counts, counts if not from_offsets else offsets, n, K, decay,
        FROM_OFFSETS=from_offsets, BLOCK_K=1024,
    )
    BLOCK_D = _block_d(D)
    sorted_rows = sums is None
    _ema_embed_kernel[(K, triton.cdiv(D, BLOCK_D))](
        z if sorted_rows else sums, perm if sorted_rows else n, offsets if sorted_rows else n,
        embed_avg if sorted_rows else sums, cluster_size, n, embed_avg, embed, K, D, decay, eps,
        SORTED=sorted_rows, FINISH=True, BLOCK_N=16, BLOCK_D=BLOCK_D,
    )


def ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps):
    """Stage 3: decay, smoothing and normalisation from (all-reduced) fp32 ``counts`` and ``sums``."""
    _finish(cluster_size, embed_avg, embed, None, None, None, counts.contiguous(), sums.contiguous(), decay, eps)


def ema_update_fwd(cluster_size, embed_avg, embed, z, indices, decay, eps, deterministic=True):
    """Whole single-process update in place: sort + two launches (deterministic) or scatter + two."""
    K = cluster_size.shape[0]
    if not deterministic:
        counts, sums = _scatter(z, indices, K)
        ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)
        return
    perm, offsets = _segments(indices, K)
    _finish(cluster_size, embed_avg, embed, z, perm, offsets, None, None, decay, eps)
