"""Helpers of the training loop: rank-0 printing, RNG capture, metrics, PSNR (checkpoints: ``training.checkpoint``)."""
import contextlib
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
    traceback; the run's own endings (``lgvq_fast.training.errors.RunError``: divergence, a busy output folder, a
    stalled peer, a checkpoint that cannot be written) as one line with their own status. Set ``LGVQ_TRACEBACK=1``
    to see the traceback. Every other exception propagates unchanged (status 1)."""
    from lgvq_fast._backend import env_flag
    from lgvq_fast.training.errors import RunError

    try:
        return main(argv)
    except (RunError, ValueError, OSError) as e:  # ConfigError is a ValueError
        if env_flag("LGVQ_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(e.status if isinstance(e, RunError) else 2)


def one_line_error(error):
    """The message of ``error`` on one line. An exception re-raised from a DataLoader worker carries the worker's
    whole traceback ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): keep only its
    last line, the cause, without the exception's type."""
    msg = str(error)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = re.sub(r"^[\w.]+(Error|Exception|Warning)?: ", "", last.strip())
    return " ".join(msg.split())


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
