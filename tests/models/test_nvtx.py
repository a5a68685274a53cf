"""NVTX ranges of the model (lgvq_fast.models._nvtx)."""
import contextlib
import types

import torch

from lgvq_fast.models import _nvtx
from lgvq_fast.models._nvtx import nvtx_range


def test_nvtx_range_is_noop_on_cpu():
    with nvtx_range("encoder", "cpu"):
        pass


def test_nvtx_range_on_cuda_pushes_except_while_compiling(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(annotate=lambda name, domain: calls.append((name, domain)) or contextlib.nullcontext())
    monkeypatch.setattr(_nvtx, "_NVTX", fake)
    monkeypatch.setattr(_nvtx, "_CHECKED", True)
    with nvtx_range("encoder", "cuda"):
        pass
    assert calls == [("encoder", "lgvq_fast")]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with nvtx_range("decoder", "cuda"):
        pass
    assert calls == [("encoder", "lgvq_fast")], "a range pushed while torch.compile traces breaks the graph"
