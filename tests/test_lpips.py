"""Tests for lgvq_fast.ops.lpips_distance (reference and Triton-interpreter backends) against float64, and for
the PerceptualLoss module that calls it."""
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


def _make(n, C, H, W, layout, dtype):
    f = torch.randn(2 * n, C, H, W) * (0.2 + torch.rand(1, C, 1, 1) * 3)
    # y's features close to x's in half the pixels (the regime of a good reconstruction)
    f[n:, :, : H // 2] = f[:n, :, : H // 2] + 0.05 * torch.randn(n, C, H // 2, W)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.randn(2 * n, C, H, 2 * W)
        wide[..., ::2] = f
        f = wide[..., ::2]
    return f.to(dtype)


def _run(fn, f, w, g, wgrad):
    fl = f.detach().clone().requires_grad_()
    wl = w.detach().clone().requires_grad_(wgrad)
    d = fn(fl, wl)
    d.backward(g)
    return d.detach(), fl.grad, wl.grad


def _check(impl, f, w, wgrad=False):
    g = torch.randn(f.shape[0] // 2, device=f.device)
    got = _run(lambda a, b: lpips_distance(a, b, impl=impl), f, w, g, wgrad)
    same = _run(lambda a, b: ref.lpips_distance(a, b), f, w, g, wgrad)
    want = _run(lambda a, b: ref.lpips_distance(a, b, compute_dtype=torch.float64), f.double(), w.double(),
                g.double(), wgrad)
    assert got[0].dtype == torch.float32 and got[0].shape == (f.shape[0] // 2,)
    assert got[1].dtype == f.dtype and got[1].shape == f.shape
    for name, a, s, t in zip(("distance", "dfeats", "dweight"), got, same, want):
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
    f = _make(n, C, H, W, layout, torch.float32)
    _check(impl, f, torch.rand(C), wgrad=(layout == "nchw"))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lpips_distance_half_features(impl, dtype):
    f = _make(2, 64, 6, 5, "channels_last", dtype)
    _check(impl, f, torch.rand(64))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lpips_distance_zero_vectors_and_identical_pairs(impl):
    f = _make(2, 32, 4, 4, "nchw", torch.float32)
    f[:, :, 0, 0] = 0.0  # zero feature vectors in both halves
    f[2:, :, 1] = f[:2, :, 1]  # identical rows: zero distance there, finite gradient
    got = _check(impl, f, torch.rand(32))
    assert torch.isfinite(got[1]).all()
    same = _make(1, 16, 3, 3, "nchw", torch.float32)
    same[1] = same[0]
    torch.testing.assert_close(lpips_distance(same, torch.rand(16), impl=impl), torch.zeros(1))


def test_lpips_distance_reference_is_the_lpips_formula():
    # the PerceptualLoss formulation (LPIPS' normalize_tensor, difference, 1x1 head, spatial mean)
    f = _make(2, 24, 5, 6, "nchw", torch.float32)
    lin = torch.nn.Conv2d(24, 1, 1, bias=False)
    g = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
    want = lin((g[:2] - g[2:]).square()).mean(dim=(2, 3)).view(-1)
    torch.testing.assert_close(lpips_distance(f, lin.weight, impl="reference"), want)
    torch.testing.assert_close(lpips_distance(f, lin.weight.view(-1), impl="auto"), want)


def test_lpips_distance_bad_inputs_raise():
    f, w = torch.randn(4, 8, 3, 3), torch.rand(8)
    with pytest.raises(ValueError, match="it must stack two equal non-empty batches"):
        lpips_distance(f[:3], w)
    with pytest.raises(ValueError, match="it must stack two equal non-empty batches"):
        lpips_distance(f[:0], w)
    with pytest.raises(ValueError, match="it needs channels and pixels"):
        lpips_distance(f[:, :, :0], w)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\)"):
        lpips_distance(f, w[:7])
    with pytest.raises(ValueError, match="feats must be 4-D"):
        lpips_distance(f[0], w)
    with pytest.raises(ValueError, match="feats must have dtype"):
        lpips_distance(f.double(), w)
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        lpips_distance(f, w, eps=0)
    with pytest.raises(RuntimeError, match="no LPIPS kernel"):
        lpips_distance(f, w, impl="cuda")


@needs_triton
def test_lpips_distance_triton_deterministic_and_opcheck():
    f = _make(2, 48, 7, 5, "channels_last", torch.float32)
    w = torch.rand(48)
    runs = [_run(lambda a, b: lpips_distance(a, b, impl="triton"), f, w, torch.ones(2), True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.lgvq_fast.lpips_fwd.default, (f.requires_grad_(), w, 1e-10))
    torch.library.opcheck(torch.ops.lgvq_fast.lpips_bwd.default, (torch.randn(2), f.detach(), w, 1e-10, True))


@needs_triton
def test_perceptual_loss_fused_matches_native(monkeypatch):
    from lgvq_fast.models.perceptual import PerceptualLoss

    torch.manual_seed(0)
    net = PerceptualLoss()
    for k in range(5):
        torch.nn.init.uniform_(getattr(net, f"lin{k}").weight, 0, 1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    outs = []
    for impl in ("native", "triton"):
        net.impl = impl
        yl = y.clone().requires_grad_()
        p = net(x, yl)
        p.sum().backward()
        outs.append((p.detach(), yl.grad))
        assert p.shape == (2, 1, 1, 1)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-3, atol=1e-6 * outs[0][1].abs().max().item())
    net.impl = "auto"  # CPU tensors: the PyTorch formulation
    torch.testing.assert_close(net(x, y), outs[0][0])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lpips_distance_gpu_triton_matches_float64(dtype, layout):
    # the first and the last VGG16 layers at 256x256, batch 8 (x and y features stacked)
    for n, C, H, W in ((8, 64, 256, 256), (8, 512, 16, 16)):
        f = _make(n, C, H, W, layout, dtype).cuda()
        _check("triton", f, torch.rand(C, device="cuda"), wgrad=True)
