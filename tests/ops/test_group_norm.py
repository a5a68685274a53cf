"""Tests for lgvq_fast.ops.group_norm (reference and Triton-interpreter backends; Triton on a GPU with ``-m gpu``)
against float64. The VQGAN GroupNorm module that calls it is tested in tests/models/test_vqgan.py."""
import pytest
import torch
import torch.nn.functional as F

from lgvq_fast import _backend
from lgvq_fast.ops import group_norm
from lgvq_fast.reference import group_norm as ref

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
# (N, C, H, W, G): C/G of 2, 3, 6 and 1; one position; C not a power of two; H*W over many row tiles
SHAPES = [(2, 64, 5, 7, 32), (3, 96, 9, 11, 32), (2, 48, 13, 17, 8), (1, 40, 3, 2, 40), (4, 12, 1, 1, 3),
          (2, 20, 60, 37, 4)]
LAYOUTS = ["nchw", "channels_last", "strided", "3d"]


def _shape_id(s):
    return "n{}_c{}_h{}_w{}_g{}".format(*s)


def _make_x(N, C, H, W, layout, dtype):
    """Fresh input with a non-zero mean per channel (so the variance is not just E[x^2])."""
    x = torch.randn(N, C, H, W) * (0.5 + torch.rand(1, C, 1, 1) * 3) + torch.randn(1, C, 1, 1) * 4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # every other column of a wider tensor: H and W do not fold into one stride
        wide = torch.randn(N, C, H, 2 * W)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "3d":
        x = x.reshape(N, C, H * W)
    return x.to(dtype)


def _run(fn, x, w, b, dy, **kw):
    """Output and gradients (x, w, b) of ``fn`` on leaf copies of the inputs."""
    xl = x.detach().clone().requires_grad_()
    wl = None if w is None else w.detach().clone().requires_grad_()
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(xl, wl, bl, **kw)
    y.backward(dy)
    return y.detach(), xl.grad, None if wl is None else wl.grad, None if bl is None else bl.grad


def _truth(x, w, b, G, act, dy):
    """Float64 ground truth (output and gradients, all float64) from the same already-rounded inputs and
    output gradient."""
    def f64(xl, wl, bl):
        return ref.group_norm(xl, wl, bl, G, 1e-6, act, torch.float64)

    return _run(f64, x.double(), None if w is None else w.double(), None if b is None else b.double(), dy.double())


# how many fp32 roundings of the group statistics an implementation may carry: the mean comes out of a chain of
# partial means merged with Chan's formula (each merge rounds once), rstd out of a sum, a divide and a square root
STAT_ULPS = 4


def _closed_form(x, w, b, G, act, dy, mean, rstd):
    """Float64 output and gradients (y, dx, dweight, dbias) of GroupNorm(+SiLU) evaluated with the given group
    statistics, by the closed-form backward every implementation computes:
    ``dx = rstd * (g*w - mean_group(g*w) - xhat * mean_group(g*w*xhat))``."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, G, -1)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(N, C, -1)
    wc = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    bc = torch.zeros(C, dtype=torch.float64) if b is None else b.double()
    pre = xhat * wc[:, None] + bc[:, None]
    g = dy.double().reshape(N, C, -1)
    if act:
        s = torch.sigmoid(pre)
        y = pre * s
        g = g * s * (1 + pre * (1 - s))
    else:
        y = pre
    gw = (g * wc[:, None]).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    c1, c2 = gw.mean(-1, keepdim=True), (gw * xh).mean(-1, keepdim=True)
    dx = rstd[..., None] * (gw - c1 - xh * c2)
    return (y.reshape(x.shape), dx.reshape(x.shape), None if w is None else (g * xhat).sum((0, 2)),
            None if b is None else g.sum((0, 2)))


def _statistics_sensitivity(x, w, b, G, act, dy, truth):
    """Per output, the largest float64 change that STAT_ULPS fp32 roundings of a group's statistics cause: the
    mean moved by ``STAT_ULPS * eps * mean(|x|)`` (a float sum's rounding error scales with the sum of the
    magnitudes, not with the result), rstd by ``STAT_ULPS * eps`` relative.

    No fp32 implementation gets a better mean than a rounded one, and an error of ``d`` in the mean moves every
    normalised value of its group by ``d * rstd``: with a mean of 12 and a spread of 0.3 that is 40 ulps of the
    output. The same-dtype PyTorch error can land far below it on a lucky draw, so the tolerance takes this term
    from the inputs themselves. The model is first checked against the float64 truth (unperturbed, it must give
    the same numbers). Measured on the Triton kernels (interpreter, the shapes and inputs of these tests): mean
    within 2.8 eps * mean(|x|), rstd within 3.8 eps relative."""
    N = x.shape[0]
    xg = x.double().reshape(N, G, -1)
    mean, magnitude = xg.mean(-1), xg.abs().mean(-1)
    rstd = 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-6)
    base = _closed_form(x, w, b, G, act, dy, mean, rstd)
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), base, truth):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * (want.abs().max().item() + 1e-30),
                                       msg=lambda m, name=name: f"closed-form model, {name}: {m}")
    u = STAT_ULPS * torch.finfo(torch.float32).eps
    sens = [0.0] * 4
    for dm, dr in ((u, 0), (-u, 0), (0, u), (0, -u)):
        moved = _closed_form(x, w, b, G, act, dy, mean + dm * magnitude, rstd * (1 + dr))
        for i, (m, t) in enumerate(zip(moved, base)):
            if t is not None:
                sens[i] = max(sens[i], (m - t).abs().max().item())
    return sens


def _assert_derived(got, want64, same_dtype_ref, name, out_dtype, stat_sens=0.0):
    """|got - float64| <= 2x the same-dtype PyTorch error + a few roundings of the output dtype + what a few
    roundings of the fp32 group statistics move this output by (``_statistics_sensitivity``)."""
    assert torch.isfinite(got).all(), f"{name}: NaN/inf (unwritten poisoned output?)"
    scale = want64.abs().max().item() + 1e-30
    ref_err = (same_dtype_ref.double() - want64).abs().max().item()
    tol = 2 * ref_err + 4 * torch.finfo(out_dtype).eps * scale + stat_sens
    err = (got.double() - want64).abs().max().item()
    assert err <= tol, (f"{name}: max |err| {err:.3e} > tol {tol:.3e} (same-dtype PyTorch error {ref_err:.3e}, "
                        f"statistics term {stat_sens:.3e})")


def _check(impl, x, w, b, G, act):
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        dy = dy.contiguous(memory_format=torch.channels_last)
    got = _run(lambda xl, wl, bl: group_norm(xl, wl, bl, G, act=act, impl=impl), x, w, b, dy)
    same = _run(lambda xl, wl, bl: ref.group_norm(xl, wl, bl, G, 1e-6, act), x, w, b, dy)
    want = _truth(x, w, b, G, act, dy)
    sens = _statistics_sensitivity(x.cpu(), None if w is None else w.cpu(), None if b is None else b.cpu(), G, act,
                                   dy.cpu(), [None if t is None else t.cpu() for t in want])
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    pdtype = torch.float32 if w is None else w.dtype
    for name, g, s, t, dt, st in zip(("y", "dx", "dweight", "dbias"), got, same, want,
                                     (x.dtype, x.dtype, pdtype, pdtype), sens):
        if t is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g.dtype == s.dtype, f"{name}: dtype {g.dtype}, PyTorch gives {s.dtype}"
        _assert_derived(g, t, s, name, dt, st)
    return got


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("act", [True, False], ids=["silu", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_group_norm_matches_float64(impl, shape, layout, act):
    N, C, H, W, G = shape
    x = _make_x(N, C, H, W, layout, torch.float32)
    w, b = torch.randn(C), torch.randn(C)
    y = _check(impl, x, w, b, G, act)[0]
    if layout == "channels_last" and impl == "triton":
        # the output keeps the input's memory format
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_half_inputs_fp32_params(impl, dtype, layout):
    # the autocast case: low-precision activations, fp32 parameters (their gradients stay fp32)
    x = _make_x(3, 96, 10, 9, layout, dtype)
    _check(impl, x, torch.randn(96), torch.randn(96), 32, True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_group_norm_without_affine(impl):
    x = _make_x(2, 30, 7, 5, "channels_last", torch.float32)
    _check(impl, x, None, None, 6, True)
    _check(impl, x, None, torch.randn(30), 6, False)


@needs_triton
def test_group_norm_triton_multi_tile_programs(monkeypatch):
    # force 8 sub-tiles per reducing program: the last program's first sub-tile is partial, the rest empty
    from lgvq_fast.kernels import group_norm as kgn

    monkeypatch.setattr(kgn, "ITERS_MIN_PROGRAMS", 1)
    assert kgn._iters(2, 50 * 41, kgn._blocks(32, 8)[0]) == 8
    x = _make_x(2, 32, 50, 41, "channels_last", torch.float32)
    # a ramp over rows gives each sub-tile and each program its own mean, so merging them has to be right
    x = x + torch.linspace(-20, 20, 50).view(1, 1, 50, 1)
    _check("triton", x, torch.randn(32), torch.randn(32), 8, True)
    _check("triton", x.contiguous(), torch.randn(32), torch.randn(32), 8, False)


@needs_triton
def test_group_norm_triton_batch_in_grid_chunks(monkeypatch):
    # CUDA caps the grid's batch axis at 65535: larger batches launch in chunks (forced small here)
    from lgvq_fast.kernels import group_norm as kgn

    monkeypatch.setattr(kgn, "MAX_GRID_Y", 2)
    x = _make_x(5, 32, 6, 7, "channels_last", torch.float32)
    _check("triton", x, torch.randn(32), torch.randn(32), 8, True)
    _check("triton", _make_x(5, 24, 3, 5, "nchw", torch.float32), torch.randn(24), torch.randn(24), 4, False)


@needs_triton
def test_group_norm_triton_second_derivative_raises():
    """The Triton backward is not differentiable: a double backward (gradient penalty) must raise, not return a
    gradient missing its second-order term."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    for loss in (lambda y: y.square().sum(), lambda y: y.sum()):
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(loss(group_norm(x, None, None, 4, act=True, impl="triton")), x, create_graph=True)
    (g,) = torch.autograd.grad(group_norm(x, None, None, 4, act=True, impl="triton").sum(), x)  # first order: fine
    assert torch.isfinite(g).all()


@needs_triton
def test_group_norm_tile_autotune_candidates(monkeypatch):
    # what the GPU autotuner may try: 2048-4096-element tiles at <= 16 elements a thread, no more rows than H*W,
    # the default first
    from lgvq_fast.kernels import group_norm as kgn

    monkeypatch.setattr(kgn, "_interpret", lambda: False)
    monkeypatch.setenv("LGVQ_FAST_TRITON_AUTOTUNE", "1")
    every = kgn._tile_configs()
    for C, HW in ((128, 65536), (512, 256), (96, 99), (2048, 64), (128, 3)):
        block_c = kgn._blocks(C, 32)[1]
        kept = kgn._prune_tile_configs(every, {"HW": HW}, BLOCK_C=block_c)
        assert kept, (C, HW)
        rows = [c.kwargs["BLOCK_HW"] for c in kept]
        assert max(rows) <= max(4, 2 ** (HW - 1).bit_length()), (C, HW, rows)
        # a shape no tile size fits (tiny H*W or very wide C) gets the one smallest tile
        assert all(2048 <= c.kwargs["BLOCK_HW"] * block_c <= 16 * 32 * c.num_warps for c in kept) or rows == [4], \
            (C, HW, rows)
        assert kept[0].num_warps == kgn.NUM_WARPS
        rows_needed = max(4, 2 ** (HW - 1).bit_length())
        assert rows[0] == min(max(4, min(128, kgn.TILE_ELEMS // block_c)), rows_needed), (C, HW, rows)
    monkeypatch.setenv("LGVQ_FAST_TRITON_AUTOTUNE", "0")
    assert len(kgn._prune_tile_configs(every, {"HW": 65536}, BLOCK_C=128)) == 1


@needs_triton
def test_group_norm_triton_int64_offsets(monkeypatch):
    # the int64 indexing the kernels switch to when one sample spans 2**31 elements, on a small tensor
    from lgvq_fast.kernels import group_norm as kgn

    monkeypatch.setattr(kgn, "_offs_64", lambda *tensors: True)
    _check("triton", _make_x(2, 96, 7, 6, "channels_last", torch.float32), torch.randn(96), torch.randn(96), 32, True)
    _check("triton", _make_x(2, 64, 7, 6, "nchw", torch.float32), torch.randn(64), torch.randn(64), 32, True)


@needs_triton
def test_group_norm_triton_large_mean_small_spread():
    # variance 1e-4 under a mean of 100: E[x^2] - E[x]^2 in fp32 would lose every digit
    x = (100 + 0.01 * torch.randn(2, 32, 9, 13)).contiguous(memory_format=torch.channels_last)
    _check("triton", x, torch.randn(32), torch.randn(32), 8, False)


@needs_triton
def test_group_norm_triton_deterministic_and_broadcast_grad():
    x = _make_x(2, 64, 11, 6, "channels_last", torch.float32)
    w, b = torch.randn(64), torch.randn(64)
    runs = []
    for _ in range(2):
        xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        # .sum() hands the backward an expanded gradient (all strides 0)
        y = group_norm(xl, wl, bl, 32, act=True, impl="triton")
        y.sum().backward()
        runs.append((y, xl.grad, wl.grad, bl.grad))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    want = _truth(x, w, b, 32, True, torch.ones(x.shape))
    for name, g, t in zip(("y", "dx", "dweight", "dbias"), runs[0], want):
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5 * t.abs().max().item())


def test_group_norm_reference_is_torch_group_norm():
    x = _make_x(2, 48, 6, 5, "nchw", torch.float32)
    w, b = torch.randn(48), torch.randn(48)
    torch.testing.assert_close(group_norm(x, w, b, 16, act=True, impl="reference"),
                               F.silu(F.group_norm(x, 16, w, b, 1e-6)))
    torch.testing.assert_close(group_norm(x, w, b, 16, eps=1e-3, impl="auto"), F.group_norm(x, 16, w, b, 1e-3))


def test_group_norm_bad_inputs_raise():
    x, w = torch.randn(2, 64, 4, 4), torch.randn(64)
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        group_norm(x, w, w, 3)
    with pytest.raises(ValueError, match="num_groups must be an integer"):
        group_norm(x, w, w, 0)
    with pytest.raises(ValueError, match="a group needs at least one element"):
        group_norm(x[:0], w, w, 32)
    with pytest.raises(ValueError, match="a group needs at least one element"):
        group_norm(x[:, :, :0], w, w, 32)
    with pytest.raises(ValueError, match=r"no channels \(C=0\)"):
        group_norm(x[:, :0], None, None, 1)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\)"):
        group_norm(x, w[:63], w, 32)
    with pytest.raises(ValueError, match="bias must have dtype"):
        group_norm(x, w, w.long(), 32)
    with pytest.raises(ValueError, match="x must have dtype"):
        group_norm(x.double(), w, w, 32)
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        group_norm(torch.randn(64), w, w, 32)
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        group_norm(x, w, w, 32, eps=0.0)
    with pytest.raises(RuntimeError, match="no GroupNorm kernel"):
        group_norm(x, w, w, 32, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        group_norm(x, w, w, 32, impl="fast")


@needs_triton
def test_group_norm_triton_rejects_too_many_groups():
    x = torch.randn(1, 256, 2, 2)
    with pytest.raises(ValueError, match="C \\* num_groups <= 32768"):
        group_norm(x, None, None, 256, impl="triton")
    # auto falls back to the reference for such shapes (on CPU it always picks the reference)
    torch.testing.assert_close(group_norm(x, None, None, 256), F.group_norm(x, 256, eps=1e-6))


@needs_triton
def test_group_norm_opcheck():
    x = _make_x(2, 32, 5, 3, "channels_last", torch.float32).requires_grad_()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    torch.library.opcheck(torch.ops.lgvq_fast.group_norm_fwd.default, (x, w, b, 8, 1e-6, True))
    y, mean, rstd = torch.ops.lgvq_fast.group_norm_fwd(x.detach(), w.detach(), b.detach(), 8, 1e-6, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.lgvq_fast.group_norm_bwd.default,
                          (dy, x.detach(), w.detach(), b.detach(), mean, rstd, 8, True))


@needs_triton
def test_group_norm_torch_compile_fullgraph():
    # under torch.compile the op goes through the registered lgvq_fast::group_norm_fwd/bwd (eager calls use an
    # autograd.Function, which has less per-call overhead)
    torch._dynamo.reset()

    def step(x, w, b):
        return group_norm(x * 2.0, w, b, 8, act=True, impl="triton").square().mean()

    x = _make_x(2, 32, 5, 3, "channels_last", torch.float32)
    w, b = torch.randn(32), torch.randn(32)
    got_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    try:
        got = torch.compile(step, fullgraph=True)(*got_leaves)
    except Exception as exc:
        if "C++ compiler" in str(exc) or "CppCompileError" in type(exc).__name__:
            pytest.skip(f"torch.compile cannot build CPU code here: {type(exc).__name__}")
        raise
    got.backward()
    want = step(*want_leaves)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, w_ in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g.grad, w_.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_norm_gpu_triton_matches_float64(dtype, layout):
    # a paper-shape encoder activation (8 x 128 x 128 x 128) and a low-resolution one
    for N, C, H, W in ((8, 128, 128, 128), (8, 512, 16, 16)):
        x = _make_x(N, C, H, W, layout, dtype).cuda()
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        got = _check("triton", x, w, b, 32, True)
        if layout == "channels_last":
            assert got[0].is_contiguous(memory_format=torch.channels_last)
