"""Train an LG-VQ tokenizer: ``torchrun --nproc_per_node=N lgvq_fast/train.py [--config PRESET] [--set k=v ...]``.

With no arguments this trains the ``tiny-cpu`` preset (captioned shapes, packaged MiniLM) in a few minutes on a
laptop CPU. One generator forward per step; the discriminator is trained on ``x_rec.detach()`` of that same
forward, and not at all before ``disc_start`` (its loss is multiplied by 0 there, so the official code's D
work before that step only costs time). Checkpoints are atomic (temp file + rename), written every
``--ckpt-every`` steps, at the end and on SIGTERM/SIGINT; ``--resume`` continues at the same step with the same
data order and RNG state.
"""
import argparse
import copy
import json
import os
import signal
import sys
import time

if __name__ == "__main__" and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script (torchrun lgvq_fast/train.py): Python put this file's folder first on sys.path, where the package's
    # own modules (data, models, ops) would shadow top-level modules of those names. Drop it: the package is
    # imported as installed (pip install -e .), and the repository root is never added.
    del sys.path[0]

import torch
import torch.distributed as dist

from lgvq_fast.data.collate import mix_seed
from lgvq_fast.train_config import PRESETS, ConfigError, build_config, config_to_dict, resolve_auto, validate_config
from lgvq_fast.train_utils import (
    DiscSwap, MetricsLog, batch_psnr, capture_rng, one_line_error, place_models, print0, restore_rng, run_cli,
)
from lgvq_fast.training.checkpoint import CheckpointIO, nonfinite_entries
from lgvq_fast.training.distributed import DEFAULT_TIMEOUT_S, PeerWatch, init_distributed
from lgvq_fast.training.errors import CheckpointWriteError, Diverged, FolderBusy, signal_status
from lgvq_fast.training.run_folder import ParentWatch, RunLock, has_summary, trim_metrics


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops (the command line
    then exits with 128 + the signal's number). A torchrun worker whose launcher died stops the same way, as if
    sent SIGHUP."""

    def __init__(self):
        self.stop = False
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.stop, self.signum = True, signum

    def orphaned(self, launcher_pid):
        print(f"warning: the launcher (pid {launcher_pid}) is gone: this worker (pid {os.getpid()}) writes a "
              "checkpoint after its current step and stops", file=sys.stderr, flush=True)
        self.stop, self.signum = True, int(signal.SIGHUP)


def make_loaders(cfg, text_encoder, rank, world):
    from lgvq_fast.data import EpochBatchSampler, KeyedDataset, build_dataset, make_collate

    d, t, m = cfg.data, cfg.train, cfg.model
    common = dict(resolution=m.resolution, seed=t.seed, root=d.root, max_words=d.max_words,
                  skip_bad_samples=d.skip_bad_samples)
    train_ds = build_dataset(d.name, "train", size=d.train_size, image_dir=d.image_dir,
                             annotation_json=d.annotations, **common)
    val_ds = build_dataset(d.name, "val" if d.name != "cub" else "test", size=d.val_size,
                           image_dir=d.val_image_dir or d.image_dir,
                           annotation_json=d.val_annotations or d.annotations, **common)
    sampler = EpochBatchSampler(len(train_ds), t.batch_size, seed=t.seed, rank=rank, world_size=world)
    collate = make_collate(text_encoder if m.use_text_losses else None, m.max_text_len, seed=t.seed,
                           mask_ratio_range=tuple(m.mask_ratio_range))
    loader = torch.utils.data.DataLoader(KeyedDataset(train_ds, seed=t.seed), batch_sampler=sampler,
                                         collate_fn=collate, num_workers=d.num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         # its own generator: creating an iterator must not draw from the global
                                         # RNG, or a resumed run's dropout stream would drift from an
                                         # uninterrupted run's
                                         generator=torch.Generator())
    return train_ds, val_ds, sampler, loader


def fixed_val_batch(val_ds, n):
    n = min(n, len(val_ds))
    return torch.stack([val_ds[i]["image"] for i in range(n)])


@torch.no_grad()
def reconstruct(model, x, autocast):
    was_training = model.training
    model.eval()
    with autocast():
        x_rec = model(x)["x_rec"].float().clamp(-1, 1)
    model.train(was_training)
    return x_rec


def build_everything(cfg, device, world):
    from lgvq_fast.models import TextEncoder, build_model
    from lgvq_fast.models.vqgan import set_norm_impl

    resolve_auto(cfg, device, world)  # "auto" settings -> true/false (already done by train(): nothing left)
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


def _saving_on_data_error(loader, save):
    """Iterate ``loader``; when reading a batch fails (an unreadable image, an empty caption file: a ValueError or
    OSError naming the file), call ``save`` (a checkpoint at the current step) first, so fixing the file (or
    passing --skip-bad-samples) and resuming loses nothing. ``save=None`` (several processes) only re-raises.
    The error is one line whatever ``num_workers`` is: a worker's exception carries its whole traceback, of which
    only the last line (the cause, naming the file) is kept."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ValueError, OSError) as e:
            cause = one_line_error(e)
            if save is None:  # several processes: the others are inside collectives, no checkpoint possible
                raise ValueError(cause) from None
            save("data error")
            raise ValueError(f"{cause} (a checkpoint of the steps so far was written: fix the file or pass "
                             "--skip-bad-samples, then --resume auto)") from None
        yield batch


def load_resume_state(ckpt, resume, device):
    """``(path, state)`` of the checkpoint ``resume`` names (``"auto"``: the latest readable one in the run's
    folder, falling back to older ones past an unreadable file; ``(None, None)`` when there is none)."""
    if resume != "auto":
        return resume, ckpt.load(resume, device)
    candidates = list(reversed(ckpt.all()))
    for path in candidates:
        try:
            return path, ckpt.load(path, device)
        except ValueError as e:
            print0(f"warning: {e}; trying the checkpoint before it")
    if candidates:
        raise ValueError(f"--resume auto: none of the {len(candidates)} checkpoints in {ckpt.dir} can be read")
    return None, None


# settings that may change on resume without changing what is trained
_RESUME_NEUTRAL = {"train.steps", "train.out", "train.resume", "train.ckpt_every", "train.keep_last",
                   "train.sample_every", "train.eval_every", "train.log_every", "train.val_batch", "train.progress",
                   "train.device", "train.compile", "train.compile_scope", "train.cuda_graph", "train.channels_last",
                   "train.batch_size", "train.dist_timeout",
                   "data.num_workers", "data.skip_bad_samples"}


def config_changes(saved, now, sections=("model", "data", "train")):
    """``"section.key: saved -> now"`` for each setting of ``sections`` that differs between a checkpoint's stored
    config and this run's (those that do not change the training, e.g. ``train.steps``, left out)."""
    if not isinstance(saved, dict):
        return []
    out = []
    for section in sections:
        a, b = saved.get(section) or {}, now.get(section) or {}
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            va, vb = a.get(key), b.get(key)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if name not in _RESUME_NEUTRAL and va != vb:
                out.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


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
    import torch._dynamo.config as dynamo_config
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
    # automatic dynamic shapes would make one symbolic graph for blocks of different sizes (slower kernels, and
    # an inductor sympy error was seen with torch 2.13); static shapes cost one compile per distinct shape
    for name, least in (("recompile_limit", 4 * len(blocks) + 8), ("cache_size_limit", 4 * len(blocks) + 8),
                        ("accumulated_recompile_limit", 8 * len(blocks) + 64),
                        ("accumulated_cache_size_limit", 8 * len(blocks) + 64)):
        if hasattr(dynamo_config, name):  # older torch names them cache_size_limit / accumulated_cache_size_limit
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), least))
    for block in blocks:
        block.compile(dynamic=False)
    return model


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


def load_optimizer_state(opt, saved):
    """``opt.load_state_dict(saved)`` keeping this run's settings: PyTorch restores every hyperparameter of the
    checkpoint's groups, so a run resumed with another ``--lr`` or ``train.cuda_graph`` would silently train with
    the old lr, or with an Adam that cannot be captured. The moments and step counts are the checkpoint's; the
    step counter moves to the parameters' device when the optimizer is fused or capturable, as Adam keeps it, and
    the moments take their parameter's memory format (a run resumed with another ``train.channels_last``)."""
    keep = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, settings in zip(opt.param_groups, keep):
        group.update(settings)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            st = opt.state.get(p, {})
            if on_device and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            for k, v in st.items():
                # moments saved from a run in the other memory format (train.channels_last changed on resume):
                # the fused Adam needs them laid out as their parameter
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def train_step(model, raw_model, loss_mod, disc_swap, opt_g, opt_d, text_encoder, x, text, step, autocast, mcfg):
    """One training step: one generator forward, G update, then D on that forward's detached x_rec.

    ``model`` may be the DDP/compiled wrapper of ``raw_model``. The D update runs only from
    ``disc_start`` on (before, its loss is multiplied by 0). Returns the generator output and the logs.
    """
    from lgvq_fast.models._nvtx import nvtx_range

    device = x.device
    feats = None
    if mcfg.use_text_losses:
        text = text.to(device, non_blocking=True)
        with nvtx_range("text_encoder", device):
            feats = text_encoder.encode(text, mask_input=mcfg.mask_input)
    else:
        text = None
    with disc_swap.generator(), autocast():
        out = model(x, text, feats)
        g_loss, logs = loss_mod.generator_loss(x, out, step, last_layer=raw_model.last_layer)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    if loss_mod.disc_active(step):
        with nvtx_range("discriminator", device), disc_swap.discriminator(), autocast():
            d_loss, d_logs = loss_mod.discriminator_loss(x, out["x_rec"].detach(), step)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        logs.update(d_logs)
    return out, logs


def train(cfg):
    """Run the training ``cfg`` describes; returns its summary (see README, "Training", for the exit statuses
    the command line maps its endings to)."""
    t0 = time.perf_counter()
    validate_config(cfg)  # also for configs built in code, not by build_config
    cfg = copy.deepcopy(cfg)  # "auto" settings are resolved below: the caller's config keeps them
    t = cfg.train
    rank, world, _, device = init_distributed(t.device, t.dist_timeout)
    auto = resolve_auto(cfg, device, world)  # train.cuda_graph / channels_last "auto" -> true or false
    out_dir = t.out or os.path.join("runs", cfg.preset)
    lock = lock_run_folder(out_dir, rank, world, device)
    stop = StopFlag()
    watch = PeerWatch(rank, world, t.dist_timeout or DEFAULT_TIMEOUT_S["nccl" if device.type == "cuda" else "gloo"])
    # torchrun's workers outlive a launcher killed with -9: such an orphan stops (with a checkpoint) instead of
    # writing on into a folder its user may already have resumed in
    parent = ParentWatch(stop.orphaned) if "TORCHELASTIC_RUN_ID" in os.environ else None
    try:
        return _train(cfg, auto, rank, world, device, out_dir, stop, watch, t0)
    finally:
        watch.stop()
        if parent is not None:
            parent.stop()
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def lock_run_folder(out_dir, rank, world, device):
    """Rank 0 takes the output folder's lock (:class:`RunLock`) before anything in it is touched; every rank
    learns whether it could, so all stop together when another run holds it. Rank 0 returns the lock."""
    lock, busy = None, None
    if rank == 0:
        lock = RunLock(out_dir)
        try:
            warning = lock.acquire()
            if warning:
                print0(warning)
        except FolderBusy as e:
            lock, busy = None, e
    if world > 1:
        flag = torch.tensor([0.0 if busy is None else 1.0], device=device)
        dist.all_reduce(flag)
        if busy is None and flag.item() > 0:
            busy = FolderBusy(f"rank 0 could not lock {out_dir}: it is in use by another run")
    if busy is not None:
        raise busy
    return lock


def _train(cfg, auto, rank, world, device, out_dir, stop, watch, t0):
    from lgvq_fast.eval import save_recon_grid, save_usage_histogram
    from lgvq_fast.quantize import code_counts

    t, m = cfg.train, cfg.model
    is_main = rank == 0
    text_encoder, model, loss_mod, opt_g, opt_d, lr = build_everything(cfg, device, world)
    raw_model, raw_disc = model, loss_mod.discriminator
    train_ds, val_ds, sampler, loader = make_loaders(cfg, text_encoder, rank, world)
    use_amp = device.type == "cuda" and t.amp == "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark

    def autocast():
        # a captured step may not keep autocast's weight-cast cache
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not t.cuda_graph)

    ckpt = CheckpointIO(out_dir, keep_last=t.keep_last)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if is_main:
        stale = ckpt.remove_stale_temps()
        if stale:
            print0(f"removed {len(stale)} temp file(s) of checkpoint writes that were cut short: {', '.join(stale)}")
    step, epoch, batch_in_epoch = 0, 0, 0
    usage = torch.zeros(m.codebook_size, dtype=torch.long, device=device)
    path, state = load_resume_state(ckpt, t.resume, device) if t.resume else (None, None)
    if t.resume == "auto" and path is None:
        print0(f"--resume auto: no checkpoint in {ckpt.dir}, starting from scratch")
    if state is not None:
        step, epoch, batch_in_epoch = resume_from(state, path, cfg, raw_model, raw_disc, opt_g, opt_d, sampler,
                                                  world)
        if "code_usage" in state and state["code_usage"].shape == usage.shape:
            usage.copy_(state["code_usage"])
        if step >= t.steps and has_summary(metrics_path, step):
            print0(f"{path} is at step {step}, at or past --steps {t.steps}, and its summary is written: nothing to "
                   "train (no file written)")
            return {"step": step, "nothing_to_train": True, "rank": rank}
    start_step = step
    if world > 1:
        with watch.collective("the start-up barrier"):
            dist.barrier()  # every rank has read its checkpoint before rank 0 moves any aside
    if is_main:
        # checkpoints of another run (or of steps after the one resumed from) are moved aside, not overwritten
        # or pruned: keep_last only ever removes this run's older checkpoints
        moved = ckpt.archive(after_step=step if state is not None else -1)
        if moved is not None:
            if state is None and os.path.exists(metrics_path):
                os.replace(metrics_path, os.path.join(moved, "metrics.jsonl"))
            what = f"after step {step}" if state is not None else "of an earlier run"
            print0(f"warning: {ckpt.dir} held checkpoints {what}; moved them to {moved} (--resume auto continues "
                   "the latest run in a folder)")
        if state is not None:
            dropped = trim_metrics(metrics_path, step)
            if dropped:
                print0(f"metrics.jsonl: dropped {dropped} row(s) logged after step {step} by the interrupted run")
    if t.compile:
        model = compile_model(model, t.compile_scope)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        with watch.collective("the DDP start-up broadcast"):
            # Every parameter gets a gradient in the normal setups (without text losses the heads are not built);
            # train.find_unused_parameters=true is for experiments that leave a part idle.
            model = DDP(model, device_ids=ids, find_unused_parameters=t.find_unused_parameters)
            ddp_disc = DDP(raw_disc, device_ids=ids)
    else:
        ddp_disc = raw_disc
    disc_swap = DiscSwap(loss_mod, raw_disc, ddp_disc)
    graphed = None
    if t.cuda_graph:
        from lgvq_fast.train_graph import GraphedTrainStep

        # chosen by "auto": a capture that fails warns and the run goes on eagerly; asked for: the error stops it
        graphed = GraphedTrainStep(model, raw_model, loss_mod, disc_swap, opt_g, opt_d, text_encoder, autocast, m,
                                   eager_on_capture_error="train.cuda_graph" in auto, log=print0)
    if t.resume and step > 0:
        restore_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
    else:
        torch.manual_seed(t.seed + rank)

    val_x = fixed_val_batch(val_ds, t.val_batch).to(device)
    psnr_start = batch_psnr(reconstruct(raw_model, val_x, autocast), val_x)
    print0(f"config {cfg.preset}: {world} process(es) on {device}, {m.resolution}px, K={m.codebook_size}, "
           f"batch {t.batch_size}x{world}, lr {lr:.3g}, steps {t.steps}, text losses "
           f"{'on' if m.use_text_losses else 'off'}{', step captured in a CUDA graph' if t.cuda_graph else ''}"
           f"{', channels_last' if t.channels_last else ''}, start-up {time.perf_counter() - t0:.1f}s")
    print0(f"val PSNR at step {step}: {psnr_start:.2f} dB")
    metrics = MetricsLog(metrics_path, enabled=is_main)
    if is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
    window = {"usage": torch.zeros_like(usage), "n": 0, "sums": {}, "t": time.perf_counter()}
    skipped = 0
    progress = None
    if is_main and t.progress and step < t.steps:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=step, dynamic_ncols=True, mininterval=1.0)

    # Set on the device when a loss turns NaN or inf (no sync per step); read at log rows (one process), at the
    # per-step multi-rank sync (which makes it agree on every rank) and before every save, so a diverged model is
    # never written over the good checkpoints.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_finite_check = step

    def diverged(what):
        if progress is not None:
            progress.close()
        good = ckpt.latest_good() if is_main else None
        return Diverged(f"training diverged: {what}; no checkpoint was written after it (latest good one: "
                        f"{good or 'none'}). Lower the learning rate (--lr) or resume from that checkpoint with "
                        "--resume auto.")

    def raise_if_nonfinite():
        nonlocal last_finite_check
        if bool(nonfinite.item()):
            raise diverged(f"a loss became NaN or inf between step {last_finite_check + 1} and step {step}")
        last_finite_check = step

    def save(reason):
        raise_if_nonfinite()
        state = {
            "model": raw_model.state_dict(), "discriminator": raw_disc.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "config": config_to_dict(cfg), "world_size": world,
            "code_usage": usage,
        }
        # a loss can be finite while the update it drove left NaN weights or moments (a corrupt Adam state):
        # check the whole state, one reduction per dtype and one host read
        bad = nonfinite_entries({k: state[k] for k in ("model", "discriminator", "opt_g", "opt_d")})
        if bad:
            raise diverged(f"the model or optimizer state is not finite after step {step} ({', '.join(bad)})")
        with watch.collective(f"the RNG gather of the step-{step} checkpoint"):
            state["rng"] = gather_rng(device, world)
        failure = None
        if is_main:
            try:
                path = ckpt.save(state, step)
                print0(f"checkpoint ({reason}): {path}")
            except CheckpointWriteError as e:
                failure = e
        if world > 1:
            with watch.collective(f"the step-{step} checkpoint barrier"):
                flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
                dist.all_reduce(flag)
            if failure is None and flag.item() > 0:
                failure = CheckpointWriteError(f"rank 0 could not write the step-{step} checkpoint")
        if failure is not None:
            if progress is not None:
                progress.close()
            raise failure

    model.train()
    loss_mod.train()
    while step < t.steps and not stop.stop:
        sampler.set_position(epoch, batch_in_epoch)
        for batch in _saving_on_data_error(loader, save if world == 1 else None):
            x = batch["image"].to(device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            skipped += batch["skipped"]
            # Every step's randomness (dropout, dead-code restarts) is a pure function of (seed, rank, step):
            # what one step draws cannot shift the next, so a run with the text losses at weight 0 trains the
            # tokenizer bit-identically to --no-text-losses, and resume needs no RNG state to be exact.
            torch.manual_seed(mix_seed(t.seed, rank, step))
            watch.step = step
            with watch.collective(f"the gradient all-reduce of step {step + 1} (DDP)"):
                if graphed is not None:
                    out, logs = graphed(x, batch["text"], step)
                else:
                    out, logs = train_step(model, raw_model, loss_mod, disc_swap, opt_g, opt_d, text_encoder, x,
                                           batch["text"], step, autocast, m)
            step += 1
            batch_in_epoch += 1
            with torch.no_grad():
                for key in ("total", "d_loss"):
                    if key in logs:
                        nonfinite |= ~torch.isfinite(logs[key])
                idx = out["indices"].flatten()
                counts = code_counts(idx, m.codebook_size)  # torch.bincount would sync the host
                usage += counts
                window["usage"] += counts
                logs["psnr"] = batch_psnr(out["x_rec"].detach().float().clamp(-1, 1), x, reduce=False)
                if out.get("mtp_acc") is not None:
                    logs["mtp_acc"] = out["mtp_acc"].detach().float()
                for k, v in logs.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v.detach().float()
                window["n"] += 1
            if progress is not None:
                progress.update(1)
            if step % t.log_every == 0 or step == t.steps:
                if world == 1:
                    raise_if_nonfinite()
                now = time.perf_counter()
                row = {"step": step, "epoch": epoch, "lr": lr,
                       "images_per_s": window["n"] * t.batch_size * world / max(now - window["t"], 1e-9)}
                row.update({k: round(float(v) / window["n"], 6) for k, v in window["sums"].items()})
                row["codebook_usage"] = float((window["usage"] > 0).float().mean())
                row["perplexity"] = perplexity(window["usage"])
                metrics.write(row)
                if progress is not None:
                    progress.set_postfix(l1=f"{row.get('l1', 0):.3f}", psnr=f"{row['psnr']:.1f}",
                                         use=f"{row['codebook_usage']:.2f}")
                window.update(usage=torch.zeros_like(usage), n=0, sums={}, t=time.perf_counter())
            if is_main and t.sample_every and step % t.sample_every == 0:
                save_recon_grid(val_x[:8], reconstruct(raw_model, val_x[:8], autocast),
                                os.path.join(out_dir, "samples", f"step_{step:06d}.png"))
            if t.eval_every and step % t.eval_every == 0:
                psnr = batch_psnr(reconstruct(raw_model, val_x, autocast), val_x)
                metrics.write({"step": step, "val_psnr": psnr})
            if world > 1:
                with watch.collective(f"the stop-flag all-reduce of step {step}"):
                    flag = torch.stack([torch.tensor(float(stop.stop), device=device), nonfinite.float()])
                    dist.all_reduce(flag)
                    stop.stop = bool(flag[0].item() > 0)
                nonfinite.fill_(bool(flag[1].item() > 0))
                raise_if_nonfinite()
            if t.ckpt_every and step % t.ckpt_every == 0 and step < t.steps and not stop.stop:
                save("periodic")
            if step >= t.steps or stop.stop:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    if progress is not None:
        progress.close()
    if step > start_step:
        save("signal" if stop.stop else "final")
    psnr_end = batch_psnr(reconstruct(raw_model, val_x, autocast), val_x)
    if is_main:
        save_recon_grid(val_x[:8], reconstruct(raw_model, val_x[:8], autocast),
                        os.path.join(out_dir, "samples", f"step_{step:06d}.png"))
        save_usage_histogram(usage.cpu(), os.path.join(out_dir, "codebook_usage.png"))
    if skipped or getattr(train_ds, "skipped", 0):
        print0(f"skipped bad samples: {getattr(train_ds, 'skipped', 0)} at build time, {skipped} while reading")
    summary = {"step": step, "val_psnr_start": psnr_start, "val_psnr_end": psnr_end,
               "codebook_usage_total": float((usage > 0).float().mean()), "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": stop.stop, "signal": stop.signum, "rank": rank,
               "model_sha256": state_sha256(raw_model.state_dict())}
    if graphed is not None:
        summary["cuda_graph"] = {"captures": graphed.captures, "replays": graphed.replays}
        if graphed.capture_error is not None:
            summary["cuda_graph"]["capture_error"] = graphed.capture_error
        print0(f"cuda graph: {graphed.captures} capture(s), {graphed.replays} of {step - start_step} steps replayed")
    metrics.write({"summary": summary})
    print0(f"val PSNR: {psnr_start:.2f} dB at start -> {psnr_end:.2f} dB at step {step}; "
           f"codebook usage {summary['codebook_usage_total']:.2f}; total {summary['wall_s']:.1f}s")
    metrics.close()
    if world > 1:
        with watch.collective("the end-of-run barrier"):
            dist.barrier()
    return summary


def resume_from(state, path, cfg, raw_model, raw_disc, opt_g, opt_d, sampler, world):
    """Load a checkpoint's weights and optimizer moments; returns (step, epoch, batch_in_epoch) to continue at."""
    t = cfg.train
    try:
        raw_model.load_state_dict(state["model"])
        raw_disc.load_state_dict(state["discriminator"])
        for opt, key in ((opt_g, "opt_g"), (opt_d, "opt_d")):
            load_optimizer_state(opt, state[key])
    except (RuntimeError, ValueError, KeyError) as e:
        changed = config_changes(state.get("config"), config_to_dict(cfg), sections=("model",))
        why = f"its model settings differ: {'; '.join(changed)}" if changed else f"{type(e).__name__}: {e}"
        raise ConfigError(f"cannot resume from {path}: the weights do not fit this run's model ({why})") from e
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    changed = config_changes(state.get("config"), config_to_dict(cfg))
    if changed:
        print0(f"warning: resuming {path} with changed settings ({'; '.join(changed)}): the run continues "
               "but does not repeat the uninterrupted one")
    saved_world = int(state.get("world_size", world))
    saved_batch = int(state.get("config", {}).get("train", {}).get("batch_size", t.batch_size))
    if (saved_world, saved_batch) != (world, t.batch_size):
        # Keep the position in the epoch in images, not batches: continue at the first global batch
        # of the new size not fully seen (at most one batch of images is seen twice).
        seen = batch_in_epoch * saved_world * saved_batch
        batch_in_epoch = seen // (world * t.batch_size)
        if batch_in_epoch >= sampler.batches_per_epoch():
            epoch, batch_in_epoch = epoch + 1, 0
        print0(f"warning: {path} was written by {saved_world} process(es) x batch {saved_batch}, this run "
               f"has {world} x {t.batch_size}: it continues at step {step} after {seen} images of epoch "
               f"{state['epoch']}, but its data order differs from an uninterrupted run")
    print0(f"resumed from {path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    return step, epoch, batch_in_epoch


def state_sha256(state_dict):
    """Digest of every tensor of a state dict: equal digests mean bit-identical weights and buffers."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def perplexity(counts):
    p = counts.float() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def gather_rng(device, world):
    """RNG state of every rank (rank order), so a resumed multi-process run continues each rank's stream."""
    mine = capture_rng(device)
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny-cpu", help="preset: " + ", ".join(PRESETS) + " (default tiny-cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.codebook_size=512 --set train.log_every=5")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per step per process (train.batch_size)")
    p.add_argument("--lr", type=float, help="Adam learning rate of both networks (train.lr; default base_lr x batch x processes)")
    p.add_argument("--out", help="output folder: checkpoints, samples, metrics (train.out; default runs/<preset>)")
    p.add_argument("--ckpt-every", type=int, help="write a checkpoint every N steps, 0 = only at the end")
    p.add_argument("--sample-every", type=int, help="save a reconstruction grid every N steps, 0 = only at the end")
    p.add_argument("--eval-every", type=int, help="validation PSNR every N steps, 0 = only at start and end")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the latest in the output folder")
    p.add_argument("--seed", type=int, help="seed of the model init, data order and every step's draws")
    p.add_argument("--no-text-losses", action="store_true", help="baseline: train without the LG-VQ text losses")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip and count unreadable images or captions instead of stopping")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes per rank (data.num_workers)")
    p.add_argument("--device", help="auto (default: cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--compile", nargs="?", const="model", choices=("model", "blocks"), default=None,
                   help="torch.compile the model (before the DDP wrap): the whole model as one graph (default), or "
                        "each VQGAN block on its own ('--compile blocks': compiles faster)")
    p.add_argument("--data-root", help="dataset folder (CUB, CelebA-HQ)")
    p.add_argument("--image-dir", help="COCO image folder")
    p.add_argument("--annotations", help="COCO captions annotation JSON")
    p.add_argument("--text-encoder", help="minilm (default), tiny-random, or a local model folder (e.g. CLIP)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (log lines only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    return train(cfg)


def cli(argv=None):
    """``main`` for the command line: one-line errors and an exit status per ending (``training/errors.py``)."""
    summary = run_cli(main, "train.py", argv)
    if summary and summary.get("stopped_by_signal"):
        name = signal.Signals(summary["signal"]).name
        print0(f"stopped by {name} at step {summary['step']} after writing a checkpoint: continue with --resume auto "
               f"(exit status {signal_status(summary['signal'])})")
        sys.exit(signal_status(summary["signal"]))
    return summary


if __name__ == "__main__":
    cli()
