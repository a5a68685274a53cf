"""Fast-mode nearest-code search for Hopper: bf16 operand copies made once per call, read by TMA descriptors.

The tile kernel of ``nearest_code.py`` reads ``z`` and the codebook in their own dtype and rounds every tile to
bf16 on every visit: with fp32 inputs each of the N/BLOCK_N programs converts the whole codebook again, and
the codebook tiles of a 16-bit input with D in one tile are not pipelined. Here:

1. One preparation pass per operand (``_bf16_rows_kernel``) writes a contiguous bf16 copy ``[R, Dp]`` (``Dp``:
   D rounded up to 8 elements, the 16-byte row pitch TMA needs; the pad columns are zeros, which add nothing
   to a product) together with the row's fp32 auxiliary value, computed from the input values as the tile
   kernel does: ``||x||^2`` (l2), ``1 / max(||x||, eps)`` (cos rows, NaN at or beyond the 2^126 limit), or
   the normalised code itself (cos codes, ``e / max(||e||, eps)``, auxiliary 0). A 16-bit-aligned bf16 input
   whose pitch already suits TMA is read in place (only the auxiliary is computed).
   Extra memory: ``(N + K) * Dp * 2`` bytes of copies plus ``(N + K) * 4`` bytes; at (65536, 16384, 256)
   that is 42 MB.
2. The search kernel (``_nearest_code_tma_kernel``) loads its ``[BLOCK_N, BLOCK_D]`` row tile and the
   ``[BLOCK_K, BLOCK_D]`` code tiles through host-built tensor descriptors (TMA on sm_90, pipelined over the
   code loop by ``num_stages``); rows and codes past the tensor's end arrive as zeros. The product is bf16 x
   bf16 with fp32 accumulation (``wgmma`` on sm_90), the epilogue is the tile kernel's own
   (``keep_tile_min`` / ``finish_rows``): the same scores, the same rule for non-finite values, ties to the
   lowest index. Codes past K read ``e_aux = +inf`` and never win, whatever TMA filled in.

The results are those of the tile kernel's fast mode (same bf16 operand rounding, fp32 norms), up to the
order of the fp32 accumulation. Which of the two is faster on a card is for ``bench/nn_search.py`` to say:
``LGVQ_FAST_NN_FAST_KERNEL=tma`` selects this one for ``precision="fast"`` on sm_90 and newer (``auto`` keeps
the tile kernel until GPU timings pick the default; ``lgvq_fast._backend.nn_fast_kernel``). In the CPU
interpreter, which multiplies bf16 tiles as raw bit patterns, the tiles are widened to fp32 before ``tl.dot``
(the same products, exactly), and the copies round to bf16 on the bits (``nearest_code.to_bf16``).

The tile reduction comes in two forms, both timed by the autotuner: ``keep_tile_min`` (value and index pairs,
as the tile kernel) and ``_keep_tile_min_packed`` (one unsigned key per score; NOTES.md).
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lgvq_fast import _alloc
from lgvq_fast._backend import env_flag, triton_interpret as _interpret
from lgvq_fast.kernels.nearest_code import COS_EPS, _inv_norms, finish_rows, keep_tile_min, to_bf16

# Preparation modes: what the auxiliary value of a row is and what the copy holds.
PREP_L2 = 0  # aux = ||x||^2 in fp32; copy = bf16(x)
PREP_COS_ROW = 1  # aux = 1 / max(||x||, eps) (NaN at or beyond 2^126); copy = bf16(x)
PREP_COS_CODE = 2  # aux = 0; copy = bf16(x / max(||x||, eps)) (NaN row at or beyond 2^126)

# TMA: the global row pitch must be a multiple of 16 bytes (8 bf16 elements), the base 16-byte aligned.
_PITCH = 8


def _padded(D):
    return triton.cdiv(D, _PITCH) * _PITCH


@triton.jit
def _bf16_rows_kernel(x_ptr, out_ptr, aux_ptr, R, D, Dp, stride_r, stride_d, eps, MODE: tl.constexpr,
                      WRITE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Rows ``x [R, D]`` (any strides, fp32/bf16/fp16) -> ``aux [R]`` fp32 and, with ``WRITE``, the bf16 copy
    ``out [R, Dp]`` (contiguous, columns D..Dp-1 zero)."""
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    rows = x_ptr + offs_r[:, None] * stride_r
    if MODE == 0:
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for d0 in range(0, Dp, BLOCK_D):
            cols = d0 + offs_d
            x = tl.load(rows + cols[None, :] * stride_d, mask=mask_r[:, None] & (cols < D)[None, :],
                        other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
            if WRITE:
                tl.store(out_ptr + offs_r[:, None] * Dp + cols[None, :], to_bf16(x, EMULATE_BF16),
                         mask=mask_r[:, None] & (cols < Dp)[None, :])
        tl.store(aux_ptr + offs_r, sq, mask=mask_r)
    else:
        inv = _inv_norms(rows, mask_r, stride_d, D, eps, BLOCK_R, BLOCK_D)
        if MODE == 1:
            tl.store(aux_ptr + offs_r, inv, mask=mask_r)
        else:
            tl.store(aux_ptr + offs_r, tl.zeros([BLOCK_R], dtype=tl.float32), mask=mask_r)
        if WRITE:
            for d0 in range(0, Dp, BLOCK_D):
                cols = d0 + offs_d
                x = tl.load(rows + cols[None, :] * stride_d, mask=mask_r[:, None] & (cols < D)[None, :],
                            other=0.0).to(tl.float32)
                if MODE == 2:
                    x = x * inv[:, None]
                tl.store(out_ptr + offs_r[:, None] * Dp + cols[None, :], to_bf16(x, EMULATE_BF16),
                         mask=mask_r[:, None] & (cols < Dp)[None, :])


def _tma_ready(x):
    """A bf16 ``[R, D]`` tensor TMA can read in place: unit column stride, 16-byte row pitch and base."""
    return (x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.shape[1] % _PITCH == 0
            and x.stride(0) % _PITCH == 0 and x.stride(0) >= x.shape[1] and x.data_ptr() % 16 == 0)


def prepare(x, mode):
    """``(copy [R, Dp] bf16, aux [R] fp32)`` for the search (see the module docstring). ``copy`` is ``x`` itself
    when it is a bf16 tensor TMA can read as it is (l2 and cos rows; codes for cos are always normalised)."""
    R, D = x.shape
    Dp = _padded(D)
    write = mode == PREP_COS_CODE or not _tma_ready(x)
    out = torch.empty((R, Dp), dtype=torch.bfloat16, device=x.device) if write else x
    aux = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R:
        block_r, block_d = 32, min(64, max(16, triton.next_power_of_2(D)))
        _bf16_rows_kernel[(triton.cdiv(R, block_r),)](
            x, out, aux, R, D, Dp, x.stride(0), x.stride(1), COS_EPS, MODE=mode, WRITE=write, EMULATE_BF16=_interpret(),
            BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out, aux


def _configs():
    if _interpret():
        # One config (the interpreter cannot time several); tests launch the other reduction through ``config``.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 64, "PACKED": True}, num_warps=4,
                              pre_hook=_set_blocks)]
    # (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages, register cap or None)
    shapes = [
        # D in one tile (the row tile stays in shared memory; the code tiles stream through num_stages buffers)
        (128, 128, 256, 8, 2, None),
        (128, 64, 256, 8, 3, None),
        (64, 128, 256, 4, 2, None),
        # D in 64- or 128-wide chunks
        (128, 128, 64, 8, 4, None),
        (128, 256, 64, 8, 3, None),
        (256, 128, 64, 8, 3, None),
        (128, 128, 128, 8, 3, None),
        (64, 128, 64, 4, 4, None),
        # two blocks per SM, so that one's tile reduction overlaps the other's products: 96 KiB of shared memory
        # and at most 128 registers per thread (sm_90, Triton 3.6: no spills with the cap)
        (128, 128, 64, 8, 3, 128),
        # small D (8, 16, 32: one 16- or 32-wide tile)
        (128, 128, 32, 8, 4, None),
        (128, 256, 32, 8, 4, None),
        (256, 128, 32, 8, 4, None),
        (128, 128, 16, 4, 4, None),
        (128, 256, 16, 8, 4, None),
        (256, 128, 16, 8, 4, None),
        (64, 128, 16, 4, 4, None),
        (128, 128, 32, 8, 4, 128),
        (128, 128, 16, 8, 4, 128),
    ]
    # Each tile shape with both tile reductions: the (value, index) pairs of keep_tile_min, and packed keys.
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d, "PACKED": packed}, num_warps=w, num_stages=s,
                      maxnreg=cap, pre_hook=_set_blocks)
        for packed in (True, False)
        for n, k, d, w, s, cap in shapes
    ]


def _set_blocks(nargs):
    """Descriptor block shapes follow the config (the autotuner calls this before every launch)."""
    nargs["z_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]
    nargs["e_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_D"]]


# Hopper allows up to 227 KiB of shared memory per block; leave room for the epilogue's reductions.
_SMEM_BUDGET = 200 * 1024


def _smem_estimate(config, D):
    kw = config.kwargs
    stages = max(config.num_stages, 1)
    if D <= kw["BLOCK_D"]:  # one row tile for the whole loop, code tiles per stage
        return 2 * kw["BLOCK_D"] * (kw["BLOCK_N"] + stages * kw["BLOCK_K"])
    return 2 * kw["BLOCK_D"] * stages * (kw["BLOCK_N"] + kw["BLOCK_K"])


def _prune_configs(configs, named_args, **kwargs):
    """Chunk widths that suit D: the one tile that holds D (16 to 256 wide), and for D > 64 also 64- or
    128-wide chunks looped over D; and the shared memory budget."""
    D = {**named_args, **kwargs}["D"]
    widest = max(16, triton.next_power_of_2(D))
    kept = []
    for c in configs:
        bd = c.kwargs["BLOCK_D"]
        fits = (bd == widest and widest <= 256) or (bd in (64, 128) and bd < D)
        if (fits or _interpret()) and _smem_estimate(c, D) <= _SMEM_BUDGET:
            kept.append(c)
    kept = kept or configs[:1]
    if not env_flag("LGVQ_FAST_TRITON_AUTOTUNE", default=True):
        kept = kept[:1]
    return kept


# Finite scores map below this key (see _keep_tile_min_packed); +-inf and NaN map at or above it.
_KEY_NONFINITE = tl.constexpr(0xFF000000)


@triton.jit
def _keep_tile_min_packed(acc, e_aux, k0, best, best_idx, IS_COS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``keep_tile_min`` with a cheaper tile reduction: each score becomes an unsigned key ordered as the
    scores are, whose lowest log2(BLOCK_K) bits are replaced by the score's column, so one unsigned ``min``
    per score yields the tile's best score and its lowest column together (instead of a (value, index)
    compare-and-select pair). The key ordering:

    - ``u = bits ^ 0x80000000`` for a non-negative float, ``~bits`` for a negative one: ascending floats give
      ascending ``u`` (from -NaN and -inf at the bottom to +inf and +NaN at the top);
    - ``u - 0x00800000`` (mod 2^32) moves -inf and negative NaNs from the bottom to the top: every finite
      score keys below 0xFF000000, +-inf and NaN at or above it, so a score that is not finite never wins,
      and a tile without a finite score decodes to +inf.

    Cost of the packing: a score is compared with its lowest ``log2(BLOCK_K)`` significand bits cleared
    (under 2^-16 of its magnitude for BLOCK_K = 128, 2^-15 for 256; the bf16 operands already round at
    2^-8), scores equal in the remaining bits go to the lowest index, and the best score is reported rounded
    toward -inf by as much.
    Exact ties still go to the lowest index."""
    if IS_COS:
        score = e_aux[None, :] - acc
    else:
        score = e_aux[None, :] - 2.0 * acc
    IDX_BITS: tl.constexpr = BLOCK_K.bit_length() - 1
    bits = score.to(tl.uint32, bitcast=True)
    sign = (score.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True)  # all ones for a negative
    key = (bits ^ (sign | 0x80000000)) - 0x00800000
    cols = tl.arange(0, BLOCK_K).to(tl.uint32)
    key = ((key >> IDX_BITS) << IDX_BITS) | cols[None, :]
    tile_key = tl.min(key, axis=1)
    tile_col = (tile_key & (BLOCK_K - 1)).to(tl.int64)
    u = ((tile_key >> IDX_BITS) << IDX_BITS) + 0x00800000
    flip = tl.where(u >= 0x80000000, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    tile_min = (u ^ flip).to(tl.float32, bitcast=True)
    tile_min = tl.where(tile_key < _KEY_NONFINITE, tile_min, float("inf"))
    better = tile_min < best
    best = tl.where(better, tile_min, best)
    best_idx = tl.where(better, k0 + tile_col, best_idx)
    return best, best_idx


@triton.autotune(
    configs=_configs(),
    key=["K", "D", "IS_COS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"ONE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit
def _nearest_code_tma_kernel(
    z_desc,
    e_desc,
    z_aux_ptr,
    e_aux_ptr,
    idx_ptr,
    dist_ptr,
    N,
    K,
    D,
    IS_COS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row0 = pid_n * BLOCK_N
    offs_kb = tl.arange(0, BLOCK_K)
    if ONE_D_TILE:
        z_tile = z_desc.load([row0, 0])
        if EMULATE_BF16:
            z_tile = z_tile.to(tl.float32)
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in tl.range(0, K, BLOCK_K):
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_D_TILE:
            et = e_desc.load([k0, 0])
            if EMULATE_BF16:
                acc = tl.dot(z_tile, et.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(z_tile, et.T, acc)
        else:
            for d0 in range(0, D, BLOCK_D):
                zt = z_desc.load([row0, d0])
                et = e_desc.load([k0, d0])
                if EMULATE_BF16:
                    acc = tl.dot(zt.to(tl.float32), et.to(tl.float32).T, acc, input_precision="ieee")
                else:
                    acc = tl.dot(zt, et.T, acc)
        offs_k = k0 + offs_kb
        e_aux = tl.load(e_aux_ptr + offs_k, mask=offs_k < K, other=float("inf"))
        if PACKED:
            best, best_idx = _keep_tile_min_packed(acc, e_aux, k0, best, best_idx, IS_COS, BLOCK_K)
        else:
            best, best_idx = keep_tile_min(acc, e_aux, k0, best, best_idx, IS_COS)
    offs_n = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    z_aux = tl.load(z_aux_ptr + offs_n, mask=mask_n, other=0.0)
    best_idx, dist = finish_rows(best, best_idx, z_aux, IS_COS)
    tl.store(idx_ptr + offs_n, best_idx, mask=mask_n)
    tl.store(dist_ptr + offs_n, dist, mask=mask_n)


def nearest_code_fast_tma(z, codebook, metric="l2", config=None):
    """Fast-mode search (bf16 products, fp32 norms) of ``z [N, D]`` against ``codebook [K, D]`` (any strides,
    fp32/bf16/fp16); returns ``(indices int64 [N], distances fp32 [N])``. Arguments are assumed validated by
    ``lgvq_fast.ops.nearest_code``. Needs TMA (sm_90+) on a GPU, or the CPU interpreter.

    ``config`` (a ``triton.Config`` of ``_configs()``) launches that config instead of autotuning (tests)."""
    assert z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1]
    N, D = z.shape
    K = codebook.shape[0]
    indices = _alloc.empty((N,), torch.int64, z.device)
    distances = _alloc.empty((N,), torch.float32, z.device)
    if N == 0:
        return indices, distances
    is_cos = metric == "cos"
    z16, z_aux = prepare(z, PREP_COS_ROW if is_cos else PREP_L2)
    e16, e_aux = prepare(codebook, PREP_COS_CODE if is_cos else PREP_L2)
    # Placeholder block shapes: the config's pre-hook sets the real ones before the launch.
    z_desc = TensorDescriptor.from_tensor(z16, [16, 16])
    e_desc = TensorDescriptor.from_tensor(e16, [16, 16])
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel, extra = _nearest_code_tma_kernel, {}
    if config is not None:
        kernel, extra = _nearest_code_tma_kernel.fn, config.all_kwargs()
        _set_blocks({"z_desc": z_desc, "e_desc": e_desc, **config.kwargs})
    kernel[grid](z_desc, e_desc, z_aux, e_aux, indices, distances, N, K, D, IS_COS=is_cos,
                 EMULATE_BF16=_interpret(), **extra)
    return indices, distances
