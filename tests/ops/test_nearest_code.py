"""Tests for lgvq_fast.ops.nearest_code against float64: the reference and Triton (interpreter) backends on CPU; on a
GPU (``-m gpu``) the reference, Triton and CUDA-extension searches, both metrics, both precisions, fp32/bf16/fp16
inputs, D from 8 to 256, tails of N and K, the extension's fp32 validation loop, ties, strides and determinism."""
import functools

import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import nearest_code
from lgvq_fast.reference import nearest_code as ref

CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
needs_ext = pytest.mark.skipif(not _backend.cuda_ext_available(),
                               reason=f"the compiled extension is not built: {_backend.cuda_ext_import_error()}")
GPU_IMPLS = [pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_ext)]
METRICS = ["l2", "cos"]
PRECISIONS = ["exact", "fast"]
# (N, K, D): non-powers of two, K=1, D spanning one or several 64-wide chunks.
SHAPES = [(300, 1000, 77), (64, 1, 8), (100, 50, 256), (130, 200, 8)]
# Fraction of rows a bf16-product search may resolve differently from float64
# (measured about 0.5 % on Gaussian inputs at K=1000, D=77).
FAST_MISMATCH_MAX = 0.05


def _shape_id(s):
    return "n{}_k{}_d{}".format(*s)


def _check_against_float64(z, codebook, indices, distances, metric, precision, truth=None,
                           fast_mismatch_max=FAST_MISMATCH_MAX, exact_rtol=1e-5, atol=0.0):
    """The one checker of every nearest_code test, CPU and GPU: every output written (a poisoned output is NaN or
    out of range), the index tie-aware against float64 (no row off beyond a tie for ``exact`` and for the CUDA
    extension's fp32 loop, ``scalar``; at most ``fast_mismatch_max`` of the rows for ``fast``), the distance
    within ``rtol`` of the summed magnitudes (2^-6 for ``fast``, ``exact_rtol`` otherwise) + ``atol``.
    ``truth``: the float64 argmin, where the caller has it cached."""
    D = z.shape[-1]
    assert indices.shape == z.shape[:-1] and distances.shape == z.shape[:-1]
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    z2d, idx, dist = z.reshape(-1, D), indices.reshape(-1), distances.reshape(-1)
    assert torch.isfinite(dist).all(), "unwritten (poisoned) or non-finite distances"
    assert ((idx >= 0) & (idx < codebook.shape[0])).all(), "index out of range (unwritten output?)"
    if truth is None:
        truth, _ = ref.exact_nearest(z2d, codebook, metric)
    rate = ref.tie_aware_mismatch(z2d, codebook, idx, metric, truth=truth)
    if precision == "fast":
        assert rate <= fast_mismatch_max, f"fast search mismatch rate {rate:.2%}"
    else:
        assert rate == 0.0, f"{precision} search disagrees with float64 beyond ties on {rate:.4%} of rows"
    chosen = ref.exact_distances(z2d, codebook, idx[:, None], metric)[:, 0]
    rtol = 2.0**-6 if precision == "fast" else exact_rtol
    tol = ref.tie_tolerance(z2d, codebook, metric, rtol) + atol
    err = (dist.double() - chosen).abs()
    assert (err <= tol).all(), f"distance error {err.max():.3g} > tol {tol[err.argmax()]:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_matches_float64(impl, metric, precision, shape):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    N, K, D = shape
    z = torch.randn(N, D)
    codebook = torch.randn(K, D)
    indices, distances = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    _check_against_float64(z, codebook, indices, distances, metric, precision)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_half_inputs(impl, metric, dtype):
    z = torch.randn(150, 77).to(dtype)
    codebook = torch.randn(300, 77).to(dtype)
    indices, distances = nearest_code(z, codebook, metric=metric, impl=impl)
    _check_against_float64(z, codebook, indices, distances, metric, "exact")


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_fwd_bf16x3_split(metric):
    from lgvq_fast.kernels.nearest_code import nearest_code_fwd

    z = torch.randn(200, 77)
    codebook = torch.randn(300, 77)
    indices, distances = nearest_code_fwd(z, codebook, metric, "exact", exact_split="bf16x3")
    _check_against_float64(z, codebook, indices, distances, metric, "exact")


def _first_occurrence(codebook):
    """For each code, the lowest index holding an identical row."""
    same = (codebook[:, None, :] == codebook[None, :, :]).all(dim=-1)
    return same.to(torch.int64).argmax(dim=1)


def _integer_duplicates(metric):
    """``(z [200, 24], codebook [300, 24])``: every code repeated, at random places (different 64/128-wide code
    tiles), with values that keep every product and sum exact in fp32 and bf16, so duplicated rows tie exactly
    whatever order a backend sums in: small integers (l2); for cos four entries of +-1 per code (norm 2), so its
    normalised entries (+-0.5) and all products stay exact too."""
    if metric == "l2":
        base = torch.randint(-3, 4, (60, 24)).float()
    else:
        base = torch.zeros(60, 24)
        cols = torch.rand(60, 24).argsort(dim=1)[:, :4]
        base.scatter_(1, cols, torch.randint(0, 2, (60, 4)).float() * 2 - 1)
    picks = torch.cat([torch.arange(60), torch.randint(0, 60, (240,))])
    codebook = base[picks[torch.randperm(300)]]
    z = base[torch.randint(0, 60, (200,))] + torch.randint(-1, 2, (200, 24)).float()
    return z, codebook


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_duplicate_codes_lowest_index_wins(impl, precision, metric):
    z, codebook = _integer_duplicates(metric)
    indices, distances = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    first = _first_occurrence(codebook)
    assert torch.equal(first[indices], indices), "a duplicated code won over its lower-index twin"
    if metric == "l2":
        truth, truth_d = ref.exact_nearest(z, codebook, metric)
        assert torch.equal(indices, truth)
        assert torch.equal(distances.double(), truth_d)
    else:
        _check_against_float64(z, codebook, indices, distances, metric, "exact")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_leading_dims_and_strides(impl):
    B, H, W, D, K = 2, 5, 7, 77, 130
    codebook = torch.randn(K, D)
    channel_first = torch.randn(B, D, H, W)
    z_bhwd = channel_first.permute(0, 2, 3, 1)
    assert not z_bhwd.is_contiguous()
    indices, distances = nearest_code(z_bhwd, codebook, impl=impl)
    assert indices.shape == (B, H, W)
    _check_against_float64(z_bhwd, codebook, indices, distances, "l2", "exact")

    wide = torch.randn(90, 2 * D)
    for z in (wide[:, ::2], wide[::3, D:]):
        indices, distances = nearest_code(z, codebook, metric="cos", impl=impl)
        _check_against_float64(z, codebook, indices, distances, "cos", "exact")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_empty_input(impl):
    codebook = torch.randn(10, 16)
    indices, distances = nearest_code(torch.randn(2, 0, 16), codebook, impl=impl)
    assert indices.shape == (2, 0) and distances.shape == (2, 0)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_zero_vectors_cos(impl):
    codebook = torch.randn(40, 20)
    codebook[5] = 0.0
    z = torch.randn(30, 20)
    z[3] = 0.0
    indices, distances = nearest_code(z, codebook, metric="cos", impl=impl)
    assert torch.isfinite(distances).all()
    assert indices[3] == 0 and distances[3] == 1.0
    _check_against_float64(z, codebook, indices, distances, "cos", "exact")


# ---- Non-finite values and overflow: the rule of lgvq_fast.ops.nearest_code, injected fault by fault. ----

FP32_MAX = torch.finfo(torch.float32).max
COS_NORM_LIMIT = 2.0**126


def _rule_oracle(z2d, codebook, metric):
    """What the rule demands, from float64: rows and codes that count as non-finite, and the rows whose fp32
    ``||z||^2`` overflows (l2 distance +inf). Test inputs stay far from every threshold."""
    z64, e64 = z2d.double(), codebook.double()
    row_bad = ~torch.isfinite(z64).all(dim=1)
    code_bad = ~torch.isfinite(e64).all(dim=1)
    z_norm, e_norm = z64.nan_to_num(0.0, 0.0, 0.0).norm(dim=1), e64.nan_to_num(0.0, 0.0, 0.0).norm(dim=1)
    if metric == "cos":
        row_bad |= z_norm >= COS_NORM_LIMIT
        code_bad |= e_norm >= COS_NORM_LIMIT
    else:
        code_bad |= e_norm**2 > FP32_MAX
    return row_bad, code_bad, ~row_bad & (z_norm**2 > FP32_MAX)


def _check_rule(z, codebook, indices, distances, metric, precision):
    """Assert the rule on one backend's output: excluded rows/codes, index 0 + NaN where no score is finite, and
    on the other rows the float64 argmin over the valid codes (tie-aware, scores compared relative to their own
    magnitudes, so rows of 1e20 are checked as tightly as rows of 1)."""
    D = z.shape[-1]
    z2d, idx, dist = z.reshape(-1, D).cpu(), indices.reshape(-1).cpu(), distances.reshape(-1).cpu()
    codebook = codebook.cpu()
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert ((idx >= 0) & (idx < codebook.shape[0])).all(), "index out of range (unwritten output?)"
    row_bad, code_bad, z_sq_overflows = _rule_oracle(z2d, codebook, metric)
    if code_bad.all():
        row_bad = torch.ones_like(row_bad)
    assert (idx[row_bad] == 0).all(), f"rows with no finite score must get index 0, got {idx[row_bad].tolist()}"
    assert dist[row_bad].isnan().all(), f"rows with no finite score must get distance NaN, got {dist[row_bad]}"
    ok = ~row_bad
    if not ok.any():
        return
    assert not code_bad[idx[ok]].any(), f"a non-finite code won: {sorted(set(idx[ok][code_bad[idx[ok]]].tolist()))}"
    good = (~code_bad).nonzero().squeeze(1)
    zs, es = z2d[ok].double(), codebook[good].double()
    if metric == "cos":
        zs, es = ref._normalize(zs), ref._normalize(es)
        scores, scale = -(zs @ es.T), torch.full((zs.shape[0],), 4.0, dtype=torch.float64)
    else:
        e_sq = es.pow(2).sum(dim=1)
        scores = e_sq - 2.0 * (zs @ es.T)
        scale = e_sq.max() + 2.0 * zs.norm(dim=1) * es.norm(dim=1).max()
    chosen = scores.gather(1, torch.searchsorted(good, idx[ok])[:, None]).squeeze(1)
    rtol = 2.0**-6 if precision == "fast" else 1e-5
    wrong = (chosen - scores.min(dim=1).values) > rtol * scale
    rate = float(wrong.double().mean())
    assert rate <= (FAST_MISMATCH_MAX if precision == "fast" else 0.0), f"mismatch rate {rate:.2%} on valid rows"
    d_ok = dist[ok]
    if metric == "cos":
        want = 1.0 + chosen
        assert ((d_ok.double() - want).abs() <= rtol * scale).all(), "cos distance off"
        return
    big = z_sq_overflows[ok]
    assert (d_ok[big] == float("inf")).all(), f"l2 rows whose ||z||^2 overflows fp32 must report +inf: {d_ok[big]}"
    want = (zs[~big].pow(2).sum(dim=1) + chosen[~big]).clamp_min(0.0)
    tol = rtol * (zs[~big].norm(dim=1) + es.norm(dim=1).max()) ** 2
    assert ((d_ok[~big].double() - want).abs() <= tol).all(), "l2 distance off"


def _inject_bad_codes(z, codebook):
    """NaN, +inf and -inf codes (one at index 0), each the near twin of some rows: if the compare let a
    non-finite score through, those rows would pick it."""
    K, D = codebook.shape
    bad = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(K - 1)[:3]])
    for code, value in zip(bad.tolist(), (float("nan"), float("nan"), float("inf"), float("-inf"))):
        rows = torch.randperm(z.shape[0])[:3]
        z[rows] = codebook[code] + 0.01 * torch.randn(3, D)
        codebook[code, torch.randint(0, D, (1,))] = value
    codebook[bad[1]] = float("nan")
    return bad


def _inject_bad_rows(z):
    """A NaN entry, an all-NaN row, +inf and -inf entries. Returns the rows, and a mask of the others."""
    rows = torch.randperm(z.shape[0])[:4]
    D = z.shape[1]
    z[rows[0], torch.randint(0, D, (1,))] = float("nan")
    z[rows[1]] = float("nan")
    z[rows[2], torch.randint(0, D, (1,))] = float("inf")
    z[rows[3], torch.randint(0, D, (1,))] = float("-inf")
    others = torch.ones(z.shape[0], dtype=torch.bool)
    others[rows] = False
    return rows, others


# D=37 fits one Triton chunk (interpreter BLOCK_D=64), D=77 loops over two.
FAULT_SHAPES = [(150, 200, 37), (90, 130, 77)]


@pytest.mark.parametrize("shape", FAULT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_nonfinite_codes_and_rows(impl, metric, precision, shape):
    """NaN/inf codes never win (also at index 0, and as the near twin of rows); rows holding NaN/inf get index 0
    and distance NaN; every other row is the float64 argmin over the finite codes."""
    N, K, D = shape
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    bad_codes = _inject_bad_codes(z, codebook)
    bad_rows, others = _inject_bad_rows(z)
    indices, distances = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    assert not torch.isin(indices[others], bad_codes).any()
    assert (indices[bad_rows] == 0).all() and distances[bad_rows].isnan().all()
    _check_rule(z, codebook, indices, distances, metric, precision)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_no_valid_code_gives_index_0_and_nan(impl, metric):
    """Every code non-finite (and, for l2, every ||e||^2 overflowing fp32): index 0 and NaN for every row."""
    z, codebook = torch.randn(70, 33), torch.randn(45, 33)
    codebook[torch.arange(45), torch.randint(0, 33, (45,))] = torch.tensor([float("nan"), float("inf")]).repeat(23)[:45]
    books = [codebook]
    if metric == "l2":
        books.append(torch.randn(45, 33) * 1e20)
    for cb in books:
        for precision in PRECISIONS:
            indices, distances = nearest_code(z, cb, metric=metric, precision=precision, impl=impl)
            assert (indices == 0).all() and distances.isnan().all(), (precision, indices, distances)


def _row_scales(n, lo, hi):
    return 10.0 ** (lo + (hi - lo) * torch.rand(n, 1))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_cos_huge_and_tiny_norms(impl, precision):
    """cos is scale-free: rows of norm 1e19..1e36 (whose squares overflow fp32) and below eps, codes of 1e30 and
    1e-25, get the float64 answer; rows and codes with norm >= 2^126 count as non-finite (index 0 + NaN, never
    chosen)."""
    N, K, D = 120, 150, 77
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    z = z * _row_scales(N, 19, 36)
    z[:10] *= 1e-49
    codebook[::3] *= 1e30
    codebook[1::7] *= 1e-25
    z[10] = codebook[3] * 1.5
    z[11], codebook[5] = 3e37, 3e37
    indices, distances = nearest_code(z, codebook, metric="cos", precision=precision, impl=impl)
    assert indices[11] == 0 and distances[11].isnan() and not (indices == 5).any()
    # a row on a code of norm 1e30: cos 1 (the old reference normalised 1e30-scale rows to 0 and answered 0)
    assert indices[10] == 3 and abs(float(distances[10])) < 1e-2
    _check_rule(z, codebook, indices, distances, "cos", precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_l2_overflow(impl, precision):
    """l2: rows of 1e20 (||z||^2 overflows fp32) still get the argmin and distance +inf; codes whose ||e||^2
    overflows are never chosen, even by rows sitting on them."""
    N, K, D = 100, 140, 37
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    z[:40] *= 1e20
    huge = torch.randperm(K)[:10]
    codebook[huge] *= 1e20
    z[40:45] = codebook[huge[:5]]
    indices, distances = nearest_code(z, codebook, metric="l2", precision=precision, impl=impl)
    assert not torch.isin(indices, huge).any()
    # rows 40..44 sit on 1e20 codes: their own ||z||^2 overflows too
    assert (distances[:45] == float("inf")).all()
    assert torch.isfinite(distances[45:]).all()
    _check_rule(z, codebook, indices, distances, "l2", precision)


@pytest.mark.skipif(len(CPU_IMPLS) < 2, reason="needs a second backend (triton)")
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_backends_agree_on_faults(metric):
    """Reference and Triton give the same NaN/inf pattern and (but for near-ties) the same indices on one input
    holding every fault."""
    N, K, D = 110, 120, 45
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    _inject_bad_codes(z, codebook)
    _inject_bad_rows(z)
    z[-20:] *= 1e25 if metric == "cos" else 1e20
    outs = [nearest_code(z, codebook, metric=metric, impl=impl) for impl in CPU_IMPLS]
    (i0, d0), (i1, d1) = outs
    assert torch.equal(d0.isnan(), d1.isnan()) and torch.equal(d0.isinf(), d1.isinf())
    for indices, distances in outs:
        _check_rule(z, codebook, indices, distances, metric, "exact")
    # both are tie-aware optimal; only a true near-tie may split them
    assert float((i0 != i1).double().mean()) <= 0.02


def test_reference_float64_follows_the_rule():
    """The float64 reference applies the same rule (its own overflow thresholds)."""
    z, codebook = torch.randn(60, 21, dtype=torch.float64), torch.randn(50, 21, dtype=torch.float64)
    bad_codes = _inject_bad_codes(z, codebook)
    bad_rows, keep = _inject_bad_rows(z)
    z[-10:] *= 1e30
    for metric in METRICS:
        indices, distances = ref.nearest_code(z, codebook, metric)
        assert distances.dtype == torch.float64
        assert not torch.isin(indices[keep], bad_codes).any()
        assert (indices[bad_rows] == 0).all() and distances[bad_rows].isnan().all()
        good = torch.ones(50, dtype=torch.bool)
        good[bad_codes] = False
        truth = ref.exact_nearest(z[keep], codebook[good], metric)[0]
        assert torch.equal(good.nonzero().squeeze(1)[truth], indices[keep])
        assert torch.isfinite(distances[keep]).all()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_returns_detached(impl):
    z = torch.randn(20, 9, requires_grad=True)
    codebook = torch.randn(11, 9, requires_grad=True)
    indices, distances = nearest_code(z, codebook, impl=impl)
    assert not distances.requires_grad and not indices.requires_grad


def test_reference_float64_and_chunking(monkeypatch):
    z = torch.randn(257, 33, dtype=torch.float64)
    codebook = torch.randn(70, 33, dtype=torch.float64)
    whole_i, whole_d = ref.nearest_code(z, codebook)
    assert whole_d.dtype == torch.float64
    brute = torch.cdist(z, codebook).pow(2)
    assert torch.equal(whole_i, brute.argmin(dim=1))
    torch.testing.assert_close(whole_d, brute.min(dim=1).values)
    # Several chunks (40 rows each, the last one partial) must give the same answer.
    monkeypatch.setattr(ref, "MAX_CHUNK_ELEMENTS", 70 * 40)
    for metric in METRICS:
        chunk_i, chunk_d = ref.nearest_code(z, codebook, metric)
        full_i, full_d = ref.nearest_code(z[None], codebook, metric)
        assert torch.equal(chunk_i, full_i[0]) and torch.equal(chunk_d, full_d[0])


def test_tie_aware_mismatch_helper():
    z = torch.randn(50, 12)
    codebook = torch.randn(40, 12)
    truth, _ = ref.exact_nearest(z, codebook)
    assert ref.tie_aware_mismatch(z, codebook, truth) == 0.0
    worst = ref.exact_distances(z, codebook, torch.arange(40).expand(50, 40)).argmax(dim=1)
    assert ref.tie_aware_mismatch(z, codebook, worst) == 1.0
    poisoned = truth.clone()
    poisoned[:5] = torch.iinfo(torch.int64).min
    assert ref.tie_aware_mismatch(z, codebook, poisoned) == pytest.approx(0.1)
    # A duplicate of the best code is a tie, not a mismatch.
    dup = torch.cat([codebook, codebook[truth[:1]]])
    assert ref.tie_aware_mismatch(z[:1], dup, torch.tensor([40])) == 0.0
    assert ref.tie_aware_mismatch(z[:0], codebook, truth[:0]) == 0.0


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 9)), "codebook has D=9 but z has D=8"),
        (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(5, 8)), "z must have dtype"),
        (lambda: (torch.randn(4, 8), torch.randint(0, 3, (5, 8))), "codebook must have dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8, device="meta")), "codebook is on meta"),
        (lambda: (torch.randn(4, 8), torch.randn(40)), "codebook must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(2, 5, 8)), "codebook must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(0, 8)), "codebook is empty"),
        (lambda: (torch.tensor(1.0), torch.randn(5, 8)), "z must have at least 1 dims"),
        (lambda: ([[1.0]], torch.randn(5, 1)), "z must be a torch.Tensor"),
    ],
    ids=["wrong_D", "int_z", "int_codebook", "device_mismatch", "codebook_1d", "codebook_3d", "empty_codebook",
         "scalar_z", "list_z"],
)
def test_nearest_code_bad_input_raises(make_args, match):
    z, codebook = make_args()
    with pytest.raises(ValueError, match=match):
        nearest_code(z, codebook)


def test_nearest_code_bad_options_raise():
    z, codebook = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="metric"):
        nearest_code(z, codebook, metric="dot")
    with pytest.raises(ValueError, match="precision"):
        nearest_code(z, codebook, precision="tf32")
    with pytest.raises(ValueError, match="impl"):
        nearest_code(z, codebook, impl="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        nearest_code(z, codebook, impl="cuda")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_opcheck(impl):
    z = torch.randn(37, 20)
    codebook = torch.randn(45, 20)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.lgvq_fast.nearest_code.default, (z, codebook, metric, "exact", impl))


def test_nearest_code_torch_compile_fullgraph():
    torch._dynamo.reset()

    def quantize(z, codebook):
        indices, distances = nearest_code(z * 2.0, codebook, impl="reference")
        return codebook[indices], distances.sum()

    z = torch.randn(3, 17, 20)
    codebook = torch.randn(30, 20)
    try:
        compiled = torch.compile(quantize, fullgraph=True)
        got_q, got_s = compiled(z, codebook)
    except Exception as exc:
        if "C++ compiler" in str(exc) or "CppCompileError" in type(exc).__name__:
            pytest.skip(f"torch.compile cannot build CPU code here: {type(exc).__name__}")
        raise
    want_q, want_s = quantize(z, codebook)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_s, want_s)


def _gpu_impls():
    impls = ["reference"]
    if _backend.triton_available():
        impls.append("triton")
    if _backend.cuda_ext_available():
        impls.append("cuda")
    return impls


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4099, 4096, 256), (3000, 1000, 77), (5000, 16384, 8)], ids=_shape_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_gpu_matches_float64(metric, precision, shape):
    N, K, D = shape
    z = torch.randn(N, D, device="cuda")
    codebook = torch.randn(K, D, device="cuda")
    for impl in _gpu_impls():
        for zz in (z, z.to(torch.bfloat16), torch.randn(D, N, device="cuda").T):
            indices, distances = nearest_code(zz, codebook, metric=metric, precision=precision, impl=impl)
            _check_against_float64(zz, codebook, indices, distances, metric, precision)


@pytest.mark.gpu
def test_nearest_code_gpu_duplicates_and_empty():
    base = torch.randint(-3, 4, (100, 64), device="cuda").float()
    codebook = base[torch.randint(0, 100, (3000,), device="cuda")]
    z = base[torch.randint(0, 100, (2000,), device="cuda")] + torch.randint(-1, 2, (2000, 64), device="cuda").float()
    truth, _ = ref.exact_nearest(z, codebook)
    for impl in _gpu_impls():
        for precision in PRECISIONS:
            indices, _ = nearest_code(z, codebook, precision=precision, impl=impl)
            assert torch.equal(indices, truth), (impl, precision)
        indices, distances = nearest_code(z[:0], codebook, impl=impl)
        assert indices.shape == (0,) and distances.shape == (0,)


def _surviving_configs(z, codebook, fast, monkeypatch):
    """The configs the autotuner would time for this launch (with autotuning on)."""
    from lgvq_fast.kernels import nearest_code as nc

    monkeypatch.setenv("LGVQ_FAST_TRITON_AUTOTUNE", "1")
    configs = nc._prune_configs(nc._configs(), {"D": z.shape[1], "FAST": fast, "z_ptr": z, "e_ptr": codebook})
    monkeypatch.setenv("LGVQ_FAST_TRITON_AUTOTUNE", "0")
    return configs


@needs_triton
def test_autotune_pruning(monkeypatch):
    """Looped-D launches keep only the low-spill configs; a D that fits one chunk keeps every fitting config;
    LGVQ_FAST_TRITON_AUTOTUNE=0 keeps the first."""
    from lgvq_fast.kernels import nearest_code as nc

    monkeypatch.setattr(nc, "_interpret", lambda: False)  # the GPU config list, also under the interpreter
    z, cb = torch.empty(8, 256), torch.empty(8, 256)
    looped = _surviving_configs(z, cb, False, monkeypatch)
    assert looped and {nc._config_key(c) for c in looped} <= nc._LOOPED_D_CONFIGS
    # every listed looped-D config exists and fits at the headline D=256 in fp32
    assert {nc._config_key(c) for c in looped} == nc._LOOPED_D_CONFIGS
    small = _surviving_configs(torch.empty(8, 8), torch.empty(8, 8), True, monkeypatch)
    assert len(small) > 1 and all(c.kwargs["BLOCK_D"] == 16 for c in small)
    first = nc._prune_configs(nc._configs(), {"D": 256, "FAST": False, "z_ptr": z, "e_ptr": cb})
    assert first == looped[:1]


@needs_triton
@pytest.mark.parametrize("mode", [("exact", "tf32x3"), ("exact", "bf16x3"), ("fast", "tf32x3")], ids="-".join)
def test_every_surviving_triton_config_matches_float64(mode, monkeypatch):
    """Each config the autotuner may pick is correct on its own (tests otherwise run the first one only).
    On a GPU: a looped-D shape and a one-chunk shape; in the interpreter: its single config, small."""
    from lgvq_fast.kernels.nearest_code import nearest_code_fwd

    precision, split = mode
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _backend.triton_interpret():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    shapes = [(4097, 2049, 256), (3001, 1000, 32)] if device == "cuda" else [(130, 300, 77)]
    for N, K, D in shapes:
        z = torch.randn(N, D, device=device)
        codebook = torch.randn(K, D, device=device)
        configs = _surviving_configs(z, codebook, precision == "fast", monkeypatch)
        assert configs
        for config in configs:
            indices, distances = nearest_code_fwd(z, codebook, "l2", precision, split, config=config)
            _check_against_float64(z, codebook, indices, distances, "l2", precision)


def _gpu_backends():
    """(name, function) for every GPU path, the CUDA extension's fp32 validation loop included."""
    fns = [(impl, lambda z, cb, m, p, impl=impl: nearest_code(z, cb, metric=m, precision=p, impl=impl))
           for impl in _gpu_impls()]
    if _backend.cuda_ext_available():
        from lgvq_fast import _cuda

        fns.append(("cuda-scalar", lambda z, cb, m, p: _cuda.nearest_code(z, cb, m, "scalar")))
    return fns


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3000, 1000, 77), (2100, 4096, 256), (4000, 2048, 8)], ids=_shape_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_gpu_nonfinite_rule(metric, precision, shape):
    """The rule on every GPU backend (reference, Triton, CUDA tensor-core and scalar), with every fault at once:
    NaN/inf codes (one at index 0), NaN/inf rows, huge rows (1e20 for l2: ||z||^2 overflows; 1e19..1e36 for cos),
    huge codes (l2: excluded; cos: valid), and rows/codes past the cos limit; and the backends agree."""
    N, K, D = shape
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    bad_codes = _inject_bad_codes(z, codebook)
    bad_rows, others = _inject_bad_rows(z)
    z[-300:] *= 1e20 if metric == "l2" else _row_scales(300, 19, 36)
    codebook[-7:] *= 1e20 if metric == "l2" else 1e30
    if metric == "cos":
        z[-301], codebook[-8] = 5e37, 5e37  # norm >= 2^126 at every D here, far from the limit
    z, codebook = z.cuda(), codebook.cuda()
    patterns = []
    for name, fn in _gpu_backends():
        indices, distances = fn(z, codebook, metric, precision)
        assert not torch.isin(indices[others.cuda()], bad_codes.cuda()).any(), name
        assert (indices[bad_rows] == 0).all() and distances[bad_rows].isnan().all(), name
        _check_rule(z, codebook, indices, distances, metric, "exact" if name == "cuda-scalar" else precision)
        patterns.append((name, distances.isnan().cpu(), distances.isinf().cpu()))
    for name, nan, inf in patterns[1:]:
        assert torch.equal(nan, patterns[0][1]) and torch.equal(inf, patterns[0][2]), (name, patterns[0][0])


@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_gpu_no_valid_code(metric):
    z = torch.randn(500, 64, device="cuda")
    books = [torch.full((300, 64), float("nan"), device="cuda")]
    if metric == "l2":
        books.append(torch.randn(300, 64, device="cuda") * 1e20)
    for cb in books:
        for name, fn in _gpu_backends():
            for precision in PRECISIONS:
                indices, distances = fn(z, cb, metric, precision)
                assert (indices == 0).all() and distances.isnan().all(), (name, precision)


# ---- The GPU sweep: every GPU backend, fp32/bf16/fp16 rows, tails of the 64-row and 64-code tiles. ----

# (N, K, D): D from 8 to 256, one shape past 64 K-tiles.
GPU_SWEEP_SHAPES = [(1000, 1000, 77), (1000, 16384, 8), (65536, 1000, 8), (4097, 2049, 256), (333, 130, 33)]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The sweep keeps the bounds it was written and run with: a bf16-product search resolves about 0.5-10 % of
# Gaussian rows differently from float64 at these shapes, and distances are held to 2e-5 of the magnitudes + 1e-6.
GPU_SWEEP_TOL = dict(fast_mismatch_max=0.15, exact_rtol=2e-5, atol=1e-6)


def _dtype_id(d):
    return str(d).replace("torch.", "")


@functools.lru_cache(maxsize=64)
def _gpu_inputs(shape, dtype, seed):
    """Rows (in ``dtype``) and an fp32 codebook on the GPU, drawn once per (shape, dtype, seed) for the sweep."""
    N, K, D = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(N, D, generator=gen).to("cuda", dtype)
    codebook = torch.randn(K, D, generator=gen).to("cuda")
    return z, codebook


@functools.lru_cache(maxsize=64)
def _gpu_truth(shape, dtype, seed, metric):
    z, codebook = _gpu_inputs(shape, dtype, seed)
    return ref.exact_nearest(z, codebook, metric)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SWEEP_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_nearest_code_gpu_sweep_matches_float64(impl, metric, precision, dtype, shape):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    z, codebook = _gpu_inputs(shape, dtype, 1234)
    indices, distances = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    _check_against_float64(z, codebook, indices, distances, metric, precision,
                           truth=_gpu_truth(shape, dtype, 1234, metric), **GPU_SWEEP_TOL)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1000, 1000, 77), (333, 130, 8), (200, 300, 1024)], ids=_shape_id)
def test_nearest_code_gpu_cuda_scalar_path_matches_float64(metric, shape):
    from lgvq_fast import _cuda

    z, codebook = _gpu_inputs(shape, torch.float32, 99)
    indices, distances = _cuda.nearest_code(z, codebook, metric, "scalar")
    _check_against_float64(z, codebook, indices, distances, metric, "scalar", **GPU_SWEEP_TOL)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("precision", PRECISIONS)
def test_nearest_code_gpu_cuda_wide_dim_falls_back_when_tile_does_not_fit(precision):
    from lgvq_fast import _C

    z, codebook = _gpu_inputs((300, 200, 1024), torch.float32, 7)
    indices, distances = nearest_code(z, codebook, "l2", precision, "cuda")
    _check_against_float64(z, codebook, indices, distances, "l2", precision, **GPU_SWEEP_TOL)
    algo = _C.ALGO_CODES[precision]
    assert _C.nearest_code_uses_tensor_cores(256, algo, 0)
    assert isinstance(_C.nearest_code_uses_tensor_cores(1024, algo, 0), bool)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_nearest_code_gpu_ties_go_to_lowest_index(impl, metric, precision):
    # Codes 700..1399 repeat codes 0..699 exactly, and z rows are codes: every
    # best distance is an exact tie between i and i + 700, which must give i.
    half = torch.randn(700, 64, device="cuda")
    codebook = torch.cat([half, half])
    pick = torch.randint(0, 700, (1000,), device="cuda")
    z = half[pick] + 0.01 * torch.randn(1000, 64, device="cuda")
    indices, _ = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    assert (indices < 700).all(), "a tie between duplicated codes went to the higher index"
    exact = nearest_code(half[pick], codebook, metric=metric, precision=precision, impl=impl)[0]
    assert torch.equal(exact, pick), "a row equal to a code must pick that code (lowest duplicate)"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_nearest_code_gpu_is_deterministic_and_handles_strides(impl):
    z, codebook = _gpu_inputs((4097, 2049, 256), torch.float32, 5)
    first = nearest_code(z, codebook, "l2", "exact", impl)
    second = nearest_code(z, codebook, "l2", "exact", impl)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    wide = torch.randn(4097, 300, device="cuda")
    wide[:, :256] = z
    strided = nearest_code(wide[:, :256], codebook, "l2", "exact", impl)
    _check_against_float64(z, codebook, strided[0], strided[1], "l2", "exact", **GPU_SWEEP_TOL)
    # Same codes. The distances may differ in the last bits: Triton compiles a separate specialisation for a
    # row stride not divisible by 16 (300 here), whose load layout sums ||z||^2 in another order (seen on H200).
    assert torch.equal(strided[0], first[0])
    z_sq = z.double().pow(2).sum(1)
    assert ((strided[1].double() - first[1].double()).abs() <= 1e-5 * (z_sq + 1)).all()


# ---- certified exact mode (kernels/nearest_code_certified.py): fp16 pass 1 proves rows, float64 re-scores ----

def _certified(z, codebook, metric, stats=None):
    from lgvq_fast.kernels.nearest_code_certified import nearest_code_certified

    return nearest_code_certified(z.reshape(-1, z.shape[-1]), codebook, metric, stats=stats)


def _scores64(z2d, codebook, metric):
    """float64 scores ``[N, K]`` (``||e||^2 - 2 z.e``, or ``-cos``) and per row the magnitudes they sum."""
    z64, e64 = z2d.double(), codebook.double()
    if metric == "cos":
        return -(ref._normalize(z64) @ ref._normalize(e64).T), torch.ones(z2d.shape[0], dtype=torch.float64)
    e_sq = e64.pow(2).sum(dim=1)
    return e_sq - 2.0 * (z64 @ e64.T), e_sq.max() + 2.0 * z64.norm(dim=1) * e_sq.max().sqrt()


def _check_certified(z, codebook, indices, distances, metric):
    """The float64 answer, not just a near one: the index equals float64's argmin unless the two codes' float64
    scores agree within float64 rounding (1e-12 of the magnitudes summed), and the distance is the float64
    distance of that code rounded to fp32. (The plain exact mode is held to 1e-5 of the magnitudes.)"""
    D = z.shape[-1]
    z2d, idx, dist = z.reshape(-1, D), indices.reshape(-1), distances.reshape(-1)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert ((idx >= 0) & (idx < codebook.shape[0])).all(), "index out of range (unwritten output?)"
    assert torch.isfinite(dist).all(), "unwritten (poisoned) or non-finite distances"
    truth, _ = ref.exact_nearest(z2d, codebook, metric)
    scores, scale = _scores64(z2d, codebook, metric)
    gap = scores.gather(1, idx[:, None])[:, 0] - scores.gather(1, truth[:, None])[:, 0]
    off = (idx != truth) & (gap.abs() > 1e-12 * scale)
    assert not off.any(), f"{int(off.sum())} rows off the float64 argmin, e.g. row {int(off.nonzero()[0])}: " \
                          f"{int(idx[off][0])} instead of {int(truth[off][0])} (score gap {float(gap[off][0]):.3g})"
    want = ref.exact_distances(z2d, codebook, idx[:, None], metric)[:, 0]
    err = (dist.double() - want).abs()
    # fp32 rounding of the float64 value; for cos also float64's own rounding of 1 - cos near 0 (a row on a code)
    tol = 2.0**-23 * want.abs() + (1e-15 if metric == "cos" else 1e-30)
    assert (err <= tol).all(), f"distance off by {float((err - tol).max()):.3g} beyond fp32 rounding"


CERT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", CERT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_matches_float64(metric, shape, dtype):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    N, K, D = shape
    z, codebook = torch.randn(N, D).to(dtype), torch.randn(K, D).to(dtype)
    indices, distances = _certified(z, codebook, metric)
    _check_certified(z, codebook, indices, distances, metric)


def _adversarial(case, metric, N=160, K=300, D=40):
    """Inputs built to defeat a low-precision search: ``duplicates`` (every code twice, in different tiles),
    ``near_ties`` (rows equidistant from two codes up to 1e-6), ``on_codes`` (||e|| ~ 100 and z = e_k +
    1e-3 noise: distances tiny next to the norms), ``clustered`` (a trained-looking codebook: 6 clusters,
    code norms spread over 10^-1..10^1), ``scales`` (rows and codes spread over many decades)."""
    if case == "duplicates":
        base = torch.randn(K // 2, D)
        codebook = base[torch.cat([torch.arange(K // 2), torch.randperm(K // 2)])]
        z = codebook[torch.randint(0, K, (N,))] + 0.3 * torch.randn(N, D)
    elif case == "near_ties":
        codebook = torch.randn(K, D)
        a, b = torch.randint(0, K, (N,)), torch.randint(0, K, (N,))
        z = 0.5 * (codebook[a] + codebook[b]) + 1e-6 * torch.randn(N, D)
        if metric == "cos":  # equal angles: the bisector of the two unit codes
            z = ref._normalize(codebook[a].double()) + ref._normalize(codebook[b].double())
            z = (z + 1e-7 * torch.randn(N, D, dtype=torch.float64)).float()
    elif case == "on_codes":
        codebook = torch.randn(K, D) * (100.0 / D**0.5)
        z = codebook[torch.randint(0, K, (N,))] + 1e-3 * torch.randn(N, D)
    elif case == "clustered":
        centres = torch.randn(6, D)
        codebook = centres[torch.randint(0, 6, (K,))] + 0.05 * torch.randn(K, D)
        codebook = codebook * 10.0 ** (2 * torch.rand(K, 1) - 1)
        z = codebook[torch.randint(0, K, (N,))] * (1 + 0.02 * torch.randn(N, 1)) + 0.02 * torch.randn(N, D)
    elif case == "scales":
        lo, hi = (-30, 30) if metric == "cos" else (-12, 12)
        codebook = torch.randn(K, D) * 10.0 ** (lo + (hi - lo) * torch.rand(K, 1))
        z = torch.randn(N, D) * 10.0 ** (lo + (hi - lo) * torch.rand(N, 1))
        z[: N // 4] = codebook[torch.randint(0, K, (N // 4,))] * (1 + 1e-4 * torch.randn(N // 4, D))
    else:
        raise AssertionError(case)
    return z, codebook


ADVERSARIAL = ["duplicates", "near_ties", "on_codes", "clustered", "scales"]


@needs_triton
@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_adversarial_inputs(metric, case):
    z, codebook = _adversarial(case, metric)
    stats = {}
    indices, distances = _certified(z, codebook, metric, stats)
    _check_certified(z, codebook, indices, distances, metric)
    rescored = int(stats["rescored"])
    assert rescored == int((~stats["proven"]).sum())
    if case == "duplicates":
        # every row's nearest code has an exact twin: neither level can prove it; the twins are listed as
        # candidates and float64 picks the lower index
        assert int(stats["split_rows"]) == z.shape[0] == int(stats["candidate_rows"])
    if case in ("duplicates", "near_ties"):
        # two codes tie (near enough) and nothing else is close: the candidate lists settle every row, and no row
        # needs the search over the whole codebook in float64
        assert rescored == 0, f"{rescored} rows re-scored against every code"
        assert torch.equal(_first_occurrence(codebook)[indices], indices)
    if case == "on_codes":
        # distances of 1e-3 next to norms of 100 are far apart from the runner-up's: all proven
        assert rescored == 0, f"{rescored} rows re-scored"


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_certified_proves_most_gaussian_rows(metric):
    """The certificate is not vacuous: on Gaussian inputs most rows are proven in the fp16 pass (measured 1-3 %
    left at these shapes) and the split level proves nearly all the rest, leaving float64 almost nothing."""
    z, codebook = torch.randn(400, 64), torch.randn(500, 64)
    stats = {}
    indices, distances = _certified(z, codebook, metric, stats)
    _check_certified(z, codebook, indices, distances, metric)
    split_rows, rescored = int(stats["split_rows"]), int(stats["rescored"])
    assert split_rows <= 0.15 * z.shape[0], f"{split_rows} of 400 rows left unproven by the fp16 pass"
    assert rescored <= split_rows


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_certified_split_level_proves_what_fp16_cannot(metric):
    """Rows set between two codes with a score gap of 0.3x the fp16 pass's two bounds -- too close for it,
    several times the split level's bounds: every row goes to the split level and none to float64."""
    from lgvq_fast.kernels import nearest_code_certified as cert

    K, D, N = 20, 40, 40
    codebook = torch.randn(K, D)
    if metric == "cos":
        codebook = codebook / codebook.norm(dim=1, keepdim=True)
    a, b = torch.randint(0, K, (400,)), torch.randint(0, K - 1, (400,))
    b = b + (b >= a).long()  # b != a
    mid = 0.5 * (codebook[a].double() + codebook[b].double())
    # keep the pairs whose midpoint has no third code anywhere near: a and b must be its two nearest by far
    scores, _ = _scores64(mid, codebook, metric)
    pair = scores.gather(1, a[:, None])[:, 0]
    third = scores.scatter(1, torch.stack([a, b], dim=1), float("inf")).min(dim=1).values
    clear = (third - pair) > 0.1 * (pair.abs() + 1)
    assert int(clear.sum()) >= N, "too few clear pairs"
    a, b, mid = a[clear][:N], b[clear][:N], mid[clear][:N]
    d = codebook[a].double() - codebook[b].double()

    def bound(split):
        codes = cert._prepare_codes(codebook, metric, split)
        rows = cert._prepare_rows(mid.float(), metric, codes)
        return (rows["m"] * codes["P"].max() + rows["rho"] * codes["Q"].max() + rows["lam"] * codes["L"].max()
                + codes["R"].max()).double()

    b1, b2 = bound(False), bound(True)
    assert (0.3 * 2 * b1 > 4 * 2 * b2).all(), "the two levels' bounds are too close for this test"
    # l2: S_b - S_a = 2 t ||d||;  cos (unit codes): -z.e_b + z.e_a = t ||d||
    gap = 0.3 * 2 * b1
    t = gap / ((2.0 if metric == "l2" else 1.0) * d.norm(dim=1))
    z = (mid + t[:, None] * d / d.norm(dim=1, keepdim=True)).float()
    stats = {}
    indices, distances = _certified(z, codebook, metric, stats)
    assert int(stats["split_rows"]) == N and int(stats["rescored"]) == 0, \
        (int(stats["split_rows"]), int(stats["rescored"]))
    assert torch.equal(indices, a)
    _check_certified(z, codebook, indices, distances, metric)


def _bound_check(z, codebook, metric, sequential, split=False):
    """A pass emulated in PyTorch from the launcher's own prepared operands (``split``: the second level's
    ``hi.hi + 2^-12 (hi.lo + lo.hi)``): every computed score lies within its code's bound
    ``||z|| P_k + rho_z Q_k + lam_z L_k + R_k`` of the real score (float64 of the fp32 inputs). The fp32
    accumulation is a BLAS product, or with ``sequential`` a left-to-right sum over D (the order with the largest
    error bound).
    Returns the largest error / bound ratio."""
    from lgvq_fast.kernels import nearest_code_certified as cert

    codes = cert._prepare_codes(codebook, metric, split)
    rows = cert._prepare_rows(z, metric, codes)
    keep = ~rows["force"] & ~rows["bad"]

    def prod(a, b):
        a, b = a.float(), b.float()
        if not sequential:
            return a @ b.T
        acc = torch.zeros(a.shape[0], b.shape[0])
        for j in range(a.shape[1]):
            acc = acc + a[:, j:j + 1] * b[:, j][None, :]
        return acc

    acc = prod(rows["z16"], codes["e16"])
    if split:
        acc = acc + (prod(rows["z16"], codes["el16"]) + prod(rows["zl16"], codes["e16"])) * 2.0**-12
    computed = codes["a"][None, :] - acc * rows["f"][:, None]
    scores, _ = _scores64(z, codebook, metric)
    if metric == "cos":  # the kernel's cos score is -z.e_hat, not -cos: scale the truth by max(||z||, eps)
        scores = scores * z.double().norm(dim=1, keepdim=True).clamp_min(ref.COS_EPS)
    bound = (rows["m"][:, None] * codes["P"][None, :] + rows["rho"][:, None] * codes["Q"][None, :]
             + rows["lam"][:, None] * codes["L"][None, :] + codes["R"][None, :]).double()
    err = (computed.double() - scores).abs()
    valid = keep[:, None] & torch.isfinite(codes["a"])[None, :]
    assert (err[valid] <= bound[valid]).all(), f"score error {float((err / bound)[valid].max()):.3g} x its bound"
    return float((err / bound)[valid].max())


@pytest.mark.parametrize("level", ["fp16", "split"])
@pytest.mark.parametrize("sequential", [False, True], ids=["blas", "sequential"])
@pytest.mark.parametrize("case", ["gaussian"] + ADVERSARIAL)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_error_bound_holds(metric, case, sequential, level):
    """The derivation in lgvq_fast/ops/NOTES.md, checked score by score for both levels: the bound is never
    exceeded, and it is not loose by orders of magnitude on plain inputs (the largest error reaches a fraction
    of it)."""
    if case == "gaussian":
        z, codebook = torch.randn(200, 256), torch.randn(300, 256)
    else:
        z, codebook = _adversarial(case, metric, N=120, K=200, D=40)
    ratio = _bound_check(z, codebook, metric, sequential, split=level == "split")
    if case == "gaussian":
        assert ratio > 1e-3, f"bound {1 / ratio:.0f}x the largest error: looser than the derivation says"


@needs_triton
@pytest.mark.parametrize("shape", FAULT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_nonfinite_codes_and_rows(metric, shape):
    N, K, D = shape
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    bad_codes = _inject_bad_codes(z, codebook)
    bad_rows, others = _inject_bad_rows(z)
    indices, distances = _certified(z, codebook, metric)
    assert not torch.isin(indices[others], bad_codes).any()
    assert (indices[bad_rows] == 0).all() and distances[bad_rows].isnan().all()
    _check_rule(z, codebook, indices, distances, metric, "exact")


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_certified_edge_cases(metric):
    """No valid code (index 0, NaN everywhere), an empty batch, K = 1, rows of zeros (cos: all codes tie at
    distance 1, lowest index), and for l2 rows whose ||z||^2 overflows fp32 (distance +inf) and codes whose
    ||e||^2 overflows (never chosen)."""
    z, codebook = torch.randn(70, 33), torch.randn(45, 33)
    dead = codebook.clone()
    dead[torch.arange(45), torch.randint(0, 33, (45,))] = float("nan")
    indices, distances = _certified(z, dead, metric)
    assert (indices == 0).all() and distances.isnan().all()
    indices, distances = _certified(z[:0], codebook, metric)
    assert indices.shape == (0,) and distances.shape == (0,)
    indices, distances = _certified(z, codebook[:1], metric)
    assert (indices == 0).all()
    _check_certified(z, codebook[:1], indices, distances, metric)
    zeros = torch.zeros(5, 33)
    indices, distances = _certified(zeros, codebook, metric)
    truth, _ = ref.exact_nearest(zeros, codebook, metric)
    assert torch.equal(indices, truth)
    if metric == "l2":
        big, cb = torch.randn(60, 37), torch.randn(80, 37)
        big[:20] *= 1e20
        huge = torch.randperm(80)[:8]
        cb[huge] *= 1e20
        indices, distances = _certified(big, cb, "l2")
        assert not torch.isin(indices, huge).any()
        assert (distances[:20] == float("inf")).all() and torch.isfinite(distances[20:]).all()
        _check_rule(big, cb, indices, distances, "l2", "exact")


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("case", ["gaussian"] + ADVERSARIAL)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_gpu_matches_float64(metric, case):
    """On the GPU's tensor cores (whose fp32 accumulation the bound assumes no worse than 2^-22 per add):
    float64's argmin at a larger shape, on every adversarial input."""
    # (the float64 checks run on the CPU: sizes that keep them to a second or two)
    if case == "gaussian":
        z, codebook = torch.randn(2048, 256), torch.randn(1024, 256)
    else:
        z, codebook = _adversarial(case, metric, N=1024, K=1024, D=256)
    stats = {}
    indices, distances = _certified(z.cuda(), codebook.cuda(), metric, stats)
    _check_certified(z, codebook, indices.cpu(), distances.cpu(), metric)


@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_exact_mode_runs_the_certified_kernels_on_request(metric, monkeypatch):
    """``LGVQ_FAST_NN_EXACT_KERNEL=certified``: the op's exact mode runs the certified launcher (float64's argmin,
    any leading shape); ``split`` and the default do not; a bad value is refused naming the variable."""
    from lgvq_fast.kernels import nearest_code_certified as cert

    calls = []
    real = cert.nearest_code_certified
    monkeypatch.setattr(cert, "nearest_code_certified", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, codebook = _adversarial("near_ties", metric, N=64, K=100, D=24)
    z3 = z.reshape(4, 16, 24)
    for value in ("", "auto", "split"):
        monkeypatch.setenv("LGVQ_FAST_NN_EXACT_KERNEL", value)
        nearest_code(z3, codebook, metric, "exact", impl="triton")
    assert calls == []
    monkeypatch.setenv("LGVQ_FAST_NN_EXACT_KERNEL", "Certified")
    indices, distances = nearest_code(z3, codebook, metric, "exact", impl="triton")
    assert calls == [1] and indices.shape == distances.shape == (4, 16)
    _check_certified(z, codebook, indices.reshape(-1), distances.reshape(-1), metric)
    nearest_code(z3, codebook, metric, "fast", impl="triton")  # fast mode is not affected
    assert calls == [1]
    # the custom op's contract (schema, fake kernel, no aliasing) holds on this path too
    torch.library.opcheck(torch.ops.lgvq_fast.nearest_code.default, (z[:40], codebook, metric, "exact", "triton"))
    assert len(calls) > 1
    monkeypatch.setenv("LGVQ_FAST_NN_EXACT_KERNEL", "f64")
    with pytest.raises(ValueError, match="LGVQ_FAST_NN_EXACT_KERNEL"):
        nearest_code(z3, codebook, metric, "exact", impl="triton")


# Operations that read a device value on the host (a sync, refused during CUDA graph capture), or whose output
# shape depends on the data (``nonzero``; indexing with a bool mask runs one inside).
_HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.is_nonzero.default", "aten.equal.default", "aten.allclose.default", "aten.unique_dim.default",
               "aten._unique2.default", "aten.masked_scatter.default", "aten.masked_scatter_.default"}


class _HostReadRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every ATen operation that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        indexing = name.split(".")[1] in ("index", "index_put", "index_put_", "_index_put_impl_")
        index_args = [a for a in (args[1] if indexing else []) if isinstance(a, torch.Tensor)]
        if name in _HOST_READS or any(a.dtype == torch.bool for a in index_args):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.parametrize("case", ["duplicates", "scales"])
@pytest.mark.parametrize("metric", METRICS)
def test_certified_never_reads_the_device_on_the_host(metric, case):
    """Every level runs without a host sync (so the call can be captured in a CUDA graph): rows are compacted on
    the device and the passes read their counts there. Inputs chosen so that every level has rows to do --
    duplicated codes (split level, candidate lists) and rows over many decades (the full float64 search) --
    and the recorder itself is checked on a call that does sync."""
    z, codebook = _adversarial(case, metric, N=96, K=120, D=24)
    z[3, 5] = float("nan")  # a bad row too
    recorder = _HostReadRecorder()
    with recorder:
        stats = {}
        indices, distances = _certified(z, codebook, metric, stats)
    assert recorder.reads == [], f"host reads of device values: {recorder.reads}"
    if case == "duplicates":
        assert int(stats["split_rows"]) > 0 and int(stats["candidate_rows"]) > 0
    else:
        assert int(stats["rescored"]) > 0
    assert indices[3] == 0 and distances[3].isnan()
    keep = torch.arange(z.shape[0]) != 3
    _check_certified(z[keep], codebook, indices[keep], distances[keep], metric)
    with recorder:
        torch.nonzero(z[:, 0] > 0)
        bool(z[0, 0] > 0)
        z[z[:, 0] > 0]
    assert recorder.reads == ["aten.nonzero.default", "aten._local_scalar_dense.default", "aten.index.Tensor"]


@needs_triton
@pytest.mark.parametrize("case", ["gaussian", "scales", "faults", "half", "strided"])
@pytest.mark.parametrize("metric", METRICS)
def test_certified_fused_code_preparation_matches_float64(metric, case):
    """The codebook's Triton preparation (both levels in two passes, float64 arithmetic) against its float64
    PyTorch version: the same fp16 operands bit for bit (hi and lo), the same exclusions, scale, ||e||^2 in fp32
    and float64, and bound terms never below the float64 values rounded up to fp32, at most one fp32 step above
    (the two sum in different orders)."""
    from lgvq_fast.kernels import nearest_code_certified as cert

    K, D = 90, 77
    codebook = torch.randn(K, D)
    if case == "scales":  # codes over 24 decades, some of whose elements underflow in fp16 at the common scale
        codebook = codebook * 10.0 ** (24 * torch.rand(K, 1) - 12)
    elif case == "faults":
        codebook[3, 5] = float("nan")
        codebook[4, 0] = float("-inf")
        codebook[6] *= 1e19  # l2: ||e||^2 overflows fp32, excluded; cos: normalised like any other
        codebook[7] = 0.0
    elif case == "half":
        codebook = codebook.half()
    elif case == "strided":
        codebook = torch.randn(D, 2 * K)[:, ::2].T
    levels = cert._prepare_codes_fused(codebook, metric)
    for split, got in zip((False, True), levels):
        want = cert._prepare_codes(codebook, metric, split)
        assert got["split"] == split
        assert torch.equal(got["valid"], want["valid"])
        assert int(got["s_e"]) == int(want["s_e"]) and bool(got["codes_ok"]) == bool(want["codes_ok"])
        assert torch.equal(got["e16"].view(torch.int16), want["e16"].view(torch.int16)), "hi differs"
        if split:
            assert torch.equal(got["el16"].view(torch.int16), want["el16"].view(torch.int16)), "lo differs"
        assert torch.equal(got["a"], want["a"])
        assert torch.equal(got["a64"], want["a64"]) or metric == "l2"  # l2: float64 sums in another order
        rel = (got["a64"] - want["a64"]).abs() / want["a64"].abs().clamp_min(1e-300)
        assert (rel[want["valid"]] <= 1e-14).all()
        assert torch.allclose(got["n_max"], want["n_max"], rtol=1e-14, atol=0)
        for key in "PQRL":
            g, w = got[key], want[key]
            step = torch.nextafter(w, torch.full_like(w, float("inf"))) - w
            assert (g >= w - step).all() and (g <= w + step).all(), f"{key} (split={split})"
            assert (g[~want["valid"]] == 0).all()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("metric", METRICS)
def test_certified_gpu_runs_in_a_cuda_graph(metric):
    """Captured once, replayed on other inputs of the same shapes: float64's argmin each time, whatever number of
    rows each level gets (the counts live on the device)."""
    from lgvq_fast.kernels.nearest_code_certified import nearest_code_certified

    first = _adversarial("duplicates", metric, N=1024, K=1024, D=64)
    z, codebook = first[0].cuda(), first[1].cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile (and tune) every kernel before capture
        for _ in range(2):
            nearest_code_certified(z, codebook, metric)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        indices, distances = nearest_code_certified(z, codebook, metric)
    for case in ("duplicates", "scales", "near_ties", "gaussian"):
        if case == "gaussian":
            zc, cc = torch.randn(1024, 64), torch.randn(1024, 64)
        else:
            zc, cc = _adversarial(case, metric, N=1024, K=1024, D=64)
        z.copy_(zc)
        codebook.copy_(cc)
        graph.replay()
        torch.cuda.synchronize()
        _check_certified(zc, cc, indices.cpu(), distances.cpu(), metric)


@needs_triton
@pytest.mark.parametrize("split", [False, True], ids=["fp16", "split"])
@pytest.mark.parametrize("case", ["gaussian", "scales", "faults", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_certified_fused_row_preparation_matches_float64(metric, case, split):
    """The rows' Triton preparation against its float64 PyTorch version: the same fp16 operands bit for bit, the
    same row flags, and bounds of ||z||, the residual and ||lo|| that are never below the exact values and at
    most (D + 4) 2^-24 above them (plus an absolute 2^-150 sqrt(D) in scaled units)."""
    from lgvq_fast.kernels import nearest_code_certified as cert

    N, K, D = 90, 40, 77
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    if case == "scales":  # rows over 60 decades, some of whose elements underflow when scaled down
        z = z * 10.0 ** (60 * torch.rand(N, 1) - 30)
        z[:5, :3] *= 1e-25
    elif case == "faults":
        _inject_bad_rows(z)
        z[10] *= 1e30  # beyond the scaled range: forced to float64
        z[11] *= 3e37  # cos: norm >= 2^126, a bad row
    elif case == "bf16":
        z = z.bfloat16()
    codes = cert._prepare_codes(codebook, metric, split)
    want = cert._prepare_rows(z, metric, codes)
    got = cert._prepare_rows_fused(z, metric, codes)
    assert torch.equal(got["bad"], want["bad"]) and torch.equal(got["force"], want["force"])
    keep = ~want["bad"] & ~want["force"]
    assert torch.equal(got["z16"][keep].view(torch.int16), want["z16"][keep].view(torch.int16))
    if split:
        assert torch.equal(got["zl16"][keep].view(torch.int16), want["zl16"][keep].view(torch.int16))
    assert torch.equal(got["f"][keep], want["f"][keep])
    z64 = z.double()
    s_z = cert._scale_exponent(z64.abs().amax(dim=1))
    exact = {"m": z64.norm(dim=1)}
    _, _, exact["rho"], exact["lam"] = cert._to_scaled_half(z64, s_z[:, None], split)
    floor = torch.ldexp(torch.full_like(exact["m"], D**0.5 * 2.0**-150), -s_z)
    for key in ("m", "rho", "lam"):
        g, e = got[key][keep].double(), exact[key][keep]
        assert (g >= e).all(), f"{key}: below the exact value"
        slack = e * (D + 8) * 2.0**-24 + 2 * floor[keep]
        assert (g <= e + slack).all(), f"{key}: looser than the kernel's rounding allows"
