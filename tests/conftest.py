import os
import random
import zlib

import torch  # noqa: E402  (torch does not import triton at load)

# Both must be set before triton / lgvq_fast are imported: Triton reads
# TRITON_INTERPRET when its runtime loads, lgvq_fast._alloc reads the poison flag.
# Without a GPU the Triton kernels run in the CPU interpreter; with one they compile.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("LGVQ_FAST_POISON", "1")
# Tests check results, not tuning: one Triton autotune config per launch instead of compiling and timing every
# candidate for each new shape (minutes on a GPU). Export LGVQ_FAST_TRITON_AUTOTUNE=1 to test full autotuning.
os.environ.setdefault("LGVQ_FAST_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

# Every run draws fresh inputs; a failing run is replayed with LGVQ_FAST_TEST_SEED=<printed seed>.
SESSION_SEED = int(os.environ.get("LGVQ_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"lgvq_fast: LGVQ_FAST_TEST_SEED={SESSION_SEED} TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
