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
assignments, the VQ case, keep segments short.

Scan path (``method="scan"``, or ``LGVQ_FAST_EMA_METHOD=scan`` for the op): the same sort, then programs over
fixed chunks of 256 sorted rows, whatever the codes: each loads its chunk once, sums every code's run of rows
with one segmented scan (``tl.associative_scan``, a fixed tree), and finishes the codes whose rows all lie in
the chunk; a code spanning chunks leaves one piece per chunk in a small ``[chunks, 2, D]`` buffer, which a
fix-up kernel (programs over blocks of 32 codes) sums in chunk order and finishes, with the codes that got no
rows. Bitwise deterministic too, and a code with half the rows costs one chunk's work per 256 of them. Not the
default until a GPU run measures it (``bench/ema.py`` row "triton deterministic scan", ``--skew``). ``deterministic=False`` scatters rows
with ``tl.atomic_add`` instead of sorting (float sums then depend on the order the atomics land).

For a distributed caller the same kernels run as three stages: ``ema_counts_sums`` (the embed
kernel in its sums-only mode), an all-reduce done by the caller, then ``ema_finish_``.
Everything accumulates in fp32.
"""
import os

import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc
from lgvq_fast._backend import triton_interpret as _interpret


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


@triton.jit
def _seg_combine(head_a, sum_a, head_b, sum_b):
    """Segmented-sum combine: a segment head on the right restarts the sum."""
    return head_a | head_b, tl.where(head_b, sum_b, sum_a + sum_b)


@triton.jit
def _finish_rows(total, code, row_mask, offs_d, mask_d, cs_ptr, n_ptr, embed_avg_ptr, embed_ptr, K, D, decay, eps):
    """Decay, smoothing and normalisation of the codes ``code [R]`` (rows where ``row_mask``) from their sums
    ``total [R, BLOCK_D]`` (as ``_ema_embed_kernel`` does for one code)."""
    mask = row_mask[:, None] & mask_d[None, :]
    where = code[:, None] * D + offs_d[None, :]
    cs = tl.load(cs_ptr + code, mask=row_mask, other=0.0)
    n = tl.load(n_ptr)
    avg = tl.load(embed_avg_ptr + where, mask=mask, other=0.0)
    avg = avg * decay + total * (1.0 - decay)
    tl.store(embed_avg_ptr + where, avg, mask=mask)
    smoothed = (cs + eps) / (n + K * eps) * n
    keep = (tl.zeros([1, 1], dtype=tl.float32) + smoothed[:, None]) <= 0.0
    old = tl.load(embed_ptr + where, mask=mask & keep, other=0.0).to(tl.float32)
    out = tl.where(keep, old, avg / smoothed[:, None])
    tl.store(embed_ptr + where, out.to(embed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema_chunk_kernel(
    z_ptr, perm_ptr, scode_ptr, offsets_ptr, carry_ptr, sums_ptr, cs_ptr, n_ptr, embed_avg_ptr, embed_ptr,
    N, K, D, decay, eps,
    FINISH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (c, d): sorted rows ``[c CHUNK, (c + 1) CHUNK)``, columns block d. One load of the chunk, a segmented
    scan over its rows (one fixed tree), then per segment: a code whose rows all lie in the chunk is finished
    (or its sums stored); a code that spans chunks leaves its piece in ``carry [chunks, 2, D]`` (slot 0: the
    chunk's first piece, begun in an earlier chunk; slot 1: the last piece, going on into the next)."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    pos = start + tl.arange(0, CHUNK)
    mask_p = pos < end
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    code = tl.load(scode_ptr + pos, mask=mask_p, other=-1).to(tl.int64)
    prev = tl.load(scode_ptr + pos - 1, mask=mask_p & (pos > start), other=-2).to(tl.int64)
    nxt = tl.load(scode_ptr + pos + 1, mask=mask_p & (pos + 1 < end), other=-3).to(tl.int64)
    head = code != prev
    tail = mask_p & (code != nxt)
    rows = tl.load(perm_ptr + pos, mask=mask_p, other=0).to(tl.int64)
    x = tl.load(z_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
    heads = (tl.zeros([CHUNK, BLOCK_D], dtype=tl.int32) + head.to(tl.int32)[:, None]) != 0
    _, seg = tl.associative_scan((heads, x.to(tl.float32)), axis=0, combine_fn=_seg_combine)
    safe = tl.where(tail, code, 0)
    lo = tl.load(offsets_ptr + safe, mask=tail, other=0)
    hi = tl.load(offsets_ptr + safe + 1, mask=tail, other=0)
    before = lo < start
    after = hi > end
    whole = tail & ~before & ~after
    if FINISH:
        _finish_rows(seg, safe, whole, offs_d, mask_d, cs_ptr, n_ptr, embed_avg_ptr, embed_ptr, K, D, decay, eps)
    else:
        tl.store(sums_ptr + safe[:, None] * D + offs_d[None, :], seg, mask=whole[:, None] & mask_d[None, :])
    slot = tl.where(after, 1, 0)
    part = tail & (before | after)
    tl.store(carry_ptr + (pid_c * 2 + slot)[:, None] * D + offs_d[None, :], seg,
             mask=part[:, None] & mask_d[None, :])


@triton.jit
def _ema_fixup_kernel(
    carry_ptr, offsets_ptr, sums_ptr, cs_ptr, n_ptr, embed_avg_ptr, embed_ptr,
    K, D, decay, eps,
    FINISH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (k, d): codes ``k BLOCK_K + [0, BLOCK_K)``, the ones ``_ema_chunk_kernel`` left. A code spanning
    chunks sums its pieces in chunk order (its first chunk's slot 1, the middle chunks' slot 1, its last chunk's
    slot 0); a code with no rows gets zero sums. The block's codes are contiguous in the sorted order, so their
    chunks form one range, walked once."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lo = tl.load(offsets_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    hi = tl.load(offsets_ptr + offs_k + 1, mask=mask_k, other=0).to(tl.int64)
    c0 = lo // CHUNK
    c1 = (hi - 1) // CHUNK
    span = mask_k & (hi > lo) & (c1 > c0)
    todo = span | (mask_k & (hi == lo))
    total = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    c_first = tl.min(tl.where(span, c0, 2**62), axis=0)
    c_last = tl.max(tl.where(span, c1, -1), axis=0)
    for c in range(c_first, c_last + 1):
        use = span & (c >= c0) & (c <= c1)
        slot = tl.where(c == c1, 0, 1)
        total += tl.load(carry_ptr + ((c * 2 + slot) * D)[:, None] + offs_d[None, :],
                         mask=use[:, None] & mask_d[None, :], other=0.0)
    if FINISH:
        _finish_rows(total, offs_k, todo, offs_d, mask_d, cs_ptr, n_ptr, embed_avg_ptr, embed_ptr, K, D, decay, eps)
    else:
        tl.store(sums_ptr + offs_k[:, None] * D + offs_d[None, :], total, mask=todo[:, None] & mask_d[None, :])


# Rows per program of the scan path: a 256 x 32 fp32 tile (32 KiB in registers over 8 warps; 64 columns spilled
# kilobytes per thread in the sm_90 compile of the finishing variant); the interpreter,
# which pays per step of the scan, takes 64-row chunks (more chunk crossings for the tests' small N).
SCAN_CHUNK = 64 if _interpret() else 256


def _scan_sorted(z, perm, scode, offsets, K, sums, finish_args):
    """The scan path over sorted rows: chunk kernel + fix-up kernel, finishing (``finish_args`` = (cs, n,
    embed_avg, embed, decay, eps)) or writing ``sums``."""
    N, D = z.shape
    BLOCK_D = min(_block_d(D), 32)
    chunks = triton.cdiv(N, SCAN_CHUNK)
    carry = torch.empty((max(chunks, 1), 2, D), dtype=torch.float32, device=z.device)
    finish = finish_args is not None
    cs, n, embed_avg, embed, decay, eps = finish_args if finish else (sums, sums, sums, sums, 0.0, 1.0)
    sums = carry if sums is None else sums  # a placeholder pointer: the finishing kernels never write sums
    if N:
        _ema_chunk_kernel[(chunks, triton.cdiv(D, BLOCK_D))](
            z, perm, scode, offsets, carry, sums, cs, n, embed_avg, embed, N, K, D, decay, eps,
            FINISH=finish, CHUNK=SCAN_CHUNK, BLOCK_D=BLOCK_D, num_warps=8,
        )
    _ema_fixup_kernel[(triton.cdiv(K, 32), triton.cdiv(D, BLOCK_D))](
        carry, offsets, sums, cs, n, embed_avg, embed, K, D, decay, eps,
        FINISH=finish, CHUNK=SCAN_CHUNK, BLOCK_K=32, BLOCK_D=BLOCK_D, num_warps=4,
    )


def _block_d(D):
    return min(128, max(16, triton.next_power_of_2(D)))


def _segments(indices, K, with_sorted=False):
    """Stable sort of ``indices`` and the ``[K + 1]`` bounds of each code's segment of sorted rows (and, with
    ``with_sorted``, the sorted codes).

    The keys are sorted as int32 (codes and row counts are below 2**31): a radix sort then has half the
    passes of int64 keys, and a stable sort gives the same permutation for either width.
    """
    keys = indices.to(torch.int32) if K < 2**31 and indices.shape[0] < 2**31 else indices
    sorted_idx, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(K + 1, dtype=sorted_idx.dtype, device=indices.device)
    offsets = torch.searchsorted(sorted_idx, bounds)
    if with_sorted:
        return perm, offsets, sorted_idx
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


def ema_counts_sums(z, indices, K, deterministic=True, method=None):
    """Stage 1: per-code counts ``[K]`` and sums ``[K, D]`` (fp32) of ``z [N, D]`` (contiguous). ``method``: the
    deterministic path, ``"segments"`` or ``"scan"`` (default ``DETERMINISTIC_METHOD``)."""
    N, D = z.shape
    if not deterministic:
        return _scatter(z, indices, K)
    method = _method(method)
    perm, offsets, scode = _segments(indices, K, with_sorted=True)
    counts = (offsets[1:] - offsets[:-1]).to(torch.float32)
    sums = _alloc.empty((K, D), torch.float32, z.device)
    if method == "scan":
        _scan_sorted(z, perm, scode, offsets, K, sums, None)
        return counts, sums
    BLOCK_D = _block_d(D)
    _ema_embed_kernel[(K, triton.cdiv(D, BLOCK_D))](
        z, perm, offsets, sums, sums, sums, sums, sums, K, D, 0.0, 1.0,
        SORTED=True, FINISH=False, BLOCK_N=16, BLOCK_D=BLOCK_D,
    )
    return counts, sums


def _finish(cluster_size, embed_avg, embed, z, perm, offsets, counts, sums, decay, eps, scode=None):
    K, D = embed_avg.shape
    n = _alloc.empty((1,), torch.float32, cluster_size.device)
    from_offsets = counts is None
    _ema_cluster_size_kernel[(1,)](
        cluster_size, offsets if from_offsets else counts, counts if not from_offsets else offsets, n, K, decay,
        FROM_OFFSETS=from_offsets, BLOCK_K=1024,
    )
    if scode is not None:  # the scan path over the sorted rows
        _scan_sorted(z, perm, scode, offsets, K, None, (cluster_size, n, embed_avg, embed, decay, eps))
        return
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


def ema_update_fwd(cluster_size, embed_avg, embed, z, indices, decay, eps, deterministic=True, method=None):
    """Whole single-process update in place: sort + two launches (deterministic; ``method="scan"``: sort + three)
    or scatter + two."""
    K = cluster_size.shape[0]
    if not deterministic:
        counts, sums = _scatter(z, indices, K)
        ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)
        return
    if _method(method) == "scan":
        perm, offsets, scode = _segments(indices, K, with_sorted=True)
        _finish(cluster_size, embed_avg, embed, z, perm, offsets, None, None, decay, eps, scode=scode)
        return
    perm, offsets = _segments(indices, K)
    _finish(cluster_size, embed_avg, embed, z, perm, offsets, None, None, decay, eps)


# The deterministic path the op uses: "segments" (one program per code and column block) until a GPU run shows
# "scan" (fixed chunks of sorted rows, a segmented scan, a fix-up for codes spanning chunks) at least as fast;
# LGVQ_FAST_EMA_METHOD=scan selects it. Both are bitwise deterministic; "scan" does not serialise a code that
# takes most of the rows.
DETERMINISTIC_METHOD = os.environ.get("LGVQ_FAST_EMA_METHOD", "segments")
METHODS = ("segments", "scan")


def _method(method):
    method = DETERMINISTIC_METHOD if method is None else method
    if method not in METHODS:
        raise ValueError(f"ema: deterministic method must be one of {METHODS}, got {method!r} "
                         f"(LGVQ_FAST_EMA_METHOD)")
    return method
