"""Triton relationship-alignment loss (LG-VQ spec section 4): fused forward and backward.

Forward, three launches. (1) One program per (batch element, tile of ``BLOCK_T`` vision tokens): text
norms -> similarity of every word to the tile's tokens -> the tile's max and its lowest index (written to a
small ``[B, T / BLOCK_T, L]`` scratch). Splitting T over programs matters: one program per batch element
walked all T x C in latency-bound steps (0.80 ms at B=64, L=30, T=256, C=512 on an H200, against 0.27 ms
for the vectorised PyTorch forward). (2) One program per batch element: combine the tiles in increasing
token order (strict ``>``, so ties go to the lowest index) -> gather the matched code rows ->
``U = normalize(a * G)`` -> ``R_uu = U U^T`` and ``R_tt = Tn Tn^T`` -> the masked squared difference summed
into one partial per batch element. (3) A one-program deterministic sum over the batch. ``p`` and ``a`` are
stored for the backward, which recomputes the L x C quantities (cheap) instead of saving them.

The similarity is a broadcast product reduced with ``tl.sum`` rather than ``tl.dot``: every
(word, token) pair then goes through the same instruction sequence, so two identical vision tokens
get bit-identical similarities and the tie rule holds (matrix-product kernels, including the CPU
interpreter's BLAS, may round edge columns differently). The L x L relation matrices have no such
constraint and use ``tl.dot`` in IEEE fp32.

Backward (derivation in lgvq_fast/ops/NOTES.md), one program per batch element: with
``M = coef * m m^T (.) m m^T (.) (R_uu - R_tt)`` and ``coef = grad * 4 / (B L L)``:
``g_U = M U``, ``g_W = (g_U - (g_U . U) U) / ||W||`` (``g_U / eps`` where ``||W|| <= eps``),
``g_G = a g_W``; rows of words that share a token are summed with a 0/1 matrix product and written
once by the first such word; rows no word picked are written as zeros. No atomics: deterministic.
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc

MAX_L = 64


@triton.jit
def _row_norms(base_ptr, rows, mask_rows, C, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_rows[:, None] & (offs_c < C)[None, :]
        x = tl.load(base_ptr + rows[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    return tl.sqrt(sq)


@triton.jit
def _scaled_rows_norm(base_ptr, rows, scale, mask_rows, C, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_rows[:, None] & (offs_c < C)[None, :]
        x = tl.load(base_ptr + rows[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        w = x * scale[:, None]
        sq += tl.sum(w * w, axis=1)
    return tl.sqrt(sq)


@triton.jit
def _relations(
    text_base, codes_base, offs_l, mask_l, p, a, t_den, w_den, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr
):
    r_uu = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    r_tt = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_l[:, None] & (offs_c < C)[None, :]
        g = tl.load(codes_base + p[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        u = g * a[:, None] / w_den[:, None]
        t = tl.load(text_base + offs_l[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        t = t / t_den[:, None]
        r_uu += tl.dot(u, tl.trans(u), input_precision="ieee")
        r_tt += tl.dot(t, tl.trans(t), input_precision="ieee")
    return r_uu, r_tt


@triton.jit
def _relation_match_kernel(
    text_ptr,
    vision_ptr,
    best_ptr,
    idx_ptr,
    L,
    T,
    C,
    NT,
    eps,
    BLOCK_L: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_CS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, j): every word's best cosine similarity and its lowest index over tokens j*BLOCK_T + [0, BLOCK_T)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    text_base = text_ptr + pid_b * L * C
    vision_base = vision_ptr + pid_b * T * C
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    t_den = tl.maximum(_row_norms(text_base, offs_l, mask_l, C, BLOCK_C, BLOCK_L), eps)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    dot = tl.zeros([BLOCK_L, BLOCK_T], dtype=tl.float32)
    v_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CS):
        offs_c = c0 + tl.arange(0, BLOCK_CS)
        mask_c = offs_c < C
        t = tl.load(
            text_base + offs_l[:, None] * C + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0
        ).to(tl.float32)
        v = tl.load(
            vision_base + offs_t[:, None] * C + offs_c[None, :], mask=mask_t[:, None] & mask_c[None, :], other=0.0
        ).to(tl.float32)
        dot += tl.sum(t[:, None, :] * v[None, :, :], axis=2)
        v_sq += tl.sum(v * v, axis=1)
    v_den = tl.maximum(tl.sqrt(v_sq), eps)
    sim = dot / (t_den[:, None] * v_den[None, :])
    sim = tl.where(mask_t[None, :], sim, float("-inf"))
    tile_max, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
    out = (pid_b * NT + pid_t) * L + offs_l
    tl.store(best_ptr + out, tile_max, mask=mask_l)
    tl.store(idx_ptr + out, tile_arg + pid_t * BLOCK_T, mask=mask_l)


@triton.jit
def _relation_loss_fwd_kernel(
    text_ptr,
    codes_ptr,
    pad_ptr,
    best_ptr,
    idx_ptr,
    p_ptr,
    a_ptr,
    partial_ptr,
    L,
    T,
    C,
    NT,
    eps,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program b: combine the token tiles' matches, then the relation matrices and this element's partial sum."""
    pid_b = tl.program_id(0).to(tl.int64)
    text_base = text_ptr + pid_b * L * C
    codes_base = codes_ptr + pid_b * T * C
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    t_den = tl.maximum(_row_norms(text_base, offs_l, mask_l, C, BLOCK_C, BLOCK_L), eps)

    # Tiles in increasing token order with a strict '>': ties go to the lowest index, as inside a tile.
    best = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_L], dtype=tl.int32)
    for j in range(0, NT):
        part = (pid_b * NT + j) * L + offs_l
        tile_max = tl.load(best_ptr + part, mask=mask_l, other=float("-inf"))
        tile_idx = tl.load(idx_ptr + part, mask=mask_l, other=0)
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    a = tl.where(mask_l, best, 0.0)
    p = tl.where(mask_l, best_idx, 0).to(tl.int64)
    tl.store(a_ptr + pid_b * L + offs_l, a, mask=mask_l)
    tl.store(p_ptr + pid_b * L + offs_l, p, mask=mask_l)

    w_den = tl.maximum(_scaled_rows_norm(codes_base, p, a, mask_l, C, BLOCK_C, BLOCK_L), eps)
    r_uu, r_tt = _relations(text_base, codes_base, offs_l, mask_l, p, a, t_den, w_den, C, BLOCK_L, BLOCK_C)
    m = tl.load(pad_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    diff = (r_uu - r_tt) * (m[:, None] * m[None, :])
    tl.store(partial_ptr + pid_b, tl.sum(tl.sum(diff * diff, axis=1), axis=0))


@triton.jit
def _relation_loss_reduce_kernel(partial_ptr, loss_ptr, B, scale, BLOCK_B: tl.constexpr):
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        acc += tl.load(partial_ptr + offs_b, mask=offs_b < B, other=0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _relation_loss_bwd_kernel(
    grad_ptr,
    text_ptr,
    codes_ptr,
    pad_ptr,
    p_ptr,
    a_ptr,
    dcodes_ptr,
    L,
    T,
    C,
    eps,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    text_base = text_ptr + pid_b * L * C
    codes_base = codes_ptr + pid_b * T * C
    dcodes_base = dcodes_ptr + pid_b * T * C
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    p = tl.load(p_ptr + pid_b * L + offs_l, mask=mask_l, other=0)
    a = tl.load(a_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    m = tl.load(pad_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    coef = tl.load(grad_ptr).to(tl.float32) * scale

    t_den = tl.maximum(_row_norms(text_base, offs_l, mask_l, C, BLOCK_C, BLOCK_L), eps)
    w_norm = _scaled_rows_norm(codes_base, p, a, mask_l, C, BLOCK_C, BLOCK_L)
    w_den = tl.maximum(w_norm, eps)
    r_uu, r_tt = _relations(text_base, codes_base, offs_l, mask_l, p, a, t_den, w_den, C, BLOCK_L, BLOCK_C)
    mm = m[:, None] * m[None, :]
    mix = coef * mm * mm * (r_uu - r_tt)  # [L, L]
    radial = tl.sum(mix * r_uu, axis=1)  # g_U . U per word
    big = w_norm > eps

    same = (p[:, None] == p[None, :]) & mask_l[None, :] & mask_l[:, None]
    earlier = same & (offs_l[None, :] < offs_l[:, None])
    first = mask_l & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    same_f = same.to(tl.float32)

    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        hit = (p[None, :] == offs_t[:, None]) & mask_l[None, :]
        unpicked = (offs_t < T) & (tl.sum(hit.to(tl.int32), axis=1) == 0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            zeros = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
            tl.store(
                dcodes_base + offs_t[:, None] * C + offs_c[None, :],
                zeros.to(dcodes_ptr.dtype.element_ty),
                mask=unpicked[:, None] & (offs_c < C)[None, :],
            )

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g = tl.load(
            codes_base + p[:, None] * C + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0
        ).to(tl.float32)
        u = g * a[:, None] / w_den[:, None]
        g_u = tl.dot(mix, u, input_precision="ieee")
        g_w = tl.where(big[:, None], (g_u - radial[:, None] * u) / w_den[:, None], g_u / eps)
        g_g = g_w * a[:, None]
        # 0/1 weights: the products are exact and every shared token gets one sum, stored once.
        summed = tl.dot(same_f, g_g, input_precision="ieee")
        tl.store(
            dcodes_base + p[:, None] * C + offs_c[None, :],
            summed.to(dcodes_ptr.dtype.element_ty),
            mask=first[:, None] & mask_c[None, :],
        )


def _blocks(L, C):
    BLOCK_L = max(16, triton.next_power_of_2(L))
    # tl.dot operands are staged in shared memory: 96 KiB per program at BLOCK_L = 64, BLOCK_C = 64 (sm_90).
    BLOCK_C = min(64, max(16, triton.next_power_of_2(C)))
    BLOCK_CS = 16
    BLOCK_T = max(2, 8192 // (BLOCK_L * BLOCK_CS))
    return BLOCK_L, BLOCK_T, BLOCK_CS, BLOCK_C


def relation_loss_fwd(text_feats, vision_tokens, codes, pad, eps):
    """Fused forward on contiguous ``[B, L, C]``, ``[B, T, C]``, ``[B, T, C]``, fp32 ``pad [B, L]``.

    Returns ``(loss fp32 [], p int64 [B, L], a fp32 [B, L])``.
    """
    B, L, C = text_feats.shape
    T = vision_tokens.shape[1]
    assert L <= MAX_L, "checked by the caller"
    device = text_feats.device
    loss = _alloc.empty((), torch.float32, device)
    p = _alloc.empty((B, L), torch.int64, device)
    a = _alloc.empty((B, L), torch.float32, device)
    partial = _alloc.empty((B,), torch.float32, device)
    BLOCK_L, BLOCK_T, BLOCK_CS, BLOCK_C = _blocks(L, C)
    NT = triton.cdiv(T, BLOCK_T)
    tile_best = _alloc.empty((B, NT, L), torch.float32, device)
    tile_idx = _alloc.empty((B, NT, L), torch.int32, device)
    _relation_match_kernel[(B, NT)](
        text_feats, vision_tokens, tile_best, tile_idx, L, T, C, NT, eps,
        BLOCK_L=BLOCK_L, BLOCK_T=BLOCK_T, BLOCK_CS=BLOCK_CS, BLOCK_C=BLOCK_C, num_warps=4,
    )
    num_warps = 4 if BLOCK_L <= 32 else 8
    _relation_loss_fwd_kernel[(B,)](
        text_feats, codes, pad, tile_best, tile_idx, p, a, partial, L, T, C, NT, eps,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    _relation_loss_reduce_kernel[(1,)](partial, loss, B, 1.0 / (B * L * L), BLOCK_B=1024)
    return loss, p, a


def relation_loss_bwd(grad, text_feats, codes, pad, p, a, eps):
    """Fused backward: gradient of the loss with respect to ``codes`` (same dtype and shape)."""
    B, L, C = text_feats.shape
    T = codes.shape[1]
    dcodes = _alloc.empty(codes.shape, codes.dtype, codes.device)
    BLOCK_L, _, _, BLOCK_C = _blocks(L, C)
    # Narrower C chunks and 8 warps keep the L x L tiles and the chunk's rows in registers: the sm_90 compile
    # check (Triton 3.6) went from 255 registers + 200 B of stack at L=30 and 880-984 B at L=64 to no stack at
    # L=30 and at most 16 B at L=64. Not yet timed on a GPU.
    BLOCK_C = min(BLOCK_C, 32 if BLOCK_L <= 32 else 16)
    BLOCK_T = 32
    num_warps = 4 if BLOCK_L <= 16 else 8
    _relation_loss_bwd_kernel[(B,)](
        grad, text_feats, codes, pad, p, a, dcodes, L, T, C, eps, 4.0 / (B * L * L),
        BLOCK_L=BLOCK_L, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return dcodes
