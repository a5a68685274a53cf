"""Tests for lgvq_fast.ops.lpips_distance (reference and Triton-interpreter backends; Triton on a GPU with
``-m gpu``) against float64. The PerceptualLoss module that calls it is tested in tests/models/test_perceptual.py."""
import pytest
import torch

from lgvq_fast import _backend
from lgvq_fast.ops import lpips_distance
from lgvq_fast.reference import lpips as ref

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
# (n, C, H, W): C not a power of two; one pixel; pixels over several tiles
SHAPES = [(2, 64, 5, 7), (3, 96, 9, 11), (1, 40, 1, 1), (2, 20, 33, 21)]


def _shape_id(s):
    return "n{}_c{}_h{}_w{}".format(*s)


def _layout(f, layout):
    if layout == "channels_last":
        return f.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.randn(*f.shape[:3], 2 * f.shape[3])
        wide[..., ::2] = f
        return wide[..., ::2]
    return f


def _make(n, C, H, W, layout, dtype):
    """Features of x and y; y close to x in half the pixels (the regime of a good reconstruction)."""
    fx = torch.randn(n, C, H, W) * (0.2 + torch.rand(1, C, 1, 1) * 3)
    fy = torch.randn(n, C, H, W) * (0.2 + torch.rand(1, C, 1, 1) * 3)
    fy[:, :, : H // 2] = fx[:, :, : H // 2] + 0.05 * torch.randn(n, C, H // 2, W)
    return _layout(fx, layout).to(dtype), _layout(fy, layout).to(dtype)


def _run(fn, fx, fy, w, g, grads):
    """Distances and the gradients asked for (``grads``: which of fx, fy, w require grad)."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((fx, fy, w), grads)]
    d = fn(*leaves)
    d.backward(g)
    return (d.detach(),) + tuple(t.grad for t in leaves)


def _check(impl, fx, fy, w, grads=(False, True, False)):
    g = torch.randn(fx.shape[0], device=fx.device)
    got = _run(lambda a, b, c: lpips_distance(a, b, c, impl=impl), fx, fy, w, g, grads)
    same = _run(lambda a, b, c: ref.lpips_distance(a, b, c), fx, fy, w, g, grads)
    want = _run(lambda a, b, c: ref.lpips_distance(a, b, c, compute_dtype=torch.float64), fx.double(),
                fy.double(), w.double(), g.double(), grads)
    assert got[0].dtype == torch.float32 and got[0].shape == (fx.shape[0],)
    for t, f in zip(got[1:3], (fx, fy)):
        assert t is None or (t.dtype == f.dtype and t.shape == f.shape)
    for name, a, s, t in zip(("distance", "dfx", "dfy", "dweight"), got, same, want):
        if t is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert torch.isfinite(a).all(), f"{name}: NaN/inf (unwritten poisoned output?)"
        scale = t.abs().max().item() + 1e-30
        ref_err = (s.double() - t).abs().max().item()
        tol = 2 * ref_err + 8 * torch.finfo(a.dtype).eps * scale
        err = (a.double() - t).abs().max().item()
        assert err <= tol, f"{name}: max |err| {err:.3e} > tol {tol:.3e} (same-dtype PyTorch error {ref_err:.3e})"
    return got


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_lpips_distance_matches_float64(impl, shape, layout):
    n, C, H, W = shape
    fx, fy = _make(n, C, H, W, layout, torch.float32)
    _check(impl, fx, fy, torch.rand(C), grads=(True, True, True) if layout == "nchw" else (False, True, False))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lpips_distance_half_features(impl, dtype):
    fx, fy = _make(2, 64, 6, 5, "channels_last", dtype)
    _check(impl, fx, fy, torch.rand(64), grads=(True, True, False))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lpips_distance_zero_vectors_and_identical_pairs(impl):
    fx, fy = _make(2, 32, 4, 4, "nchw", torch.float32)
    fx[:, :, 0, 0] = 0.0  # zero feature vectors in both
    fy[:, :, 0, 0] = 0.0
    fy[:, :, 1] = fx[:, :, 1]  # identical rows: zero distance there, finite gradient
    got = _check(impl, fx, fy, torch.rand(32), grads=(True, True, True))
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    a, _ = _make(1, 16, 3, 3, "nchw", torch.float32)
    torch.testing.assert_close(lpips_distance(a, a.clone(), torch.rand(16), impl=impl), torch.zeros(1))


def test_lpips_distance_reference_is_the_lpips_formula():
    # the PerceptualLoss formulation (LPIPS' normalize_tensor, difference, 1x1 head, spatial mean)
    fx, fy = _make(2, 24, 5, 6, "nchw", torch.float32)
    lin = torch.nn.Conv2d(24, 1, 1, bias=False)
    a = fx / (fx.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
    b = fy / (fy.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
    want = lin((a - b).square()).mean(dim=(2, 3)).view(-1)
    torch.testing.assert_close(lpips_distance(fx, fy, lin.weight, impl="reference"), want)
    torch.testing.assert_close(lpips_distance(fx, fy, lin.weight.view(-1), impl="auto"), want)


def test_lpips_distance_bad_inputs_raise():
    f, w = torch.randn(4, 8, 3, 3), torch.rand(8)
    with pytest.raises(ValueError, match=r"fx has shape \(3, 8, 3, 3\) but fy has \(4, 8, 3, 3\)"):
        lpips_distance(f[:3], f, w)
    with pytest.raises(ValueError, match="empty batch"):
        lpips_distance(f[:0], f[:0], w)
    with pytest.raises(ValueError, match="it needs channels and pixels"):
        lpips_distance(f[:, :, :0], f[:, :, :0], w)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\)"):
        lpips_distance(f, f, w[:7])
    with pytest.raises(ValueError, match="fy must be 4-D"):
        lpips_distance(f, f[0], w)
    with pytest.raises(ValueError, match="fx must have dtype"):
        lpips_distance(f.double(), f, w)
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        lpips_distance(f, f, w, eps=0)
    with pytest.raises(RuntimeError, match="no LPIPS kernel"):
        lpips_distance(f, f, w, impl="cuda")


@needs_triton
def test_lpips_distance_triton_deterministic_and_opcheck():
    fx, fy = _make(2, 48, 7, 5, "channels_last", torch.float32)
    w = torch.rand(48)
    runs = [_run(lambda a, b, c: lpips_distance(a, b, c, impl="triton"), fx, fy, w, torch.ones(2), (True,) * 3)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.lgvq_fast.lpips_fwd.default, (fx, fy.clone().requires_grad_(), w, 1e-10))
    torch.library.opcheck(torch.ops.lgvq_fast.lpips_bwd.default, (torch.randn(2), fx, fy, w, 1e-10))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lpips_distance_gpu_triton_matches_float64(dtype, layout):
    # the first and the last VGG16 layers at 256x256, batch 8
    for n, C, H, W in ((8, 64, 256, 256), (8, 512, 16, 16)):
        fx, fy = (t.cuda() for t in _make(n, C, H, W, layout, dtype))
        _check("triton", fx, fy, torch.rand(C, device="cuda"), grads=(True, True, True))


@needs_triton
def test_lpips_distance_triton_batch_in_grid_chunks(monkeypatch):
    # CUDA caps the grid's batch axis at 65535: larger batches launch in chunks (forced small here)
    from lgvq_fast.kernels import lpips as kl

    monkeypatch.setattr(kl, "MAX_GRID_Y", 2)
    fx, fy = _make(5, 24, 5, 6, "channels_last", torch.float32)
    _check("triton", fx, fy, torch.rand(24), grads=(True, True, True))
    _check("triton", *_make(5, 24, 5, 6, "nchw", torch.float32), torch.rand(24), grads=(False, True, False))


@needs_triton
def test_lpips_distance_triton_second_derivative_raises():
    fx, fy = _make(2, 8, 3, 3, "nchw", torch.float32)
    w = torch.rand(8)
    fy.requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(lpips_distance(fx, fy, w, impl="triton").sum(), fy, create_graph=True)
    (g,) = torch.autograd.grad(lpips_distance(fx, fy, w, impl="triton").sum(), fy)
    assert torch.isfinite(g).all()
