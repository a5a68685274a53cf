"""Backend discovery and the `impl=` contract shared by every op.

Nothing optional is imported at module load: triton and the compiled extension
``lgvq_fast._C`` are probed the first time an op asks for them.
"""
import functools
import importlib
import os

import torch

IMPLS = ("auto", "reference", "triton", "cuda")


def env_flag(name, default=False):
    """A boolean environment switch: unset gives ``default``; ``""`` and ``"0"`` are off, anything else on."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error():
    """Return None when triton imports, else the reason it does not."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


# torch.compile calls these once while tracing and keeps the answer (tracing into importlib is not allowed)
@torch.compiler.assume_constant_result
def triton_available():
    return triton_import_error() is None


NN_FAST_KERNELS = ("auto", "tiles", "tma")


def nn_fast_kernel(device):
    """Which kernels run ``nearest_code(..., precision="fast")``: ``LGVQ_FAST_NN_FAST_KERNEL`` = ``tiles`` (the
    Triton tile kernel, the CUDA mma.sync kernel), ``tma`` (bf16 copies read through TMA descriptors: Triton's
    ``nearest_code_tma``, and the CUDA extension's wgmma kernel; sm_90 or newer, or the CPU interpreter) or
    ``auto`` (default: ``tiles``, until GPU timings of both in ``bench/nn_search.py`` choose)."""
    choice = os.environ.get("LGVQ_FAST_NN_FAST_KERNEL", "auto").strip().lower() or "auto"
    if choice not in NN_FAST_KERNELS:
        raise ValueError(f"LGVQ_FAST_NN_FAST_KERNEL must be one of {NN_FAST_KERNELS}, got {choice!r}")
    if choice == "tma" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"LGVQ_FAST_NN_FAST_KERNEL=tma needs TMA (sm_90 or newer); {name} has none. "
                           "Unset it or use 'tiles'.")
    return "tma" if choice == "tma" else "tiles"


NN_EXACT_KERNELS = ("auto", "split", "certified")


def nn_exact_kernel():
    """Which kernels run ``nearest_code(..., precision="exact")`` on the GPU backends:
    ``LGVQ_FAST_NN_EXACT_KERNEL`` = ``split`` (split-precision products: Triton ``tf32x3``, the CUDA kernel's
    own), ``certified`` (``kernels/nearest_code_certified.py``: one fp16 pass with a rigorous error bound,
    float64 for the rows it cannot prove; Triton kernels, used by both ``impl="triton"`` and ``impl="cuda"``)
    or ``auto`` (default: ``split``, until GPU timings in ``bench/nn_search.py`` choose)."""
    choice = os.environ.get("LGVQ_FAST_NN_EXACT_KERNEL", "auto").strip().lower() or "auto"
    if choice not in NN_EXACT_KERNELS:
        raise ValueError(f"LGVQ_FAST_NN_EXACT_KERNEL must be one of {NN_EXACT_KERNELS}, got {choice!r}")
    return "certified" if choice == "certified" else "split"


def triton_interpret():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return env_flag("TRITON_INTERPRET")


@functools.lru_cache(maxsize=None)
def cuda_ext_import_error():
    """Return None when the compiled extension lgvq_fast._C imports, else why not."""
    if env_flag("LGVQ_FAST_DISABLE_CUDA_EXT"):
        return "disabled by LGVQ_FAST_DISABLE_CUDA_EXT"
    try:
        importlib.import_module("lgvq_fast._C")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@torch.compiler.assume_constant_result
def cuda_ext_available():
    return cuda_ext_import_error() is None


def resolve_impl(op, impl, device):
    """Map ``impl`` to the backend that will run ``op`` on ``device``.

    ``auto`` picks cuda -> triton -> reference by availability and device. An
    explicit choice that cannot run raises and says why; nothing falls back
    silently.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda":
            if cuda_ext_available():
                return "cuda"
            if triton_available():
                return "triton"
        return "reference"
    if impl == "reference":
        return impl
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' needs triton, which failed to import ({triton_import_error()})")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"got tensors on {device}"
            )
        return impl
    if not cuda_ext_available():
        raise RuntimeError(f"{op}: impl='cuda' needs the compiled extension lgvq_fast._C ({cuda_ext_import_error()})")
    if device.type != "cuda":
        raise RuntimeError(f"{op}: impl='cuda' needs CUDA tensors; got tensors on {device}")
    return impl


def resolve_no_cuda_kernel(op, impl, device, kernel):
    """``resolve_impl`` for an op with Triton and reference backends only: ``impl="cuda"`` raises (the compiled
    extension has no ``kernel`` kernel) and ``auto`` on CUDA picks triton when it imports, else the reference."""
    if impl == "cuda":
        raise RuntimeError(f"{op}: impl='cuda' is not available: the compiled extension has no {kernel} kernel; "
                           "use impl='triton' (or 'auto')")
    backend = resolve_impl(op, impl, device)
    if backend == "cuda":
        backend = "triton" if triton_available() else "reference"
    return backend
