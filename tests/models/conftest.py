"""Fixtures of the model tests."""
import pytest
import torch

from lgvq_fast.models import TextEncoder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the shapes here are tiny: intra-op threads only add overhead, and a lot of it on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder.tiny_random(vocab_size=101, hidden=48, layers=2, seed=1, max_len=13)
