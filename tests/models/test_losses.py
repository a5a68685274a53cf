"""The VQGAN loss (lgvq_fast.models.losses) and its discriminator (lgvq_fast.models.discriminator): adaptive GAN
weight, hinge loss, the perceptual term switched off by default."""
import logging

import torch

from lgvq_fast.models import NLayerDiscriminator, VQGANLoss
from lgvq_fast.models import losses as losses_mod


def _tiny_gen(seed=0):
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    feat = torch.randn(2, 4, 12, 10)
    return conv, feat


def test_vqgan_loss_adaptive_weight_matches_hand_computation():
    loss_fn = VQGANLoss(disc_start=3, disc_weight=0.8, disc_ndf=8, disc_layers=1, w_gsa=0.5, w_mtp=0.25, w_ras=2.0)
    conv, feat = _tiny_gen()
    x = torch.rand(2, 3, 12, 10) * 2 - 1
    q = torch.rand(())
    text = {"gsa": torch.rand(()), "mtp": torch.rand(()), "ras": torch.rand(())}
    out = {"x_rec": conv(feat), "q_loss": q, "text_losses": text}
    loss, logs = loss_fn.generator_loss(x, out, 5, conv.weight)
    x_rec = conv(feat)
    nll = (x - x_rec).abs().mean()
    g = -loss_fn.discriminator(x_rec).mean()
    gn = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, conv.weight)[0].norm()
    w = torch.clamp(gn / (gg + 1e-4), 0, 1e4) * 0.8
    torch.testing.assert_close(logs["d_weight"], w, rtol=1e-5, atol=1e-7)
    ref = nll + w * g + q + 0.5 * text["gsa"] + 0.25 * text["mtp"] + 2.0 * text["ras"]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    before, logs0 = loss_fn.generator_loss(x, {"x_rec": conv(feat), "q_loss": q}, 2, conv.weight)
    assert logs0["d_weight"] == 0 and logs0["g_loss"] == 0
    torch.testing.assert_close(before, nll + q)


def test_discriminator_hinge_loss():
    loss_fn = VQGANLoss(disc_start=1, disc_ndf=8, disc_layers=2)
    loss_fn.discriminator.eval()
    x, y = torch.rand(3, 3, 20, 18) * 2 - 1, torch.rand(3, 3, 20, 18) * 2 - 1
    loss, logs = loss_fn.discriminator_loss(x, y, 1)
    r, f = loss_fn.discriminator(x), loss_fn.discriminator(y)
    ref = 0.5 * (torch.relu(1 - r).mean() + torch.relu(1 + f).mean())
    torch.testing.assert_close(loss, ref)
    zero, _ = loss_fn.discriminator_loss(x, y, 0)
    assert zero == 0 and not loss_fn.disc_active(0) and loss_fn.disc_active(1)
    bn = [m for m in NLayerDiscriminator(3, 8, 2).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 2


def test_perceptual_off_by_default_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(losses_mod, "_PERCEPTUAL_OFF_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger="lgvq_fast.models.losses"):
        a = VQGANLoss(disc_ndf=8)
        b = VQGANLoss(disc_ndf=8)
    assert a.perceptual is None and b.perceptual is None
    assert sum("perceptual" in r.getMessage() for r in caplog.records) == 1
