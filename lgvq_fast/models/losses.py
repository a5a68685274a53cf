"""VQGAN training objective with the LG-VQ text terms (spec §5.1).

generator:  mean(|x - x̂| + w_p·LPIPS(x, x̂)) + λ·f_disc·(-mean D(x̂)) + codebook_weight·q_loss
            + w_gsa·gsa + w_mtp·mtp + w_ras·ras
discriminator: f_disc·0.5·(mean relu(1 - D(x)) + mean relu(1 + D(sg x̂)))
λ = clamp(‖∇_W L_nll‖ / (‖∇_W L_gan‖ + 1e-4), 0, 1e4)·disc_weight, W = the decoder's last conv weight.

Where this differs from the official loss: λ and the generator's pass through D are computed only once the
discriminator is active (global_step >= disc_start). The official code computes both at every step and then
multiplies by f_disc = 0, which changes nothing but costs a D forward and two partial backwards.
The perceptual term is off unless ``lpips_path`` names a local VGG16+LPIPS checkpoint (one log line says so).
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgvq_fast.models.discriminator import NLayerDiscriminator

log = logging.getLogger(__name__)
_PERCEPTUAL_OFF_LOGGED = False


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss, g_loss, last_layer, disc_weight: float) -> torch.Tensor:
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * disc_weight


class VQGANLoss(nn.Module):
    def __init__(self, *, disc_start: int = 10000, disc_weight: float = 0.8, disc_factor: float = 1.0,
                 codebook_weight: float = 1.0, perceptual_weight: float = 1.0, lpips_path: str | None = None,
                 w_gsa: float = 0.0, w_mtp: float = 0.0, w_ras: float = 0.0, disc_in_channels: int = 3,
                 disc_ndf: int = 64, disc_layers: int = 3):
        super().__init__()
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.codebook_weight = codebook_weight
        self.text_weights = {"gsa": w_gsa, "mtp": w_mtp, "ras": w_ras}
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_layers)
        if lpips_path and perceptual_weight > 0:
            from lgvq_fast.models.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss.from_checkpoint(lpips_path)
            self.perceptual_weight = perceptual_weight
        else:
            global _PERCEPTUAL_OFF_LOGGED
            if not _PERCEPTUAL_OFF_LOGGED:
                _PERCEPTUAL_OFF_LOGGED = True
                log.warning("perceptual (LPIPS) loss is off: no lpips_path given "
                            "(see lgvq_fast/models/perceptual.py for how to make one)")
            self.perceptual = None
            self.perceptual_weight = 0.0

    def disc_factor_at(self, global_step: int) -> float:
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def disc_active(self, global_step: int) -> bool:
        return self.disc_factor_at(global_step) > 0

    def generator_loss(self, x, out, global_step: int, last_layer=None, discriminator=None):
        """``discriminator``: the network judging ``x_rec`` (default ``self.discriminator``; the trainer passes the
        plain one with its parameters frozen, so the generator pass computes no weight gradients for it)."""
        discriminator = self.discriminator if discriminator is None else discriminator
        x_rec = out["x_rec"]
        rec = (x.float() - x_rec.float()).abs()
        l1 = rec.mean()
        nll = rec
        p_loss = torch.zeros((), device=x.device)
        if self.perceptual is not None:
            p = self.perceptual(x.float(), x_rec.float())  # [B, 1, 1, 1]
            p_loss = p.mean()
            nll = rec + self.perceptual_weight * p
        nll = nll.mean()
        factor = self.disc_factor_at(global_step)
        g_loss = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        loss = nll
        if factor > 0:
            g_loss = -discriminator(x_rec).float().mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            else:
                d_weight = torch.full((), self.disc_weight, device=x.device)
            loss = loss + d_weight * factor * g_loss
        q_loss = out["q_loss"].float()
        loss = loss + self.codebook_weight * q_loss
        logs = {"l1": l1.detach(), "p_loss": p_loss.detach(), "nll": nll.detach(), "g_loss": g_loss.detach(),
                "d_weight": d_weight.detach(), "disc_factor": torch.tensor(float(factor)), "q_loss": q_loss.detach()}
        for name, value in out.get("text_losses", {}).items():
            loss = loss + self.text_weights[name] * value.float()
            logs[name] = value.detach()
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x, x_rec_detached, global_step: int, discriminator=None):
        """Always runs D (as the official code, times f_disc); callers may skip it while not disc_active.
        ``discriminator``: the network to train (default ``self.discriminator``; under DDP its wrapper, so the
        gradients are averaged over the processes)."""
        discriminator = self.discriminator if discriminator is None else discriminator
        logits_real = discriminator(x.detach()).float()
        logits_fake = discriminator(x_rec_detached.detach()).float()
        factor = self.disc_factor_at(global_step)
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return loss, logs
