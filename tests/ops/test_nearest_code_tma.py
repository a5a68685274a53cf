"""The TMA fast-mode search (kernels/nearest_code_tma.py) against float64, in the CPU interpreter and (``-m gpu``,
sm_90+) on the card: the same checker, fault injection and tie rules as tests/ops/test_nearest_code.py, plus
its own parts: the bf16 operand copies, the in-place path for TMA-ready bf16 inputs, and the kernel choice."""
import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import nearest_code
from lgvq_fast.reference import nearest_code as ref
from test_nearest_code import (FAULT_SHAPES, GPU_SWEEP_TOL, METRICS, SHAPES, _check_against_float64, _check_rule,
                               _first_occurrence, _inject_bad_codes, _inject_bad_rows, _integer_duplicates,
                               _shape_id)

pytestmark = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")

if _backend.triton_available():
    import triton
    import triton.language as tl

    from lgvq_fast.kernels.nearest_code import keep_tile_min
    from lgvq_fast.kernels.nearest_code_tma import _keep_tile_min_packed

    @triton.jit
    def _both_tile_reductions(acc_ptr, aux_ptr, out_ptr, idx_ptr, R: tl.constexpr, C: tl.constexpr):
        """One [R, C] tile of products folded into empty running minima by each reduction."""
        rows, cols = tl.arange(0, R), tl.arange(0, C)
        acc = tl.load(acc_ptr + rows[:, None] * C + cols[None, :])
        aux = tl.load(aux_ptr + cols)
        best = tl.full([R], float("inf"), tl.float32)
        idx = tl.zeros([R], tl.int64)
        b1, i1 = keep_tile_min(acc, aux, 1000, best, idx, False)
        b2, i2 = _keep_tile_min_packed(acc, aux, 1000, best, idx, False, C)
        tl.store(out_ptr + rows, b1)
        tl.store(out_ptr + R + rows, b2)
        tl.store(idx_ptr + rows, i1)
        tl.store(idx_ptr + R + rows, i2)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(d):
    return str(d).replace("torch.", "")


@pytest.fixture
def tma(monkeypatch):
    """Route ``precision="fast"`` of the Triton backend to the TMA kernel, as a user would."""
    monkeypatch.setenv("LGVQ_FAST_NN_FAST_KERNEL", "tma")


@pytest.mark.parametrize("shape", SHAPES + [(70, 300, 16), (257, 129, 300)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("metric", METRICS)
def test_tma_matches_float64(tma, metric, dtype, shape):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    N, K, D = shape
    z = torch.randn(N, D).to(dtype)
    codebook = torch.randn(K, D).to(dtype)
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    _check_against_float64(z, codebook, indices, distances, metric, "fast")


@pytest.mark.parametrize("metric", METRICS)
def test_tma_agrees_with_the_tile_kernel(metric):
    """Same bf16 operands and fp32 norms as the tile kernel's fast mode: the same codes except where two scores
    differ by less than the accumulation order can move them, and the same distances to fp32 rounding."""
    from lgvq_fast.kernels.nearest_code import nearest_code_fwd
    from lgvq_fast.kernels.nearest_code_tma import nearest_code_fast_tma

    z, codebook = torch.randn(400, 77), torch.randn(500, 77)
    i_tma, d_tma = nearest_code_fast_tma(z, codebook, metric)
    i_tiles, d_tiles = nearest_code_fwd(z, codebook, metric, "fast")
    assert (i_tma == i_tiles).double().mean() >= 0.99
    same = i_tma == i_tiles
    tol = 1e-5 * ref.tie_tolerance(z, codebook, metric, 1.0)
    assert ((d_tma[same].double() - d_tiles[same].double()).abs() <= tol[same]).all()


@pytest.mark.parametrize("shape", FAULT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("metric", METRICS)
def test_tma_nonfinite_codes_and_rows(tma, metric, shape):
    N, K, D = shape
    z, codebook = torch.randn(N, D), torch.randn(K, D)
    _inject_bad_codes(z, codebook)
    _inject_bad_rows(z)
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    _check_rule(z, codebook, indices, distances, metric, "fast")


@pytest.mark.parametrize("metric", METRICS)
def test_tma_no_valid_code_and_overflow(tma, metric):
    z, codebook = torch.randn(70, 40), torch.randn(90, 40)
    codebook[:, 3] = float("nan")
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    assert (indices == 0).all() and distances.isnan().all()
    # l2: ||e||^2 overflows for the big codes (never chosen), ||z||^2 for the big rows (distance +inf);
    # cos: norms far beyond 1e19 normalise, those at 2^126 and above count as non-finite.
    z, codebook = torch.randn(70, 40), torch.randn(90, 40)
    codebook[torch.randperm(90)[:5]] *= 1e20 if metric == "l2" else 1e38
    z[torch.randperm(70)[:5]] *= 1e20
    z[torch.randperm(70)[:3]] *= 1e-30
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    _check_rule(z, codebook, indices, distances, metric, "fast")


@pytest.mark.parametrize("metric", METRICS)
def test_tma_duplicate_codes_lowest_index_wins(tma, metric):
    z, codebook = _integer_duplicates(metric)
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    first = _first_occurrence(codebook)
    assert torch.equal(first[indices], indices), "a duplicated code won over its lower-index twin"
    if metric == "l2":  # exact scores: float64's own argmin (the packed reduction rounds the distance only)
        assert torch.equal(indices, ref.exact_nearest(z, codebook, metric)[0])
    _check_against_float64(z, codebook, indices, distances, metric, "fast")


@pytest.mark.parametrize("layout", ["ready", "wide_pitch", "odd_d", "misaligned", "column_major", "leading_dims"])
def test_tma_inputs_read_in_place_or_copied(tma, layout):
    """bf16 rows TMA can read (unit column stride, 16-byte pitch and base) are used in place, anything else is
    copied first; both give the float64 answer."""
    from lgvq_fast.kernels import nearest_code_tma as nt

    D, K = (37 if layout == "odd_d" else 64), 150
    codebook = torch.randn(K, D)
    if layout == "ready":
        z = torch.randn(120, D).bfloat16()
    elif layout == "wide_pitch":
        z = torch.randn(120, D + 24).bfloat16()[:, 8:8 + D]
    elif layout == "odd_d":
        z = torch.randn(120, D).bfloat16()
    elif layout == "misaligned":
        z = torch.randn(120 * D + 1).bfloat16()[1:].view(120, D)
    elif layout == "column_major":
        z = torch.randn(D, 120).bfloat16().T
    else:
        z = torch.randn(2, 6, 10, D).bfloat16()
    in_place = layout in ("ready", "wide_pitch", "leading_dims")
    z2d = z.reshape(-1, D)
    assert nt._tma_ready(z2d) == in_place
    copy, aux = nt.prepare(z2d, nt.PREP_L2)
    assert (copy is z2d) == in_place
    indices, distances = nearest_code(z, codebook, metric="l2", precision="fast", impl="triton")
    _check_against_float64(z, codebook, indices, distances, "l2", "fast")


@pytest.mark.parametrize("mode", ["l2", "cos_row", "cos_code"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("D", [8, 37, 77, 256])
def test_prepare_copies_and_aux(mode, dtype, D):
    """The copy is bf16 of the values (cos codes: of the normalised values), zero in the pad columns; the
    auxiliary is ||x||^2 (l2) or 1 / max(||x||, eps) (cos rows) from the input values, 0 for cos codes."""
    from lgvq_fast.kernels import nearest_code_tma as nt
    from lgvq_fast.kernels.nearest_code import normalized_codebook

    x = (torch.randn(50, D) * torch.logspace(-3, 3, 50)[:, None]).to(dtype)
    x[7] = 0.0
    prep = {"l2": nt.PREP_L2, "cos_row": nt.PREP_COS_ROW, "cos_code": nt.PREP_COS_CODE}[mode]
    if mode == "cos_code" or dtype != torch.bfloat16 or D % 8:
        x = x.T.contiguous().T  # column-major: never TMA-ready, so the copy is written
    copy, aux = nt.prepare(x, prep)
    Dp = (D + 7) // 8 * 8
    assert copy.shape == (50, Dp) and copy.dtype == torch.bfloat16 and copy.is_contiguous()
    assert (copy[:, D:] == 0).all()
    x64 = x.double()
    norm = x64.norm(dim=1)
    if mode == "cos_code":
        want = normalized_codebook(x, torch.bfloat16)
        assert torch.equal(copy[:, :D], want)
        assert (aux == 0).all()
        return
    assert torch.equal(copy[:, :D], x.bfloat16())
    if mode == "l2":
        assert torch.allclose(aux.double(), norm**2, rtol=1e-5, atol=0)
    else:
        assert torch.allclose(aux.double(), 1.0 / norm.clamp_min(1e-12), rtol=1e-6, atol=0)


def _config(packed, block_d=64):
    from lgvq_fast.kernels import nearest_code_tma as nt

    return triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": block_d, "PACKED": packed}, num_warps=4,
                         pre_hook=nt._set_blocks)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "pairs"])
@pytest.mark.parametrize("metric", METRICS)
def test_tma_both_tile_reductions(metric, packed):
    """Both reductions, launched directly: float64 agreement at one-tile and looped D, the rule for
    non-finite values, and exact ties to the lowest index."""
    from lgvq_fast.kernels.nearest_code_tma import nearest_code_fast_tma

    for N, K, D in [(200, 300, 37), (150, 260, 130)]:
        z, codebook = torch.randn(N, D), torch.randn(K, D)
        indices, distances = nearest_code_fast_tma(z, codebook, metric, config=_config(packed))
        _check_against_float64(z, codebook, indices, distances, metric, "fast")
        _inject_bad_codes(z, codebook)
        _inject_bad_rows(z)
        indices, distances = nearest_code_fast_tma(z, codebook, metric, config=_config(packed))
        _check_rule(z, codebook, indices, distances, metric, "fast")
    z, codebook = _integer_duplicates("l2")
    indices, _ = nearest_code_fast_tma(z, codebook, "l2", config=_config(packed))
    assert torch.equal(indices, ref.exact_nearest(z, codebook, "l2")[0])


def test_packed_keys_order_scores_and_reject_nonfinite():
    """The packed reduction on hand-made score tiles against the (value, index) one: the same index wherever
    the best score leads the runner-up by more than the cleared bits, +inf where a row has no finite score,
    the best score to within 2^-16 of its magnitude (never above it), and ties to the lowest index."""
    R, C = 32, 128
    scale = torch.logspace(-30, 30, R)[:, None]
    acc = torch.randn(R, C) * scale
    aux = torch.zeros(C)
    acc[0] = float("nan")  # no finite score
    acc[1] = float("-inf")  # scores +inf
    acc[2, :] = float("inf")  # scores -inf: never win
    acc[2, 77] = 1.0
    acc[3, ::2] = float("nan")
    acc[3, 1::2] = -float(torch.finfo(torch.float32).max) / 2  # score +max: finite, wins
    acc[4] = 0.0  # all scores zero: the lowest column
    acc[5, 10] = acc[5, 90] = 1e6  # an exact tie: column 10
    acc[6, 50] = torch.finfo(torch.float32).max / 2  # score -max
    out = torch.empty(2 * R)
    idx = torch.empty(2 * R, dtype=torch.int64)
    _both_tile_reductions[(1,)](acc, aux, out, idx, R=R, C=C)
    pairs, packed = out[:R].double(), out[R:].double()
    i_pairs, i_packed = idx[:R] - 1000, idx[R:] - 1000
    # no finite score: the running minimum stays +inf and the index where it started (0)
    assert packed[0] == float("inf") and packed[1] == float("inf") and idx[R] == 0 and idx[R + 1] == 0
    assert i_packed[2] == 77 and i_packed[4] == 0 and i_packed[5] == 10 and i_packed[6] == 50
    assert i_packed[3] % 2 == 1 and torch.isfinite(packed[3])
    finite = torch.isfinite(pairs)
    assert torch.equal(finite, torch.isfinite(packed))
    assert (packed[finite] <= pairs[finite]).all()
    # 7 of the 23 significand bits cleared (C = 128): under 2^-16 of the magnitude
    assert ((pairs - packed)[finite] <= 2.0**-16 * pairs[finite].abs()).all()
    assert (pairs - packed)[finite].max() > 0, "no score was rounded: the packing was not exercised"
    scores = -2.0 * acc.double()
    top2 = scores[7:].topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 2.0**-15 * top2[:, 0].abs()
    assert torch.equal(i_packed[7:][clear], i_pairs[7:][clear])
    assert clear.double().mean() > 0.5


def test_fast_kernel_choice(monkeypatch):
    from lgvq_fast._backend import nn_fast_kernel as fast_kernel

    cpu = torch.device("cpu")
    monkeypatch.delenv("LGVQ_FAST_NN_FAST_KERNEL", raising=False)
    assert fast_kernel(cpu) == "tiles"
    for value, want in (("tma", "tma"), ("TILES", "tiles"), ("auto", "tiles"), ("", "tiles")):
        monkeypatch.setenv("LGVQ_FAST_NN_FAST_KERNEL", value)
        assert fast_kernel(cpu) == want
    monkeypatch.setenv("LGVQ_FAST_NN_FAST_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="LGVQ_FAST_NN_FAST_KERNEL.*'wgmma'"):
        nearest_code(torch.randn(4, 8), torch.randn(5, 8), precision="fast", impl="triton")


def test_tma_empty_batch(tma):
    indices, distances = nearest_code(torch.randn(0, 16), torch.randn(5, 16), precision="fast", impl="triton")
    assert indices.shape == (0,) and distances.shape == (0,)


# ---- on the card (sm_90+) ----

def _needs_tma():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a GPU with TMA (sm_90 or newer)")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4099, 4096, 256), (65536, 1000, 8), (3000, 16384, 32), (1000, 1000, 77),
                                   (333, 130, 33), (4097, 2049, 300)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("metric", METRICS)
def test_tma_gpu_matches_float64(tma, metric, dtype, shape):
    _needs_tma()
    N, K, D = shape
    z = torch.randn(N, D, device="cuda").to(dtype)
    codebook = torch.randn(K, D, device="cuda")
    indices, distances = nearest_code(z, codebook, metric=metric, precision="fast", impl="triton")
    _check_against_float64(z, codebook, indices, distances, metric, "fast", **GPU_SWEEP_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [8, 256, 300])
def test_tma_gpu_every_config_matches_float64(D, monkeypatch):
    """Each config the pruning keeps for D (one 16-wide tile, one 256-wide tile, 64/128-wide chunks), launched
    directly (autotuning would time them and keep one): l2 for each, cos for the first."""
    _needs_tma()
    from lgvq_fast.kernels import nearest_code_tma as nt

    monkeypatch.setenv("LGVQ_FAST_TRITON_AUTOTUNE", "1")
    z, codebook = torch.randn(2053, D, device="cuda"), torch.randn(3001, D, device="cuda")
    truth = {m: ref.exact_nearest(z, codebook, m)[0] for m in METRICS}
    configs = nt._prune_configs(nt._configs(), {"D": D})
    assert configs
    for i, config in enumerate(configs):
        for metric in METRICS if i == 0 else ["l2"]:
            indices, distances = nt.nearest_code_fast_tma(z, codebook, metric, config=config)
            _check_against_float64(z, codebook, indices, distances, metric, "fast", truth=truth[metric],
                                   **GPU_SWEEP_TOL)


@pytest.mark.gpu
def test_tma_gpu_nonfinite_and_ties(tma):
    _needs_tma()
    for metric in METRICS:
        z, codebook = torch.randn(3000, 77), torch.randn(2000, 77)
        _inject_bad_codes(z, codebook)
        _inject_bad_rows(z)
        indices, distances = nearest_code(z.cuda(), codebook.cuda(), metric=metric, precision="fast", impl="triton")
        _check_rule(z, codebook, indices, distances, metric, "fast")
    half = torch.randn(700, 64, device="cuda")
    codebook = torch.cat([half, half])
    pick = torch.randint(0, 700, (1000,), device="cuda")
    indices, _ = nearest_code(half[pick], codebook, metric="l2", precision="fast", impl="triton")
    assert torch.equal(indices, pick), "a row equal to a code must pick that code (lowest duplicate)"


def test_bf16_rounding_is_the_gpus():
    """The copies round to nearest even as torch and the GPU do (the interpreter's own conversion truncates):
    halfway cases, a carry into the exponent, overflow to inf, subnormals, NaN and inf."""
    from lgvq_fast.kernels import nearest_code_tma as nt

    one = 1.0
    special = torch.tensor([one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, 2 - 2**-9, 3.4e38, -3.4e38,
                            1e-40, -3e-39, float("inf"), float("-inf"), 0.0, -0.0], dtype=torch.float32)
    x = torch.cat([special, torch.randn(20) * torch.logspace(-30, 30, 20)]).reshape(4, 8)
    copy, _ = nt.prepare(x.T.contiguous().T, nt.PREP_L2)
    assert torch.equal(copy.view(torch.int16), x.bfloat16().view(torch.int16))
    x[1, 3] = float("nan")
    copy, aux = nt.prepare(x.T.contiguous().T, nt.PREP_L2)
    assert copy[1, 3].isnan() and aux[1].isnan()


# ---- the CUDA extension's TMA + wgmma search (csrc/nearest_code_sm90.cu), on the card (compute capability 9.0) ----

def _needs_cuda_tma():
    _needs_tma()
    if not _backend.cuda_ext_available():
        pytest.skip(f"the compiled extension is not built: {_backend.cuda_ext_import_error()}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the extension's wgmma kernel is sm_90a machine code (compute capability 9.0)")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4099, 4096, 256), (65536, 1000, 8), (3000, 16384, 32), (1000, 1000, 77),
                                   (333, 130, 33), (4097, 2049, 300), (700, 900, 512), (128, 128, 64)],
                         ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_tma_gpu_matches_float64(metric, dtype, shape):
    _needs_cuda_tma()
    from lgvq_fast import _cuda

    N, K, D = shape
    z = torch.randn(N, D, device="cuda").to(dtype)
    codebook = torch.randn(K, D, device="cuda")
    indices, distances = _cuda.nearest_code(z, codebook, metric, "fast_tma")
    _check_against_float64(z, codebook, indices, distances, metric, "fast", **GPU_SWEEP_TOL)
    # strided rows (a wider row pitch) give the same answer
    wide = torch.zeros(N, D + 40, device="cuda", dtype=dtype)
    wide[:, 3:3 + D] = z
    again = _cuda.nearest_code(wide[:, 3:3 + D], codebook, metric, "fast_tma")
    assert torch.equal(again[0], indices) and torch.equal(again[1], distances)


@pytest.mark.gpu
def test_cuda_tma_gpu_rule_ties_and_dispatch(monkeypatch):
    _needs_cuda_tma()
    from lgvq_fast import _cuda

    for metric in METRICS:
        z, codebook = torch.randn(3000, 77), torch.randn(2000, 77)
        _inject_bad_codes(z, codebook)
        _inject_bad_rows(z)
        indices, distances = _cuda.nearest_code(z.cuda(), codebook.cuda(), metric, "fast_tma")
        _check_rule(z, codebook, indices, distances, metric, "fast")
        codebook[:, 5] = float("nan")
        indices, distances = _cuda.nearest_code(z.cuda(), codebook.cuda(), metric, "fast_tma")
        assert (indices == 0).all() and distances.isnan().all()
    half = torch.randn(700, 64, device="cuda")
    codebook = torch.cat([half, half])
    pick = torch.randint(0, 700, (1000,), device="cuda")
    indices, _ = _cuda.nearest_code(half[pick], codebook, "l2", "fast_tma")
    assert torch.equal(indices, pick), "a row equal to a code must pick that code (lowest duplicate)"
    # LGVQ_FAST_NN_FAST_KERNEL=tma routes the op's fast mode here (the same kernel: the same bits), and a D the
    # kernel does not take falls back to the mma.sync kernel
    z, codebook = torch.randn(2000, 256, device="cuda"), torch.randn(3000, 256, device="cuda")
    direct = _cuda.nearest_code(z, codebook, "l2", "fast_tma")
    monkeypatch.setenv("LGVQ_FAST_NN_FAST_KERNEL", "tma")
    routed = nearest_code(z, codebook, "l2", "fast", "cuda")
    assert torch.equal(direct[0], routed[0]) and torch.equal(direct[1], routed[1])
    z, codebook = torch.randn(300, 600, device="cuda"), torch.randn(200, 600, device="cuda")
    indices, distances = nearest_code(z, codebook, "l2", "fast", "cuda")
    _check_against_float64(z, codebook, indices, distances, "l2", "fast", **GPU_SWEEP_TOL)
    with pytest.raises(RuntimeError, match="fast_tma"):
        _cuda.nearest_code(z, codebook, "l2", "fast_tma")


# ---- the certified exact mode's passes through TMA descriptors (kernels/nearest_code_certified.py, USE_TMA) ----

@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(300, 1000, 77), (100, 50, 256), (130, 200, 8), (90, 130, 37)], ids=_shape_id)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_tma_matches_float64(tma, metric, shape, dtype):
    """The same float64 answer as the pointer passes, with the fp16 rows read through descriptors (rows of D
    rounded up to 8; D = 77 and 37 need the padding)."""
    from test_nearest_code import _certified, _check_certified

    from lgvq_fast.kernels import nearest_code_certified as cert

    assert cert.use_tma(torch.device("cpu"))
    N, K, D = shape
    z, codebook = torch.randn(N, D).to(dtype), torch.randn(K, D).to(dtype)
    indices, distances = _certified(z, codebook, metric)
    _check_certified(z, codebook, indices, distances, metric)


@pytest.mark.parametrize("case", ["duplicates", "near_ties", "on_codes", "clustered", "scales"])
@pytest.mark.parametrize("metric", METRICS)
def test_certified_tma_adversarial_inputs(tma, metric, case):
    """Every level through TMA (the duplicates reach the split level and the candidate lists)."""
    from test_nearest_code import _adversarial, _certified, _check_certified

    z, codebook = _adversarial(case, metric, D=44)
    stats = {}
    indices, distances = _certified(z, codebook, metric, stats)
    _check_certified(z, codebook, indices, distances, metric)
    if case == "duplicates":
        assert int(stats["split_rows"]) == z.shape[0] == int(stats["candidate_rows"])
        assert int(stats["rescored"]) == 0


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_certify_pass_same_with_and_without_tma(metric, split):
    """One pass, pointers against descriptors: the same fp16 operands, so the same argmin, proofs and bounds
    (the products are exact in fp32 here; only the operands' route differs)."""
    from lgvq_fast.kernels.nearest_code_certified import certify_pass

    z, codebook = torch.randn(150, 45), torch.randn(260, 45)
    i1, i2 = torch.empty(150, dtype=torch.int64), torch.empty(150, dtype=torch.int64)
    _, _, p1, u1 = certify_pass(z, codebook, metric, i1, split=split, tma=False)
    _, _, p2, u2 = certify_pass(z, codebook, metric, i2, split=split, tma=True)
    assert torch.equal(i1, i2) and torch.equal(p1, p2)
    assert torch.allclose(u1, u2, rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4099, 4096, 256), (5000, 16384, 8), (3000, 1000, 77)], ids=_shape_id)
@pytest.mark.parametrize("metric", METRICS)
def test_certified_tma_gpu_matches_float64(tma, metric, shape):
    _needs_tma()
    from test_nearest_code import _certified, _check_certified

    N, K, D = shape
    z, codebook = torch.randn(N, D, device="cuda"), torch.randn(K, D, device="cuda")
    indices, distances = _certified(z, codebook, metric)
    _check_certified(z.cpu(), codebook.cpu(), indices.cpu(), distances.cpu(), metric)
