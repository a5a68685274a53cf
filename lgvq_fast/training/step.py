"""One training step, and what builds it: the models on their device, the optimizers, torch.compile.

:class:`TrainStep` holds the networks, the optimizers, the autocast context and the model config, and is called
with ``(images, text, step)``: one generator forward, the generator update, then the discriminator on that
forward's detached reconstruction (from ``disc_start`` on; before it the D loss is multiplied by 0, so the
official code's D work there only costs time). ``lgvq_fast.training.cuda_graph.GraphedTrainStep`` replays the
same step from a CUDA graph.
"""
import contextlib

import torch

from lgvq_fast.models._nvtx import nvtx_range


def lr_schedule(lr, steps, schedule="constant", warmup=0, floor=0.1):
    """Step -> learning rate: ``lr`` after a linear warm-up of ``warmup`` steps; "cosine" then decays it to
    ``floor * lr`` at ``steps`` (a function of the step alone, so a resumed run follows the same curve)."""
    import math

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "constant":
            return lr
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    return lr_at


class TrainStep:
    """``out, logs = step_fn(images, text, step)``.

    ``model``: what the forward calls (the tokenizer, or its compiled / DDP wrapper of ``raw_model``);
    ``loss_mod``: the ``VQGANLoss`` whose ``discriminator`` is the plain discriminator; ``disc_train``: the
    network the discriminator update goes through (its DDP wrapper under several processes, so the gradients
    are averaged; the plain one otherwise). In the generator pass the plain discriminator judges ``x_rec`` with
    its parameters frozen: it only carries gradient to ``x_rec``, so no weight gradients and no DDP reduction.
    """

    def __init__(self, model, loss_mod, opt_g, opt_d, text_encoder, autocast, mcfg, raw_model=None, disc_train=None,
                 lr_at=None):
        self.model, self.loss_mod, self.opt_g, self.opt_d = model, loss_mod, opt_g, opt_d
        self.lr_at = lr_at  # step -> learning rate of both optimizers (None: keep theirs)
        self.text_encoder, self.autocast, self.mcfg = text_encoder, autocast, mcfg
        self.raw_model = model if raw_model is None else raw_model
        self.disc = loss_mod.discriminator
        self.disc_train = self.disc if disc_train is None else disc_train

    def disc_active(self, step):
        return self.loss_mod.disc_active(step)

    def __call__(self, x, text, step):
        if self.lr_at is not None:
            for opt in (self.opt_g, self.opt_d):
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(step)
        device = x.device
        feats = None
        if self.mcfg.use_text_losses:
            text = text.to(device, non_blocking=True)
            with nvtx_range("text_encoder", device):
                feats = self.text_encoder.encode(text, mask_input=self.mcfg.mask_input)
        else:
            text = None
        with _frozen(self.disc), self.autocast():
            out = self.model(x, text, feats)
            g_loss, logs = self.loss_mod.generator_loss(x, out, step, last_layer=self.raw_model.last_layer,
                                                        discriminator=self.disc)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        if self.disc_active(step):
            with nvtx_range("discriminator", device), self.autocast():
                d_loss, d_logs = self.loss_mod.discriminator_loss(x, out["x_rec"].detach(), step,
                                                                  discriminator=self.disc_train)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            logs.update(d_logs)
        return out, logs


@contextlib.contextmanager
def _frozen(module):
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def build_models(cfg, device, world):
    """(text_encoder, model, loss_mod, opt_g, opt_d, lr) of ``cfg`` placed on ``device`` (its "auto" settings
    resolved in place for ``device`` and ``world`` processes, where train() has not done it already); ``lr``:
    ``train.lr``, or ``base_lr x batch x world`` when it is unset."""
    from lgvq_fast.models import TextEncoder, build_model
    from lgvq_fast.models.vqgan import set_norm_impl
    from lgvq_fast.training.config import resolve_auto

    resolve_auto(cfg, device, world)
    m, t = cfg.model, cfg.train
    text_encoder = TextEncoder.build(m.text_encoder, max_len=m.max_text_len)
    # Same initial weights on every rank (DDP also broadcasts them, this keeps single-process runs reproducible).
    torch.manual_seed(t.seed)
    model, loss_mod = build_model(m, text_encoder)
    set_norm_impl(model, t.norm_impl)
    place_models(device, t.channels_last, text_encoder, model, loss_mod)
    lr = t.lr if t.lr is not None else t.base_lr * t.batch_size * world
    opt_g, opt_d = make_optimizers(model, loss_mod, lr, t.betas, device, capturable=t.cuda_graph)
    return text_encoder, model, loss_mod, opt_g, opt_d, lr


def place_models(device, channels_last, text_encoder, model, loss_mod):
    """Move the frozen text encoder, the tokenizer and the loss module (with its discriminator) to ``device``;
    with ``channels_last`` the convolutional modules also take that memory format."""
    text_encoder.to(device)
    model.to(device)
    loss_mod.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        loss_mod.to(memory_format=torch.channels_last)


def make_optimizers(model, loss_mod, lr, betas, device, capturable=False):
    """Adam for the generator's trainable parameters and for the discriminator.

    On CUDA the fused implementation: one kernel per parameter group instead of several multi-tensor launches
    per group, and far less host work per step (the paper-shape step is close to launch-bound).
    ``capturable``: the step may be recorded in a CUDA graph (``train.cuda_graph``).
    """
    fused = torch.device(device).type == "cuda"
    extra = {"capturable": True} if capturable else {}
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas),
                             fused=fused or None, **extra)
    opt_d = torch.optim.Adam(loss_mod.discriminator.parameters(), lr=lr, betas=tuple(betas), fused=fused or None,
                             **extra)
    return opt_g, opt_d


def make_autocast(device, amp, cuda_graph):
    """A factory of the step's autocast context: bf16 on CUDA when ``amp == "bf16"``, off otherwise; a captured
    step (``cuda_graph``) may not keep autocast's weight-cast cache."""
    enabled = device.type == "cuda" and amp == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=not cuda_graph)

    return autocast


def wrap_ddp(model, disc, device, find_unused_parameters):
    """(model, discriminator) in DistributedDataParallel wrappers. Every parameter gets a gradient in the normal
    setups (without text losses the heads are not built); ``find_unused_parameters`` is for experiments that
    leave a part idle."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return (DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters),
            DDP(disc, device_ids=ids))


def compile_model(model, scope="model"):
    """torch.compile with the settings the training step needs; returns the model to call.

    ``scope="model"``: ``torch.compile(model)``, one graph (a wrapper; its ``_orig_mod`` is ``model``).
    ``scope="blocks"``: every VQGAN ``ResnetBlock`` and ``AttnBlock`` is compiled in place with static shapes
    and ``model`` itself is returned. Blocks of one shape share their compiled code, so this compiles faster
    (about half the time of the whole model on CPU at 64 px, 36 blocks) and loses only fusion across blocks.
    Each distinct block shape and grad mode is one more compile, so the recompile limit is raised to cover them.

    The adaptive GAN weight differentiates the compiled graph twice (torch.autograd.grad with retain_graph=True,
    then backward); AOTAutograd's donated buffers forbid that, so they are turned off. A warm AOTAutograd disk
    cache replays one of this graph's output aliases with a garbage shape in the next process (torch 2.13, CPU:
    "shape [...] is invalid for input of size ..."), so that cache is off too; the FX graph cache stays on.
    """
    import torch._functorch.config as functorch_config

    from lgvq_fast.models.vqgan import AttnBlock, ResnetBlock

    functorch_config.donated_buffer = False
    functorch_config.enable_autograd_cache = False
    # the compiled graphs fuse the weight casts themselves (lgvq_fast.models._precast is for eager steps)
    model.precast = False
    if scope == "model":
        return torch.compile(model)
    if scope != "blocks":
        raise ValueError(f"compile scope must be 'model' or 'blocks', got {scope!r}")
    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock, AttnBlock))]
    _raise_recompile_limits(len(blocks))
    for block in blocks:
        block.compile(dynamic=False)
    return model


def _raise_recompile_limits(n_blocks):
    # automatic dynamic shapes would make one symbolic graph for blocks of different sizes (slower kernels, and
    # an inductor sympy error was seen with torch 2.13); static shapes cost one compile per distinct shape
    import torch._dynamo.config as dynamo_config

    for name, least in (("recompile_limit", 4 * n_blocks + 8), ("cache_size_limit", 4 * n_blocks + 8),
                        ("accumulated_recompile_limit", 8 * n_blocks + 64),
                        ("accumulated_cache_size_limit", 8 * n_blocks + 64)):
        if hasattr(dynamo_config, name):  # older torch names them cache_size_limit / accumulated_cache_size_limit
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), least))
