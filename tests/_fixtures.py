"""Fixtures shared by test folders (imported into their conftest.py or test module)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: intra-op threads only add overhead, and a lot of it on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
