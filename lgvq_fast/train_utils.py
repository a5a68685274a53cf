"""Helpers of the training loop: rank-0 printing, atomic checkpoints, RNG capture, metrics, PSNR."""
import contextlib
import glob
import json
import os
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def run_cli(main, prog, argv=None):
    """Run ``main(argv)`` for the command line: a bad configuration, a missing or unreadable file (data folder,
    image, caption file, text encoder folder, checkpoint) or a bad value -- every ``ValueError`` and ``OSError``,
    whose messages name the culprit -- is printed as one ``<prog>: error:`` line with exit status 2 instead of a
    traceback; set ``LGVQ_TRACEBACK=1`` to see the traceback. Every other exception propagates unchanged."""
    from lgvq_fast._backend import env_flag

    try:
        return main(argv)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        if env_flag("LGVQ_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def place_models(device, channels_last, text_encoder, model, loss_mod):
    """Move the frozen text encoder, the tokenizer and the loss module (with its discriminator) to ``device``;
    with ``channels_last`` the convolutional modules also take that memory format."""
    text_encoder.to(device)
    model.to(device)
    loss_mod.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        loss_mod.to(memory_format=torch.channels_last)


def batch_psnr(x_rec, x, reduce=True):
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1]), averaged over the batch."""
    mse = ((x_rec.float() - x.float()) / 2).pow(2).flatten(1).mean(1)
    psnr = (-10.0 * torch.log10(mse.clamp_min(1e-10))).mean()
    return float(psnr) if reduce else psnr.detach()


def capture_rng(device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device):
    # Both setters take a CPU ByteTensor; a checkpoint loaded with map_location="cuda" holds them on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class CheckpointIO:
    """``out/checkpoints/step_<7-digit step>.pt``, written to a temp file in the same folder and renamed.

    ``os.replace`` is atomic on POSIX, so a crash while saving leaves the previous checkpoints intact and
    never a partial file under a checkpoint name. ``keep_last`` prunes only checkpoints older than the one just
    written; checkpoints of another run (a fresh start in a used folder, or the later steps of a run resumed
    from an earlier checkpoint) are first moved aside by :meth:`archive`, never deleted.
    """

    pattern = re.compile(r"step_(\d+)\.pt$")

    def __init__(self, out_dir, keep_last=3):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step):
        return os.path.join(self.dir, f"step_{step:07d}.pt")

    def _steps(self):
        found = []
        for p in glob.glob(os.path.join(self.dir, "step_*.pt")):
            m = self.pattern.search(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def all(self):
        return [p for _, p in self._steps()]

    def latest(self):
        paths = self.all()
        return paths[-1] if paths else None

    def archive(self, after_step=-1):
        """Move the checkpoints of steps above ``after_step`` (all by default) into a new ``earlier_<k>/``
        subfolder of the checkpoint folder. Returns that folder, or None when there was nothing to move."""
        moving = [p for s, p in self._steps() if s > after_step]
        if not moving:
            return None
        k = 1
        while os.path.exists(os.path.join(self.dir, f"earlier_{k}")):
            k += 1
        dest = os.path.join(self.dir, f"earlier_{k}")
        os.makedirs(dest)
        for p in moving:
            os.replace(p, os.path.join(dest, os.path.basename(p)))
        return dest

    def save(self, state, step):
        os.makedirs(self.dir, exist_ok=True)
        path = self.path(step)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.keep_last:
            older = [p for s, p in self._steps() if s < step]
            for old in older[:max(0, len(older) - (self.keep_last - 1))]:
                os.remove(old)
        return path

    @staticmethod
    def load(path, device="cpu"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # weights_only=False: the checkpoint holds RNG states and the config (plain Python objects we wrote)
            state = torch.load(path, map_location=device, weights_only=False)
        except Exception as e:  # truncated or foreign file: name it
            raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
        if not isinstance(state, dict) or "model" not in state or "step" not in state:
            raise ValueError(f"cannot read checkpoint {path}: not a lgvq_fast training checkpoint (no 'model' and "
                             "'step' entries)")
        return state


class DiscSwap:
    """Which discriminator the loss module calls: the plain one for the generator pass, the DDP one for D.

    In the generator pass D only carries gradient to x_rec, so its parameters stop requiring grad there (no
    wasted weight gradients, no DDP reduction); the discriminator pass goes through the DDP wrapper so its
    gradients are averaged over ranks.
    """

    def __init__(self, loss_mod, raw_disc, ddp_disc):
        self.loss_mod, self.raw, self.ddp = loss_mod, raw_disc, ddp_disc

    @contextlib.contextmanager
    def generator(self):
        self.raw.requires_grad_(False)
        try:
            yield
        finally:
            self.raw.requires_grad_(True)

    @contextlib.contextmanager
    def discriminator(self):
        if self.ddp is self.raw:
            yield
            return
        self.loss_mod._modules["discriminator"] = self.ddp
        try:
            yield
        finally:
            self.loss_mod._modules["discriminator"] = self.raw


class MetricsLog:
    """JSON lines, one object per write, flushed at once (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.f = None
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
