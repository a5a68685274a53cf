"""Triton nearest-code search: fused distance product + running argmin, no N x K tensor.

One program owns ``BLOCK_N`` rows of ``z`` and visits the codebook in tiles of
``BLOCK_K`` codes in increasing order. For each tile it forms ``z . e`` with
``tl.dot`` (looping over ``D`` in ``BLOCK_D`` chunks unless one chunk covers
``D``), turns it into a score and keeps a running minimum with a strict ``<``;
inside a tile the smallest index reaching the tile minimum wins, so ties go to
the lowest index as in ``torch.argmin``.

Scores:
- l2: ``||e||^2 - 2 z.e`` (``||e||^2`` precomputed in fp32 by a small kernel);
  ``||z||^2`` is added only when the distance is stored, then clamped at 0.
- cos: ``-(z . e_hat)`` with ``e_hat = e / max(||e||, eps)`` from a normalised
  copy of the codebook (one small kernel, fp32 for exact, bf16 for fast);
  dividing by ``max(||z||, eps)`` does not change the argmin, so it happens
  only when the distance ``1 - cos`` is stored.

Norms for cos come from two sums of squares in one pass, of ``x`` and of
``x * 2^-64``, the second used where the first overflows: norms of 1e19 and far
beyond normalise correctly. A vector whose norm reaches 2^126 counts as
non-finite (the op's rule): below that, ``|z . e_hat| <= ||z||`` keeps every
partial sum of the product finite without scaling ``z`` in the K loop, and
``1 / max(||x||, eps)`` is a normal fp32, the one row value the epilogue needs.

Non-finite values (rule in ``lgvq_fast.ops.nearest_code``): a score that is not
finite never wins -- one ``score > -inf`` select per score (NaN and -inf fail
it; +inf never beats the running minimum, which starts at +inf; codes past K
get ``e_aux = +inf`` and so score +inf or NaN). A row with no finite score keeps
index 0 and stores distance NaN.

For l2 the codebook is never copied: tiles are loaded in its own dtype and
strides and converted in registers, so the extra memory is K floats plus the
outputs; cos adds the K x D normalised copy (as the CUDA path's bf16 pieces).

Precision: ``exact`` multiplies fp32 operands with ``input_precision="tf32x3"``
(three TF32 products, about fp32 accuracy); ``fast`` multiplies bf16 operands
with fp32 accumulation. ``nearest_code_fwd(..., exact_split="bf16x3")`` is an
exact-mode variant with three bf16 products of hi/lo parts, offered to the
benchmark as a faster candidate. The CPU interpreter (Triton 3.9) multiplies bf16 tiles as
their raw uint16 bit patterns and truncates when it converts fp32 to bf16, so under
TRITON_INTERPRET the fast path rounds the operands to bf16 (to nearest even, on the
bits: ``to_bf16``) and multiplies them as fp32 (the same products, exactly).
"""

import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc
from lgvq_fast._backend import env_flag, nn_fast_kernel, triton_interpret as _interpret

# Same eps as lgvq_fast.reference.nearest_code.COS_EPS (torch.nn.functional.normalize's default).
COS_EPS = 1e-12


def _configs():
    if _interpret():
        # The CPU interpreter pays per tile, not per FLOP: one mid-sized config keeps tests fast.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=4)]
    shapes = [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 32, 8, 3),
        (256, 128, 32, 8, 3),
        (64, 128, 128, 4, 3),
        (64, 128, 256, 4, 2),
        (64, 64, 256, 4, 2),
        (128, 128, 16, 4, 4),
        (64, 128, 16, 4, 4),
        (256, 128, 16, 8, 3),
        (128, 256, 16, 8, 3),
        (64, 128, 32, 8, 3),
        (128, 64, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for n, k, d, w, s in shapes
    ]


# Hopper allows up to 227 KiB of shared memory per block; leave room for the reductions.
_SMEM_BUDGET = 200 * 1024


def _smem_estimate(config, operand_bytes):
    """Pipelined operand tiles: num_stages copies of a [BLOCK_N, BLOCK_D] and a [BLOCK_D, BLOCK_K] tile."""
    kw = config.kwargs
    tile = kw["BLOCK_N"] * kw["BLOCK_D"] + kw["BLOCK_D"] * kw["BLOCK_K"]
    return max(config.num_stages, 1) * tile * operand_bytes


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose D chunk is far wider than D, or whose tiles overflow shared memory."""
    args = {**named_args, **kwargs}
    D = args["D"]
    # Exact mode stages fp32 tiles whatever the input dtype; fast mode stages tiles as loaded.
    operand_bytes = 4
    if args.get("FAST", False):
        operand_bytes = max(args["z_ptr"].element_size(), args["e_ptr"].element_size())
    widest = max(16, triton.next_power_of_2(D))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_D"] <= widest and _smem_estimate(c, operand_bytes) <= _SMEM_BUDGET
        and (D <= c.kwargs["BLOCK_D"] or _interpret() or _config_key(c) in _LOOPED_D_CONFIGS)
    ]
    kept = kept or configs[:1]
    # Each config is a separate compile (a second or more) the first time a shape is seen: tests and quick
    # checks can ask for the first surviving config only.
    if not env_flag("LGVQ_FAST_TRITON_AUTOTUNE", default=True):
        kept = kept[:1]
    return kept


def _config_key(config):
    kw = config.kwargs
    return kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_D"], config.num_warps, config.num_stages


# When D is wider than BLOCK_D the kernel loops over D and the sm_90 cubins of most configs spill registers
# (Triton 3.6, fp32 operands: 100 B to 3 KB of stack per thread, bench/results/triton_aot/sm_90_triton3.6.txt).
# Only these are tried then: the three that spilled least among the first thirteen (stack at most 616 B in
# tf32x3 mode, 24 B in the others) and two smaller 8-warp tiles that spill nothing (64 x 128) or at most 16 B
# (128 x 64) in every mode. Every config stays for a D that fits one chunk, where none spills.
_LOOPED_D_CONFIGS = {(128, 128, 32, 8, 3), (128, 256, 16, 8, 3), (64, 128, 16, 4, 4), (64, 128, 32, 8, 3),
                     (128, 64, 32, 8, 3)}


# A cos vector whose norm reaches 2^126 counts as non-finite (lgvq_fast.ops.nearest_code's rule).
COS_NORM_LIMIT = tl.constexpr(2.0**126)
# A second sum of squares of x * 2^-64 stands in where the plain one overflows (||x|| >~ 1.8e19).
_TWO_M64 = tl.constexpr(2.0**-64)
_TWO_P64 = tl.constexpr(2.0**64)


@triton.jit
def _inv_norms(row_ptrs, mask_r, stride_d, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row of ``x`` (row starts ``row_ptrs [BLOCK_R, 1]``): ``1 / max(||x||, eps)`` in one pass without
    overflow, or NaN where ``||x|| >= 2^126``. Below that limit the result is a normal fp32 (>= 2^-126), so
    ``x * inv`` never meets a subnormal and stays within [-1, 1]."""
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    sq_lo = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = (d0 + offs_d) < D
        x = tl.load(row_ptrs + (d0 + offs_d)[None, :] * stride_d, mask=mask_r[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        x = x * _TWO_M64
        sq_lo += tl.sum(x * x, axis=1)
    # A NaN sq (a row holding NaN) takes the second branch and stays NaN.
    norm = tl.where(sq < float("inf"), tl.sqrt_rn(sq), tl.sqrt_rn(sq_lo) * _TWO_P64)
    return tl.where(norm >= COS_NORM_LIMIT, float("nan"), 1.0 / tl.maximum(norm, eps))


@triton.jit
def _code_norms_kernel(e_ptr, out_ptr, K, D, stride_ek, stride_ed, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per code, in fp32: ``||e||^2`` (l2). It overflows to +inf for ``||e|| >~ 1.8e19``: such a code never wins."""
    pid_k = tl.program_id(0)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = (d0 + offs_d) < D
        ptrs = e_ptr + offs_k[:, None] * stride_ek + (d0 + offs_d)[None, :] * stride_ed
        et = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(et * et, axis=1)
    tl.store(out_ptr + offs_k, sq, mask=mask_k)


@triton.jit
def _code_normalize_kernel(e_ptr, out_ptr, K, D, stride_ek, stride_ed, eps, OUT_BF16: tl.constexpr,
                           EMULATE_BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out [K, D]`` (contiguous, fp32 or bf16) = ``e / max(||e||, eps)``; NaN for a code whose norm reaches 2^126
    (the rule: such a code counts as non-finite and never wins)."""
    pid_k = tl.program_id(0)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    inv = _inv_norms(e_ptr + offs_k[:, None] * stride_ek, mask_k, stride_ed, D, eps, BLOCK_K, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        mask = mask_k[:, None] & ((d0 + offs_d) < D)[None, :]
        x = tl.load(e_ptr + offs_k[:, None] * stride_ek + (d0 + offs_d)[None, :] * stride_ed, mask=mask,
                    other=0.0).to(tl.float32)
        x = x * inv[:, None]
        if OUT_BF16:
            x = to_bf16(x, EMULATE_BF16)
        tl.store(out_ptr + offs_k[:, None] * D + (d0 + offs_d)[None, :], x, mask=mask)


@triton.jit
def to_bf16(x, EMULATE_BF16: tl.constexpr):
    """``x`` rounded to bf16, to nearest even, as the GPU's conversion does. The CPU interpreter's own fp32 ->
    bf16 conversion truncates, so there the rounding is done on the bits: add 0x7FFF plus the lowest kept bit,
    keep the upper half (a carry into the exponent is the right result, up to +-inf); NaN stays a quiet NaN."""
    if EMULATE_BF16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        upper = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        upper = tl.where(x != x, 0x7FC0, upper).to(tl.uint16)
        return upper.to(tl.bfloat16, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _operand(x, FAST: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """A tile as the product wants it: fp32 (exact) or bf16 (fast; fp32 holding bf16 values when emulated)."""
    if FAST:
        x = to_bf16(x, EMULATE_BF16)
        if EMULATE_BF16:
            x = x.to(tl.float32)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _bf16_parts(x, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` as ``hi + lo`` with both parts bf16 (about 16 significant bits together)."""
    hi = to_bf16(x, EMULATE_BF16)
    lo = to_bf16(x - hi.to(tl.float32), EMULATE_BF16)
    if EMULATE_BF16:
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    return hi, lo


@triton.jit
def _dot(a, b, acc, FAST: tl.constexpr, SPLIT_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if FAST:
        if EMULATE_BF16:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    elif SPLIT_BF16:
        # Three bf16 products (lo*lo dropped), small terms first; exact bf16 products, fp32 sums.
        a_hi, a_lo = _bf16_parts(a, EMULATE_BF16)
        b_hi, b_lo = _bf16_parts(b, EMULATE_BF16)
        if EMULATE_BF16:
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_lo, b_hi, acc)
            acc = tl.dot(a_hi, b_lo, acc)
            acc = tl.dot(a_hi, b_hi, acc)
    elif EMULATE_BF16:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        # Split precision: three TF32 products recover about fp32 accuracy on tensor cores.
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


@triton.jit
def keep_tile_min(acc, e_aux, k0, best, best_idx, IS_COS: tl.constexpr):
    """Fold one tile of products ``acc [BLOCK_N, BLOCK_K]`` (codes ``k0 ...``) into the running ``best`` score and
    its ``best_idx`` (int64). ``e_aux``: ``||e||^2`` (l2) or 0 (cos), +inf for codes past K."""
    if IS_COS:
        # The score is -(z . e_hat); |z . e_hat| <= ||z|| < 2^126 for every row that is not excluded later.
        score = e_aux[None, :] - acc
    else:
        score = e_aux[None, :] - 2.0 * acc
    # NaN and -inf become +inf, which never beats the running minimum: a score that is not finite never wins
    # (and tl.min never sees a NaN, whose place in its reduction tree would decide the result).
    score = tl.where(score > float("-inf"), score, float("inf"))
    tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_min < best
    best = tl.where(better, tile_min, best)
    best_idx = tl.where(better, k0 + tile_arg.to(tl.int64), best_idx)
    return best, best_idx


@triton.jit
def finish_rows(best, best_idx, z_aux, IS_COS: tl.constexpr):
    """The rows' outputs from their best score: ``(index, distance)``. ``z_aux``: ``||z||^2`` in fp32 (l2) or
    ``1 / max(||z||, eps)``, NaN at or beyond the 2^126 limit (cos)."""
    if IS_COS:
        # A row whose norm reaches 2^126 counts as non-finite (its products may have overflowed); a NaN z_inv
        # from a row holding NaN has no finite score anyway.
        too_big = z_aux != z_aux
        best = tl.where(too_big, float("inf"), best)
        best_idx = tl.where(too_big, 0, best_idx)
        # cos = (z . e_hat) / max(||z||, eps), with |z . e_hat| <= ||z||.
        dist = 1.0 + best * z_aux
    else:
        dist = z_aux + best
        # clamp the rounding below 0, but keep a NaN (tl.maximum would turn it into 0, an exact match)
        dist = tl.where(dist < 0.0, 0.0, dist)
    # No finite score (a row holding NaN or inf, or every code excluded): index 0 (never moved), distance NaN.
    dist = tl.where(best < float("inf"), dist, float("nan"))
    return best_idx, dist


@triton.autotune(
    configs=_configs(),
    key=["K", "D", "IS_COS", "FAST", "SPLIT_BF16"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"ONE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit
def _nearest_code_fwd_kernel(
    z_ptr,
    e_ptr,
    e_aux_ptr,
    idx_ptr,
    dist_ptr,
    N,
    K,
    D,
    stride_zn,
    stride_zd,
    stride_ek,
    stride_ed,
    eps,
    IS_COS: tl.constexpr,
    FAST: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_kb = tl.arange(0, BLOCK_K)
    z_rows = z_ptr + offs_n[:, None] * stride_zn

    if IS_COS:
        # 1 / max(||z||, eps) without overflow, NaN for a row at or beyond the 2^126 limit: one pass, one row
        # vector live across the K loop (as z_sq for l2; a second pass here made sm_90 spill more).
        z_inv = _inv_norms(z_rows, mask_n, stride_zd, D, eps, BLOCK_N, BLOCK_D)
    else:
        # ||z||^2 from the input values in fp32 (before any bf16 rounding of the operands); it may overflow to
        # +inf, which is then the distance (the true one is beyond fp32 too).
        z_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = (d0 + offs_d) < D
            zt = tl.load(z_rows + (d0 + offs_d)[None, :] * stride_zd, mask=mask_n[:, None] & mask_d[None, :],
                         other=0.0)
            zt = zt.to(tl.float32)
            z_sq += tl.sum(zt * zt, axis=1)

    if ONE_D_TILE:
        # D fits one chunk: keep the z tile in registers across all code tiles.
        mask_d = offs_d < D
        z_tile = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        z_tile = _operand(z_tile, FAST, EMULATE_BF16)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        e_cols = e_ptr + offs_k.to(tl.int64)[None, :] * stride_ek
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_D_TILE:
            et = tl.load(e_cols + offs_d[:, None] * stride_ed, mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            acc = _dot(z_tile, _operand(et, FAST, EMULATE_BF16), acc, FAST, SPLIT_BF16, EMULATE_BF16)
        else:
            for d0 in range(0, D, BLOCK_D):
                mask_d = (d0 + offs_d) < D
                zt = tl.load(
                    z_rows + (d0 + offs_d)[None, :] * stride_zd, mask=mask_n[:, None] & mask_d[None, :], other=0.0
                )
                et = tl.load(
                    e_cols + (d0 + offs_d)[:, None] * stride_ed, mask=mask_d[:, None] & mask_k[None, :], other=0.0
                )
                zt = _operand(zt, FAST, EMULATE_BF16)
                acc = _dot(zt, _operand(et, FAST, EMULATE_BF16), acc, FAST, SPLIT_BF16, EMULATE_BF16)
        # e_aux = ||e||^2 (l2) or 0 (cos: e is the normalised copy); +inf past K, so padding codes score +inf or
        # NaN (cos: 0 * inf) and never win.
        e_aux = tl.load(e_aux_ptr + offs_k, mask=mask_k, other=float("inf"))
        best, best_idx = keep_tile_min(acc, e_aux, k0, best, best_idx, IS_COS)

    if IS_COS:
        z_aux = z_inv
    else:
        z_aux = z_sq
    best_idx, dist = finish_rows(best, best_idx, z_aux, IS_COS)
    tl.store(idx_ptr + offs_n, best_idx, mask=mask_n)
    tl.store(dist_ptr + offs_n, dist, mask=mask_n)


def _norm_blocks(D, block_k=64, max_block_d=128):
    return block_k, min(max_block_d, max(16, triton.next_power_of_2(D)))


def code_norms(codebook, metric):
    """fp32 ``[K]``: ``||e||^2`` for l2, zeros for cos (one launch, no codebook copy)."""
    K, D = codebook.shape
    if metric == "cos":
        return torch.zeros((K,), dtype=torch.float32, device=codebook.device)
    out = torch.empty((K,), dtype=torch.float32, device=codebook.device)
    block_k, block_d = _norm_blocks(D)
    _code_norms_kernel[(triton.cdiv(K, block_k),)](
        codebook, out, K, D, codebook.stride(0), codebook.stride(1), BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out


def normalized_codebook(codebook, dtype):
    """``codebook / max(||row||, eps)`` as a contiguous ``[K, D]`` copy in ``dtype``, overflow-free for any finite
    row (see ``_inv_norms``); a row holding NaN or inf, or whose norm reaches 2^126, comes out with NaN."""
    K, D = codebook.shape
    out = torch.empty((K, D), dtype=dtype, device=codebook.device)
    # Smaller tiles than code_norms: with BLOCK_K=64, BLOCK_D=128 a two-pass kernel like this spilled on sm_90.
    block_k, block_d = _norm_blocks(D, 32, 64)
    _code_normalize_kernel[(triton.cdiv(K, block_k),)](
        codebook, out, K, D, codebook.stride(0), codebook.stride(1), COS_EPS, OUT_BF16=dtype == torch.bfloat16,
        EMULATE_BF16=_interpret(), BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out


def nearest_code_fwd(z, codebook, metric="l2", precision="exact", exact_split="tf32x3", config=None):
    """Host launcher: ``z [N, D]`` and ``codebook [K, D]`` (any strides; fp32/bf16/fp16).

    Returns ``(indices int64 [N], distances fp32 [N])``. Arguments are assumed
    validated by ``lgvq_fast.ops.nearest_code``. Extra memory is ``K`` floats for l2
    (the codebook is read in place and converted tile by tile inside the kernel);
    cos adds a normalised ``[K, D]`` copy, fp32 for exact and bf16 for fast.

    ``exact_split`` picks the exact-mode product: ``"tf32x3"`` (default, about
    fp32 accuracy) or ``"bf16x3"`` (hi/lo bf16 parts, about 16 significant bits,
    twice the tensor-core rate of tf32); bench/nn_search.py reports both.

    ``precision="fast"`` runs the kernel that ``lgvq_fast._backend.nn_fast_kernel`` picks
    (``LGVQ_FAST_NN_FAST_KERNEL``).
    ``config`` (a ``triton.Config`` of ``_configs()``) launches that config of this module's kernel instead of
    autotuning (tests).
    """
    assert exact_split in ("tf32x3", "bf16x3")
    assert z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1]
    if precision == "fast" and config is None and nn_fast_kernel(z.device) == "tma":
        from lgvq_fast.kernels.nearest_code_tma import nearest_code_fast_tma

        return nearest_code_fast_tma(z, codebook, metric)
    N, D = z.shape
    K = codebook.shape[0]
    indices = _alloc.empty((N,), torch.int64, z.device)
    distances = _alloc.empty((N,), torch.float32, z.device)
    if N == 0:
        return indices, distances
    e_aux = code_norms(codebook, metric)
    if metric == "cos":
        # Normalised once (K x D, as the CUDA path's bf16 pieces): the search then multiplies unit codes, with
        # no per-tile scaling of the codebook operand (bf16 is all that the fast product reads).
        codebook = normalized_codebook(codebook, torch.bfloat16 if precision == "fast" else torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel, extra = _nearest_code_fwd_kernel, {}
    if config is not None:
        kernel, extra = _nearest_code_fwd_kernel.fn, config.all_kwargs()  # .fn: the heuristics, no autotuning
    kernel[grid](
        z,
        codebook,
        e_aux,
        indices,
        distances,
        N,
        K,
        D,
        z.stride(0),
        z.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        COS_EPS,
        IS_COS=metric == "cos",
        FAST=precision == "fast",
        SPLIT_BF16=exact_split == "bf16x3",
        EMULATE_BF16=_interpret(),
        **extra,
    )
    return indices, distances
