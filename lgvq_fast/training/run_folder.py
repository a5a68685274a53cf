"""One writer per output folder, and no orphan writers.

:class:`RunLock` is an exclusive ``fcntl.flock`` on ``<out>/.lock``, taken by rank 0 before anything in the
folder is touched. The kernel drops a flock when its holder dies (even by ``kill -9``), so a lock is never
stale while a process holds it; the file keeps the holder's pid, host and start time for the message a second
run prints, and a run that finds the file left by a process that is gone says so and takes it over.

:class:`ParentWatch` stops a torchrun worker whose launcher died: ``kill -9`` of torchrun leaves its workers
running (re-parented), and an orphan would go on writing checkpoints into a folder the user already resumed in.

:class:`RunContext` holds both for a run, with its :class:`StopFlag` (SIGTERM/SIGINT) and the
:class:`~lgvq_fast.training.distributed.PeerWatch` of its collectives; :func:`tidy_folder` moves an earlier
run's checkpoints aside instead of overwriting them.
"""
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from lgvq_fast.errors import FolderBusy
from lgvq_fast.training.distributed import DEFAULT_TIMEOUT_S, PeerWatch, print0


class RunLock:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, ".lock")
        self.fd = None

    def acquire(self):
        """Take the lock or raise :class:`FolderBusy` naming the holder. Returns a warning line when the file was
        left by a process that is gone (killed), else None."""
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise FolderBusy(f"{self.out_dir} is in use by another run ({holder}); wait for it to end, stop it, or "
                             "pick another --out") from None
        previous = _read(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:
            return f"warning: took over the lock of {self.out_dir} left by {_describe(previous)}, which ended " \
                   "without releasing it"
        return None

    def release(self):
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _read(fd):
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder):
    if not holder or "pid" not in holder:
        return "holder unknown"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


class ParentWatch:
    """Calls ``on_orphaned()`` once, from a daemon thread, when this process's parent changes (the launcher
    died and the process was re-parented). Polls ``os.getppid()`` every ``interval`` seconds."""

    def __init__(self, on_orphaned, interval=1.0):
        self.parent = os.getppid()
        self.on_orphaned = on_orphaned
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lgvq-parent-watch", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self.interval):
            if os.getppid() != self.parent:
                self.on_orphaned(self.parent)
                return

    def stop(self):
        self._done.set()


def trim_metrics(path, step):
    """Drop the rows of ``metrics.jsonl`` logged after ``step`` (by a run killed after its last checkpoint), so
    a run resumed at ``step`` does not repeat them. Atomic rewrite; returns how many rows were dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1  # a line cut short by the kill
                continue
            row_step = row.get("step", (row.get("summary") or {}).get("step"))
            if row_step is not None and row_step > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def has_summary(path, step):
    """True when ``metrics.jsonl`` holds the end-of-run summary of ``step``."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                summary = json.loads(line).get("summary")
            except ValueError:
                continue
            if summary and summary.get("step") == step:
                return True
    return False


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


class RunContext:
    """A run's processes and folder: ``rank``, ``world``, ``device``, ``out_dir``, the folder's lock (rank 0),
    ``stop`` (:class:`StopFlag`), ``watch`` (the collectives' :class:`PeerWatch`) and, under torchrun, the
    launcher watch. ``with RunContext(...) as run:`` takes the lock (every rank stops with
    :class:`~lgvq_fast.errors.FolderBusy` when another run holds it); leaving releases everything and ends the
    process group."""

    def __init__(self, out_dir, rank, world, device, dist_timeout=0):
        self.out_dir, self.rank, self.world, self.device = out_dir, rank, world, device
        self.is_main = rank == 0
        self.timeout = dist_timeout or DEFAULT_TIMEOUT_S["nccl" if device.type == "cuda" else "gloo"]
        self.log = print0

    def __enter__(self):
        self.lock = lock_run_folder(self.out_dir, self.rank, self.world, self.device)
        self.stop = StopFlag()
        self.watch = PeerWatch(self.rank, self.world, self.timeout)
        # torchrun's workers outlive a launcher killed with -9: such an orphan stops (with a checkpoint) instead of
        # writing on into a folder its user may already have resumed in
        self.parent = ParentWatch(self.stop.orphaned) if "TORCHELASTIC_RUN_ID" in os.environ else None
        return self

    def __exit__(self, *exc):
        self.watch.stop()
        if self.parent is not None:
            self.parent.stop()
        if self.lock is not None:
            self.lock.release()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        return False

    def sync(self, guard, step):
        """Several processes, after each step: agree on the stop flag and on the divergence flag of ``guard`` (one
        all-reduce, so every rank stops at the same step), then check the guard."""
        with self.watch.collective(f"the stop-flag all-reduce of step {step}"):
            flag = torch.stack([torch.tensor(float(self.stop.stop), device=self.device), guard.flag.float()])
            dist.all_reduce(flag)
            self.stop.stop = bool(flag[0].item() > 0)
        guard.flag.fill_(bool(flag[1].item() > 0))
        guard.check(step)

    def barrier(self, what):
        """Wait for every rank (several processes; nothing with one), naming ``what`` if a peer stalls."""
        if self.world > 1:
            with self.watch.collective(what):
                dist.barrier()


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


def tidy_folder(ckpt, metrics_path, resumed_step, log=print0):
    """Rank 0, before the first step: checkpoints of another run (``resumed_step`` None), or of steps after the
    one resumed from, are moved aside to ``checkpoints/earlier_<k>/``, not overwritten or pruned (keep_last only
    ever removes this run's older checkpoints); a fresh run's old ``metrics.jsonl`` goes with them, a resumed
    run's drops the rows logged after ``resumed_step``."""
    moved = ckpt.archive(after_step=-1 if resumed_step is None else resumed_step)
    if moved is not None:
        if resumed_step is None and os.path.exists(metrics_path):
            os.replace(metrics_path, os.path.join(moved, "metrics.jsonl"))
        what = f"after step {resumed_step}" if resumed_step is not None else "of an earlier run"
        log(f"warning: {ckpt.dir} held checkpoints {what}; moved them to {moved} (--resume auto continues "
            "the latest run in a folder)")
    if resumed_step is not None:
        dropped = trim_metrics(metrics_path, resumed_step)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} row(s) logged after step {resumed_step} by the interrupted run")
