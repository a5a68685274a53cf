"""NVTX ranges that cost nothing when profiling is not possible.

``nvtx_range(name, device)`` pushes a range only when the ``nvtx`` package imports and the work runs on a
CUDA device outside torch.compile's tracing; everywhere else it is a ``contextlib.nullcontext``.
"""
import contextlib

import torch

_NVTX = None
_CHECKED = False


def _nvtx_module():
    global _NVTX, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        try:
            import nvtx

            _NVTX = nvtx
        except ImportError:
            _NVTX = None
    return _NVTX


def nvtx_range(name: str, device):
    """Context manager annotating ``name`` for Nsight Systems; a no-op off CUDA, without ``nvtx``, and while
    torch.compile traces (the push and pop are calls it cannot trace: each would break the graph in two)."""
    if torch.device(device).type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    mod = _nvtx_module()
    if mod is None:
        return contextlib.nullcontext()
    return mod.annotate(name, domain="lgvq_fast")
