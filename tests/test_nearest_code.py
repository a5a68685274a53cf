"""Tests for lgvq_fast.ops.nearest_code (reference and Triton-interpreter backends) against float64."""
import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import nearest_code
from lgvq_fast.reference import nearest_code as ref

CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
METRICS = ["l2", "cos"]
PRECISIONS = ["exact", "fast"]
# (N, K, D): non-powers of two, K=1, D spanning one or several 64-wide chunks.
SHAPES = [(300, 1000, 77), (64, 1, 8), (100, 50, 256), (130, 200, 8)]
# Fraction of rows a bf16-product search may resolve differently from float64
# (measured about 0.5 % on Gaussian inputs at K=1000, D=77).
FAST_MISMATCH_MAX = 0.05


def _shape_id(s):
    return "n{}_k{}_d{}".format(*s)


def _distance_tol(z2d, codebook, metric, precision):
    """Allowed |distance - float64 distance| per row: fp32 (or bf16) rounding of the summed magnitudes."""
    rtol = 2.0**-6 if precision == "fast" else 1e-5
    return ref.tie_tolerance(z2d, codebook, metric, rtol)


def _check_against_float64(z, codebook, indices, distances, metric, precision):
    D = z.shape[-1]
    assert indices.shape == z.shape[:-1] and distances.shape == z.shape[:-1]
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    z2d, idx, dist = z.reshape(-1, D), indices.reshape(-1), distances.reshape(-1)
    assert torch.isfinite(dist).all(), "unwritten (poisoned) or non-finite distances"
    assert ((idx >= 0) & (idx < codebook.shape[0])).all(), "index out of range (unwritten output?)"
    truth, _ = ref.exact_nearest(z2d, codebook, metric)
    rate = ref.tie_aware_mismatch(z2d, codebook, idx, metric, truth=truth)
    if precision == "exact":
        assert rate == 0.0, f"exact search disagrees with float64 beyond ties on {rate:.2%} of rows"
    else:
        assert rate <= FAST_MISMATCH_MAX, f"fast search mismatch rate {rate:.2%}"
    chosen = ref.exact_distances(z2d, codebook, idx[:, None], metric)[:, 0]
    tol = _distance_tol(z2d, codebook, metric, precision)
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


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="triton is not installed")
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


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_duplicate_codes_lowest_index_wins(impl, precision, metric):
    # Small integers make every product and sum exact in fp32 and bf16, so duplicated
    # rows tie exactly whatever order a backend sums in; duplicates sit in different
    # 64/128-wide code tiles. For cos each code has four entries of +-1 (norm 2), so
    # its normalised entries (+-0.5) and all products stay exact too.
    if metric == "l2":
        base = torch.randint(-3, 4, (60, 24)).float()
    else:
        base = torch.zeros(60, 24)
        cols = torch.rand(60, 24).argsort(dim=1)[:, :4]
        base.scatter_(1, cols, torch.randint(0, 2, (60, 4)).float() * 2 - 1)
    picks = torch.cat([torch.arange(60), torch.randint(0, 60, (240,))])
    codebook = base[picks[torch.randperm(300)]]
    z = base[torch.randint(0, 60, (200,))] + torch.randint(-1, 2, (200, 24)).float()
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


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nearest_code_nan_row_gets_a_non_finite_distance(impl, metric, precision):
    """A row holding NaN (or an inf that makes its norm NaN) must not report distance 0, an exact match."""
    _check_nan_rows(impl, metric, precision, "cpu")


def _check_nan_rows(impl, metric, precision, device):
    z = torch.randn(70, 24, device=device)
    codebook = torch.randn(50, 24, device=device)
    bad = torch.randperm(70, device=device)[:3]
    z[bad[0], 5] = float("nan")
    z[bad[1], 0] = float("-inf")
    z[bad[2]] = float("nan")
    indices, distances = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    if metric == "l2":  # cos clamps the norm, so -inf alone may still give a finite value there
        assert not torch.isfinite(distances[bad]).any(), distances[bad]
    else:
        assert not torch.isfinite(distances[bad[[0, 2]]]).any(), distances[bad]
    keep = torch.ones(70, dtype=torch.bool, device=device)
    keep[bad] = False
    _check_against_float64(z[keep].cpu(), codebook.cpu(), indices[keep].cpu(), distances[keep].cpu(), metric,
                           precision)


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


@pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")
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


@pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")
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


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_gpu_nan_row_gets_a_non_finite_distance(metric, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for impl in _gpu_impls():
        _check_nan_rows(impl, metric, precision, "cuda")
