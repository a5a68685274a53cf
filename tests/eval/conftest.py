import pytest


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    # These tests exercise the training and evaluation code, not the kernels: the ops' PyTorch path, as a CPU user
    # gets it, instead of the Triton interpreter (several times slower); errors as one line.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
