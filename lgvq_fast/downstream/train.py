"""Train the second stage over a frozen tokenizer:
``torchrun --nproc_per_node=N lgvq_fast/downstream/train.py --tokenizer CKPT --task caption|t2i [--config PRESET]``.

The tokenizer's codes (and the captions' token ids) are extracted once per dataset and split into a memory-mapped
cache (``data.cache_dir``); a downstream epoch reads only that cache. Conventions as ``lgvq_fast/train.py``:
presets and ``--set section.key=value``, DDP, atomic checksummed checkpoints and ``--resume auto`` (the same step,
data order and draws as an uninterrupted run), a tqdm bar, ``metrics.jsonl``, one-line errors and the same exit
statuses (``lgvq_fast/errors.py``). At the end (and every ``--eval-every`` steps) the task's metrics are computed
on the validation split (``lgvq_fast/downstream/evaluate.py``) and a sample grid is written.
"""
import copy
import os
import signal
import sys
import time

if __name__ == "__main__" and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    # run as a script: this folder's modules (config, model, metrics, ...) would shadow top-level modules of those
    # names; the package is imported as installed
    del sys.path[0]

import torch

from lgvq_fast.data.collate import EpochBatchSampler, mix_seed
from lgvq_fast.downstream.config import TOKENIZER_FIELDS, build_config, make_parser
from lgvq_fast.downstream.model import TASKS, CodeTransformer
from lgvq_fast.downstream.state import check_same_tokenizer, load_tokenizer
from lgvq_fast.downstream.tasks import config_for, make_batch
from lgvq_fast.errors import ConfigError, run_cli, signal_status
from lgvq_fast.training.checkpoint import (
    CheckpointIO, Position, load_optimizer_state, load_resume_state, state_sha256,
)
from lgvq_fast.training.distributed import init_distributed, print0
from lgvq_fast.training.metrics import DivergenceGuard, MetricsLog, progress_bar
from lgvq_fast.training.run_folder import RunContext, has_summary, tidy_folder
from lgvq_fast.training.step import lr_schedule


def train(cfg):
    """Run the downstream training ``cfg`` (a ``DownstreamConfig``) describes; returns its summary."""
    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg.validate())
    t = cfg.train
    rank, world, _, device = init_distributed(t.device, t.dist_timeout)
    with RunContext(cfg.out_dir, rank, world, device, t.dist_timeout) as run:
        return _train(cfg, run, t0)


class Setup:
    """The run's pieces before the first step: tokenizer, code caches, model, optimizer, loader."""

    def __init__(self, cfg, run):
        from lgvq_fast.downstream.codes import CodeCache
        from lgvq_fast.downstream.state import caption_vocabulary, text_vocab

        d, t = cfg.data, cfg.train
        self.tokenizer, self.text_encoder, self.tok_cfg, self.identity = load_tokenizer(d.tokenizer, run.device)
        self.caches = {split: CodeCache.get(d.cache_dir, d.tokenizer, d.spec(split), split, run.device,
                                            rank=run.rank, world=run.world, progress=t.progress and run.is_main,
                                            barrier=lambda: run.barrier(f"the {split} code extraction"))
                       for split in ("train", "val")}
        self.vocabulary = caption_vocabulary(self.caches["train"], self.text_encoder)
        self.vocab = text_vocab(self.vocabulary, self.text_encoder)
        sizes = config_for(self.tokenizer, self.text_encoder, self.vocab)
        for name in TOKENIZER_FIELDS:
            setattr(cfg.model, name, getattr(sizes, name))
        torch.manual_seed(t.seed)
        self.model = CodeTransformer(cfg.model.validate()).to(run.device)
        # the prefix modality's output head is never used by this task: frozen, so DDP and AdamW skip it
        self.model.heads[TASKS[t.task][0]].requires_grad_(False)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        rest = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
        self.lr_at = lr_schedule(t.lr, t.steps, "cosine", t.lr_warmup, t.lr_floor)
        train_ds = self.caches["train"].dataset(seed=t.seed)
        self.sampler = EpochBatchSampler(len(train_ds), t.batch_size, seed=t.seed, rank=run.rank, world_size=run.world)
        from lgvq_fast.downstream.codes import collate_codes

        self.loader = torch.utils.data.DataLoader(train_ds, batch_sampler=self.sampler, collate_fn=collate_codes,
                                                  num_workers=d.num_workers, generator=torch.Generator())
        self.fwd = self.model
        if run.world > 1:
            with run.watch.collective("the DDP start-up broadcast"):
                self.fwd = torch.nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        amp = t.amp if t.amp != "auto" else ("bf16" if run.device.type == "cuda" else "fp32")
        self.autocast = lambda: torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _state(cfg, s, pos, run):
    return {"model": s.model.state_dict(), "opt": s.opt.state_dict(), "step": pos.step, "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch, "config": cfg.to_dict(), "world_size": run.world,
            "tokenizer": s.identity, "caption_vocabulary": s.vocabulary}


def _resume(cfg, s, run, ckpt):
    """The Position to start at: fresh, or where the checkpoint ``train.resume`` names stopped (weights, AdamW
    moments; the data order and each step's draws are functions of (seed, step), so the run continues exactly)."""
    t = cfg.train
    if run.is_main:
        ckpt.remove_stale_temps()
    path, state = load_resume_state(ckpt, t.resume, "cpu", run.log) if t.resume else (None, None)
    if state is None:
        if t.resume == "auto":
            run.log(f"--resume auto: no checkpoint in {ckpt.dir}, starting from scratch")
        run.barrier("the start-up barrier")
        if run.is_main:
            tidy_folder(ckpt, os.path.join(run.out_dir, "metrics.jsonl"), None, run.log)
        return Position()
    check_same_tokenizer(state.get("tokenizer"), s.identity, path)
    saved_task = state.get("config", {}).get("train", {}).get("task")
    if saved_task != t.task:
        raise ConfigError(f"cannot resume {path}: it trains the {saved_task!r} task, this run {t.task!r}")
    try:
        s.model.load_state_dict(state["model"])
        load_optimizer_state(s.opt, state["opt"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot resume from {path}: its weights do not fit this run's model "
                          f"({' '.join(str(exc).split())[:200]})") from exc
    pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    if (int(state.get("world_size", run.world)), state["config"]["train"]["batch_size"]) != (run.world, t.batch_size):
        raise ConfigError(f"cannot resume {path}: it was written by {state.get('world_size')} process(es) x batch "
                          f"{state['config']['train']['batch_size']}, this run has {run.world} x {t.batch_size}")
    run.log(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch})")
    run.barrier("the start-up barrier")
    if run.is_main:
        tidy_folder(ckpt, os.path.join(run.out_dir, "metrics.jsonl"), pos.step, run.log)
    return pos


def _train(cfg, run, t0):
    from lgvq_fast.downstream.evaluate import evaluate_task
    from lgvq_fast.eval import finite_json

    t = cfg.train
    s = Setup(cfg, run)
    ckpt = CheckpointIO(run.out_dir, keep_last=t.keep_last)
    metrics_path = os.path.join(run.out_dir, "metrics.jsonl")
    pos = _resume(cfg, s, run, ckpt)
    if pos.step >= t.steps and has_summary(metrics_path, pos.step):
        run.log(f"the checkpoint is at step {pos.step}, at or past --steps {t.steps}: nothing to train")
        return {"step": pos.step, "nothing_to_train": True, "rank": run.rank}
    start_step = pos.step
    n_params = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    print0(f"downstream {t.task} over {cfg.data.tokenizer} ({s.identity['grid'][0]}x{s.identity['grid'][1]} codes, "
           f"K={s.identity['codebook_size']}): {n_params / 1e6:.2f}M parameters, {s.caches['train'].n} "
           f"train / {s.caches['val'].n} val images, {t.steps} steps x {t.batch_size} x {run.world} on {run.device}, "
           f"start-up {time.perf_counter() - t0:.1f}s")
    metrics = MetricsLog(metrics_path, enabled=run.is_main)
    if run.is_main:
        cfg.write_json(os.path.join(run.out_dir, "config.json"))
    guard = DivergenceGuard(run.device, pos.step, ckpt.latest_good if run.is_main else lambda: None)

    def save(reason):
        guard.check(pos.step)
        if run.is_main:
            run.log(f"checkpoint ({reason}): {ckpt.save(_state(cfg, s, pos, run), pos.step)}")
        run.barrier(f"the step-{pos.step} checkpoint barrier")

    def evaluate(final):
        result = evaluate_task(cfg, s, run, final=final, step=pos.step)
        metrics.write({"step": pos.step, **{f"eval/{k}": v for k, v in finite_json(result)[0].items()}})
        return result

    _loop(cfg, s, run, pos, metrics, guard, save, evaluate)
    if pos.step > start_step:
        save("signal" if run.stop.stop else "final")
    result = evaluate(final=True) if not run.stop.stop else {}
    summary = {"step": pos.step, "task": t.task, "eval": result, "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": run.stop.stop, "signal": run.stop.signum, "rank": run.rank,
               "model_sha256": state_sha256(s.model.state_dict())}
    metrics.write({"summary": finite_json(summary)[0]})
    metrics.close()
    print0(f"{t.task} at step {pos.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                                        if isinstance(v, float)) + f"; total {summary['wall_s']:.1f}s")
    run.barrier("the end-of-run barrier")
    return summary


def _loop(cfg, s, run, pos, metrics, guard, save, evaluate):
    t = cfg.train
    progress = progress_bar(t.steps, pos.step) if run.is_main and t.progress else None
    s.model.train()
    loss_sum, n_sum, t_log = torch.zeros((), device=run.device), 0, time.perf_counter()
    try:
        while pos.step < t.steps and not run.stop.stop:
            s.sampler.set_position(pos.epoch, pos.batch_in_epoch)
            for codes, text in s.loader:
                batch = make_batch(t.task, codes, s.vocab.encode_text(text)).to(run.device, non_blocking=True)
                torch.manual_seed(mix_seed(t.seed, run.rank, pos.step))  # dropout, null-prefix draws
                for group in s.opt.param_groups:
                    group["lr"] = s.lr_at(pos.step)
                with run.watch.collective(f"the gradient all-reduce of step {pos.step + 1} (DDP)"), s.autocast():
                    _, loss = s.fwd(**batch.inputs())
                s.opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.grad_clip)
                s.opt.step()
                pos.advance()
                guard.watch({"total": loss.detach()})
                loss_sum, n_sum = loss_sum + loss.detach().float(), n_sum + 1
                if progress is not None:
                    progress.update(1)
                if pos.step % t.log_every == 0 or pos.step == t.steps:
                    guard.check(pos.step)
                    row = {"step": pos.step, "epoch": pos.epoch, "lr": s.opt.param_groups[0]["lr"],
                           "loss": round(float(loss_sum) / n_sum, 6),
                           "seq_per_s": n_sum * t.batch_size * run.world / max(time.perf_counter() - t_log, 1e-9)}
                    metrics.write(row)
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss']:.3f}")
                    loss_sum, n_sum, t_log = torch.zeros((), device=run.device), 0, time.perf_counter()
                if run.world > 1:
                    run.sync(guard, pos.step)
                if t.eval_every and pos.step % t.eval_every == 0 and pos.step < t.steps:
                    evaluate(final=False)
                    s.model.train()
                if t.ckpt_every and pos.step % t.ckpt_every == 0 and pos.step < t.steps and not run.stop.stop:
                    save("periodic")
                if pos.step >= t.steps or run.stop.stop:
                    break
            else:
                pos.next_epoch()
    finally:
        if progress is not None:
            progress.close()


def main(argv=None):
    return train(build_config(make_parser(__doc__.split("\n\n")[0]).parse_args(argv)))


def cli(argv=None):
    summary = run_cli(main, "downstream/train.py", argv)
    if summary and summary.get("stopped_by_signal"):
        name = signal.Signals(summary["signal"]).name
        print0(f"stopped by {name} at step {summary['step']} after writing a checkpoint: continue with --resume auto")
        sys.exit(signal_status(summary["signal"]))
    return summary


if __name__ == "__main__":
    cli()
