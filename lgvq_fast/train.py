"""Train an LG-VQ tokenizer: ``torchrun --nproc_per_node=N lgvq_fast/train.py [--config PRESET] [--set k=v ...]``.

With no arguments this trains the ``tiny-cpu`` preset (captioned shapes, packaged MiniLM) in a few minutes on a
laptop CPU. Checkpoints are atomic and verified, written every ``--ckpt-every`` steps, at the end and on
SIGTERM/SIGINT; ``--resume auto`` continues at the same step with the same data order and RNG state. The pieces
are in ``lgvq_fast/training/`` (config, step, cuda_graph, checkpoint, metrics, loaders, run_folder, distributed);
this file is the loop.
"""
import copy
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

from lgvq_fast.data.collate import mix_seed
from lgvq_fast.errors import run_cli, signal_status
from lgvq_fast.images import save_usage_histogram
from lgvq_fast.training.checkpoint import (
    CheckpointIO, save_checkpoint, seed_or_restore_rng, start_position, state_sha256,
)
from lgvq_fast.training.config import build_config, parse_args, resolve_auto
from lgvq_fast.training.distributed import init_distributed, print0
from lgvq_fast.training.loaders import fixed_val_batch, make_loaders, saving_on_data_error
from lgvq_fast.training.metrics import (
    DivergenceGuard, MetricsLog, MetricsWindow, batch_psnr, progress_bar, reconstruct,
)
from lgvq_fast.training.run_folder import RunContext
from lgvq_fast.training.samples import SampleSheet, save_run_curves
from lgvq_fast.training.step import TrainStep, build_models, compile_model, lr_schedule, make_autocast, wrap_ddp


def train(cfg):
    """Run the training ``cfg`` (a ``training.config.Config``) describes; returns its summary (the exit statuses
    the command line maps its endings to: ``lgvq_fast/errors.py``)."""
    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg.validate())  # "auto" settings are resolved below: the caller's config keeps them
    t = cfg.train
    rank, world, _, device = init_distributed(t.device, t.dist_timeout)
    auto = resolve_auto(cfg, device, world)  # train.cuda_graph / channels_last "auto" -> true or false
    with RunContext(t.out or os.path.join("runs", cfg.preset), rank, world, device, t.dist_timeout) as run:
        return _train(cfg, auto, run, t0)


def _train(cfg, auto, run, t0):
    t, m = cfg.train, cfg.model
    text_encoder, model, loss_mod, opt_g, opt_d, lr = build_models(cfg, run.device, run.world)
    nets = {"model": model, "discriminator": loss_mod.discriminator, "opt_g": opt_g, "opt_d": opt_d}
    train_ds, val_ds, sampler, loader = make_loaders(cfg, text_encoder, run.rank, run.world)
    autocast = make_autocast(run.device, t.amp, t.cuda_graph)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
    ckpt = CheckpointIO(run.out_dir, keep_last=t.keep_last)
    metrics_path = os.path.join(run.out_dir, "metrics.jsonl")
    usage = torch.zeros(m.codebook_size, dtype=torch.long, device=run.device)  # codes picked over the whole run
    start = start_position(cfg, run, ckpt, nets, sampler, usage, metrics_path, text_encoder)
    if start.done:
        return {"step": start.pos.step, "nothing_to_train": True, "rank": run.rank}
    pos, start_step = start.pos, start.pos.step
    step_fn = make_step(cfg, auto, run, model, loss_mod, opt_g, opt_d, text_encoder, autocast)
    seed_or_restore_rng(run, t.seed, start.rng)
    val_x = fixed_val_batch(val_ds, t.val_batch).to(run.device)
    sheet = SampleSheet(val_ds, 8, text_encoder, m, run.device, t.seed)  # captions, masked-word guesses
    psnr_start = batch_psnr(reconstruct(model, val_x, autocast), val_x)
    print0(f"{cfg.describe(run.world, run.device, lr)}, start-up {time.perf_counter() - t0:.1f}s")
    print0(f"val PSNR at step {pos.step}: {psnr_start:.2f} dB")
    metrics = MetricsLog(metrics_path, enabled=run.is_main)
    if pos.step == 0:
        metrics.write({"step": 0, "val_psnr": psnr_start})
    if run.is_main:
        cfg.write_json(os.path.join(run.out_dir, "config.json"))
    window = MetricsWindow(usage, t.batch_size * run.world)
    guard = DivergenceGuard(run.device, pos.step, ckpt.latest_good if run.is_main else lambda: None)
    progress = progress_bar(t.steps, pos.step) if run.is_main and t.progress else None
    skipped = 0

    def save(reason):
        save_checkpoint(ckpt if run.is_main else None, nets, pos, cfg.to_dict(), usage, run, guard, reason,
                        start.text_sha256)

    model.train()
    loss_mod.train()
    try:
        while pos.step < t.steps and not run.stop.stop:
            sampler.set_position(pos.epoch, pos.batch_in_epoch)
            for batch in saving_on_data_error(loader, save if run.world == 1 else None):
                x = batch["image"].to(run.device, non_blocking=True)
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                skipped += batch["skipped"]
                # each step's draws (dropout, dead-code restarts) are a function of (seed, rank, step) alone: resume
                # is exact, and text losses at weight 0 train the tokenizer bit-identically to --no-text-losses
                torch.manual_seed(mix_seed(t.seed, run.rank, pos.step))
                run.watch.step = pos.step
                with run.watch.collective(f"the gradient all-reduce of step {pos.step + 1} (DDP)"):
                    out, logs = step_fn(x, batch["text"], pos.step)
                pos.advance()
                guard.watch(logs)
                window.add(out, logs, x)
                if progress is not None:
                    progress.update(1)
                if pos.step % t.log_every == 0 or pos.step == t.steps:
                    if run.world == 1:
                        guard.check(pos.step)
                    window.write(metrics, progress, step=pos.step, epoch=pos.epoch, lr=opt_g.param_groups[0]["lr"])
                if run.is_main and t.sample_every and pos.step % t.sample_every == 0:
                    sheet.save(model, autocast, os.path.join(run.out_dir, "samples", f"step_{pos.step:06d}.png"))
                if t.eval_every and pos.step % t.eval_every == 0:
                    metrics.write({"step": pos.step, "val_psnr": batch_psnr(reconstruct(model, val_x, autocast), val_x)})
                if run.world > 1:
                    run.sync(guard, pos.step)  # every rank stops (signal, divergence) at the same step
                if t.ckpt_every and pos.step % t.ckpt_every == 0 and pos.step < t.steps and not run.stop.stop:
                    save("periodic")
                if pos.step >= t.steps or run.stop.stop:
                    break
            else:
                pos.next_epoch()
    finally:
        if progress is not None:
            progress.close()
    if pos.step > start_step:
        save("signal" if run.stop.stop else "final")
    psnr_end = batch_psnr(reconstruct(model, val_x, autocast), val_x)
    if run.is_main:
        sheet.save(model, autocast, os.path.join(run.out_dir, "samples", f"step_{pos.step:06d}.png"))
        save_usage_histogram(usage.cpu(), os.path.join(run.out_dir, "codebook_usage.png"))
    if skipped or getattr(train_ds, "skipped", 0):
        print0(f"skipped bad samples: {getattr(train_ds, 'skipped', 0)} at build time, {skipped} while reading")
    summary = {"step": pos.step, "val_psnr_start": psnr_start, "val_psnr_end": psnr_end,
               "codebook_usage_total": float((usage > 0).float().mean()), "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": run.stop.stop, "signal": run.stop.signum, "rank": run.rank,
               "model_sha256": state_sha256(model.state_dict())}
    return finish(summary, step_fn, start_step, metrics, run)


def make_step(cfg, auto, run, model, loss_mod, opt_g, opt_d, text_encoder, autocast):
    """The step the loop calls: torch.compile'd (``--compile``), in DDP wrappers (several processes), replayed from
    a CUDA graph (``train.cuda_graph``)."""
    t = cfg.train
    fwd = compile_model(model, t.compile_scope) if t.compile else model
    disc_train = loss_mod.discriminator
    if run.world > 1:
        with run.watch.collective("the DDP start-up broadcast"):
            fwd, disc_train = wrap_ddp(fwd, disc_train, run.device, t.find_unused_parameters)
    lr_at = None if t.lr_schedule == "constant" and not t.lr_warmup else \
        lr_schedule(opt_g.param_groups[0]["lr"], t.steps, t.lr_schedule, t.lr_warmup, t.lr_floor)
    step_fn = TrainStep(fwd, loss_mod, opt_g, opt_d, text_encoder, autocast, cfg.model, raw_model=model,
                        disc_train=disc_train, lr_at=lr_at)
    if t.cuda_graph:
        from lgvq_fast.training.cuda_graph import GraphedTrainStep

        # chosen by "auto": a capture that fails warns and the run goes on eagerly; asked for: the error stops it
        step_fn = GraphedTrainStep(step_fn, eager_on_capture_error="train.cuda_graph" in auto, log=print0)
    return step_fn


def finish(summary, step_fn, start_step, metrics, run):
    """Write the run's summary row (with the CUDA graph's counts when the step was captured), print it, and wait
    for every rank."""
    if hasattr(step_fn, "captures"):
        summary["cuda_graph"] = {"captures": step_fn.captures, "replays": step_fn.replays}
        if step_fn.capture_error is not None:
            summary["cuda_graph"]["capture_error"] = step_fn.capture_error
        print0(f"cuda graph: {step_fn.captures} capture(s), {step_fn.replays} of {summary['step'] - start_step} "
               "steps replayed")
    metrics.write({"summary": summary})
    print0(f"val PSNR: {summary['val_psnr_start']:.2f} dB at start -> {summary['val_psnr_end']:.2f} dB at step "
           f"{summary['step']}; codebook usage {summary['codebook_usage_total']:.2f}; total {summary['wall_s']:.1f}s")
    metrics.close()
    if run.is_main:
        save_run_curves(metrics.path, os.path.join(run.out_dir, "curves.png"))
    run.barrier("the end-of-run barrier")
    return summary


def main(argv=None):
    return train(build_config(parse_args(argv, description=__doc__.split("\n\n")[0])))


def cli(argv=None):
    """``main`` for the command line: one-line errors and an exit status per ending (``lgvq_fast/errors.py``)."""
    summary = run_cli(main, "train.py", argv)
    if summary and summary.get("stopped_by_signal"):
        name = signal.Signals(summary["signal"]).name
        print0(f"stopped by {name} at step {summary['step']} after writing a checkpoint: continue with --resume auto "
               f"(exit status {signal_status(summary['signal'])})")
        sys.exit(signal_status(summary["signal"]))
    return summary


if __name__ == "__main__":
    cli()
