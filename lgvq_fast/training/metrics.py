"""What a run measures and logs: ``metrics.jsonl`` rows, PSNR, codebook usage and perplexity, and the guard that
stops a run whose losses went NaN or inf."""
import json
import os
import time

import torch

from lgvq_fast.errors import Diverged


class MetricsLog:
    """JSON lines, one object per write, flushed at once (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.f, self.path = None, path
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.f = open(path, "a", encoding="utf-8")

    def write(self, row):
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def batch_psnr(x_rec, x, reduce=True):
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1]), averaged over the batch."""
    mse = ((x_rec.float() - x.float()) / 2).pow(2).flatten(1).mean(1)
    psnr = (-10.0 * torch.log10(mse.clamp_min(1e-10))).mean()
    return float(psnr) if reduce else psnr.detach()


def perplexity(counts):
    p = counts.float() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class MetricsWindow:
    """The steps since the last log row: sums of every logged value and PSNR, kept on the device (no host sync
    per step), and the codes used. ``usage`` (the run's total code counts) is updated too."""

    def __init__(self, usage, images_per_step):
        self.usage, self.images_per_step = usage, images_per_step
        self._reset()

    def _reset(self):
        self.counts, self.n, self.sums, self.t = torch.zeros_like(self.usage), 0, {}, time.perf_counter()

    @torch.no_grad()
    def add(self, out, logs, x):
        from lgvq_fast.quantize import code_counts

        counts = code_counts(out["indices"].flatten(), self.usage.numel())  # torch.bincount would sync the host
        self.usage += counts
        self.counts += counts
        logs["psnr"] = batch_psnr(out["x_rec"].detach().float().clamp(-1, 1), x, reduce=False)
        if out.get("mtp_acc") is not None:
            logs["mtp_acc"] = out["mtp_acc"].detach().float()
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.n += 1

    def row(self, **fields):
        """The log row of the window (``fields`` first: step, epoch, lr), then a new window starts."""
        now = time.perf_counter()
        row = dict(fields, images_per_s=self.n * self.images_per_step / max(now - self.t, 1e-9))
        row.update({k: round(float(v) / self.n, 6) for k, v in self.sums.items()})
        row["codebook_usage"] = float((self.counts > 0).float().mean())
        row["perplexity"] = perplexity(self.counts)
        self._reset()
        return row


    def write(self, metrics, progress=None, **fields):
        """Write the window's row to ``metrics`` (a :class:`MetricsLog`), show its headline on the progress bar."""
        row = self.row(**fields)
        metrics.write(row)
        if progress is not None:
            progress.set_postfix(l1=f"{row.get('l1', 0):.3f}", psnr=f"{row['psnr']:.1f}",
                                 use=f"{row['codebook_usage']:.2f}")
        return row


class DivergenceGuard:
    """A device flag set when a watched loss turns NaN or inf (no sync per step); :meth:`check` reads it (at log
    rows, at the per-step multi-rank sync, before every save), so a diverged model is never written over the
    good checkpoints. ``latest_good``: returns the latest good checkpoint's path for the message (or None)."""

    WATCHED = ("total", "d_loss")

    def __init__(self, device, step, latest_good=lambda: None):
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.last_check, self.latest_good = step, latest_good

    def watch(self, logs):
        with torch.no_grad():
            for key in self.WATCHED:
                if key in logs:
                    self.flag |= ~torch.isfinite(logs[key])

    def check(self, step):
        if bool(self.flag.item()):
            raise self.error(f"a loss became NaN or inf between step {self.last_check + 1} and step {step}")
        self.last_check = step

    def error(self, what):
        return Diverged(f"training diverged: {what}; no checkpoint was written after it (latest good one: "
                        f"{self.latest_good() or 'none'}). Lower the learning rate (--lr) or resume from that "
                        "checkpoint with --resume auto.")


@torch.no_grad()
def reconstruct(model, x, autocast):
    """The model's reconstruction of ``x`` in eval mode, float in [-1, 1]; the model's mode is kept."""
    was_training = model.training
    model.eval()
    with autocast():
        x_rec = model(x)["x_rec"].float().clamp(-1, 1)
    model.train(was_training)
    return x_rec


def progress_bar(total, initial):
    """A tqdm bar over the run's steps (None when there is nothing left to run)."""
    if initial >= total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=1.0)
