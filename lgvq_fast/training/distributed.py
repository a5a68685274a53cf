"""Process groups with bounded waits, and a one-line account of a peer that stalled.

``init_process_group`` gets ``train.dist_timeout`` (0: 300 s with gloo, 900 s with NCCL), so a rank stopped by
``kill -STOP`` or hung in I/O ends the others' collectives in minutes instead of torch's default 30.
:class:`PeerWatch` makes the resulting error readable: every rank writes a heartbeat (its clock and step) into
the rendezvous store from a daemon thread; when a collective fails, the rank names the collective it was in
and the ranks whose heartbeat went quiet.
"""
import contextlib
import datetime
import os
import re
import threading
import time

import torch
import torch.distributed as dist

from lgvq_fast.errors import PeerTimeout

DEFAULT_TIMEOUT_S = {"gloo": 300, "nccl": 900}
# what a collective raises when a peer does not answer or went away (gloo, NCCL, the TCP store)
_PEER_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe|peer", re.I)


def init_distributed(device_arg, timeout_s=0):
    """(rank, world_size, local_rank, device) from torchrun's environment; single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S[backend])
        dist.init_process_group(backend, timeout=timeout)
    return rank, world, local_rank, device


class PeerWatch:
    """Heartbeats in the process group's store, and :meth:`collective` to name what a rank waits in."""

    interval = 2.0

    def __init__(self, rank, world, timeout_s):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.step = 0
        self.what = None
        self.store = None
        self._done = threading.Event()
        if world > 1:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # a private helper: without it, timeouts are still reported, without rank names
                self.store = None
        if self.store is not None:
            self._beat()
            threading.Thread(target=self._run, name="lgvq-heartbeat", daemon=True).start()

    def _key(self, rank):
        return f"lgvq_fast/heartbeat/{rank}"

    def _beat(self):
        self.store.set(self._key(self.rank), f"{time.time():.3f} {self.step}")

    def _run(self):
        while not self._done.wait(self.interval):
            try:
                self._beat()
            except Exception:
                return

    def stop(self):
        self._done.set()

    @contextlib.contextmanager
    def collective(self, what):
        """Run a block that waits for every rank; a peer failure inside it becomes :class:`PeerTimeout`."""
        if self.world == 1:
            yield
            return
        self.what = what
        try:
            yield
        except RuntimeError as e:  # DistBackendError and DistError are RuntimeErrors
            if not _PEER_FAILURE.search(str(e)):
                raise
            raise PeerTimeout(self.explain(e)) from e
        finally:
            self.what = None

    def explain(self, error):
        first_line = " ".join(str(error).split())[:200]
        return (f"rank {self.rank}: {self.what} waited more than {self.timeout_s:.0f} s for another rank "
                f"({self._quiet_ranks()}); this rank stops without writing a checkpoint (the last one is kept). "
                f"Cause: {first_line}")

    def _quiet_ranks(self):
        if self.store is None:
            return "heartbeats not available"
        self._done.set()
        now, quiet = time.time(), []
        try:
            self.store.set_timeout(datetime.timedelta(seconds=5))
            for r in range(self.world):
                if r == self.rank:
                    continue
                if not self.store.check([self._key(r)]):
                    quiet.append(f"rank {r} never reported")
                    continue
                beat, step = self.store.get(self._key(r)).decode().split()
                age = now - float(beat)
                if age > 2 * self.interval:
                    quiet.append(f"rank {r} silent for {age:.0f} s at step {step}: stopped, hung or dead")
        except Exception as e:
            return f"the store did not answer ({type(e).__name__}): the rank hosting it (rank 0) may be the one"
        return "; ".join(quiet) if quiet else "every other rank's heartbeat is recent: one is slow or elsewhere"


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """``print`` on rank 0 only, flushed at once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_agree(flag, device, watch, what):
    """True on every rank when ``flag`` is true on any rank (one all-reduce under ``watch``)."""
    with watch.collective(what):
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
    return bool(t.item() > 0)
