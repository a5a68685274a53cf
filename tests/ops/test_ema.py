"""Tests for lgvq_fast.ops.ema_update_ against float64: the reference and Triton (interpreter) backends on CPU; on a
GPU (``-m gpu``) the Triton and CUDA-extension updates over fp32/bf16/fp16 rows, skewed assignments up to
N=65536, K=16384, and their determinism."""
import os
import tempfile

import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import ema_update_
from lgvq_fast.reference import ema as ref

CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
needs_ext = pytest.mark.skipif(not _backend.cuda_ext_available(),
                               reason=f"the compiled extension is not built: {_backend.cuda_ext_import_error()}")
GPU_IMPLS = [pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_ext)]
# (N, K, D): non-powers of two, K=1, N=0 (decay and renormalise only), K=1000.
SHAPES = [(300, 37, 77), (500, 1, 8), (0, 20, 16), (400, 1000, 24), (257, 130, 200)]
FP32_EPS = torch.finfo(torch.float32).eps


def _shape_id(s):
    return "n{}_k{}_d{}".format(*s)


def _buffers(K, D, embed_dtype=torch.float32):
    cluster_size = torch.rand(K) * 5 + 0.1
    embed_avg = torch.randn(K, D)
    embed = torch.randn(K, D).to(embed_dtype)
    return cluster_size, embed_avg, embed


def _float64_update(buffers, z, indices, decay, eps):
    out = [b.double() for b in buffers]
    ref.ema_update_(*out, z.double(), indices, decay, eps)
    return out


def _assert_close_derived(got, want64, fp32_ref, name, elementwise=None):
    """The one checker of every ema_update_ result, CPU and GPU: |got - float64| <= 2x the fp32 reference's own
    error + a few fp32 ulps of the magnitude, and no NaN/inf (an unwritten poisoned output). ``elementwise=(rtol,
    atol)`` adds |got - float64| <= atol + rtol |float64| per element: in the GPU sweep codes with almost no mass
    get entries in the thousands, which set the max-norm bound far above the ordinary entries."""
    assert torch.isfinite(got).all(), f"{name}: NaN/inf (unwritten poisoned output?)"
    ref_err = (fp32_ref.double() - want64).abs().max() if want64.numel() else 0.0
    floor = 4 * FP32_EPS * (want64.abs().max() if want64.numel() else 0.0)
    if got.dtype in (torch.bfloat16, torch.float16):
        floor = torch.finfo(got.dtype).eps * want64.abs().max()
    err = (got.double() - want64).abs().max() if want64.numel() else 0.0
    assert err <= 2 * ref_err + floor, f"{name}: error {float(err):.3g} > tol {float(2 * ref_err + floor):.3g}"
    if elementwise is not None:
        rtol, atol = elementwise
        torch.testing.assert_close(got.double(), want64, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _formula_float64(cluster_size, embed_avg, z, indices, decay, eps):
    """The update written out in float64, independently of the reference: decay, Laplace smoothing, normalisation."""
    K = cluster_size.shape[0]
    cs, ea = cluster_size.double(), embed_avg.double()
    counts = torch.bincount(indices, minlength=K).double()
    sums = torch.zeros_like(ea).index_add_(0, indices, z.double())
    cs = decay * cs + (1 - decay) * counts
    ea = decay * ea + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    return cs, ea, ea / smoothed[:, None]


def _run(impl, buffers, z, indices, decay=0.9, eps=1e-5, **kw):
    out = [b.clone() for b in buffers]
    ema_update_(*out, z, indices, decay, eps, impl=impl, **kw)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_matches_float64(impl, shape):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    N, K, D = shape
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = torch.randint(0, K, (N,))
    want = _float64_update(buffers, z, indices, 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.9, 1e-5)
    got = _run(impl, buffers, z, indices)
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), got, want, fp32_ref):
        _assert_close_derived(g, w, r, name)


def test_ema_update_reference_is_the_formula():
    """The float64 reference every test compares against is the update as written out (skewed assignments)."""
    N, K, D = 300, 37, 77
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = (torch.rand(N) ** 3 * K).long().clamp_(max=K - 1)
    got = _float64_update(buffers, z, indices, 0.9, 1e-5)
    for name, g, w in zip(("cluster_size", "embed_avg", "embed"), got,
                          _formula_float64(buffers[0], buffers[1], z, indices, 0.9, 1e-5)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_ema_update_triton_counts_sums_match_float64(deterministic):
    from lgvq_fast.kernels import ema as tri

    N, K, D = 350, 45, 77
    z = torch.randn(N, D)
    indices = torch.randint(0, K, (N,))
    counts, sums = tri.ema_counts_sums(z, indices, K, deterministic)
    want_counts = torch.bincount(indices, minlength=K).double()
    want_sums = torch.zeros(K, D, dtype=torch.float64).index_add_(0, indices, z.double())
    assert torch.equal(counts.double(), want_counts)
    tol = 4 * FP32_EPS * torch.zeros(K, D, dtype=torch.float64).index_add_(0, indices, z.double().abs()).max()
    assert (sums.double() - want_sums).abs().max() <= tol


@needs_triton
def test_ema_update_triton_deterministic_bitwise():
    N, K, D = 480, 7, 77
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = torch.randint(0, K, (N,))
    first = _run("triton", buffers, z, indices)
    second = _run("triton", buffers, z, indices)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("embed_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["e32", "ebf16", "efp16"])
@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16], ids=["zbf16", "zfp16"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_half_inputs(impl, z_dtype, embed_dtype):
    N, K, D = 200, 33, 40
    buffers = _buffers(K, D, embed_dtype)
    z = torch.randn(N, D).to(z_dtype)
    indices = torch.randint(0, K, (N,), dtype=torch.int32)
    want = _float64_update(buffers, z, indices.long(), 0.8, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.8, 1e-5)
    got = _run(impl, buffers, z, indices, decay=0.8)
    assert got[2].dtype == embed_dtype
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), got, want, fp32_ref):
        _assert_close_derived(g, w, r, name)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_noncontiguous_and_batched_z(impl):
    K, D = 25, 19
    buffers = _buffers(K, D)
    z = torch.randn(2, D, 6, 5).permute(0, 2, 3, 1)  # [2, 6, 5, D], channel-last view
    indices = torch.randint(0, K, (2, 6, 5))
    want = _float64_update(buffers, z.reshape(-1, D), indices.reshape(-1), 0.95, 1e-4)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z.reshape(-1, D), indices.reshape(-1), 0.95, 1e-4)
    got = _run(impl, buffers, z, indices, decay=0.95, eps=1e-4)
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), got, want, fp32_ref):
        _assert_close_derived(g, w, r, name)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_decay_one_and_zero(impl):
    K, D, N = 9, 12, 40
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = torch.randint(0, K, (N,))
    kept = _run(impl, buffers, z, indices, decay=1.0)
    assert torch.equal(kept[0], buffers[0]) and torch.equal(kept[1], buffers[1])
    fresh = _run(impl, buffers, z, indices, decay=0.0)
    assert torch.equal(fresh[0], torch.bincount(indices, minlength=K).float())


def _zero_mass_case(impl, device):
    """Zero initial counts: an empty batch leaves n = 0 and embed unchanged; a real batch then fills it."""
    K, D = 13, 10
    cluster_size = torch.zeros(K, device=device)
    embed_avg = torch.zeros(K, D, device=device)
    embed = torch.randn(K, D, device=device)
    start = embed.clone()
    ema_update_(cluster_size, embed_avg, embed, torch.randn(0, D, device=device),
                torch.zeros(0, dtype=torch.long, device=device), 0.9, 1e-5, impl=impl)
    assert torch.equal(embed, start), f"{impl}: n = 0 must leave embed as it was"
    assert not cluster_size.any() and not embed_avg.any()
    z = torch.randn(7, D, device=device)
    indices = torch.tensor([0, 0, 3, 5, 5, 5, 12], device=device)
    want = _float64_update([cluster_size, embed_avg, embed], z, indices, 0.9, 1e-5)
    ema_update_(cluster_size, embed_avg, embed, z, indices, 0.9, 1e-5, impl=impl)
    # codes 1, 2, 4, ... got no row but n > 0: smoothed > 0, their embed is embed_avg / s = 0
    assert torch.isfinite(embed).all() and not embed[1].any()
    for name, g, w in zip(("cluster_size", "embed_avg", "embed"), (cluster_size, embed_avg, embed), want):
        assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-6), f"{impl} {name}"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_zero_mass_keeps_embed(impl):
    _zero_mass_case(impl, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference"] + GPU_IMPLS)
def test_ema_update_zero_mass_keeps_embed_gpu(impl):
    _zero_mass_case(impl, "cuda")


def test_ema_update_bad_inputs_raise():
    K, D, N = 10, 8, 20
    cs, ea, e = _buffers(K, D)
    z = torch.randn(N, D)
    idx = torch.randint(0, K, (N,))
    cases = [
        ("indices out of range", dict(indices=torch.full((N,), K))),
        ("indices out of range", dict(indices=torch.full((N,), -1))),
        ("cluster_size", dict(cluster_size=cs.double())),
        ("embed_avg", dict(embed_avg=torch.randn(K + 1, D))),
        ("embed", dict(embed=torch.randn(K, D + 1))),
        ("embed", dict(embed=torch.randn(D, K).t())),
        ("z", dict(z=torch.randn(N, D + 1))),
        ("z", dict(z=torch.randint(0, 3, (N, D)))),
        ("indices", dict(indices=idx.float())),
        ("indices", dict(indices=idx[:-1])),
        ("z", dict(z=torch.randn(N, D, device="meta"))),
        ("decay", dict(decay=1.5)),
        ("decay", dict(decay=-0.1)),
        ("eps", dict(eps=0.0)),
        ("cluster_size", dict(cluster_size=torch.empty(0))),
    ]
    for match, change in cases:
        args = dict(cluster_size=cs.clone(), embed_avg=ea.clone(), embed=e.clone(), z=z, indices=idx)
        args.update(decay=0.9, eps=1e-5)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            ema_update_(**args)
    with pytest.raises(ValueError, match="impl"):
        ema_update_(cs, ea, e, z, idx, 0.9, 1e-5, impl="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        ema_update_(cs, ea, e, z, idx, 0.9, 1e-5, impl="cuda")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_opcheck(impl):
    K, D, N = 11, 20, 37
    cs, ea, e = _buffers(K, D)
    z = torch.randn(N, D)
    idx = torch.randint(0, K, (N,))
    torch.library.opcheck(torch.ops.lgvq_fast.ema_update_.default, (cs, ea, e, z, idx, 0.9, 1e-5, True, impl))


def test_ema_update_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(cs, ea, e, z, idx):
        ema_update_(cs, ea, e, z * 1.0, idx, 0.9, 1e-5, check_indices=False, impl="reference")
        return e.sum()

    K, D, N = 13, 20, 50
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    idx = torch.randint(0, K, (N,))
    got = [b.clone() for b in buffers]
    want = [b.clone() for b in buffers]
    try:
        torch.compile(step, fullgraph=True)(*got, z, idx)
    except Exception as exc:
        if "C++ compiler" in str(exc) or "CppCompileError" in type(exc).__name__:
            pytest.skip(f"torch.compile cannot build CPU code here: {type(exc).__name__}")
        raise
    step(*want, z, idx)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _gloo_worker(rank, world, init_file, out_dir, impls):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(os.path.join(out_dir, "inputs.pt"))
        for impl in impls:
            buffers = [b.clone() for b in data["buffers"]]
            z, indices = data["z"][rank], data["indices"][rank]
            ema_update_(*buffers, z, indices, 0.9, 1e-5, process_group=dist.group.WORLD, impl=impl)
            torch.save(buffers, os.path.join(out_dir, f"{impl}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ema_update_process_group_gloo():
    """Two gloo ranks (spawned once for every impl): identical buffers, equal to one update on all the data."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    K, D, N = 17, 23, 60
    buffers = _buffers(K, D)
    z = torch.randn(2, N, D)
    indices = torch.randint(0, K, (2, N))
    with tempfile.TemporaryDirectory() as out_dir:
        torch.save({"buffers": buffers, "z": z, "indices": indices}, os.path.join(out_dir, "inputs.pt"))
        init_file = os.path.join(out_dir, "rendezvous")
        mp.spawn(_gloo_worker, args=(2, init_file, out_dir, CPU_IMPLS), nprocs=2, join=True)
        results = {
            impl: [torch.load(os.path.join(out_dir, f"{impl}_rank{r}.pt")) for r in range(2)] for impl in CPU_IMPLS
        }
    want = _float64_update(buffers, z.reshape(-1, D), indices.reshape(-1), 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z.reshape(-1, D), indices.reshape(-1), 0.9, 1e-5)
    for impl, ranks in results.items():
        for a, b in zip(*ranks):
            assert torch.equal(a, b), f"{impl}: ranks disagree after the all-reduced update"
        for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), ranks[0], want, fp32_ref):
            _assert_close_derived(g, w, r, f"{impl} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_ema_update_gpu_matches_float64_and_is_deterministic(impl):
    N, K, D = 4099, 1000, 77
    buffers = [b.cuda() for b in _buffers(K, D)]
    z = torch.randn(N, D, device="cuda")
    indices = torch.randint(0, K, (N,), device="cuda")
    want = _float64_update(buffers, z, indices, 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.9, 1e-5)
    first = _run(impl, buffers, z, indices)
    second = _run(impl, buffers, z, indices)
    for name, g, g2, w, r in zip(("cluster_size", "embed_avg", "embed"), first, second, want, fp32_ref):
        _assert_close_derived(g, w, r, name)
        assert torch.equal(g, g2), f"{name}: two runs differ"


# (N, K, D): tails, K=16384 at D=256 with 65536 rows, few rows for many codes, no rows at all.
GPU_SWEEP_SHAPES = [(4096, 1000, 77), (65536, 16384, 256), (10, 300, 8), (0, 50, 8)]
# Per-element bounds the sweep was written and run with, on top of the derived max-norm bound.
GPU_SWEEP_ELEMENTWISE = {"cluster_size": (1e-5, 1e-5), "embed_avg": (1e-4, 1e-4), "embed": (1e-4, 1e-4)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SWEEP_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_ema_update_gpu_sweep_matches_float64(impl, shape, dtype):
    N, K, D = shape
    z = torch.randn(N, D, device="cuda").to(dtype)
    # Skewed assignments: a few codes get many rows, many get none.
    indices = (torch.rand(N, device="cuda") ** 3 * K).long().clamp_(max=K - 1)
    # embed starts poisoned: the update must write every entry
    buffers = (torch.rand(K, device="cuda") * 5, torch.randn(K, D, device="cuda"),
               torch.full((K, D), float("nan"), device="cuda"))
    want = _float64_update(buffers, z, indices, 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.9, 1e-5)
    got = _run(impl, buffers, z, indices)
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), got, want, fp32_ref):
        _assert_close_derived(g, w, r, name, elementwise=GPU_SWEEP_ELEMENTWISE[name])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_ema_update_gpu_is_deterministic_under_contention(impl):
    N, K, D = 65536, 1024, 256
    z = torch.randn(N, D, device="cuda")
    # every row goes to one of 8 codes: many rows summed into the same entries
    indices = torch.randint(0, 8, (N,), device="cuda") * 100
    start = (torch.rand(K, device="cuda"), torch.randn(K, D, device="cuda"), torch.zeros(K, D, device="cuda"))
    first = _run(impl, start, z, indices, decay=0.99)
    second = _run(impl, start, z, indices, decay=0.99)
    for name, a, b in zip(("cluster_size", "embed_avg", "embed"), first, second):
        assert torch.equal(a, b), f"{name}: two updates on the same inputs differ"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ema_update_z_aliasing_the_codebook(impl):
    """z may be the codebook buffer itself (or a view of it): the update reads z as it was before the call."""
    K, D = 20, 12
    buffers = _buffers(K, D)
    idx = torch.randperm(K)
    want = _run("reference", buffers, buffers[2].clone(), idx)
    got = [b.clone() for b in buffers]
    ema_update_(*got, got[2], idx, 0.9, 1e-5, impl=impl)
    for name, g, w in zip(("cluster_size", "embed_avg", "embed"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    got = [b.clone() for b in buffers]
    ema_update_(*got, got[2][: K // 2], idx[: K // 2], 0.9, 1e-5, impl=impl)  # a view of the first rows
    want = _run("reference", buffers, buffers[2][: K // 2].clone(), idx[: K // 2])
    for name, g, w in zip(("cluster_size", "embed_avg", "embed"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- the scan path (kernels/ema.py, method="scan"): fixed chunks of sorted rows, a segmented scan, a fix-up ----

def _assignments(kind, N, K):
    """``uniform``; ``skewed`` (code 3 takes half the rows, the rest uniform: the case that serialises the
    per-code path); ``sparse`` (a tenth of the codes used, so runs of empty codes sit between segments)."""
    if kind == "uniform":
        return torch.randint(0, K, (N,))
    if kind == "skewed":
        idx = torch.randint(0, K, (N,))
        idx[torch.randperm(N)[: N // 2]] = min(3, K - 1)
        return idx
    used = torch.randperm(K)[: max(1, K // 10)]
    return used[torch.randint(0, used.numel(), (N,))]


# N over several chunks (64 rows in the interpreter: a code spanning 5+ chunks when skewed), N below one chunk
# with K over several 32-code fix-up blocks, K = 1, N = 0; D = 40 and 70 over two and three 32-column blocks.
SCAN_SHAPES = [(700, 37, 40), (50, 130, 24), (300, 1, 8), (0, 20, 16)]


@needs_triton
@pytest.mark.parametrize("kind", ["uniform", "skewed", "sparse"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=_shape_id)
def test_ema_scan_path_matches_float64_and_is_bitwise_stable(shape, kind):
    from lgvq_fast.kernels import ema as tri

    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    N, K, D = shape
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = _assignments(kind, N, K)
    want = _float64_update(buffers, z, indices, 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.9, 1e-5)
    runs = []
    for _ in range(2 if kind == "skewed" else 1):  # the interpreter is slow: a second run where codes span chunks
        got = [b.clone() for b in buffers]
        tri.ema_update_fwd(*got, z, indices, 0.9, 1e-5, deterministic=True, method="scan")
        runs.append(got)
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), runs[0], want, fp32_ref):
        _assert_close_derived(g, w, r, name)
    for a, b in zip(runs[0], runs[-1]):
        assert torch.equal(a, b), "scan path not bitwise deterministic"


@needs_triton
def test_ema_scan_wide_d():
    """D over three 32-column blocks, K over five 32-code fix-up blocks, skewed."""
    from lgvq_fast.kernels import ema as tri

    N, K, D = 400, 150, 70
    buffers = _buffers(K, D)
    z = torch.randn(N, D)
    indices = _assignments("skewed", N, K)
    want = _float64_update(buffers, z, indices, 0.9, 1e-5)
    fp32_ref = [b.clone() for b in buffers]
    ref.ema_update_(*fp32_ref, z, indices, 0.9, 1e-5)
    got = [b.clone() for b in buffers]
    tri.ema_update_fwd(*got, z, indices, 0.9, 1e-5, deterministic=True, method="scan")
    for name, g, w, r in zip(("cluster_size", "embed_avg", "embed"), got, want, fp32_ref):
        _assert_close_derived(g, w, r, name)


@needs_triton
@pytest.mark.parametrize("kind", ["uniform", "skewed", "sparse"])
def test_ema_scan_counts_sums_match_float64(kind):
    """Stage 1 of the distributed update on the scan path: every code's sum written (poisoned outputs), codes
    inside one chunk, across chunks and without rows."""
    from lgvq_fast.kernels import ema as tri

    N, K, D = 400, 90, 45
    z = torch.randn(N, D)
    indices = _assignments(kind, N, K)
    counts, sums = tri.ema_counts_sums(z, indices, K, True, method="scan")
    assert torch.equal(counts.double(), torch.bincount(indices, minlength=K).double())
    want = torch.zeros(K, D, dtype=torch.float64).index_add_(0, indices, z.double())
    tol = 4 * FP32_EPS * torch.zeros(K, D, dtype=torch.float64).index_add_(0, indices, z.double().abs()).max()
    assert torch.isfinite(sums).all(), "unwritten (poisoned) sums"
    assert (sums.double() - want).abs().max() <= tol


@needs_triton
def test_ema_method_is_checked():
    from lgvq_fast.kernels import ema as tri

    with pytest.raises(ValueError, match="method"):
        tri._method("sorted")
