"""One writer per output folder, and no orphan writers.

:class:`RunLock` is an exclusive ``fcntl.flock`` on ``<out>/.lock``, taken by rank 0 before anything in the
folder is touched. The kernel drops a flock when its holder dies (even by ``kill -9``), so a lock is never
stale while a process holds it; the file keeps the holder's pid, host and start time for the message a second
run prints, and a run that finds the file left by a process that is gone says so and takes it over.

:class:`ParentWatch` stops a torchrun worker whose launcher died: ``kill -9`` of torchrun leaves its workers
running (re-parented), and an orphan would go on writing checkpoints into a folder the user already resumed in.
"""
import fcntl
import json
import os
import socket
import threading
import time

from lgvq_fast.training.errors import FolderBusy


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
