"""How a training run ends: one exit status per kind of ending, so a scheduler can tell them apart.

=====  ==============================================================================================
0      the run finished (all ``--steps``)
1      an unexpected error (Python traceback)
2      a user error: bad configuration, missing or unreadable file, bad data (one ``error:`` line)
3      training diverged: a loss, parameter or optimizer state became NaN or inf (nothing written after it)
4      the output folder is in use by another run (its lock names the holder)
5      a peer process stalled or died: a collective waited longer than ``train.dist_timeout``
6      a checkpoint could not be written (disk full or another OS error; the earlier ones are kept)
128+N  stopped by signal N after writing a checkpoint (130 for Ctrl-C, 143 for SIGTERM)
=====  ==============================================================================================
"""


class RunError(Exception):
    """An ending of a run that the command line reports as one line with ``status``."""

    status = 1


class Diverged(RunError, FloatingPointError):
    status = 3


class FolderBusy(RunError):
    status = 4


class PeerTimeout(RunError):
    status = 5


class CheckpointWriteError(RunError):
    status = 6


def signal_status(signum):
    return 128 + int(signum)
