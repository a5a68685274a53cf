"""Checkpoints that are atomic, finite and verified.

* Atomic: written to a temp file in the same folder, fsynced, renamed (``os.replace`` is atomic on POSIX), so
  a crash leaves the previous checkpoints intact and never a partial file under a checkpoint name.
* Finite: :func:`nonfinite_entries` checks every floating tensor of the model and optimizer state with one
  max-abs reduction per dtype group and a single host read; the trainer refuses to save a non-finite state.
* Verified: each checkpoint carries ``checksum``, a SHA-256 of its whole payload (every tensor's bytes, every
  other value's repr), recomputed by :meth:`CheckpointIO.load`; a file that fails it, or holds non-finite
  weights, is refused like an unreadable one (``--resume auto`` then takes the one before it).
"""
import glob
import hashlib
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from lgvq_fast.errors import CheckpointWriteError, ConfigError
from lgvq_fast.training.distributed import all_agree
from lgvq_fast.training.run_folder import has_summary, tidy_folder


def payload_digest(obj):
    """SHA-256 hex digest of a checkpoint payload: nested dicts, lists and tuples of tensors, arrays and plain
    values. Equal for a state and its ``torch.save``/``torch.load`` round trip on any device."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj):
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, bytes):
        h.update(b"B" + obj)
    else:
        h.update(f"V{obj!r}".encode())


def _tensors(obj, prefix=""):
    """(name, tensor) of every tensor in a nested payload."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}")


def _to_cpu(obj, _copies=None):
    """``obj`` with every tensor in it on the CPU (containers rebuilt, other values shared). A tensor that appears
    twice (tied weights) is copied once, so the file keeps one storage for it as torch.save would."""
    copies = {} if _copies is None else _copies
    if torch.is_tensor(obj):
        if id(obj) not in copies:
            copies[id(obj)] = obj.detach().cpu()
        return copies[id(obj)]
    if isinstance(obj, dict):
        return {k: _to_cpu(v, copies) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v, copies) for v in obj]
    if isinstance(obj, tuple):
        items = [_to_cpu(v, copies) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def nonfinite_entries(payload, limit=3):
    """Names of up to ``limit`` floating tensors of ``payload`` holding NaN or inf; ``[]`` when all are finite.

    One max-abs reduction per (device, dtype) group (``torch._foreach_norm`` with ord=inf: a NaN propagates, an
    inf stays inf, and unlike an L2 norm it never overflows) and one host read for the whole state; only a state
    that fails is searched tensor by tensor for the culprits."""
    groups = {}
    for name, t in _tensors(payload):
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append((name, t))
    if not groups:
        return []
    # one flag per device, read together: a single host read when the state lives on one device
    finite = {}
    for (device, _), g in groups.items():
        maxima = torch.stack(torch._foreach_norm([t.detach() for _, t in g], float("inf")))
        ok = torch.isfinite(maxima).all()
        finite[device] = ok if device not in finite else finite[device] & ok
    if bool(torch.stack([ok.cpu() for ok in finite.values()]).all()):
        return []
    bad = [name for g in groups.values() for name, t in g if not bool(torch.isfinite(t).all())]
    return bad[:limit]


class _RecordingFile:
    """A binary file whose ``write`` keeps the first OSError: ``torch.save`` reports a failed write as a
    RuntimeError from its zip writer ("unexpected pos ..."), burying the cause (ENOSPC)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


class CheckpointIO:
    """``out/checkpoints/step_<7-digit step>.pt``: atomic, checksummed, pruned to ``keep_last``.

    ``keep_last`` prunes only checkpoints older than the one just written; checkpoints of another run (a fresh
    start in a used folder, or the later steps of a run resumed from an earlier checkpoint) are first moved
    aside by :meth:`archive`, never deleted.
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

    def latest_good(self):
        """The newest checkpoint that reads, passes its checksum and holds finite weights, or None."""
        for path in reversed(self.all()):
            try:
                self.load(path)
                return path
            except ValueError:
                continue
        return None

    def remove_stale_temps(self):
        """Delete temp files (``step_*.pt.tmp<pid>``) of writes killed mid-way; call only while holding the
        folder's lock (no other writer). Returns their names."""
        stale = sorted(glob.glob(os.path.join(self.dir, "step_*.pt.tmp*")))
        for p in stale:
            os.remove(p)
        return [os.path.basename(p) for p in stale]

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
        """Write ``state`` (plus its ``checksum``) as the checkpoint of ``step``; returns its path.

        A failed write (disk full, or any OSError) removes the temp file, keeps every earlier checkpoint and raises
        :class:`CheckpointWriteError` naming the folder, the cause and the space the checkpoint needs."""
        # one device-to-host copy of every tensor, shared by the digest and torch.save (each would copy it)
        state = _to_cpu({k: v for k, v in state.items() if k != "checksum"})
        state["checksum"] = payload_digest(state)
        need = sum(t.numel() * t.element_size() for _, t in _tensors(state))
        path = self.path(step)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(tmp, "wb") as raw:
                f = _RecordingFile(raw)
                try:
                    torch.save(state, f)
                except RuntimeError as e:
                    raise (f.error or e)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise CheckpointWriteError(self._write_failure(path, e, need)) from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.keep_last:
            older = [p for s, p in self._steps() if s < step]
            for old in older[:max(0, len(older) - (self.keep_last - 1))]:
                os.remove(old)
        return path

    def _write_failure(self, path, error, need):
        cause = error.strerror or str(error)
        folder = self.dir if os.path.isdir(self.dir) else os.path.dirname(self.dir)
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free"
        except OSError:
            free = "free space unknown"
        return (f"cannot write checkpoint {path}: {cause} (the checkpoint needs about {need / 2**20:.0f} MB, "
                f"{free} in {folder}); the earlier checkpoints are kept: free space (or pick another --out) and "
                "resume with --resume auto")

    @staticmethod
    def load(path, device="cpu"):
        """The checkpoint at ``path``; ValueError naming the file when it cannot be read, is not a training
        checkpoint, fails its checksum or holds non-finite weights."""
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
        expected = state.get("checksum")
        if expected is not None and payload_digest({k: v for k, v in state.items() if k != "checksum"}) != expected:
            raise ValueError(f"checkpoint {path} fails its checksum: the file is corrupted")
        bad = nonfinite_entries({k: state.get(k) for k in ("model", "discriminator", "opt_g", "opt_d")})
        if bad:
            raise ValueError(f"checkpoint {path} holds non-finite values ({', '.join(bad)})")
        return state


# ------------------------------------------------------------------------------------------------------------
# What a checkpoint holds beyond the weights: the position in the data, the RNG state, the optimizer moments.

@dataclass
class Position:
    """Where a run is: optimizer steps done, and the batch of the current epoch it continues at."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def advance(self):
        self.step += 1
        self.batch_in_epoch += 1

    def next_epoch(self):
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0


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


def seed_or_restore_rng(run, seed, saved=None):
    """Before the first step: the RNG states ``saved`` by the run resumed from (this rank's, or rank 0's when the
    run had fewer processes), else the fresh seed ``seed + rank``. ``run``: the run's context."""
    if saved is not None:
        restore_rng(saved[run.rank] if run.rank < len(saved) else saved[0], run.device)
    else:
        torch.manual_seed(seed + run.rank)


def gather_rng(device, world):
    """RNG state of every rank (rank order), so a resumed multi-process run continues each rank's stream."""
    mine = capture_rng(device)
    if world == 1:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


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


def state_sha256(state_dict):
    """Digest of every tensor of a state dict: equal digests mean bit-identical weights and buffers."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def text_encoder_change(saved_sha256, sha256, path):
    """The warning line when the checkpoint at ``path`` was trained against other frozen text-encoder weights than
    ``sha256`` (``state_sha256`` of this run's encoder), else None. The encoder's weights are not in a checkpoint:
    it is rebuilt from ``model.text_encoder``, a name or a folder whose contents can change under the same name.
    Checkpoints written before the digest was recorded (``saved_sha256`` None) are not compared."""
    if not saved_sha256 or not sha256 or saved_sha256 == sha256:
        return None
    return (f"warning: {path} was trained with other text-encoder weights (sha256 {saved_sha256[:12]}, now "
            f"{sha256[:12]}): the text features its alignment heads were fitted to have changed")


# settings that may change on resume without changing what is trained
RESUME_NEUTRAL = {"train.steps", "train.out", "train.resume", "train.ckpt_every", "train.keep_last",
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
            # with a cosine schedule the run's length shapes the learning-rate curve
            neutral = name in RESUME_NEUTRAL and not (name == "train.steps" and
                                                      (now.get("train") or {}).get("lr_schedule") == "cosine")
            if not neutral and va != vb:
                out.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def load_resume_state(ckpt, resume, device, log=print):
    """``(path, state)`` of the checkpoint ``resume`` names (``"auto"``: the latest readable one in the run's
    folder, falling back to older ones past an unreadable file; ``(None, None)`` when there is none)."""
    if resume != "auto":
        return resume, ckpt.load(resume, device)
    candidates = list(reversed(ckpt.all()))
    for path in candidates:
        try:
            return path, ckpt.load(path, device)
        except ValueError as e:
            log(f"warning: {e}; trying the checkpoint before it")
    if candidates:
        raise ValueError(f"--resume auto: none of the {len(candidates)} checkpoints in {ckpt.dir} can be read")
    return None, None


def resume_from(state, path, cfg_dict, nets, batches_per_epoch, world, log=print, text_sha256=None):
    """Load a checkpoint's weights and optimizer moments into ``nets`` (``model``, ``discriminator``, ``opt_g``,
    ``opt_d``: this run's objects) and return the :class:`Position` to continue at. ``cfg_dict``: this run's
    config as a dict. A changed number of processes or batch size keeps the position in the epoch in images.
    ``text_sha256``: this run's text-encoder digest, compared with the one the checkpoint recorded (a warning)."""
    t = cfg_dict["train"]
    try:
        nets["model"].load_state_dict(state["model"])
        nets["discriminator"].load_state_dict(state["discriminator"])
        for key in ("opt_g", "opt_d"):
            load_optimizer_state(nets[key], state[key])
    except (RuntimeError, ValueError, KeyError) as e:
        changed = config_changes(state.get("config"), cfg_dict, sections=("model",))
        why = f"its model settings differ: {'; '.join(changed)}" if changed else f"{type(e).__name__}: {e}"
        raise ConfigError(f"cannot resume from {path}: the weights do not fit this run's model ({why})") from e
    pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    other_text = text_encoder_change(state.get("text_encoder_sha256"), text_sha256, path)
    if other_text:
        log(other_text)
    changed = config_changes(state.get("config"), cfg_dict)
    if changed:
        log(f"warning: resuming {path} with changed settings ({'; '.join(changed)}): the run continues "
            "but does not repeat the uninterrupted one")
    saved_world = int(state.get("world_size", world))
    saved_batch = int(state.get("config", {}).get("train", {}).get("batch_size", t["batch_size"]))
    if (saved_world, saved_batch) != (world, t["batch_size"]):
        # Keep the position in the epoch in images, not batches: continue at the first global batch
        # of the new size not fully seen (at most one batch of images is seen twice).
        seen = pos.batch_in_epoch * saved_world * saved_batch
        pos.batch_in_epoch = seen // (world * t["batch_size"])
        if pos.batch_in_epoch >= batches_per_epoch:
            pos.next_epoch()
        log(f"warning: {path} was written by {saved_world} process(es) x batch {saved_batch}, this run "
            f"has {world} x {t['batch_size']}: it continues at step {pos.step} after {seen} images of epoch "
            f"{state['epoch']}, but its data order differs from an uninterrupted run")
    log(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch})")
    return pos


def save_checkpoint(ckpt, nets, pos, cfg_dict, usage, run, guard, reason, text_sha256=None):
    """Write the run's checkpoint at ``pos`` (rank 0; ``ckpt`` is None on the other ranks), after checking that
    no loss went non-finite since the last check and that the whole model and optimizer state is finite (else
    :class:`~lgvq_fast.errors.Diverged`, nothing written). Every rank contributes its RNG state; a failed write
    on rank 0 stops every rank with :class:`CheckpointWriteError`. ``run``: the run's context (device, world,
    watch, log). ``text_sha256``: the digest of the frozen text encoder's weights, recorded for resume and eval."""
    guard.check(pos.step)
    state = {"model": nets["model"].state_dict(), "discriminator": nets["discriminator"].state_dict(),
             "opt_g": nets["opt_g"].state_dict(), "opt_d": nets["opt_d"].state_dict(), "step": pos.step,
             "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch, "config": cfg_dict, "world_size": run.world,
             "code_usage": usage, "text_encoder_sha256": text_sha256}
    # a loss can be finite while the update it drove left NaN weights or moments (a corrupt Adam state):
    # check the whole state, one reduction per dtype and one host read
    bad = nonfinite_entries({k: state[k] for k in ("model", "discriminator", "opt_g", "opt_d")})
    if bad:
        raise guard.error(f"the model or optimizer state is not finite after step {pos.step} ({', '.join(bad)})")
    with run.watch.collective(f"the RNG gather of the step-{pos.step} checkpoint"):
        state["rng"] = gather_rng(run.device, run.world)
    failure = None
    if ckpt is not None:
        try:
            path = ckpt.save(state, pos.step)
            run.log(f"checkpoint ({reason}): {path}")
        except CheckpointWriteError as e:
            failure = e
    if run.world > 1:
        failed = all_agree(failure is not None, run.device, run.watch, f"the step-{pos.step} checkpoint barrier")
        if failure is None and failed:
            failure = CheckpointWriteError(f"rank 0 could not write the step-{pos.step} checkpoint")
    if failure is not None:
        raise failure


@dataclass
class Start:
    """Where a run starts: its :class:`Position`, the RNG states to restore (one per rank of the run resumed from;
    None for a fresh run), ``done`` (resumed at or past ``--steps`` with its summary written) and
    ``text_sha256``, the digest of the frozen text encoder's weights that this run's checkpoints record."""

    pos: Position
    rng: list | None = None
    done: bool = False
    text_sha256: str | None = None


def start_position(cfg, run, ckpt, nets, sampler, usage, metrics_path, text_encoder=None):
    """Resume (``train.resume``: a path or "auto") or start fresh, before the first step: loads the checkpoint into
    ``nets`` and ``usage``, and tidies the run's folder on rank 0 (temp files of cut-short writes removed, later or
    earlier runs' checkpoints moved aside: ``run_folder.tidy_folder``). ``run``: the run's context;
    ``text_encoder``: the run's frozen text encoder, whose digest is compared with the checkpoint's."""
    t = cfg.train
    if run.is_main:
        stale = ckpt.remove_stale_temps()
        if stale:
            run.log(f"removed {len(stale)} temp file(s) of checkpoint writes that were cut short: {', '.join(stale)}")
    path, state = load_resume_state(ckpt, t.resume, run.device, run.log) if t.resume else (None, None)
    if t.resume == "auto" and path is None:
        run.log(f"--resume auto: no checkpoint in {ckpt.dir}, starting from scratch")
    # the frozen text encoder is rebuilt from its name or folder, never saved: its digest goes into each checkpoint
    start = Start(Position(), text_sha256=None if text_encoder is None else state_sha256(text_encoder.state_dict()))
    if state is not None:
        start.pos = resume_from(state, path, cfg.to_dict(), nets, sampler.batches_per_epoch(), run.world, run.log,
                                start.text_sha256)
        start.rng = state["rng"] if start.pos.step > 0 else None
        if "code_usage" in state and state["code_usage"].shape == usage.shape:
            usage.copy_(state["code_usage"])
        if start.pos.step >= t.steps and has_summary(metrics_path, start.pos.step):
            run.log(f"{path} is at step {start.pos.step}, at or past --steps {t.steps}, and its summary is written: "
                    "nothing to train (no file written)")
            start.done = True
            return start
    run.barrier("the start-up barrier")  # every rank has read its checkpoint before rank 0 moves any aside
    if run.is_main:
        tidy_folder(ckpt, metrics_path, start.pos.step if state is not None else None, run.log)
    return start
