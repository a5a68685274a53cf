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
import re
import shutil

import numpy as np
import torch

from lgvq_fast.training.errors import CheckpointWriteError


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
