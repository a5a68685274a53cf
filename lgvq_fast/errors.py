"""Every error the command lines (``lgvq_fast/train.py``, ``python -m lgvq_fast.eval``) report as one line, and the
exit status of each kind of ending, so a scheduler can tell them apart.

=====  ==============================================================================================
0      the run finished (all ``--steps``)
1      an unexpected error (Python traceback)
2      a user error: bad configuration, missing or unreadable file, bad data (one ``error:`` line)
3      training diverged: a loss, parameter or optimizer state became NaN or inf (nothing written after it);
       for eval: the evaluated model gives NaN or inf metrics
4      the output folder is in use by another run (its lock names the holder)
5      a peer process stalled or died: a collective waited longer than ``train.dist_timeout``
6      a checkpoint could not be written (disk full or another OS error; the earlier ones are kept)
128+N  stopped by signal N after writing a checkpoint (130 for Ctrl-C, 143 for SIGTERM)
=====  ==============================================================================================

Status 2 covers every ``ValueError`` and ``OSError`` (their messages name the culprit); the classes below
with their own status derive from :class:`RunError`.
"""
import re
import sys


class UsageError(ValueError):
    """Bad input from the user of a command line (status 2)."""


class ConfigError(UsageError):
    """A bad command line or training configuration: the train CLI prints it as one line and exits with status 2."""


class EvalError(UsageError):
    """A user error of the eval command line (bad option, unreadable checkpoint, weights that do not fit, unreadable
    data): printed as one ``eval.py: error:`` line with exit status 2."""


class RunError(Exception):
    """An ending of a run that the command line reports as one line with ``status``."""

    status = 1


class Diverged(RunError, FloatingPointError):
    status = 3


class NonFiniteMetrics(RunError):
    """The evaluated model gives NaN or inf metrics: the JSON holds null for them and the exit status is 3."""

    status = 3


class FolderBusy(RunError):
    status = 4


class PeerTimeout(RunError):
    status = 5


class CheckpointWriteError(RunError):
    status = 6


def signal_status(signum):
    return 128 + int(signum)


def run_cli(main, prog, argv=None):
    """Run ``main(argv)`` for the command line: a bad configuration, a missing or unreadable file (data folder,
    image, caption file, text encoder folder, checkpoint) or a bad value -- every ``ValueError`` and ``OSError``,
    whose messages name the culprit -- is printed as one ``<prog>: error:`` line with exit status 2 instead of a
    traceback; a :class:`RunError` (divergence, a busy output folder, a stalled peer, a checkpoint that cannot be
    written, non-finite metrics) as one line with its own status. Set ``LGVQ_TRACEBACK=1`` to see the traceback.
    Every other exception propagates unchanged (status 1)."""
    from lgvq_fast._backend import env_flag

    try:
        return main(argv)
    except (RunError, ValueError, OSError) as e:
        if env_flag("LGVQ_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(e.status if isinstance(e, RunError) else 2)


def one_line_error(error):
    """The message of ``error`` on one line. An exception re-raised from a DataLoader worker carries the worker's
    whole traceback ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): keep only its
    last line, the cause, without the exception's type."""
    msg = str(error)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = re.sub(r"^[\w.]+(Error|Exception|Warning)?: ", "", last.strip())
    return " ".join(msg.split())
