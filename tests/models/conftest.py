"""Fixtures of the model tests."""
import pytest
from _fixtures import one_thread  # noqa: F401 (autouse)

from lgvq_fast.models import TextEncoder


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder.tiny_random(vocab_size=101, hidden=48, layers=2, seed=1, max_len=13)
