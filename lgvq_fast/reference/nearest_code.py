"""Reference nearest-code search: the executable spec of ``lgvq_fast.ops.nearest_code``.

Plain PyTorch, any device, float64-capable. It chunks over the rows of ``z`` so
that no N x K distance matrix is ever allocated: each chunk holds at most
``MAX_CHUNK_ELEMENTS`` distances.

Distances:
- ``metric="l2"``: squared Euclidean distance ``||z||^2 + ||e||^2 - 2 z.e``,
  clamped at 0. The argmin uses the score ``||e||^2 - 2 z.e`` (``||z||^2`` is the
  same for every code and adding it first would lose low bits to cancellation).
- ``metric="cos"``: ``1 - cos(z, e)`` with ``cos = z.e / (max(||z||, eps) *
  max(||e||, eps))`` and ``eps = COS_EPS`` (as ``torch.nn.functional.normalize``),
  so a zero vector has cosine 0 with everything (distance 1) instead of NaN. The
  argmin uses the score ``-cos``. Norms are taken of each vector divided by its
  largest magnitude, so no square overflows (any finite vector normalises).

Ties go to the lowest index, as ``torch.argmin``.

Non-finite values (the rule every backend follows; ``lgvq_fast.ops.nearest_code``):
a score that is not finite (NaN or +-inf) never wins. So a code holding a NaN or
an inf never wins, nor does an l2 code whose ``||e||^2`` overflows the compute
dtype; a row of ``z`` holding a NaN or an inf has no finite score; for cos a
vector whose norm reaches 2^126 (2^1022 in float64) counts as non-finite. A row
with no finite score gets index 0 and distance NaN. Non-finite rows and codes are
also excluded explicitly here, so that the spec does not depend on how a BLAS
treats ``0 * NaN``.

Also here: :func:`exact_nearest` (float64 truth) and :func:`tie_aware_mismatch`,
shared by the tests and ``bench/nn_search.py``.
"""
import math

import torch

COS_EPS = 1e-12
MAX_CHUNK_ELEMENTS = 1 << 24
METRICS = ("l2", "cos")


def _chunk_rows(K):
    return max(1, MAX_CHUNK_ELEMENTS // max(K, 1))


def _normalize(x, eps=COS_EPS):
    """``x / max(||x||, eps)`` along the last dim without overflow: the norm is taken of ``x / max|x|``.

    A row whose norm reaches 2^126 (fp32; 2^1022 in float64: a quarter of the dtype's range) comes out
    NaN: the rule counts it as non-finite.
    """
    amax = x.abs().amax(dim=-1, keepdim=True)
    # A zero row keeps scale 1; a NaN amax too (the row stays NaN); an inf amax turns the row into NaN.
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    xs = x / scale
    norm = xs.norm(dim=-1, keepdim=True)
    limit = 2.0 ** (math.frexp(torch.finfo(x.dtype).max)[1] - 2)
    xs = torch.where(norm * scale >= limit, float("nan"), xs)
    return xs / norm.clamp_min(eps / scale)


def nearest_code(z, codebook, metric="l2", compute_dtype=None):
    """Return ``(indices int64 [...], distances fp32 [...])`` for ``z [..., D]``, ``codebook [K, D]``.

    ``compute_dtype`` defaults to float64 when either input is float64, else float32.
    Passing ``torch.bfloat16`` gives a plain low-precision search (benchmark baseline).
    Distances are returned in float32, or float64 when computed in float64.
    """
    if metric not in METRICS:
        raise ValueError(f"nearest_code: metric must be one of {METRICS}, got {metric!r}")
    if compute_dtype is None:
        wide = torch.float64 in (z.dtype, codebook.dtype)
        compute_dtype = torch.float64 if wide else torch.float32
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    lead = z.shape[:-1]
    D = z.shape[-1]
    z2 = z.reshape(-1, D)
    N, K = z2.shape[0], codebook.shape[0]
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    distances = torch.empty(N, dtype=out_dtype, device=z.device)
    inf = float("inf")
    # bias + (-2 z.e) (l2) or bias + (-z.e) (cos) is the score; a non-finite code (NaN or inf, or for cos a norm
    # of 2^126 or more) gets bias +inf, so its score is +inf or NaN whatever the BLAS does with 0 * NaN.
    if metric == "cos":
        # Normalise in at least fp32 so the eps clamp and the norms do not round in bf16.
        e = _normalize(codebook.to(torch.promote_types(compute_dtype, torch.float32)))
        code_bad = ~torch.isfinite(e).all(dim=1)  # [K]
        e = e.to(compute_dtype)
        bias, alpha = torch.zeros(K, dtype=out_dtype, device=z.device), -1.0
    else:
        code_bad = ~torch.isfinite(codebook).all(dim=1)  # [K]
        e = codebook.to(compute_dtype)
        bias, alpha = e.to(out_dtype).pow(2).sum(dim=1), -2.0  # [K] ||e||^2
    bias = bias.masked_fill(code_bad, inf)
    step = _chunk_rows(K)
    for start in range(0, N, step):
        zc = z2[start:start + step]
        if metric == "cos":
            zc = _normalize(zc.to(torch.promote_types(compute_dtype, torch.float32)))
        row_ok = torch.isfinite(zc).all(dim=1)  # [n]
        zc = zc.to(compute_dtype)
        if compute_dtype == out_dtype:
            score = torch.addmm(bias, zc, e.T, alpha=alpha)  # [n, K]
        else:
            score = bias + alpha * (zc @ e.T).to(out_dtype)  # [n, K]
        # The rule: a score that is not finite never wins; no finite score -> index 0 (argmin's first +inf).
        score.nan_to_num_(nan=inf, posinf=inf, neginf=inf)
        idx = torch.where(row_ok, score.argmin(dim=1), 0)
        best = torch.where(row_ok, score.gather(1, idx[:, None]).squeeze(1), inf)
        if metric == "cos":
            dist = 1.0 + best
        else:
            dist = (zc.to(out_dtype).pow(2).sum(dim=1) + best).clamp_min(0.0)
        distances[start:start + step] = torch.where(best < inf, dist, float("nan"))
        indices[start:start + step] = idx
    return indices.reshape(lead), distances.reshape(lead)


def exact_distances(z2d, codebook, rows_idx, metric="l2"):
    """float64 distances from each row of ``z2d`` to the codes ``rows_idx`` ([N, M] indices)."""
    z = z2d.to(torch.float64)
    e = codebook.to(torch.float64)
    if metric == "cos":
        z, e = _normalize(z), _normalize(e)
        return 1.0 - torch.einsum("nd,nmd->nm", z, e[rows_idx])
    diff = z[:, None, :] - e[rows_idx]
    return diff.pow(2).sum(dim=-1)


def exact_nearest(z, codebook, metric="l2"):
    """float64 truth: ``(indices, distances float64)`` for ``z [..., D]``; chunked over rows."""
    return nearest_code(z.to(torch.float64), codebook.to(torch.float64), metric, torch.float64)


def tie_tolerance(z2d, codebook, metric="l2", rtol=1e-5):
    """Per-row distance tolerance under which two codes count as tied.

    Rounding in an fp32 search is proportional to the magnitudes it adds:
    ``||z||^2``, ``||e||^2`` and ``2 |z| |e|``, so the tolerance is
    ``rtol * (||z|| + max_k ||e_k||)^2`` (``rtol * 4`` for the cosine metric,
    whose vectors are normalised).
    """
    if metric == "cos":
        return torch.full((z2d.shape[0],), 4.0 * rtol, dtype=torch.float64, device=z2d.device)
    z_norm = z2d.to(torch.float64).norm(dim=1)
    e_norm = codebook.to(torch.float64).norm(dim=1).max() if codebook.shape[0] else 0.0
    return rtol * (z_norm + e_norm) ** 2


def tie_aware_mismatch(z, codebook, indices, metric="l2", rtol=1e-5, truth=None):
    """Fraction of rows whose chosen code is farther than the best by more than the tie tolerance.

    ``truth`` may pass precomputed ``exact_nearest`` indices for the same rows.
    Returns 0.0 for empty input.
    """
    D = z.shape[-1]
    z2 = z.reshape(-1, D)
    idx = indices.reshape(-1).to(torch.int64)
    if z2.shape[0] == 0:
        return 0.0
    if truth is None:
        truth = exact_nearest(z2, codebook, metric)[0]
    truth = truth.reshape(-1).to(z2.device)
    # An index outside [0, K) (e.g. an unwritten poisoned output) is a mismatch.
    valid = (idx >= 0) & (idx < codebook.shape[0])
    bad = int((~valid).sum())
    idx = torch.where(valid, idx, truth)
    step = _chunk_rows(D * 2)
    for start in range(0, z2.shape[0], step):
        zc = z2[start:start + step]
        pair = torch.stack([idx[start:start + step], truth[start:start + step]], dim=1)
        d = exact_distances(zc, codebook, pair, metric)
        tol = tie_tolerance(zc, codebook, metric, rtol)
        bad += int(((d[:, 0] - d[:, 1]) > tol).sum())
    return bad / z2.shape[0]
