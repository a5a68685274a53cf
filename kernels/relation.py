"""Triton relationship-alignment loss (LG-VQ spec section 4): fused forward and backward.

Forward, three launches. (1) One program per (batch element, tile of ``BLOCK_T`` vision tokens): text
norms -> similarity of every word to the tile's tokens -> the tile's max and its lowest index (written to a
small ``[B, T / BLOCK_T, L]`` scratch). Splitting T over programs matters: one program per batch element
walked all T x C in latency-bound steps (0.80 ms at B=64, L=30, T=256, C=512 on an H200, against 0.27 ms
for the vectorised PyTorch forward). (2) One program per (batch element, tile of 16-32 words; one tile up
to L = 32): combine the token tiles in increasing token order (strict ``>``, so ties go to the lowest index) ->
gather the matched code rows -> ``U = normalize(a * G)`` -> the tile's rows of ``R_uu = U U^T`` and
``R_tt = Tn Tn^T`` against every word -> the masked squared difference summed into one partial per program.
Word tiles keep L up to 128 (CLIP's 77) within registers: a whole 128 x 128 pair of fp32 tiles would not fit.
(3) A one-program deterministic sum over the partials. ``p`` and ``a`` are
stored for the backward, which recomputes the L x C quantities (cheap) instead of saving them.

The similarity is a broadcast product reduced with ``tl.sum`` rather than ``tl.dot``: every
(word, token) pair then goes through the same instruction sequence, so two identical vision tokens
get bit-identical similarities and the tie rule holds (matrix-product kernels, including the CPU
interpreter's BLAS, may round edge columns differently). The L x L relation matrices have no such
constraint and use ``tl.dot`` in IEEE fp32.

Backward (derivation in lgvq_fast/ops/NOTES.md), two launches. (1) One program per (batch element, tile of
words): with ``M = coef * m m^T (.) m m^T (.) (R_uu - R_tt)`` and ``coef = grad * 4 / (B L L)``, the tile's
rows of ``g_U = M U``, ``g_W = (g_U - (g_U . U) U) / ||W||`` (``g_U / eps`` where ``||W|| <= eps``) and
``g_G = a g_W``, written to an fp32 ``[B, L, C]`` scratch. (2) One program per (batch element, chunk of
channels): rows of words that share a token (possibly in different word tiles) are summed in word order and
written once by the first such word; rows no word picked are written as zeros. No atomics:
deterministic.
"""
import torch
import triton
import triton.language as tl

from lgvq_fast import _alloc

MAX_L = 128


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
def _unit_rows(codes_base, p, a, w_den, mask, offs_c, mask_c, C):
    """``U = a G / max(||a G||, eps)`` for the words ``p`` picked, columns ``offs_c``: ``[rows, BLOCK_C]`` fp32."""
    g = tl.load(codes_base + p[:, None] * C + offs_c[None, :], mask=mask[:, None] & mask_c, other=0.0)
    return g.to(tl.float32) * a[:, None] / w_den[:, None]


@triton.jit
def _text_rows(text_base, offs, mask, t_den, offs_c, mask_c, C):
    """``Tn = T / max(||T||, eps)`` for the words ``offs``, columns ``offs_c``: ``[rows, BLOCK_C]`` fp32."""
    t = tl.load(text_base + offs[:, None] * C + offs_c[None, :], mask=mask[:, None] & mask_c, other=0.0)
    return t.to(tl.float32) / t_den[:, None]


@triton.jit
def _relations(
    text_base, codes_base, offs_i, mask_i, p_i, a_i, t_den_i, w_den_i, offs_l, mask_l, p_l, a_l, t_den_l, w_den_l,
    C, BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Rows ``offs_i`` of ``R_uu = U U^T`` and ``R_tt = Tn Tn^T`` against every word ``offs_l``: ``[BLOCK_I,
    BLOCK_L]`` each. A word's row and column values come from the same loads and arithmetic, so they agree
    bit for bit."""
    r_uu = tl.zeros([BLOCK_I, BLOCK_L], dtype=tl.float32)
    r_tt = tl.zeros([BLOCK_I, BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = (offs_c < C)[None, :]
        u_l = _unit_rows(codes_base, p_l, a_l, w_den_l, mask_l, offs_c, mask_c, C)
        t_l = _text_rows(text_base, offs_l, mask_l, t_den_l, offs_c, mask_c, C)
        if BLOCK_I == BLOCK_L:  # one tile holds every word: the rows are the columns
            u_i = u_l
            t_i = t_l
        else:
            u_i = _unit_rows(codes_base, p_i, a_i, w_den_i, mask_i, offs_c, mask_c, C)
            t_i = _text_rows(text_base, offs_i, mask_i, t_den_i, offs_c, mask_c, C)
        r_uu += tl.dot(u_i, tl.trans(u_l), input_precision="ieee")
        r_tt += tl.dot(t_i, tl.trans(t_l), input_precision="ieee")
    return r_uu, r_tt


@triton.jit
def _combine_tiles(best_ptr, idx_ptr, pid_b, NT, L, offs, mask, BLOCK: tl.constexpr):
    """The token tiles' matches of words ``offs``, in increasing token order with a strict '>': ties go to the
    lowest index, as inside a tile. Returns ``(a fp32, p int64)`` (0 for masked words)."""
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, NT):
        part = (pid_b * NT + j) * L + offs
        tile_max = tl.load(best_ptr + part, mask=mask, other=float("-inf"))
        tile_idx = tl.load(idx_ptr + part, mask=mask, other=0)
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    return tl.where(mask, best, 0.0), tl.where(mask, best_idx, 0).to(tl.int64)


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
    NI,
    eps,
    BLOCK_I: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, i): combine the token tiles' matches, then rows ``i * BLOCK_I + [0, BLOCK_I)`` of the relation
    matrices against every word, and their partial sum."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    text_base = text_ptr + pid_b * L * C
    codes_base = codes_ptr + pid_b * T * C
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < L
    a_l, p_l = _combine_tiles(best_ptr, idx_ptr, pid_b, NT, L, offs_l, mask_l, BLOCK_L)
    t_den_l = tl.maximum(_row_norms(text_base, offs_l, mask_l, C, BLOCK_C, BLOCK_L), eps)
    w_den_l = tl.maximum(_scaled_rows_norm(codes_base, p_l, a_l, mask_l, C, BLOCK_C, BLOCK_L), eps)
    if BLOCK_I == BLOCK_L:  # one tile holds every word
        a_i, p_i, t_den_i, w_den_i = a_l, p_l, t_den_l, w_den_l
    else:
        a_i, p_i = _combine_tiles(best_ptr, idx_ptr, pid_b, NT, L, offs_i, mask_i, BLOCK_I)
        t_den_i = tl.maximum(_row_norms(text_base, offs_i, mask_i, C, BLOCK_C, BLOCK_I), eps)
        w_den_i = tl.maximum(_scaled_rows_norm(codes_base, p_i, a_i, mask_i, C, BLOCK_C, BLOCK_I), eps)
    tl.store(a_ptr + pid_b * L + offs_i, a_i, mask=mask_i)
    tl.store(p_ptr + pid_b * L + offs_i, p_i, mask=mask_i)
    r_uu, r_tt = _relations(text_base, codes_base, offs_i, mask_i, p_i, a_i, t_den_i, w_den_i, offs_l, mask_l, p_l,
                            a_l, t_den_l, w_den_l, C, BLOCK_I, BLOCK_L, BLOCK_C)
    m_l = tl.load(pad_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    m_i = tl.load(pad_ptr + pid_b * L + offs_i, mask=mask_i, other=0.0)
    diff = (r_uu - r_tt) * (m_i[:, None] * m_l[None, :])
    tl.store(partial_ptr + pid_b * NI + pid_i, tl.sum(tl.sum(diff * diff, axis=1), axis=0))


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
    gg_ptr,
    L,
    T,
    C,
    eps,
    scale,
    BLOCK_I: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, i): the gradient to the matched code row of each word ``i * BLOCK_I + [0, BLOCK_I)``, written
    to the ``[B, L, C]`` fp32 scratch ``gg`` (words that share a token are summed by the next kernel)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    text_base = text_ptr + pid_b * L * C
    codes_base = codes_ptr + pid_b * T * C
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < L
    p_l = tl.load(p_ptr + pid_b * L + offs_l, mask=mask_l, other=0)
    a_l = tl.load(a_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    m_l = tl.load(pad_ptr + pid_b * L + offs_l, mask=mask_l, other=0.0)
    p_i = tl.load(p_ptr + pid_b * L + offs_i, mask=mask_i, other=0)
    a_i = tl.load(a_ptr + pid_b * L + offs_i, mask=mask_i, other=0.0)
    m_i = tl.load(pad_ptr + pid_b * L + offs_i, mask=mask_i, other=0.0)
    coef = tl.load(grad_ptr).to(tl.float32) * scale

    t_den_l = tl.maximum(_row_norms(text_base, offs_l, mask_l, C, BLOCK_C, BLOCK_L), eps)
    w_norm_l = _scaled_rows_norm(codes_base, p_l, a_l, mask_l, C, BLOCK_C, BLOCK_L)
    w_den_l = tl.maximum(w_norm_l, eps)
    if BLOCK_I == BLOCK_L:  # one tile holds every word
        t_den_i, w_norm_i, w_den_i = t_den_l, w_norm_l, w_den_l
    else:
        t_den_i = tl.maximum(_row_norms(text_base, offs_i, mask_i, C, BLOCK_C, BLOCK_I), eps)
        w_norm_i = _scaled_rows_norm(codes_base, p_i, a_i, mask_i, C, BLOCK_C, BLOCK_I)
        w_den_i = tl.maximum(w_norm_i, eps)
    r_uu, r_tt = _relations(text_base, codes_base, offs_i, mask_i, p_i, a_i, t_den_i, w_den_i, offs_l, mask_l, p_l,
                            a_l, t_den_l, w_den_l, C, BLOCK_I, BLOCK_L, BLOCK_C)
    mm = m_i[:, None] * m_l[None, :]
    mix = coef * mm * mm * (r_uu - r_tt)  # rows of the symmetric [L, L] matrix M
    radial = tl.sum(mix * r_uu, axis=1)  # g_U . U per word of the block
    big = w_norm_i > eps
    gg_base = gg_ptr + pid_b * L * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = (offs_c < C)[None, :]
        u_l = _unit_rows(codes_base, p_l, a_l, w_den_l, mask_l, offs_c, mask_c, C)
        if BLOCK_I == BLOCK_L:
            u_i = u_l
        else:
            u_i = _unit_rows(codes_base, p_i, a_i, w_den_i, mask_i, offs_c, mask_c, C)
        g_u = tl.dot(mix, u_l, input_precision="ieee")
        g_w = tl.where(big[:, None], (g_u - radial[:, None] * u_i) / w_den_i[:, None], g_u / eps)
        tl.store(gg_base + offs_i[:, None] * C + offs_c[None, :], g_w * a_i[:, None], mask=mask_i[:, None] & mask_c)


@triton.jit
def _relation_loss_scatter_kernel(
    gg_ptr,
    p_ptr,
    dcodes_ptr,
    L,
    T,
    C,
    BLOCK_L: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, c): for channels ``c * BLOCK_C + [0, BLOCK_C)``, each picked token's gradient row is the sum of
    its words' rows (in word order), stored once by its first word; the tokens no word picked get zeros. No
    atomics: deterministic."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p = tl.load(p_ptr + pid_b * L + offs_l, mask=mask_l, other=-1)
    dcodes_base = dcodes_ptr + pid_b * T * C
    gg_base = gg_ptr + pid_b * L * C
    # Word by word in increasing order (one fixed order of fp32 sums): every word adds its row to the words that
    # share its token, and a word that meets an earlier one with its token is not the first. No L x L matrix
    # (at L = 128 one spilled kilobytes per thread on sm_90).
    summed = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    first = mask_l
    for j in range(0, L):
        p_j = tl.load(p_ptr + pid_b * L + j)
        row = tl.load(gg_base + j * C + offs_c, mask=mask_c, other=0.0)
        same = p == p_j
        summed += tl.where(same[:, None], row[None, :], 0.0)
        first = first & ~(same & (offs_l > j))
    tl.store(dcodes_base + p[:, None] * C + offs_c[None, :], summed.to(dcodes_ptr.dtype.element_ty),
             mask=first[:, None] & mask_c[None, :])
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        hit = (p[None, :] == offs_t[:, None]) & mask_l[None, :]
        unpicked = (offs_t < T) & (tl.sum(hit.to(tl.int32), axis=1) == 0)
        zeros = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        tl.store(dcodes_base + offs_t[:, None] * C + offs_c[None, :], zeros.to(dcodes_ptr.dtype.element_ty),
                 mask=unpicked[:, None] & mask_c[None, :])


def _blocks(L, C):
    BLOCK_L = max(16, triton.next_power_of_2(L))
    # Rows of the L x L relation matrices per program: all of them up to L = 32; 32-row tiles at L <= 64; 16-row
    # tiles above (L = 128 in one program would hold two 128 x 128 fp32 tiles, 128 KiB, in registers; 32-row
    # tiles there spilled ~300 B per thread in the backward's sm_90 compile).
    BLOCK_I = min(BLOCK_L, 32 if BLOCK_L <= 64 else 16)
    # tl.dot operands are staged in shared memory: narrower C chunks as L grows.
    BLOCK_C = min(64 if BLOCK_L <= 32 else 32, max(16, triton.next_power_of_2(C)))
    BLOCK_CS = 16
    BLOCK_T = max(2, 8192 // (BLOCK_L * BLOCK_CS))
    return BLOCK_L, BLOCK_I, BLOCK_T, BLOCK_CS, BLOCK_C


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
    BLOCK_L, BLOCK_I, BLOCK_T, BLOCK_CS, BLOCK_C = _blocks(L, C)
    NT, NI = triton.cdiv(T, BLOCK_T), triton.cdiv(L, BLOCK_I)
    partial = _alloc.empty((B, NI), torch.float32, device)
    tile_best = _alloc.empty((B, NT, L), torch.float32, device)
    tile_idx = _alloc.empty((B, NT, L), torch.int32, device)
    _relation_match_kernel[(B, NT)](
        text_feats, vision_tokens, tile_best, tile_idx, L, T, C, NT, eps,
        BLOCK_L=BLOCK_L, BLOCK_T=BLOCK_T, BLOCK_CS=BLOCK_CS, BLOCK_C=BLOCK_C, num_warps=4,
    )
    num_warps = 4 if BLOCK_L <= 32 else 8
    _relation_loss_fwd_kernel[(B, NI)](
        text_feats, codes, pad, tile_best, tile_idx, p, a, partial, L, T, C, NT, NI, eps,
        BLOCK_I=BLOCK_I, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    _relation_loss_reduce_kernel[(1,)](partial, loss, B * NI, 1.0 / (B * L * L), BLOCK_B=1024)
    return loss, p, a


def relation_loss_bwd(grad, text_feats, codes, pad, p, a, eps):
    """Fused backward: gradient of the loss with respect to ``codes`` (same dtype and shape). Two launches: the
    per-word gradients into an fp32 ``[B, L, C]`` scratch (programs over batch x word tiles), then the per-token
    sums and zeros (programs over batch x channel chunks)."""
    B, L, C = text_feats.shape
    T = codes.shape[1]
    dcodes = _alloc.empty(codes.shape, codes.dtype, codes.device)
    gg = torch.empty((B, L, C), dtype=torch.float32, device=codes.device)
    BLOCK_L, BLOCK_I, _, _, BLOCK_C = _blocks(L, C)
    NI = triton.cdiv(L, BLOCK_I)
    # Narrower C chunks and 8 warps keep the word tiles and the chunk's rows in registers (sm_90 compile check,
    # bench/results/triton_aot).
    BLOCK_C = min(BLOCK_C, 32 if BLOCK_L <= 32 else 16)
    num_warps = 4 if BLOCK_L <= 16 else 8
    _relation_loss_bwd_kernel[(B, NI)](
        grad, text_feats, codes, pad, p, a, gg, L, T, C, eps, 4.0 / (B * L * L),
        BLOCK_I=BLOCK_I, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    BLOCK_CG = min(32, max(16, triton.next_power_of_2(C)))
    _relation_loss_scatter_kernel[(B, triton.cdiv(C, BLOCK_CG))](
        gg, p, dcodes, L, T, C, BLOCK_L=BLOCK_L, BLOCK_T=32, BLOCK_C=BLOCK_CG, num_warps=4 if BLOCK_L <= 32 else 8,
    )
    return dcodes
