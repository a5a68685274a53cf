"""Certified exact nearest-code search: one fp16 product pass proves most rows; float64 re-scores the rest.

``nearest_code_certified(z, codebook, metric)`` returns the float64 argmin of every row (ties to the lowest
index) without computing every score in high precision:

1. **Prepare** (PyTorch, float64 where it matters): ``z`` and the codebook (for cos, the codebook normalised in
   float64) are rounded to fp16 after scaling by powers of two -- per row of ``z``, one for the codebook -- and
   the exact size of what the rounding dropped is kept: ``rho = ||x - fp16(x * 2^s) * 2^-s||`` per row and per
   code, with the norms ``||z||``, ``||e||`` and, for l2, ``||e||^2`` in fp32.
2. **Search and certify** (Triton, ``_certify_kernel``): one fp16 x fp16 -> fp32 product pass, as fast mode,
   keeps per row the best low-precision score ``s1`` (lowest index on ties), the bound ``B1`` of its error, and
   ``L = min over every other code of (s_k - B_k)``. The row is *proven* when ``L > s1 + B1``: then every other
   code's true score exceeds the best's, so the low-precision argmin is the true one. ``B`` is a rigorous
   bound on ``|computed score - real score|`` from the measured rounding residuals, the norms and the fp32
   accumulation (derivation and constants: ``lgvq_fast/ops/NOTES.md``, "nearest_code: certified exact
   mode"); it is taken per tile of codes, as ``||z|| P_t + rho_z Q_t + R_t`` with the tile's largest code
   terms, two FMAs per row and tile.
3. **Re-score** the unproven rows -- true ties and near-ties, duplicated codes, rows too large for the
   scaled fp16 range -- in float64 over the whole codebook (``lgvq_fast.reference.nearest_code``, chunked;
   cuBLAS DGEMM on a GPU), with the op's rule for non-finite values applied in fp32 terms.
4. **Distances** of the chosen codes in float64 (``||z - e||^2``, or ``1 - cos``), stored as fp32.

The result is the float64 argmin except where float64 itself ties (within its own rounding); it does not
depend on tile order, config or backend. Extra memory: fp16 copies of ``z`` and the codebook (2 (N + K) D
bytes), a few fp32 vectors, and the float64 temporaries of steps 1 and 4 (chunked over rows).

Status: a CPU-tested candidate for the exact mode (Triton interpreter). Step 3 compacts the unproven rows
with ``torch.nonzero``, a device sync, so this path cannot run inside a captured CUDA graph, and its GPU speed
is unmeasured; ``bench/nn_search.py`` reports it with the fraction of rows re-scored.
"""

import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc
from lgvq_fast._backend import env_flag, triton_interpret as _interpret
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
    D = {**named_args, **kwargs}["D"]
    widest = max(16, triton.next_power_of_2(D))
    kept = [c for c in configs
            if c.kwargs["BLOCK_D"] <= widest
            and max(c.num_stages, 1) * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_D"] * 2
            <= _SMEM_BUDGET
            and (D <= c.kwargs["BLOCK_D"] or _interpret() or _config_key(c) in _LOOPED_D_CONFIGS)]
    kept = kept or configs[:1]
    return kept if env_flag("LGVQ_FAST_TRITON_AUTOTUNE", default=True) else kept[:1]


@triton.autotune(configs=_configs(), key=["K", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"ONE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit
def _certify_kernel(
    z_ptr, e_ptr, a_ptr, p_ptr, q_ptr, r_ptr, f_ptr, m_ptr, rho_ptr, idx_ptr, proven_ptr,
    N, K, D,
    SAFETY_C: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
):
    """z [N, D] and e [K, D]: contiguous fp16 (scaled). Score of code k: ``a_k - acc * f_row`` with ``acc`` the
    fp32-accumulated product of the fp16 operands. Writes the lowest-index minimum and whether it is proven."""
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_kb = tl.arange(0, BLOCK_K)
    z_rows = z_ptr + offs_n[:, None] * D
    f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    rho = tl.load(rho_ptr + offs_n, mask=mask_n, other=0.0)
    if ONE_D_TILE:
        mask_d = offs_d < D
        z_tile = tl.load(z_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if EMULATE:
            z_tile = z_tile.to(tl.float32)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    low = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        e_cols = e_ptr + offs_k.to(tl.int64)[None, :] * D
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_D_TILE:
            et = tl.load(e_cols + offs_d[:, None], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            if EMULATE:
                acc = tl.dot(z_tile, et.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(z_tile, et, acc)
        else:
            for d0 in range(0, D, BLOCK_D):
                mask_d = (d0 + offs_d) < D
                zt = tl.load(z_rows + (d0 + offs_d)[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                et = tl.load(e_cols + (d0 + offs_d)[:, None], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
                if EMULATE:
                    acc = tl.dot(zt.to(tl.float32), et.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(zt, et, acc)
        # a = ||e||^2 (l2) or 0 (cos); +inf for an excluded code and past K, so those score +inf.
        a = tl.load(a_ptr + offs_k, mask=mask_k, other=float("inf"))
        score = a[None, :] - acc * f[:, None]
        score = tl.where(score > float("-inf"), score, float("inf"))
        tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        second = tl.min(tl.where(offs_kb[None, :] == tile_arg[:, None], float("inf"), score), axis=1)
        # The tile's error bound per row: every code of the tile has B_k <= m P_t + rho Q_t + R_t.
        p_t = tl.max(tl.load(p_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        q_t = tl.max(tl.load(q_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        r_t = tl.max(tl.load(r_ptr + offs_k, mask=mask_k, other=0.0), axis=0)
        b_t = (m * p_t + rho * q_t + r_t) * SAFETY_C
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

    proven = low > best + best_b
    tl.store(idx_ptr + offs_n, best_idx, mask=mask_n)
    tl.store(proven_ptr + offs_n, proven.to(tl.int8), mask=mask_n)


def _round_up_f32(x64):
    """float64 -> fp32 rounded towards +inf (for upper bounds)."""
    x32 = x64.to(torch.float32)
    return torch.where(x32.to(torch.float64) < x64, torch.nextafter(x32, torch.full_like(x32, float("inf"))), x32)


def _scale_exponent(amax):
    """Per entry of ``amax`` (float64, >= 0): ``s`` with ``amax * 2^s`` in [2^14, 2^15), clamped to +-60."""
    _, ex = torch.frexp(amax)
    return (_TOP_EXPONENT - ex).clamp(-_MAX_SHIFT, _MAX_SHIFT)


def _to_scaled_half(x64, s):
    """``fp16(x * 2^s)`` and the exact residual norm ``||x - fp16(x * 2^s) * 2^-s||`` (float64)."""
    h = torch.ldexp(x64, s).to(torch.float16)
    resid = x64 - torch.ldexp(h.to(torch.float64), -s)
    return h, resid.norm(dim=1)


def _bound_terms(n, rho_e, D, c):
    """Per code: ``P, Q, R`` (float64) with ``B_k <= ||z|| P + rho_z Q + R`` (NOTES.md)."""
    gamma = D * ACC_UNIT / (1.0 - D * ACC_UNIT)
    g = c * (gamma + 4.0 * U32 * (1.0 + gamma))
    t = n + rho_e
    P = c * rho_e + g * t
    Q = c * n + 3.0 * c * rho_e + g * t
    R = 4.0 * U32 * (1.0 + U32) * n * n + _ABS_FLOOR
    return P, Q, R


def _prepare_codes(codebook, metric):
    """fp16 scaled codes and the per-code terms; also the float64 codebook the re-scoring uses (codes the
    fp32 rule excludes set to NaN, so the float64 reference excludes them too)."""
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
    e16, rho_e = _to_scaled_half(src, s_e)
    n = src.norm(dim=1)
    P, Q, R = _bound_terms(n, rho_e, D, c)
    zero = torch.zeros_like(n)
    P, Q, R = (torch.where(valid, v, zero) for v in (P, Q, R))
    a32 = torch.where(valid, a.to(torch.float32), float("inf"))
    n_max = torch.where(valid, n, zero).amax() if n.numel() else zero.sum()
    e64_rule = torch.where(valid[:, None], e64, float("nan"))
    return dict(e16=e16.contiguous(), a=a32.contiguous(), P=_round_up_f32(P), Q=_round_up_f32(Q),
                R=_round_up_f32(R), s_e=s_e, n_max=n_max, codes_ok=amax < _HUGE, e64=e64_rule, c=c)


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
    z16, rho = _to_scaled_half(zf, s_z[:, None])
    f = torch.ldexp(torch.full_like(norm, codes["c"]), -(s_z + codes["s_e"])).to(torch.float32)
    m32, rho32 = _round_up_f32(norm), _round_up_f32(rho)
    force = (amax >= _HUGE) | ~codes["codes_ok"] | (norm * codes["n_max"] >= _PRODUCT_LIMIT)
    force |= ~torch.isfinite(m32) | ~torch.isfinite(rho32)
    force &= ~bad
    zero = torch.zeros_like(m32)
    m32, rho32 = torch.where(force, zero, m32), torch.where(force, zero, rho32)
    return dict(z16=z16.contiguous(), f=f.contiguous(), m=m32.contiguous(), rho=rho32.contiguous(), bad=bad,
                force=force, z64=z64)


def _final_distances(z64, e64, idx, metric, chunk=1 << 22):
    """float64 distances of the chosen codes, as fp32 (``||z - e||^2``, or ``1 - cos``), chunked over rows."""
    N, D = z64.shape
    out = torch.empty((N,), dtype=torch.float32, device=z64.device)
    step = max(1, chunk // max(D, 1))
    if metric == "cos":
        e_hat = _ref._normalize(e64)
    for start in range(0, N, step):
        zc, ic = z64[start:start + step], idx[start:start + step]
        if metric == "cos":
            d = 1.0 - (_ref._normalize(zc) * e_hat[ic]).sum(dim=1)
        else:
            d = (zc - e64[ic]).pow(2).sum(dim=1)
        out[start:start + step] = d.to(torch.float32)
    return out


def certify_pass(z, codebook, metric, indices, config=None):
    """Steps 1 and 2: prepares the operands and runs ``_certify_kernel``, writing pass 1's argmin into
    ``indices``; returns ``(codes, rows, proven int8 [N])`` (the prepared terms and the kernel's flags)."""
    N, D = z.shape
    K = codebook.shape[0]
    codes = _prepare_codes(codebook, metric)
    rows = _prepare_rows(z, metric, codes)
    proven8 = torch.empty((N,), dtype=torch.int8, device=z.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel, extra = _certify_kernel, {}
    if config is not None:
        kernel, extra = _certify_kernel.fn, config.all_kwargs()
    kernel[grid](
        rows["z16"], codes["e16"], codes["a"], codes["P"], codes["Q"], codes["R"], rows["f"], rows["m"],
        rows["rho"], indices, proven8, N, K, D, SAFETY_C=SAFETY, EMULATE=_interpret(), **extra,
    )
    return codes, rows, proven8


def nearest_code_certified(z, codebook, metric="l2", config=None, stats=None):
    """Host launcher: ``z [N, D]``, ``codebook [K, D]`` (fp32/bf16/fp16, any strides) -> ``(indices int64 [N],
    distances fp32 [N])``, the float64 argmin (module docstring). Arguments are assumed validated by
    ``lgvq_fast.ops.nearest_code``.

    ``config`` (a ``triton.Config`` of ``_configs()``) launches that config instead of autotuning (tests).
    ``stats``, a dict, receives ``rescored`` (a 0-d int64 tensor on the device: rows re-scored in float64) and
    ``proven`` (bool [N]).
    """
    assert metric in ("l2", "cos")
    assert z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1]
    N = z.shape[0]
    indices = _alloc.empty((N,), torch.int64, z.device)
    distances = _alloc.empty((N,), torch.float32, z.device)
    if N == 0:
        if stats is not None:
            stats.update(rescored=torch.zeros((), dtype=torch.int64, device=z.device),
                         proven=torch.zeros((0,), dtype=torch.bool, device=z.device))
        return indices, distances
    codes, rows, proven8 = certify_pass(z, codebook, metric, indices, config)
    bad = rows["bad"]
    proven = (proven8 != 0) & ~rows["force"] & ~bad
    redo = torch.nonzero(~proven & ~bad).squeeze(1)
    if redo.numel():
        idx_redo, _ = _ref.nearest_code(rows["z64"][redo], codes["e64"], metric, torch.float64)
        indices[redo] = idx_redo
    indices.masked_fill_(bad, 0)
    dist = _final_distances(rows["z64"], codes["e64"].nan_to_num(0.0), indices, metric)
    # No finite score: a bad row, or a row whose every code is excluded (the float64 search returned index 0
    # with a NaN distance for it; its chosen code is then an excluded one).
    no_code = bad | ~torch.isfinite(codes["a"])[indices]
    distances.copy_(torch.where(no_code, float("nan"), dist))
    if stats is not None:
        stats.update(rescored=redo.new_tensor(redo.numel()), proven=proven)
    return indices, distances
