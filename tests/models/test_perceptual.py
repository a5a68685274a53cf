"""The LPIPS perceptual loss module (lgvq_fast.models.perceptual): checkpoints, and the fused
lgvq_fast.ops.lpips_distance path against the native one."""
import pytest
import torch

from lgvq_fast import _backend
from lgvq_fast.models import PerceptualLoss, VQGANLoss

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def random_lpips():
    src = PerceptualLoss()
    with torch.no_grad():
        for name, p in src.named_parameters():
            # LPIPS heads are non-negative, which makes the distance positive
            p.copy_(torch.rand_like(p) if name.startswith("lin") else torch.randn_like(p) * 0.05)
    return src


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_perceptual_checkpoint_roundtrip(tmp_path, fmt, random_lpips):
    src = random_lpips
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = str(tmp_path / ("lpips.safetensors" if fmt == "safetensors" else "lpips.pth"))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    net = PerceptualLoss.from_checkpoint(path)
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, y = torch.rand(2, 3, 17, 19) * 2 - 1, torch.rand(2, 3, 17, 19) * 2 - 1
    d = net(x, y)
    assert net.vgg.features[0].weight.device.type == "cpu" and net.shift.device.type == "cpu"
    assert d.shape == (2, 1, 1, 1) and bool((d > 0).all())
    torch.testing.assert_close(d, src(x, y))
    assert net(x, x).abs().max() < 1e-6
    loss_fn = VQGANLoss(lpips_path=path, disc_ndf=8)
    _, logs = loss_fn.generator_loss(x, {"x_rec": y, "q_loss": torch.zeros(())}, 0)
    torch.testing.assert_close(logs["p_loss"], d.mean())


def test_perceptual_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PerceptualLoss.from_checkpoint(str(tmp_path / "missing.pth"))
    bad = str(tmp_path / "bad.pth")
    torch.save({"lin0.weight": torch.zeros(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        PerceptualLoss.from_checkpoint(bad)


@needs_triton
def test_perceptual_loss_fused_matches_native(monkeypatch):
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
