"""Certified exact nearest-code search: one fp16 product pass proves most rows; float64 re-scores the rest.

``nearest_code_certified(z, codebook, metric)`` returns the float64 argmin of every row (ties to the lowest
index) without computing every score in high precision:

1. **Prepare**: ``z`` and the codebook (for cos, the codebook normalised in float64) are rounded to fp16
   after scaling by powers of two -- per row of ``z``, one for the codebook -- and the size of what the rounding
   dropped is kept (rows: one Triton kernel, ``_prep_rows_kernel``, in scaled units, rounded up; codes: two
   Triton passes in float64 arithmetic for both levels at once, ``_code_stats_kernel`` and
   ``_code_prep_kernel``; ``_prepare_rows`` and ``_prepare_codes`` are the float64 PyTorch versions, which the
   tests hold the kernels to):
   ``rho = ||x - fp16(x * 2^s) * 2^-s||`` per row and per code, with the norms ``||z||``, ``||e||`` and, for
   l2, ``||e||^2`` in fp32.
2. **Search and certify** (Triton, ``_certify_kernel``): one fp16 x fp16 -> fp32 product pass, as fast mode,
   keeps per row the best low-precision score ``s1`` (lowest index on ties), the bound ``B1`` of its error, and
   ``L = min over every other code of (s_k - B_k)``. The row is *proven* when ``L > s1 + B1``: then every other
   code's true score exceeds the best's, so the low-precision argmin is the true one. ``B`` is a rigorous
   bound on ``|computed score - real score|`` from the measured rounding residuals, the norms and the fp32
   accumulation (derivation and constants: ``lgvq_fast/ops/NOTES.md``, "nearest_code: certified exact
   mode"); it is taken per tile of codes, as ``||z|| P_t + rho_z Q_t + R_t`` (the second level adds
   ``lam_z L_t``) with the tile's largest code
   terms, two FMAs per row and tile.
3. **Second level**: the unproven rows (compacted) are searched again with split-fp16 operands, ``hi + lo
   2^-12`` (three products, ``hi.hi + 2^-12 (hi.lo + lo.hi)``), whose residuals are about 2^-11 of the first
   level's, under the same certificate.
4. **Candidates** for what is still unproven (true ties and near-ties, duplicated codes): a second run of the
   split pass lists the codes whose lower bound ``s_k - B_k`` does not exceed the best's upper bound (the real
   argmin is among them; usually two or three), and float64 scores just those, lowest index first.
5. **Re-score** the rest -- rows with more than ``CAP`` candidates, rows too large for the scaled fp16 range --
   in float64 over the whole codebook (``_f64_search_kernel``, float64 FMAs: slow, for the rare rows no
   certificate settles), with the op's rule for non-finite values applied in fp32 terms.
6. **Distances** of the chosen codes in float64 (``||z - e||^2``, or ``1 - cos``), stored as fp32
   (``_distance_kernel``).

The result is the float64 argmin except where float64 itself ties (within its own rounding); it does not
depend on tile order, config or backend. Extra memory: fp16 copies of ``z`` and the codebook (2 (N + K) D
bytes), the split level's hi and lo copies (4 (N + K) D bytes: sized for every row, as the number of rows it
gets is known only on the device), ``[N, CAP]`` int32 candidate lists, and a few ``[N]`` and ``[K]`` vectors
(no float64 copy of ``z`` or of the codebook).

With ``LGVQ_FAST_NN_FAST_KERNEL=tma`` (or ``tma=True``) the passes read the fp16 operands through TMA
descriptors (rows of D rounded up to 8), as the fast mode's ``nearest_code_tma``; the arithmetic is the same.

No host sync: the rows each of steps 3 to 5 needs are compacted on the device (``_compact``: a cumulative sum
and a scatter), and every later kernel reads their count from device memory -- programs past it skip their
loops; ``_settle_kernel`` writes each level's results back to their rows -- so the call can be captured in a
CUDA graph once its kernels are compiled and tuned. The float64 steps
are Triton kernels too (``_f64_search_kernel``), reading the inputs' own values: no float64 copy of the
codebook is kept.

Status: a CPU-tested candidate for the exact mode (Triton interpreter), opted into with
``LGVQ_FAST_NN_EXACT_KERNEL=certified``; its GPU speed is unmeasured. ``bench/nn_search.py`` reports it with
the fraction of rows re-scored.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lgvq_fast import _alloc
from lgvq_fast._backend import env_flag, nn_fast_kernel, triton_interpret as _interpret
from lgvq_fast.kernels.nearest_code import _LOOPED_D_CONFIGS, _SMEM_BUDGET, COS_EPS, _config_key, _configs
from lgvq_fast.reference import nearest_code as _ref

# Unit roundoff of fp32 and the unit assumed for the product's fp32 accumulation: four times fp32's, a margin
# for tensor cores, which align the addends of one step before adding them (NOTES.md).
U32 = 2.0**-24
ACC_UNIT = 2.0**-22
# The bound as evaluated in fp32 (three roundings) is multiplied by this.
SAFETY = 1.0 + 2.0**-16
# Operands are scaled so that a row's (or the codebook's) largest magnitude lies in [2^14, 2^15): below
# fp16's 65504 after rounding, and as far from its subnormals as it allows.
_TOP_EXPONENT = 15
# Scale exponents stay within +-60, so the per-row factor 2^-(s_z + s_e) is a normal fp32. Values whose largest
# magnitude reaches 2^75 would overflow fp16 at the smallest scale: such rows (or a whole codebook) are not
# certified but re-scored.
_MAX_SHIFT = 60
_HUGE = 2.0**75
# Rows whose ||z|| ||e||max reaches 2^120 are re-scored: their products near fp32's overflow, where the rule
# (an overflowing score never wins) depends on rounding.
_PRODUCT_LIMIT = 2.0**120
# Covers fp32 underflow of a score term (absolute, far below anything that matters).
_ABS_FLOOR = 2.0**-140
COS_NORM_LIMIT = 2.0**126


def _prune(configs, named_args, **kwargs):
    """As the search kernel's pruning, for 2-byte operands: D chunks no wider than needed, tiles within shared
    memory, and for a D that needs several chunks only the configs that spill least."""
    args = {**named_args, **kwargs}
    D = args["D"]
    widest = max(16, triton.next_power_of_2(D))
    parts = 2 if args.get("SPLIT", False) else 1  # hi and lo tiles

    def smem(c):
        kw = c.kwargs
        staged = max(c.num_stages, 1) * (kw["BLOCK_N"] + kw["BLOCK_K"]) * kw["BLOCK_D"] * 2 * parts
        if args.get("USE_TMA", False) and args.get("COLLECT", False):
            # The collect pass through TMA keeps its staged tiles beside the candidate scratch (sm_90, Triton
            # 3.6: up to 1.7x the staged bytes, 240 KiB at 128 x 256 x 32); it sees only the rows the split level
            # left, so a generous bound that drops the largest tiles costs nothing that matters.
            return 2 * staged + 2 * kw["BLOCK_N"] * kw["BLOCK_K"]
        return staged

    kept = [c for c in configs
            if c.kwargs["BLOCK_D"] <= widest and smem(c) <= _SMEM_BUDGET
            and (D <= c.kwargs["BLOCK_D"] or _interpret() or _config_key(c) in _LOOPED_D_CONFIGS)]
    kept = kept or configs[:1]
    return kept if env_flag("LGVQ_FAST_TRITON_AUTOTUNE", default=True) else kept[:1]


_TWO_M12 = tl.constexpr(2.0**-12)


@triton.jit
def _prod(a, b, acc, EMULATE: tl.constexpr):
    """``acc + a b`` for fp16 tiles with fp32 accumulation (in the interpreter as fp32 values: the same exact
    products)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def _set_blocks(nargs):
    """With TMA (the operands given as descriptors) their block shapes follow the config."""
    if nargs.get("USE_TMA"):
        for name, rows in (("z_ptr", "BLOCK_N"), ("zl_ptr", "BLOCK_N"), ("e_ptr", "BLOCK_K"), ("el_ptr", "BLOCK_K")):
            nargs[name].block_shape = [nargs[rows], nargs["BLOCK_D"]]


def _hooked(configs):
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_blocks)
            for c in configs]


@triton.autotune(configs=_hooked(_configs()), key=["K", "D", "SPLIT", "COLLECT", "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"ONE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit
def _certify_kernel(
    z_ptr, zl_ptr, e_ptr, el_ptr, a_ptr, p_ptr, q_ptr, r_ptr, l_ptr, f_ptr, m_ptr, rho_ptr, lam_ptr, idx_ptr,
    proven_ptr, upper_ptr, cand_ptr, count_ptr, nlive_ptr,
    N, K, D,
    SAFETY_C: tl.constexpr,
    SPLIT: tl.constexpr,
    COLLECT: tl.constexpr,
    CAP: tl.constexpr,
    EMULATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    DEVICE_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
):
    """z [N, D] and e [K, D]: contiguous fp16 (scaled). Score of code k: ``a_k - acc * f_row`` with ``acc`` the
    fp32-accumulated product of the fp16 operands; with ``SPLIT`` the operands are ``hi + lo 2^-12`` (``zl``,
    ``el`` the lo parts) and ``acc = hi.hi + 2^-12 (hi.lo + lo.hi)``, three products. Writes the lowest-index
    minimum, whether it is proven and its upper bound ``s1 + B1``. With ``COLLECT`` (a second run over the
    same rows, given that upper bound in ``upper``) it also lists, in increasing order, the codes whose lower
    bound ``s_k - B_k`` does not exceed it -- the real argmin is among them -- up to ``CAP`` per row in ``cand``,
    and counts them all in ``count``.

    ``USE_TMA``: ``z_ptr``, ``zl_ptr``, ``e_ptr``, ``el_ptr`` are tensor descriptors of those operands (rows
    ``[BLOCK_N | BLOCK_K, BLOCK_D]``, zeros past D and past the rows), read by TMA on sm_90; otherwise pointers
    to contiguous ``[*, D]`` arrays.

    ``DEVICE_N``: only the first ``nlive[0]`` rows (a count on the device: no host sync, capturable) are live;
    programs past them skip the codebook loop and write nothing."""
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    if DEVICE_N:
        n_live = tl.load(nlive_ptr)
        k_end = tl.where(pid_n * BLOCK_N < n_live, K, 0)
    else:
        n_live = N
        k_end = K
    mask_n = offs_n < n_live
    offs_d = tl.arange(0, BLOCK_D)
    offs_kb = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        z_rows = z_ptr + offs_n[:, None] * D
        zl_rows = zl_ptr + offs_n[:, None] * D
    f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    rho = tl.load(rho_ptr + offs_n, mask=mask_n, other=0.0)
    lam = tl.load(lam_ptr + offs_n, mask=mask_n, other=0.0)
    row0 = pid_n * BLOCK_N
    if ONE_D_TILE:
        mask_d = offs_d < D
        if USE_TMA:
            z_tile = z_ptr.load([row0, 0])
            if SPLIT:
                zl_tile = zl_ptr.load([row0, 0])
        else:
            z_tile = tl.load(z_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if SPLIT:
                zl_tile = tl.load(zl_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    low = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    if COLLECT:
        upper = tl.load(upper_ptr + offs_n, mask=mask_n, other=float("-inf"))
        # float64's argmin may lie a float64 rounding above the real one: 2^-20 of the bound covers it
        upper = upper + tl.abs(upper) * 2.0**-20
        count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        if not USE_TMA:
            e_cols = e_ptr + offs_k.to(tl.int64)[None, :] * D
            el_cols = el_ptr + offs_k.to(tl.int64)[None, :] * D
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        mid = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_D_TILE:
            if USE_TMA:
                et = e_ptr.load([k0, 0]).T
            else:
                et = tl.load(e_cols + offs_d[:, None], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            acc = _prod(z_tile, et, acc, EMULATE)
            if SPLIT:
                if USE_TMA:
                    elt = el_ptr.load([k0, 0]).T
                else:
                    elt = tl.load(el_cols + offs_d[:, None], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
                mid = _prod(z_tile, elt, mid, EMULATE)
                mid = _prod(zl_tile, et, mid, EMULATE)
        else:
            for d0 in range(0, D, BLOCK_D):
                mask_d = (d0 + offs_d) < D
                if USE_TMA:
                    zt = z_ptr.load([row0, d0])
                    et = e_ptr.load([k0, d0]).T
                else:
                    zt = tl.load(z_rows + (d0 + offs_d)[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                    et = tl.load(e_cols + (d0 + offs_d)[:, None], mask=mask_d[:, None] & mask_k[None, :],
                                 other=0.0)
                acc = _prod(zt, et, acc, EMULATE)
                if SPLIT:
                    if USE_TMA:
                        zlt = zl_ptr.load([row0, d0])
                        elt = el_ptr.load([k0, d0]).T
                    else:
                        zlt = tl.load(zl_rows + (d0 + offs_d)[None, :], mask=mask_n[:, None] & mask_d[None, :],
                                      other=0.0)
                        elt = tl.load(el_cols + (d0 + offs_d)[:, None], mask=mask_d[:, None] & mask_k[None, :],
                                      other=0.0)
                    mid = _prod(zt, elt, mid, EMULATE)
                    mid = _prod(zlt, et, mid, EMULATE)
        if SPLIT:
            acc = acc + mid * _TWO_M12
        # a = ||e||^2 (l2) or 0 (cos); +inf for an excluded code and past K, so those score +inf.
        a = tl.load(a_ptr + offs_k, mask=mask_k, other=float("inf"))
        score = a[None, :] - acc * f[:, None]
        score = tl.where(score > float("-inf"), score, float("inf"))
        tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        second = tl.min(tl.where(offs_kb[None, :] == tile_arg[:, None], float("inf"), score), axis=1)
        # The tile's error bound per row: every code of the tile has B_k <= m P_t + rho Q_t + lam L_t + R_t
        # (lam, L: the split level's dropped lo.lo term; 0 in the fp16 pass).
        p_t = tl.max(tl.load(p_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        q_t = tl.max(tl.load(q_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        r_t = tl.max(tl.load(r_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        l_t = tl.max(tl.load(l_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        b_t = (m * p_t + rho * q_t + lam * l_t + r_t) * SAFETY_C
        better = tile_min < best
        # Whichever of (running best, tile best) loses joins the other codes' lower bound; an excluded score
        # (+inf) stays +inf (never inf - inf).
        tile_low = tl.where(tile_min < float("inf"), tile_min - b_t, float("inf"))
        second_low = tl.where(second < float("inf"), second - b_t, float("inf"))
        loser_low = tl.where(better, best - best_b, tile_low)
        low = tl.minimum(low, tl.minimum(loser_low, second_low))
        best_b = tl.where(better, b_t, best_b)
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, k0 + tile_arg.to(tl.int64), best_idx)
        if COLLECT:
            hit = ((score - b_t[:, None]) <= (upper + b_t * 2.0**-20)[:, None]) & (score < float("inf"))
            hit = hit & mask_k[None, :]
            pos = count[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
            tl.store(cand_ptr + offs_n[:, None] * CAP + pos, (k0 + offs_kb)[None, :].to(tl.int32),
                     mask=hit & (pos < CAP) & mask_n[:, None])
            count += tl.sum(hit.to(tl.int32), axis=1)

    if COLLECT:
        tl.store(count_ptr + offs_n, count, mask=mask_n)
    else:
        tl.store(upper_ptr + offs_n, best + best_b, mask=mask_n)
    proven = low > best + best_b
    tl.store(idx_ptr + offs_n, best_idx, mask=mask_n)
    tl.store(proven_ptr + offs_n, proven.to(tl.int8), mask=mask_n)


@triton.jit
def _pow2(e):
    """``2^e`` as an exact fp32 for an int32 ``e`` in [-126, 127], built from its bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _prep_rows_kernel(
    z_ptr, sel_ptr, nsel_ptr, se_ptr, codes_ok_ptr, nmax_ptr, hi_ptr, lo_ptr, f_ptr, m_ptr, rho_ptr, lam_ptr,
    bad_ptr, force_ptr, N, D, stride_n, stride_d, pitch,
    C: tl.constexpr, IS_COS: tl.constexpr, SPLIT: tl.constexpr, SELECT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Step 1 for the rows, fused (``_prepare_rows`` does the same in float64 PyTorch passes). Per row: the scale
    exponent ``s`` (largest finite magnitude to [2^14, 2^15), clamped to +-60), ``hi = fp16(z 2^s)`` (and with
    ``SPLIT`` ``lo = fp16((z 2^s - hi) 2^12)``), and upper bounds of ``||z||``, the residual norm and ``||lo||
    2^-12 2^-s``, all taken in scaled units (no fp32 under- or overflow) and rounded up; ``hi`` and ``lo`` rows
    ``pitch`` elements apart (D, or D rounded up to 8 for TMA). With the codebook's exponent ``s_e``, whether it
    fits the scaled range (``codes_ok``) and its largest norm ``n_max`` (read on the device): the row factor
    ``f = C 2^-(s + s_e)``, ``bad`` (no finite score: a NaN or inf; cos: norm >= 2^126) and ``force`` (not bad,
    but no pass can certify it: too large for the scaled range, ``||z|| n_max >= 2^120``, a non-finite bound, or
    a codebook out of range), with the bounds zeroed for both. ``SELECT``: output row ``j`` is row ``sel[j]`` of ``z``, for ``j < nsel[0]`` (a count on the device, so
    no host sync); later outputs are not written."""
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if SELECT:
        mask_r = pos < tl.load(nsel_ptr)
        rows_in = tl.load(sel_ptr + pos, mask=mask_r, other=0).to(tl.int64)
    else:
        mask_r = pos < N
        rows_in = pos
    offs_d = tl.arange(0, BLOCK_D)
    base = z_ptr + rows_in[:, None] * stride_n
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    sq_lo = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = mask_r[:, None] & ((d0 + offs_d) < D)[None, :]
        x = tl.load(base + (d0 + offs_d)[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")  # False for NaN too
        bad = tl.maximum(bad, tl.max((~finite & mask).to(tl.int32), axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(finite, tl.abs(x), 0.0), axis=1))
        if IS_COS:  # the norm only to compare with 2^126 (two sums: no overflow)
            sq += tl.sum(x * x, axis=1)
            x = x * 2.0**-64
            sq_lo += tl.sum(x * x, axis=1)
    if IS_COS:
        norm = tl.where(sq < float("inf"), tl.sqrt(sq), tl.sqrt(sq_lo) * 2.0**64)
        bad = tl.where(norm >= 2.0**126, 1, bad)
    expo = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)
    s = tl.minimum(tl.maximum(141 - expo, -60), 60)
    big = amax >= 2.0**75
    scale = _pow2(s)
    inv = _pow2(-s)
    zero_row = (bad != 0)[:, None]
    ssq = tl.zeros([BLOCK_R], dtype=tl.float32)
    rsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    lsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask = mask_r[:, None] & (cols < D)[None, :]
        x = tl.load(base + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(zero_row, 0.0, x * scale[:, None])
        hi = xs.to(tl.float16)
        approx = hi.to(tl.float32)
        if SPLIT:
            lo = ((xs - approx) * 4096.0).to(tl.float16)
            lo32 = lo.to(tl.float32) * (1.0 / 4096.0)
            approx = approx + lo32
            lsq += tl.sum(lo32 * lo32, axis=1)
            tl.store(lo_ptr + pos[:, None] * pitch + cols[None, :], lo, mask=mask)
        r = xs - approx
        rsq += tl.sum(r * r, axis=1)
        ssq += tl.sum(xs * xs, axis=1)
        tl.store(hi_ptr + pos[:, None] * pitch + cols[None, :], hi, mask=mask)
    # sums of D squares carry at most (D + 2) u of relative error, a root halves it; x * 2^s may lose up to 2^-150
    # per element where it underflows (s < 0): an absolute sqrt(D) 2^-150 in scaled units
    up = 1.0 + (D + 4) * 2.0**-24
    floor = tl.sqrt(D * 1.0) * 2.0**-150
    m = (tl.sqrt(ssq) * up + floor) * inv
    rho = (tl.sqrt(rsq) * up + floor) * inv
    lam = tl.sqrt(lsq) * up * inv
    is_bad = bad != 0
    force = big | (tl.load(codes_ok_ptr) == 0) | (m.to(tl.float64) * tl.load(nmax_ptr) >= 2.0**120)  # _PRODUCT_LIMIT
    force = (force | ~(m < float("inf")) | ~(rho < float("inf")) | ~(lam < float("inf"))) & ~is_bad
    skip = force | is_bad
    tl.store(f_ptr + pos, C * _pow2(-(s + tl.load(se_ptr).to(tl.int32))), mask=mask_r)
    tl.store(m_ptr + pos, tl.where(skip, 0.0, m), mask=mask_r)
    tl.store(rho_ptr + pos, tl.where(skip, 0.0, rho), mask=mask_r)
    tl.store(lam_ptr + pos, tl.where(skip, 0.0, lam), mask=mask_r)
    tl.store(bad_ptr + pos, is_bad.to(tl.int8), mask=mask_r)
    tl.store(force_ptr + pos, force.to(tl.int8), mask=mask_r)


def _round_up_f32(x64):
    """float64 -> fp32 rounded towards +inf (for upper bounds)."""
    x32 = x64.to(torch.float32)
    return torch.where(x32.to(torch.float64) < x64, torch.nextafter(x32, torch.full_like(x32, float("inf"))), x32)


def _scale_exponent(amax):
    """Per entry of ``amax`` (float64, >= 0): ``s`` with ``amax * 2^s`` in [2^14, 2^15), clamped to +-60."""
    _, ex = torch.frexp(amax)
    return (_TOP_EXPONENT - ex).clamp(-_MAX_SHIFT, _MAX_SHIFT)


def _to_scaled_half(x64, s, split=False):
    """``(hi, lo, rho, lam)``: ``hi = fp16(x 2^s)``; with ``split`` also ``lo = fp16((x 2^s - hi) 2^12)`` (the
    remainder, at most half an ulp of ``hi < 2^15``, so ``|lo| <= 2^15``), else ``lo = None``. ``rho`` is the
    exact residual norm ``||x - (hi + lo 2^-12) 2^-s||`` and ``lam = ||lo|| 2^-12 2^-s`` (0 without split), both
    float64."""
    xs = torch.ldexp(x64, s)
    hi = xs.to(torch.float16)
    approx = hi.to(torch.float64)
    lo, lam = None, torch.zeros(x64.shape[:-1], dtype=torch.float64, device=x64.device)
    if split:
        lo = torch.ldexp(xs - approx, torch.full_like(s, 12)).to(torch.float16)
        lo64 = torch.ldexp(lo.to(torch.float64), torch.full_like(s, -12))
        approx = approx + lo64
        lam = torch.ldexp(lo64, -s).norm(dim=-1)
    resid = x64 - torch.ldexp(approx, -s)
    return hi, lo, resid.norm(dim=-1), lam


def _bound_terms(n, rho_e, lam_e, D, c, split):
    """Per code: ``P, Q, R, L`` (float64) with ``B_k <= ||z|| P + rho_z Q + lam_z L + R`` (NOTES.md); ``L = c lam_e``
    covers the split level's dropped lo.lo product (0 without split)."""
    terms = 2 * D if split else D
    gamma = terms * ACC_UNIT / (1.0 - terms * ACC_UNIT)
    if split:  # the hi.hi and the 2^-12-scaled mixed products' magnitudes, and one more rounding
        gamma *= 1.0 + 2.0**-9
    rounds = 5.0 if split else 4.0
    g = c * (gamma + rounds * U32 * (1.0 + gamma))
    t = n + rho_e
    P = c * rho_e + g * t
    Q = c * n + 3.0 * c * rho_e + g * t
    R = rounds * U32 * (1.0 + U32) * n * n + _ABS_FLOOR
    return P, Q, R, c * lam_e


def _prepare_codes(codebook, metric, split=False):
    """fp16 scaled codes (hi, and lo with ``split``) and the per-code terms; also the float64 codebook the
    re-scoring uses (codes the fp32 rule excludes set to NaN, so the float64 reference excludes them too)."""
    D = codebook.shape[1]
    c = 1.0 if metric == "cos" else 2.0
    e64 = codebook.to(torch.float64)
    valid = torch.isfinite(e64).all(dim=1)
    if metric == "cos":
        norm = e64.nan_to_num(0.0, 0.0, 0.0).norm(dim=1)
        valid &= norm < COS_NORM_LIMIT
        src = e64 / norm.clamp_min(COS_EPS)[:, None]
        a = torch.zeros_like(norm)
    else:
        src = e64
        a = e64.nan_to_num(0.0, 0.0, 0.0).pow(2).sum(dim=1)
        valid &= torch.isfinite(a.to(torch.float32))
    src = torch.where(valid[:, None], src, 0.0)
    amax = src.abs().amax() if src.numel() else src.new_zeros(())
    s_e = _scale_exponent(amax)
    e16, el16, rho_e, lam_e = _to_scaled_half(src, s_e, split)
    n = src.norm(dim=1)
    P, Q, R, L = _bound_terms(n, rho_e, lam_e, D, c, split)
    zero = torch.zeros_like(n)
    P, Q, R, L = (torch.where(valid, v, zero) for v in (P, Q, R, L))
    a32 = torch.where(valid, a.to(torch.float32), float("inf"))
    n_max = torch.where(valid, n, zero).amax() if n.numel() else zero.sum()
    # the float64 searches' per-code terms (_f64_search_kernel): score a64 - c w64 (z . e)
    a64 = torch.where(valid, a, float("inf")).contiguous()
    w64 = (1.0 / norm.clamp_min(COS_EPS) if metric == "cos" else torch.ones_like(a)).contiguous()
    return dict(e16=e16.contiguous(), el16=el16.contiguous() if split else e16, split=split,
                a=a32.contiguous(), P=_round_up_f32(P), Q=_round_up_f32(Q),
                R=_round_up_f32(R), L=_round_up_f32(L), s_e=s_e, n_max=n_max, codes_ok=amax < _HUGE,
                a64=a64, w64=w64, valid=valid, c=c)


def _rows_per_program():
    """Rows (or codes) per program of the row-wise kernels: 16 on a GPU; 128 in the CPU interpreter, whose cost is
    per program and per operation (each row's result does not depend on it)."""
    return 128 if _interpret() else 16


@triton.jit
def _rows64(ptr, rows, live, cols, D, stride_r, stride_d):
    """The float64 tile ``x[rows, cols]`` of a strided ``[*, D]`` array (zeros outside ``live`` rows and D)."""
    mask = live[:, None] & (cols < D)[None, :]
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def _round_up_to_f32(x):
    """float64 ``x >= 0`` -> the smallest fp32 not below it."""
    y = x.to(tl.float32)
    up = (y.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    return tl.where(y.to(tl.float64) < x, up, y)


@triton.jit
def _code_stats_kernel(
    e_ptr, valid_ptr, div_ptr, amax_ptr, a64_ptr, w64_ptr, K, D, stride_k, stride_d,
    IS_COS: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step 1 for the codes, first read (float64, as ``_prepare_codes``): per code whether the rule keeps it (no
    NaN or inf; cos: norm < 2^126; l2: ``||e||^2`` finite in fp32), the divisor that normalises it (cos:
    ``max(||e||, eps)``; l2: 1), the largest magnitude of the code as searched (0 for an excluded code), and the
    float64 searches' terms ``a64`` (l2 ``||e||^2``, cos 0; +inf when excluded) and ``w64`` (``1 / divisor``)."""
    pid = tl.program_id(0)
    codes = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = codes < K
    offs_d = tl.arange(0, BLOCK_D)
    finite = mask_r
    sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    amax = tl.zeros([BLOCK_R], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        x = _rows64(e_ptr, codes, mask_r, d0 + offs_d, D, stride_k, stride_d)
        ok = tl.abs(x) < float("inf")  # False for NaN too
        finite = finite & (tl.min(ok.to(tl.int32), axis=1) != 0)
        x = tl.where(ok, x, 0.0)
        sq += tl.sum(x * x, axis=1)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    if IS_COS:
        norm = tl.sqrt(sq)
        valid = finite & (norm < 2.0**126)
        div = tl.maximum(norm, EPS)
        a64 = tl.where(valid, 0.0, float("inf"))
        amax = amax / div
    else:
        valid = finite & (sq.to(tl.float32) < float("inf"))
        div = tl.full([BLOCK_R], 1.0, dtype=tl.float64)
        a64 = tl.where(valid, sq, float("inf"))
    tl.store(valid_ptr + codes, valid.to(tl.int8), mask=mask_r)
    tl.store(div_ptr + codes, div, mask=mask_r)
    tl.store(amax_ptr + codes, tl.where(valid, amax, 0.0), mask=mask_r)
    tl.store(a64_ptr + codes, a64, mask=mask_r)
    tl.store(w64_ptr + codes, 1.0 / div, mask=mask_r)


@triton.jit
def _code_level_terms(n, rho, lam, D, C: tl.constexpr, SPLIT: tl.constexpr):
    """``_bound_terms`` in float64 for one level: ``(P, Q, R, L)``."""
    acc = (tl.zeros_like(n) + (2 * D if SPLIT else D)) * 2.0**-22
    gamma = acc / (1.0 - acc)
    rounds = 5.0 if SPLIT else 4.0
    if SPLIT:
        gamma = gamma + gamma * 2.0**-9
    g = C * (gamma + rounds * 2.0**-24 * (1.0 + gamma))
    t = n + rho
    P = C * rho + g * t
    Q = C * n + 3.0 * C * rho + g * t
    R = (rounds * 2.0**-24) * (n * n + n * n * 2.0**-24) + 2.0**-140
    return P, Q, R, C * lam


@triton.jit
def _code_prep_kernel(
    e_ptr, valid_ptr, div_ptr, s_ptr, hi_ptr, lo_ptr, n_ptr, terms_ptr, K, D, stride_k, stride_d, pitch,
    C: tl.constexpr, IS_COS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step 1 for the codes, second read, both levels at once (float64, as ``_prepare_codes``): the code as
    searched ``x`` (normalised for cos; zeros when excluded) scaled by ``2^s`` (``s`` read on the device),
    ``hi = fp16(x 2^s)`` and ``lo = fp16((x 2^s - hi) 2^12)`` (each rounded through fp32, as PyTorch converts),
    ``||x||`` and each level's bound terms rounded up to fp32 into ``terms [7, K]``: ``P, Q, R`` of the fp16
    pass, then ``P, Q, R, L`` of the split level (zeros for an excluded code)."""
    pid = tl.program_id(0)
    codes = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = codes < K
    offs_d = tl.arange(0, BLOCK_D)
    valid = tl.load(valid_ptr + codes, mask=mask_r, other=0) != 0
    div = tl.load(div_ptr + codes, mask=mask_r, other=1.0)
    s = tl.load(s_ptr).to(tl.int64)
    scale = ((s + 1023) << 52).to(tl.float64, bitcast=True)
    inv = ((1023 - s) << 52).to(tl.float64, bitcast=True)
    nsq = tl.zeros([BLOCK_R], dtype=tl.float64)
    r1sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    r2sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    lsq = tl.zeros([BLOCK_R], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask = mask_r[:, None] & (cols < D)[None, :]
        x = _rows64(e_ptr, codes, mask_r, cols, D, stride_k, stride_d)
        if IS_COS:
            x = x / div[:, None]
        x = tl.where(valid[:, None], x, 0.0)
        xs = x * scale
        hi = xs.to(tl.float32).to(tl.float16)
        h64 = hi.to(tl.float64)
        lo = ((xs - h64) * 4096.0).to(tl.float32).to(tl.float16)
        l64 = lo.to(tl.float64) * (1.0 / 4096.0)
        r1 = x - h64 * inv
        r2 = x - (h64 + l64) * inv
        lam = l64 * inv
        nsq += tl.sum(x * x, axis=1)
        r1sq += tl.sum(r1 * r1, axis=1)
        r2sq += tl.sum(r2 * r2, axis=1)
        lsq += tl.sum(lam * lam, axis=1)
        tl.store(hi_ptr + codes[:, None] * pitch + cols[None, :], hi, mask=mask)
        tl.store(lo_ptr + codes[:, None] * pitch + cols[None, :], lo, mask=mask)
    n = tl.sqrt(nsq)
    tl.store(n_ptr + codes, n, mask=mask_r)
    P1, Q1, R1, _ = _code_level_terms(n, tl.sqrt(r1sq), tl.zeros_like(n), D, C, False)
    P2, Q2, R2, L2 = _code_level_terms(n, tl.sqrt(r2sq), tl.sqrt(lsq), D, C, True)
    row = terms_ptr + codes
    tl.store(row, tl.where(valid, _round_up_to_f32(P1), 0.0), mask=mask_r)
    tl.store(row + K, tl.where(valid, _round_up_to_f32(Q1), 0.0), mask=mask_r)
    tl.store(row + 2 * K, tl.where(valid, _round_up_to_f32(R1), 0.0), mask=mask_r)
    tl.store(row + 3 * K, tl.where(valid, _round_up_to_f32(P2), 0.0), mask=mask_r)
    tl.store(row + 4 * K, tl.where(valid, _round_up_to_f32(Q2), 0.0), mask=mask_r)
    tl.store(row + 5 * K, tl.where(valid, _round_up_to_f32(R2), 0.0), mask=mask_r)
    tl.store(row + 6 * K, tl.where(valid, _round_up_to_f32(L2), 0.0), mask=mask_r)


def _prepare_codes_fused(codebook, metric, pitch=None):
    """``_prepare_codes`` for both levels in two Triton passes over the codebook (float64 arithmetic) and a few
    [K] PyTorch operations, no host sync: ``(level 1, level 2)``, dicts with the keys of ``_prepare_codes``
    (without ``split=False``'s ``el16``: it is the split level's) sharing their tensors. ``pitch``: the fp16
    rows' pitch (default D; TMA wants a multiple of 8)."""
    K, D = codebook.shape
    dev = codebook.device
    c = 1.0 if metric == "cos" else 2.0
    pitch = pitch or D
    valid8 = torch.empty((K,), dtype=torch.int8, device=dev)
    div, amax_k, a64, w64, n = (torch.empty((K,), dtype=torch.float64, device=dev) for _ in range(5))
    BLOCK_R, BLOCK_D = _rows_per_program(), min(64, max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(K, BLOCK_R),)
    _code_stats_kernel[grid](codebook, valid8, div, amax_k, a64, w64, K, D, codebook.stride(0), codebook.stride(1),
                             IS_COS=metric == "cos", EPS=COS_EPS, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    valid = valid8 != 0
    amax = amax_k.amax()
    s_e = _scale_exponent(amax)
    e16 = _pitched_half(K, D, pitch, dev)
    el16 = _pitched_half(K, D, pitch, dev)
    terms = torch.empty((7, K), dtype=torch.float32, device=dev)
    _code_prep_kernel[grid](codebook, valid8, div, s_e.reshape(1), e16, el16, n, terms, K, D, codebook.stride(0),
                            codebook.stride(1), pitch, C=c, IS_COS=metric == "cos", BLOCK_R=BLOCK_R,
                            BLOCK_D=BLOCK_D)
    a32 = a64.to(torch.float32)
    n_max = torch.where(valid, n, 0.0).amax()
    shared = dict(e16=e16, a=a32, s_e=s_e, n_max=n_max, codes_ok=amax < _HUGE, a64=a64, w64=w64, valid=valid, c=c)
    level1 = dict(shared, el16=e16, split=False, P=terms[0], Q=terms[1], R=terms[2], L=torch.zeros_like(a32))
    level2 = dict(shared, el16=el16, split=True, P=terms[3], Q=terms[4], R=terms[5], L=terms[6])
    return level1, level2


def _prepare_rows(z, metric, codes):
    """fp16 scaled rows, the row factor ``c 2^-(s_z + s_e)``, ``||z||`` and ``rho_z`` (fp32, rounded up), the
    rows with no finite score under the rule, and the rows that must be re-scored whatever pass 1 finds."""
    z64 = z.to(torch.float64)
    finite = torch.isfinite(z64).all(dim=1)
    zf = torch.where(finite[:, None], z64, 0.0)
    norm = zf.norm(dim=1)
    bad = ~finite
    if metric == "cos":
        bad |= norm >= COS_NORM_LIMIT
        zf = torch.where(bad[:, None], 0.0, zf)
        norm = torch.where(bad, 0.0, norm)
    amax = zf.abs().amax(dim=1)
    s_z = _scale_exponent(amax)
    z16, zl16, rho, lam = _to_scaled_half(zf, s_z[:, None], codes["split"])
    f = torch.ldexp(torch.full_like(norm, codes["c"]), -(s_z + codes["s_e"])).to(torch.float32)
    m32, rho32, lam32 = _round_up_f32(norm), _round_up_f32(rho), _round_up_f32(lam)
    force = (amax >= _HUGE) | ~codes["codes_ok"] | (norm * codes["n_max"] >= _PRODUCT_LIMIT)
    force |= ~torch.isfinite(m32) | ~torch.isfinite(rho32) | ~torch.isfinite(lam32)
    force &= ~bad
    zero = torch.zeros_like(m32)
    m32, rho32, lam32 = (torch.where(force, zero, v) for v in (m32, rho32, lam32))
    return dict(z16=z16.contiguous(), zl16=zl16.contiguous() if codes["split"] else z16,
                f=f.contiguous(), m=m32.contiguous(), rho=rho32.contiguous(), lam=lam32.contiguous(), bad=bad,
                force=force, z64=z64)


def _pitched_half(rows, D, pitch, device):
    """An fp16 ``[rows, D]`` view whose rows lie ``pitch`` elements apart (pitch > D: TMA's 16-byte rows)."""
    return torch.empty((rows, pitch), dtype=torch.float16, device=device)[:, :D]


def _prepare_rows_fused(z, metric, codes, pitch=None, select=None):
    """``_prepare_rows`` in one Triton kernel (two reads of z) and a few [N] PyTorch operations; the same keys
    but ``z64`` (the float64 steps convert the rows they need). ``pitch``: the fp16 rows' pitch (default D).
    ``select = (sel, n)`` (``_compact``'s result): prepare rows ``z[sel[j]]`` for ``j < n`` into ``[len(sel)]``
    outputs, reading ``n`` on the device; entries from ``n`` on are left unwritten."""
    N, D = z.shape
    sel, nsel = select if select is not None else (z, z)  # unused pointers without SELECT
    if select is not None:
        N = sel.shape[0]
    split = codes["split"]
    pitch = pitch or D
    z16 = _pitched_half(N, D, pitch, z.device)
    zl16 = _pitched_half(N, D, pitch, z.device) if split else z16
    f, m, rho, lam = (torch.empty((N,), dtype=torch.float32, device=z.device) for _ in range(4))
    bad, force = (torch.empty((N,), dtype=torch.int8, device=z.device) for _ in range(2))
    BLOCK_D = min(128, max(16, triton.next_power_of_2(D)))
    BLOCK_R = _rows_per_program()
    _prep_rows_kernel[(triton.cdiv(N, BLOCK_R),)](
        z, sel, nsel, codes["s_e"], codes["codes_ok"], codes["n_max"], z16, zl16, f, m, rho, lam, bad, force, N, D,
        z.stride(0), z.stride(1), pitch, C=codes["c"], IS_COS=metric == "cos", SPLIT=split,
        SELECT=select is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return dict(z16=z16, zl16=zl16, f=f, m=m, rho=rho, lam=lam, bad=bad.view(torch.bool), force=force.view(torch.bool))


@triton.jit
def _normaliser(ptr, rows, live, D, stride_r, stride_d, EPS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Per row, ``(amax, div)`` with ``x / amax / div`` the row normalised as
    ``lgvq_fast.reference.nearest_code._normalize`` does (largest magnitude first, then ``max(norm, eps / amax)``),
    in float64."""
    offs_d = tl.arange(0, BLOCK_D)
    amax = tl.zeros([BLOCK_R], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        amax = tl.maximum(amax, tl.max(tl.abs(_rows64(ptr, rows, live, d0 + offs_d, D, stride_r, stride_d)), axis=1))
    amax = tl.where(amax > 0, amax, 1.0)
    sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        x = _rows64(ptr, rows, live, d0 + offs_d, D, stride_r, stride_d) / amax[:, None]
        sq += tl.sum(x * x, axis=1)
    return amax, tl.maximum(tl.sqrt(sq), EPS / amax)


@triton.jit
def _distance_kernel(
    z_ptr, e_ptr, idx_ptr, valid_ptr, out_ptr, N, D, stride_zn, stride_zd, stride_ek, stride_ed,
    IS_COS: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step 6: per row, the float64 distance to its chosen code ``idx`` (``||z - e||^2``, or ``1 - cos`` of the two
    normalised as ``_normaliser`` says), stored as fp32; a code the rule excludes (``valid`` 0) counts as zeros."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    k = tl.load(idx_ptr + rows, mask=mask_r, other=0)
    live = mask_r & (tl.load(valid_ptr + k, mask=mask_r, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    if IS_COS:
        z_max, z_div = _normaliser(z_ptr, rows, mask_r, D, stride_zn, stride_zd, EPS, BLOCK_R, BLOCK_D)
        e_max, e_div = _normaliser(e_ptr, k, live, D, stride_ek, stride_ed, EPS, BLOCK_R, BLOCK_D)
    acc = tl.zeros([BLOCK_R], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        zt = _rows64(z_ptr, rows, mask_r, d0 + offs_d, D, stride_zn, stride_zd)
        et = _rows64(e_ptr, k, live, d0 + offs_d, D, stride_ek, stride_ed)
        if IS_COS:
            acc += tl.sum((zt / z_max[:, None] / z_div[:, None]) * (et / e_max[:, None] / e_div[:, None]), axis=1)
        else:
            acc += tl.sum((zt - et) * (zt - et), axis=1)
    dist = 1.0 - acc if IS_COS else acc
    tl.store(out_ptr + rows, dist.to(tl.float32), mask=mask_r)


def _final_distances(z, codebook, valid, idx, metric):
    """Step 6 (``_distance_kernel``): the float64 distance of each row's chosen code, as fp32."""
    N, D = z.shape
    out = torch.empty((N,), dtype=torch.float32, device=z.device)
    BLOCK_R, BLOCK_D = _rows_per_program(), min(64, max(16, triton.next_power_of_2(D)))
    _distance_kernel[(triton.cdiv(N, BLOCK_R),)](
        z, codebook, idx, valid.to(torch.int8), out, N, D, z.stride(0), z.stride(1), codebook.stride(0),
        codebook.stride(1), IS_COS=metric == "cos", EPS=COS_EPS, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out


CAP = 16  # candidates listed per row by the collect pass; a row with more is re-scored against every code


def use_tma(device):
    """Whether the certify passes read their operands through TMA descriptors: with
    ``LGVQ_FAST_NN_FAST_KERNEL=tma`` (sm_90+, or the CPU interpreter), as the fast mode."""
    return nn_fast_kernel(device) == "tma"


def _descriptor(x):
    """A TMA descriptor of the fp16 rows ``x [R, D]`` (pitch a multiple of 8; the block shape is the config's,
    set by ``_set_blocks``)."""
    if x.stride(0) % 8 or x.data_ptr() % 16:
        padded = _pitched_half(x.shape[0], x.shape[1], triton.cdiv(x.shape[1], 8) * 8, x.device)
        padded.copy_(x)
        x = padded
    return TensorDescriptor.from_tensor(x, [16, 16])


def certify_pass(z, codebook, metric, indices, config=None, codes=None, split=False, upper=None, tma=None,
                 select=None):
    """Steps 1 and 2 (``split``: the second level's three-product pass): prepares the operands (the codebook's
    unless ``codes`` gives them, prepared with the same ``split``) and runs ``_certify_kernel``, writing its
    argmin into ``indices``; returns ``(codes, rows, proven int8 [N], upper fp32 [N])``. Given ``upper`` (a
    previous run's upper bounds for the same rows and ``split``), it runs the collect pass instead and returns
    ``(codes, rows, candidates int32 [N, CAP], counts int32 [N])``. ``tma`` (default ``use_tma``): read the
    operands through TMA descriptors (rows of D rounded up to 8). ``select = (sel, n)`` (``_compact``'s
    result): the pass runs on rows ``z[sel[j]]``, ``j < n``, with ``n`` read on the device; every array above
    is then ``[len(sel)]`` and holds nothing from ``n`` on."""
    D = z.shape[1]
    N = z.shape[0] if select is None else select[0].shape[0]
    K = codebook.shape[0]
    tma = use_tma(z.device) if tma is None else tma
    if codes is None:
        codes = _prepare_codes_fused(codebook, metric, pitch=triton.cdiv(D, 8) * 8 if tma else None)[int(split)]
    assert codes["split"] == split
    rows = _prepare_rows_fused(z, metric, codes, pitch=triton.cdiv(D, 8) * 8 if tma else None, select=select)
    proven8 = torch.empty((N,), dtype=torch.int8, device=z.device)
    collect = upper is not None
    if collect:
        cand = torch.empty((N, CAP), dtype=torch.int32, device=z.device)
        count = torch.empty((N,), dtype=torch.int32, device=z.device)
    else:
        upper = torch.empty((N,), dtype=torch.float32, device=z.device)
        cand = count = proven8
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    operands = [rows["z16"], rows["zl16"], codes["e16"], codes["el16"]]
    if tma:
        if "e16_tma" not in codes:  # the codebook's descriptors, made once per prepared codebook
            codes["e16_tma"] = _descriptor(codes["e16"])
            codes["el16_tma"] = _descriptor(codes["el16"]) if split else codes["e16_tma"]
        z_desc = _descriptor(rows["z16"])
        operands = [z_desc, _descriptor(rows["zl16"]) if split else z_desc, codes["e16_tma"], codes["el16_tma"]]
    kernel, extra = _certify_kernel, {}
    if config is not None:
        kernel, extra = _certify_kernel.fn, config.all_kwargs()
        _set_blocks({"z_ptr": operands[0], "zl_ptr": operands[1], "e_ptr": operands[2], "el_ptr": operands[3],
                     "USE_TMA": tma, **config.kwargs})
    nlive = proven8 if select is None else select[1]
    kernel[grid](
        *operands, codes["a"], codes["P"], codes["Q"], codes["R"],
        codes["L"], rows["f"], rows["m"], rows["rho"], rows["lam"], indices, proven8, upper, cand, count, nlive,
        N, K, D, SAFETY_C=SAFETY, SPLIT=split, COLLECT=collect, CAP=CAP, EMULATE=_interpret(), USE_TMA=tma,
        DEVICE_N=select is not None, **extra,
    )
    if collect:
        return codes, rows, cand, count
    return codes, rows, proven8, upper


# ---- steps 3 to 5 without a host sync: rows are compacted on the device and kernels read the count there ----

def _compact(mask):
    """Stream compaction on the device, no host sync: ``(sel int64 [M], n int32 [1])`` with ``sel[:n]`` the
    positions where ``mask [M]`` is set, in increasing order (``sel[n:]`` is 0)."""
    M = mask.shape[0]
    pos = torch.cumsum(mask, 0)
    n = pos[-1:].to(torch.int32)
    sel = torch.zeros((M + 1,), dtype=torch.int64, device=mask.device)
    # set positions go to their place; the others all to the spare slot M, dropped
    sel.index_copy_(0, torch.where(mask, pos - 1, M), torch.arange(M, device=mask.device))
    return sel[:M], n


def _live(sel, n, ok=None):
    """Which compacted entries ``j`` hold a row (``j < n``), and ``ok`` there."""
    live = torch.arange(sel.shape[0], device=sel.device) < n
    return live if ok is None else live & ok


@triton.jit
def _settle_kernel(sel_ptr, n_ptr, ok_ptr, idx_ptr, indices_ptr, proven_ptr, M, HAS_OK: tl.constexpr,
                   MARK: tl.constexpr, BLOCK: tl.constexpr):
    """For each compacted entry ``j < n[0]`` (with ``ok[j]`` set, given ``HAS_OK``): ``indices[sel[j]] = idx[j]``
    and, with ``MARK``, ``proven[sel[j]] = 1`` -- a level's results written back to their rows, no host sync."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = (j < M) & (j < tl.load(n_ptr))
    if HAS_OK:
        live = live & (tl.load(ok_ptr + j, mask=live, other=0) != 0)
    rows = tl.load(sel_ptr + j, mask=live, other=0)
    tl.store(indices_ptr + rows, tl.load(idx_ptr + j, mask=live, other=0), mask=live)
    if MARK:
        tl.store(proven_ptr + rows, tl.full([BLOCK], 1, dtype=tl.int8), mask=live)


def _settle(indices, proven, sel, n, idx, ok=None):
    """``_settle_kernel``: ``indices [N]`` int64 updated in place, and ``proven [N]`` bool unless it is None."""
    M = sel.shape[0]
    BLOCK = 1024
    mark = proven is not None
    _settle_kernel[(triton.cdiv(M, BLOCK),)](sel, n, idx if ok is None else ok, idx, indices,
                                             proven.view(torch.int8) if mark else indices, M, HAS_OK=ok is not None,
                                             MARK=mark, BLOCK=BLOCK)


@triton.jit
def _f64_search_kernel(
    z_ptr, sel_ptr, nsel_ptr, e_ptr, a_ptr, w_ptr, cand_ptr, count_ptr, idx_ptr, ok_ptr,
    K, D, stride_zn, stride_zd, stride_ek, stride_ed,
    C: tl.constexpr, CANDIDATES: tl.constexpr, CAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """float64 argmin for the rows ``z[sel[j]]``, ``j < nsel[0]`` (read on the device), over every code or, with
    ``CANDIDATES``, over the ``count[j]`` codes listed in ``cand[j]`` (increasing order; rows with none, or
    more than ``CAP``, are not handled: ``ok[j] = 0``). Score of code ``k``: ``a_k - C w_k (z . e_k)`` in
    float64 from the inputs' own values (l2: ``a = ||e||^2``, ``w = 1``, ``C = 2``; cos: ``a = 0``, ``w =
    1 / max(||e||, eps)``, ``C = 1``; ``a = +inf`` for a code the rule excludes). A score that is not finite
    never wins; ties go to the lowest index. Writes ``idx[j]`` and ``ok[j]`` (a finite best was found)."""
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_live = tl.load(nsel_ptr)
    live = pos < n_live
    rows = tl.load(sel_ptr + pos, mask=live, other=0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    if CANDIDATES:
        count = tl.load(count_ptr + pos, mask=live, other=0)
        live = live & (count >= 1) & (count <= CAP)
        c_end = tl.where(pid * BLOCK_R < n_live, CAP, 0)
    else:
        c_end = tl.where(pid * BLOCK_R < n_live, K, 0)
    best = tl.full([BLOCK_R], float("inf"), dtype=tl.float64)
    best_idx = tl.zeros([BLOCK_R], dtype=tl.int64)
    for c0 in range(0, c_end, BLOCK_C):
        slot = c0 + offs_c
        if CANDIDATES:
            valid = live[:, None] & (slot[None, :] < count[:, None])
            code = tl.load(cand_ptr + pos[:, None] * CAP + slot[None, :], mask=valid, other=0).to(tl.int64)
        else:
            valid = live[:, None] & (slot < K)[None, :]
            code = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int64) + slot[None, :]
        dot = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            zt = _rows64(z_ptr, rows, live, cols, D, stride_zn, stride_zd)
            et = tl.load(e_ptr + code[:, :, None] * stride_ek + cols[None, None, :] * stride_ed,
                         mask=valid[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float64)
            dot += tl.sum(zt[:, None, :] * et, axis=2)
        a = tl.load(a_ptr + code, mask=valid, other=float("inf"))
        w = tl.load(w_ptr + code, mask=valid, other=0.0)
        score = a - C * w * dot
        score = tl.where(valid & (tl.abs(score) < float("inf")), score, float("inf"))  # NaN fails too
        tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        chosen = tl.sum(tl.where(offs_c[None, :] == tile_arg[:, None], code, 0), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, chosen, best_idx)
    tl.store(idx_ptr + pos, best_idx, mask=pos < n_live)
    tl.store(ok_ptr + pos, (live & (best < float("inf"))).to(tl.int8), mask=pos < n_live)


def _f64_search(z, codebook, codes, sel, n, cand=None, count=None):
    """``_f64_search_kernel`` on the rows ``z[sel[:n]]``: ``(indices int64 [len(sel)], ok bool [len(sel)])``
    (entries from ``n`` on hold nothing)."""
    M = sel.shape[0]
    idx = torch.empty((M,), dtype=torch.int64, device=z.device)
    ok = torch.empty((M,), dtype=torch.int8, device=z.device)
    candidates = cand is not None
    BLOCK_R, BLOCK_C, BLOCK_D = 16, 16, 16
    _f64_search_kernel[(triton.cdiv(M, BLOCK_R),)](
        z, sel, n, codebook, codes["a64"], codes["w64"], cand if candidates else idx, count if candidates else n,
        idx, ok, codebook.shape[0], z.shape[1], z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        C=codes["c"], CANDIDATES=candidates, CAP=CAP, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
    )
    return idx, ok


def nearest_code_certified(z, codebook, metric="l2", config=None, stats=None, tma=None):
    """Host launcher: ``z [N, D]``, ``codebook [K, D]`` (fp32/bf16/fp16, any strides) -> ``(indices int64 [N],
    distances fp32 [N])``, the float64 argmin (module docstring). Arguments are assumed validated by
    ``lgvq_fast.ops.nearest_code``. No host sync (no ``nonzero``, no ``.item()``): rows are compacted on the
    device and each later pass reads their count there, so the call can be captured in a CUDA graph once its
    kernels are compiled and tuned.

    ``config`` (a ``triton.Config`` of ``_configs()``) launches that config instead of autotuning (tests).
    ``stats``, a dict, receives ``split_rows``, ``candidate_rows`` and ``rescored`` (0-d int64 tensors on the
    device: rows searched again by the split-fp16 level, settled by float64 over their listed candidates, and
    re-scored in float64 against every code) and ``proven`` (bool [N]: settled without that last search).
    ``tma`` (default ``use_tma``, i.e. ``LGVQ_FAST_NN_FAST_KERNEL=tma``): the passes read their fp16 operands
    through TMA descriptors.
    """
    tma = use_tma(z.device) if tma is None else tma
    assert metric in ("l2", "cos")
    assert z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1]
    N = z.shape[0]
    indices = _alloc.empty((N,), torch.int64, z.device)
    distances = _alloc.empty((N,), torch.float32, z.device)
    if N == 0:
        if stats is not None:
            stats.update(rescored=torch.zeros((), dtype=torch.int64, device=z.device),
                         split_rows=torch.zeros((), dtype=torch.int64, device=z.device),
                         candidate_rows=torch.zeros((), dtype=torch.int64, device=z.device),
                         proven=torch.zeros((0,), dtype=torch.bool, device=z.device))
        return indices, distances
    D = z.shape[1]
    codes, codes2 = _prepare_codes_fused(codebook, metric, pitch=triton.cdiv(D, 8) * 8 if tma else None)
    _, rows, proven8, _ = certify_pass(z, codebook, metric, indices, config, codes=codes, tma=tma)
    bad = rows["bad"]
    proven = (proven8 != 0) & ~rows["force"] & ~bad
    # Level 2: the unproven rows (not the forced ones, which no pass can certify) searched again with split-fp16
    # operands, residuals ~2^-11 smaller, under the same certificate. Arrays of level 2 and 3 are compacted:
    # entry j is row sel[j], for j below the count n.
    sel2, n2 = _compact(~proven & ~bad & ~rows["force"])
    idx2 = torch.empty((N,), dtype=torch.int64, device=z.device)
    _, _, proven2, upper2 = certify_pass(z, codebook, metric, idx2, config, codes=codes2, split=True, tma=tma,
                                         select=(sel2, n2))
    _settle(indices, proven, sel2, n2, idx2, proven2)
    # Level 3: what is left (near and true ties) lists its candidates in a second split pass, and float64 scores
    # just those; a row with none or more than CAP candidates goes to the full float64 search.
    left, n3 = _compact(_live(sel2, n2, proven2 == 0))
    sel3 = sel2[left]
    _, _, cand, count = certify_pass(z, codebook, metric, torch.empty_like(sel3), config, codes=codes2, split=True,
                                     upper=upper2[left], tma=tma, select=(sel3, n3))
    idx3, ok3 = _f64_search(z, codebook, codes, sel3, n3, cand, count)
    _settle(indices, proven, sel3, n3, idx3, ok3)
    # Last: float64 against every code, for what no certificate settled (and rows outside the scaled range).
    sel4, n4 = _compact(~proven & ~bad)
    idx4, _ = _f64_search(z, codebook, codes, sel4, n4)
    _settle(indices, None, sel4, n4, idx4)
    indices.masked_fill_(bad, 0)
    dist = _final_distances(z, codebook, codes["valid"], indices, metric)
    # No finite score: a bad row, or a row whose every code is excluded (the float64 search then keeps index 0,
    # an excluded code).
    no_code = bad | ~codes["valid"][indices]
    distances.copy_(torch.where(no_code, float("nan"), dist))
    if stats is not None:
        stats.update(rescored=n4[0].long(), split_rows=n2[0].long(), candidate_rows=_live(sel3, n3, ok3 != 0).sum(),
                     proven=proven)
    return indices, distances
