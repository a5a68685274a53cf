"""Helpers of the training and eval tests (tests/training, tests/eval): the tiny run, subprocess handling, a
host-synchronisation audit, and a tiny model with its text batches."""
import collections
import json
import os
import subprocess
import time
import traceback

import torch
from _tiny_run import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from lgvq_fast.models import PerceptualLoss, TextEncoder, build_model, preset
from lgvq_fast.training.checkpoint import payload_digest
from lgvq_fast.training.step import place_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "lgvq_fast", "train.py")


def run_tiny(out, *extra):
    """The tiny training run (``TINY``) into ``out``; returns its summary."""
    from lgvq_fast import train as train_mod

    return train_mod.main(TINY + ["--out", str(out), *extra])


def env(**extra):
    return dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", OMP_NUM_THREADS="1", **extra)


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for(predicate, procs, timeout=180, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended early ({p.returncode}) waiting for {what}: "
                                     f"{p.communicate()[0][-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(out, n):
    path = os.path.join(out, "metrics.jsonl")
    return lambda: os.path.exists(path) and sum(1 for _ in open(path)) >= n


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (ended, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def popen(cmd, **kw):
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


# operators whose CUDA implementation copies a value to the host and waits for it
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static_fallback", "argwhere", "bincount", "_unique2",
             "unique_dim", "unique_consecutive", "masked_select", "repeat_interleave", "equal", "is_nonzero",
             "allclose", "histc", "one_hot"}


# host reads that only happen on CPU tensors (the branch is skipped on an accelerator)
_CPU_ONLY_LINES = ("n = max(int(pad.sum(1).max()), 1)",)


class HostSyncAudit(TorchDispatchMode):
    """Records (operator, call site) for every operator that would synchronise a CUDA device with the host."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if name in _SYNC_OPS or bool_index:
            stack = [f for f in traceback.extract_stack() if "lgvq_fast" in f.filename or "torch" in f.filename]
            ours = [f for f in stack if f"{os.sep}lgvq_fast{os.sep}" in f.filename]
            if not (ours and any(line in (ours[-1].line or "") for line in _CPU_ONLY_LINES)):
                site = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in ours[-3:])
                self.hits[(name + (" (bool index)" if bool_index else ""), site)] += 1
        return func(*args, **(kwargs or {}))


def tiny_setup(quantizer, device="cpu", perceptual=False, **overrides):
    kw = dict(resolution=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
              embed_dim=8, codebook_size=32, max_text_len=12, mtp_ffn_hidden=16, disc_ndf=8, disc_layers=2,
              disc_start=0, vt_layers=1, mtp_layers=1)
    kw.update(overrides)
    if quantizer == "vq-ema":
        cfg = preset("cub", ema_update=True, **kw)
    else:
        cfg = preset("cub" if quantizer == "vq" else "cub-cvq", **kw)
    text_encoder = TextEncoder.build("tiny-random", max_len=cfg.max_text_len)
    model, loss_mod = build_model(cfg, text_encoder)
    if perceptual:
        loss_mod.perceptual, loss_mod.perceptual_weight = PerceptualLoss(), 1.0
    place_models(torch.device(device), False, text_encoder, model, loss_mod)
    return cfg, text_encoder, model, loss_mod


def text_batch(text_encoder, b, length, seed):
    gen = torch.Generator().manual_seed(seed)
    words = "a red circle left of a small blue square above the green star".split()
    captions = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=gen))
                for n in torch.randint(3, 9, (b,), generator=gen)]
    return text_encoder.tokenize(captions, length, generator=gen)



def rewrite_checkpoint(path, mutate):
    """Change a checkpoint and store it with a valid checksum (a corrupt state that no byte error explains)."""
    state = torch.load(path, weights_only=False)
    mutate(state)
    state["checksum"] = payload_digest({k: v for k, v in state.items() if k != "checksum"})
    torch.save(state, path)
