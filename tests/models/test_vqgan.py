"""The VQGAN backbone (lgvq_fast.models.vqgan): encoder/decoder shapes, and its GroupNorm module (autocast dtype,
the fused lgvq_fast.ops.group_norm path against the native one)."""
import pytest
import torch
import torch.nn.functional as F

from lgvq_fast import _backend
from lgvq_fast.models import vqgan
from lgvq_fast.models.vqgan import Decoder, Encoder, GroupNorm, restore_norm_impl, set_norm_impl

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("res,ch_mult,attn,hw", [
    (20, (1, 2, 2), (5,), (20, 20)),
    (12, (1, 2), (), (12, 12)),
    (24, (1, 1, 2, 2), (3,), (24, 24)),
    (16, (1, 2, 2), (), (16, 28)),
], ids=["f4-grid5-attn", "f2-grid6", "f8-grid3-attn", "f4-rect4x7"])
def test_encoder_decoder_shapes(res, ch_mult, attn, hw):
    kw = dict(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, resolution=res, z_channels=12)
    enc, dec = Encoder(**kw), Decoder(**kw)
    f = 2 ** (len(ch_mult) - 1)
    x = torch.randn(1, 3, *hw)
    z = enc(x)
    assert z.shape == (1, 12, hw[0] // f, hw[1] // f)
    assert dec(z).shape == x.shape
    assert len(dec.up[0].block) == 2 and len(enc.down[0].block) == 1


def test_groupnorm_keeps_the_autocast_dtype():
    gn = GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    plain = torch.nn.GroupNorm(8, 32, eps=1e-6)
    plain.load_state_dict(gn.state_dict())
    x = torch.randn(3, 32, 6, 5) * 3 + 1
    assert torch.equal(gn(x), plain(x))  # outside autocast: nn.GroupNorm exactly
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x1)
    assert out.dtype == torch.bfloat16
    ref = plain(x2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    out.float().backward(g)
    ref.backward(g)
    assert gn.weight.grad.dtype == torch.float32 and gn.bias.grad.dtype == torch.float32
    for a, b_ in ((gn.weight.grad, plain.weight.grad), (gn.bias.grad, plain.bias.grad), (x1.grad, x2.grad)):
        torch.testing.assert_close(a, b_, rtol=3e-2, atol=3e-2 * b_.abs().max().item())


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_vqgan_groupnorm_module_fused_matches_native(channels_last):
    torch.manual_seed(0)
    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, z_channels=8)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, GroupNorm):
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    if channels_last:
        enc = enc.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for impl in ("native", "triton"):
        previous = set_norm_impl(enc, impl)
        enc.zero_grad()
        xl = x.clone().requires_grad_()
        y = enc(xl)
        y.square().mean().backward()
        outs.append((y.detach(), xl.grad, [p.grad.clone() for p in enc.parameters()]))
        restore_norm_impl(previous)
    assert all(m.impl == "auto" for m in enc.modules() if isinstance(m, GroupNorm))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)
    for g1, g0 in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)


@needs_triton
def test_vqgan_groupnorm_fused_path_is_taken_and_keeps_autocast_dtype(monkeypatch):
    seen = []
    real = vqgan.GroupNorm._fused

    def spy(self, x):
        used = real(self, x)
        seen.append(used)
        return used

    monkeypatch.setattr(vqgan.GroupNorm, "_fused", spy)
    norm = vqgan.normalize(64)
    x = torch.randn(2, 64, 5, 4).contiguous(memory_format=torch.channels_last)
    # CPU tensors take the fused path only when asked for explicitly (CUDA "auto" takes it for channels_last)
    norm(x, act=True)
    assert seen == [False]
    norm.impl = "triton"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x, act=True)
    assert seen[-1] is True
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    norm.impl = "native"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_native = norm(x, act=True)
    assert seen[-1] is False and y_native.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_native.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="norm impl must be one of"):
        vqgan.set_norm_impl(norm, "fused")


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_vqgan_groupnorm_native_cpu_channels_last_large_mean(amp):
    """PyTorch's CPU GroupNorm loses every digit on channels-last input whose groups have a large mean and a small
    spread (E[x^2] - E[x]^2); the module's native path gives the NCHW result in either memory format."""
    norm = vqgan.normalize(32)
    norm.impl = "native"
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
        norm.bias.copy_(torch.randn(32))
    x = 100 + 0.1 * torch.randn(2, 32, 9, 13)
    if amp:
        x = x.to(torch.bfloat16)
    want = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = norm(x.contiguous(memory_format=fmt))
        assert y.is_contiguous(memory_format=fmt)
        outs.append(y)
        # fp32 values near 100 are 8e-6 apart and their mean rounds to about that: a few 1e-4 of a spread of 0.1;
        # bf16 values near 100 are 0.5 apart, 5 spreads, so only the NCHW agreement below is asked of them
        if not amp:
            assert (y.double() - want).abs().max().item() < 2e-3 * want.abs().max().item(), fmt
    torch.testing.assert_close(outs[0], outs[1].contiguous())


def test_vqgan_groupnorm_auto_fuses_only_large_channels_last_maps():
    """The measured crossover: "auto" fuses channels_last maps from 256 x 256 positions on, never NCHW."""
    for (h, w), fmt, want in [((256, 256), torch.channels_last, True), ((512, 128), torch.channels_last, True),
                              ((128, 128), torch.channels_last, False), ((16, 16), torch.channels_last, False),
                              ((256, 256), torch.contiguous_format, False)]:
        x = torch.empty(2, 64, h, w).contiguous(memory_format=fmt)
        assert vqgan.fused_by_default(x) is want, ((h, w), fmt)
    # one sample, C = 1 (channels_last and contiguous at once): not taken as channels_last
    assert vqgan.fused_by_default(torch.empty(1, 1, 256, 256)) is False


@pytest.mark.gpu
def test_vqgan_groupnorm_fused_on_gpu_under_autocast_matches_native():
    # the trainer's setting: channels_last, bf16 autocast; the fused path (impl "triton": at 32x32 "auto" keeps
    # PyTorch's, below the measured crossover) must be taken, and its error against
    # an fp32 run may be at most twice PyTorch's bf16 error (+ a floor: some gradients, e.g. attention key
    # biases, are exactly 0 in theory and pure rounding in practice)
    torch.manual_seed(0)
    enc = vqgan.Encoder(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                        z_channels=32).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    taken = []
    real = vqgan.GroupNorm._fused
    outs = {}
    for impl, amp in (("native", False), ("native", True), ("triton", True)):
        vqgan.set_norm_impl(enc, impl)
        enc.zero_grad()
        vqgan.GroupNorm._fused = lambda self, t: taken.append(real(self, t)) or taken[-1]
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = enc(x)
            y.float().square().mean().backward()
        finally:
            vqgan.GroupNorm._fused = real
        outs[impl, amp] = [y.float().detach()] + [p.grad.clone() for p in enc.parameters()]
        assert taken and (all(taken) if impl == "triton" else not any(taken))
        taken.clear()
    ref32, native, fused = outs["native", False], outs["native", True], outs["triton", True]
    floor = 1e-3 * max(t.abs().max().item() for t in ref32[1:])
    for i, (r, a, b) in enumerate(zip(ref32, native, fused)):
        native_err = (a - r).abs().max().item()
        fused_err = (b - r).abs().max().item()
        assert fused_err <= 2 * native_err + (1e-2 * r.abs().max().item() if i == 0 else floor), (i, fused_err,
                                                                                                   native_err)
