"""GPU tests: every GPU backend of the three ops against float64 (skipped on machines without CUDA).

Run on a lent GPU by bench/gpu_check.sh (`pytest -m gpu tests/test_gpu.py`). Covers the Triton and
CUDA nearest-code searches (both metrics, both precisions, fp32/bf16/fp16 inputs, D from 8 to 256,
tails of N and K), the CUDA scalar validation path, exact ties (duplicated codes), poisoned outputs,
determinism, the EMA update against a float64 update, and relation_loss forward and backward.
"""
import functools

import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import ema_update_, nearest_code, relation_loss
from lgvq_fast.reference import nearest_code as ref

pytestmark = pytest.mark.gpu

DEV = "cuda"
GPU_IMPLS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _backend.cuda_ext_available(), reason="lgvq_fast._C not built")),
]
needs_ext = pytest.mark.skipif(not _backend.cuda_ext_available(), reason="lgvq_fast._C not built")
METRICS = ["l2", "cos"]
PRECISIONS = ["exact", "fast"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, D): tails of the 64-row and 64-code tiles, D from 8 to 256, one shape past 64 K-tiles.
SHAPES = [(1000, 1000, 77), (1000, 16384, 8), (65536, 1000, 8), (4097, 2049, 256), (333, 130, 33)]
# A bf16-product search resolves about 0.5-10 % of Gaussian rows differently from float64.
FAST_MISMATCH_MAX = 0.15


def _shape_id(s):
    return "n{}_k{}_d{}".format(*s)


def _dtype_id(d):
    return str(d).replace("torch.", "")


@functools.lru_cache(maxsize=64)
def _inputs(shape, dtype, seed):
    N, K, D = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(N, D, generator=gen).to(DEV, dtype)
    codebook = torch.randn(K, D, generator=gen).to(DEV)
    return z, codebook


@functools.lru_cache(maxsize=64)
def _truth(shape, dtype, seed, metric):
    z, codebook = _inputs(shape, dtype, seed)
    return ref.exact_nearest(z, codebook, metric)[0]


def _check(z, codebook, idx, dist, metric, precision, truth=None):
    K = codebook.shape[0]
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    assert ((idx >= 0) & (idx < K)).all(), "index out of range (unwritten poisoned output?)"
    assert torch.isfinite(dist).all(), "non-finite distance (unwritten poisoned output?)"
    rate = ref.tie_aware_mismatch(z, codebook, idx, metric, truth=truth)
    if precision in ("exact", "scalar"):
        assert rate == 0.0, f"{precision} search disagrees with float64 beyond ties on {rate:.4%} of rows"
    else:
        assert rate <= FAST_MISMATCH_MAX, f"fast search mismatch rate {rate:.2%}"
    chosen = ref.exact_distances(z, codebook, idx[:, None], metric)[:, 0]
    rtol = 2.0**-6 if precision == "fast" else 2e-5
    tol = ref.tie_tolerance(z, codebook, metric, rtol) + 1e-6
    err = (dist.double() - chosen).abs()
    assert (err <= tol).all(), f"distance error {err.max():.3g} > tol {tol[err.argmax()]:.3g}"
    return rate


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_nearest_code_matches_float64(impl, metric, precision, dtype, shape):
    assert _alloc.poison_enabled()
    z, codebook = _inputs(shape, dtype, 1234)
    idx, dist = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    _check(z, codebook, idx, dist, metric, precision, truth=_truth(shape, dtype, 1234, metric))


@needs_ext
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1000, 1000, 77), (333, 130, 8), (200, 300, 1024)], ids=_shape_id)
def test_gpu_cuda_scalar_path_matches_float64(metric, shape):
    from lgvq_fast import _cuda

    z, codebook = _inputs(shape, torch.float32, 99)
    idx, dist = _cuda.nearest_code(z, codebook, metric, "scalar")
    _check(z, codebook, idx, dist, metric, "scalar")


@needs_ext
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_cuda_wide_dim_falls_back_when_tile_does_not_fit(precision):
    from lgvq_fast import _C

    z, codebook = _inputs((300, 200, 1024), torch.float32, 7)
    idx, dist = nearest_code(z, codebook, "l2", precision, "cuda")
    _check(z, codebook, idx, dist, "l2", precision)
    algo = _C.ALGO_CODES[precision]
    assert _C.nearest_code_uses_tensor_cores(256, algo, 0)
    assert isinstance(_C.nearest_code_uses_tensor_cores(1024, algo, 0), bool)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_nearest_code_ties_go_to_lowest_index(impl, metric, precision):
    # Codes 700..1399 repeat codes 0..699 exactly, and z rows are codes: every
    # best distance is an exact tie between i and i + 700, which must give i.
    half = torch.randn(700, 64, device=DEV)
    codebook = torch.cat([half, half])
    pick = torch.randint(0, 700, (1000,), device=DEV)
    z = half[pick] + 0.01 * torch.randn(1000, 64, device=DEV)
    idx, dist = nearest_code(z, codebook, metric=metric, precision=precision, impl=impl)
    assert (idx < 700).all(), "a tie between duplicated codes went to the higher index"
    exact = nearest_code(half[pick], codebook, metric=metric, precision=precision, impl=impl)[0]
    assert torch.equal(exact, pick), "a row equal to a code must pick that code (lowest duplicate)"


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_nearest_code_is_deterministic_and_handles_strides(impl):
    z, codebook = _inputs((4097, 2049, 256), torch.float32, 5)
    first = nearest_code(z, codebook, "l2", "exact", impl)
    second = nearest_code(z, codebook, "l2", "exact", impl)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    wide = torch.randn(4097, 300, device=DEV)
    wide[:, :256] = z
    strided = nearest_code(wide[:, :256], codebook, "l2", "exact", impl)
    _check(z, codebook, strided[0], strided[1], "l2", "exact")
    # Same codes. The distances may differ in the last bits: Triton compiles a separate specialisation for a
    # row stride not divisible by 16 (300 here), whose load layout sums ||z||^2 in another order (seen on H200).
    assert torch.equal(strided[0], first[0])
    z_sq = z.double().pow(2).sum(1)
    assert ((strided[1].double() - first[1].double()).abs() <= 1e-5 * (z_sq + 1)).all()


@needs_ext
def test_gpu_cuda_glue_row_stride_and_machine_code():
    from lgvq_fast import _C, _cuda

    z, codebook = _inputs((1000, 1000, 77), torch.bfloat16, 3)
    wide = torch.zeros(1000, 100, device=DEV, dtype=z.dtype)
    wide[:, :77] = z
    a = _cuda.nearest_code(z, codebook, "cos", "exact")
    b = _cuda.nearest_code(wide[:, :77], codebook, "cos", "exact")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    major, minor = torch.cuda.get_device_capability()
    version = _C.nearest_code_binary_version(torch.cuda.current_device())
    assert version == (90 if (major, minor) == (9, 0) else 80 if major == 8 else version)


def _ema_float64(cluster_size, embed_avg, z, indices, decay, eps):
    K = cluster_size.shape[0]
    cs, ea = cluster_size.double(), embed_avg.double()
    counts = torch.bincount(indices, minlength=K).double()
    sums = torch.zeros_like(ea).index_add_(0, indices, z.double())
    cs = decay * cs + (1 - decay) * counts
    ea = decay * ea + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    return cs, ea, ea / smoothed[:, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(4096, 1000, 77), (65536, 16384, 256), (10, 300, 8), (0, 50, 8)], ids=_shape_id)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_ema_update_matches_float64(impl, shape, dtype):
    N, K, D = shape
    z = torch.randn(N, D, device=DEV).to(dtype)
    # Skewed assignments: a few codes get many rows, many get none.
    indices = (torch.rand(N, device=DEV) ** 3 * K).long().clamp_(max=K - 1)
    cluster_size = torch.rand(K, device=DEV) * 5
    embed_avg = torch.randn(K, D, device=DEV)
    embed = torch.full((K, D), float("nan"), device=DEV)
    decay, eps = 0.9, 1e-5
    cs64, ea64, e64 = _ema_float64(cluster_size, embed_avg, z, indices, decay, eps)
    ema_update_(cluster_size, embed_avg, embed, z, indices, decay, eps, impl=impl)
    torch.testing.assert_close(cluster_size.double(), cs64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embed_avg.double(), ea64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embed.double(), e64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_ema_update_is_deterministic(impl):
    N, K, D = 65536, 1024, 256
    z = torch.randn(N, D, device=DEV)
    indices = torch.randint(0, 8, (N,), device=DEV) * 100
    start = (torch.rand(K, device=DEV), torch.randn(K, D, device=DEV), torch.zeros(K, D, device=DEV))
    outs = []
    for _ in range(2):
        bufs = [t.clone() for t in start]
        ema_update_(*bufs, z, indices, 0.99, 1e-5, impl=impl)
        outs.append(bufs)
    for a, b in zip(*outs):
        assert torch.equal(a, b), "two updates on the same inputs differ"


def _relation_inputs(B, L, T, C, dtype=torch.float32):
    text = torch.randn(B, L, C, device=DEV, dtype=dtype)
    vision = torch.randn(B, T, C, device=DEV, dtype=dtype)
    codes = torch.randn(B, T, C, device=DEV, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, L + 1, (B,), device=DEV)
    pad_mask = torch.arange(L, device=DEV)[None, :] < lengths[:, None]
    return text, vision, codes, pad_mask


RELATION_SHAPES = [(4, 30, 256, 512), (3, 7, 77, 33), (64, 30, 256, 512)]


@pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")
@pytest.mark.parametrize("shape", RELATION_SHAPES, ids=lambda s: "b{}_l{}_t{}_c{}".format(*s))
def test_gpu_relation_loss_triton_matches_float64(shape):
    from lgvq_fast.reference import relation as ref_relation

    text, vision, codes, pad_mask = _relation_inputs(*shape)
    loss = relation_loss(text, vision, codes, pad_mask, impl="triton")
    (grad,) = torch.autograd.grad(loss, codes)
    codes64 = codes.detach().double().requires_grad_(True)
    loss64 = ref_relation.relation_loss(text.double(), vision.double(), codes64, pad_mask)
    (grad64,) = torch.autograd.grad(loss64, codes64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-7)
    scale = grad64.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad.double() / scale, grad64 / scale, rtol=1e-3, atol=1e-4)
