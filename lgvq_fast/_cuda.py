"""Python glue of the compiled extension ``lgvq_fast._C`` (csrc/).

The extension does not link torch: these functions check the tensors, allocate
outputs and workspaces with torch, and pass raw pointers, sizes, dtype codes,
the device index and the current CUDA stream. The public ops in
``lgvq_fast.ops`` validate user input first and call these for ``impl="cuda"``.
``lgvq_fast._C`` is imported on first use, never at package import.
"""
import importlib

import torch

from lgvq_fast import _alloc
from lgvq_fast._backend import nn_fast_kernel

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
METRIC_CODES = {"l2": 0, "cos": 1}
# "scalar" is a plain fp32 loop on the GPU: an independent check for the tests. "fast_tma": fast mode's products
# through TMA loads and wgmma (sm_90, D <= _C.tma_max_dim()); "fast" runs it when LGVQ_FAST_NN_FAST_KERNEL=tma.
PRECISION_CODES = {"fast": 0, "exact": 1, "scalar": 2, "fast_tma": 3}
# As torch.nn.functional.normalize and lgvq_fast.reference.nearest_code.COS_EPS.
COS_EPS = 1e-12


def _ext():
    return importlib.import_module("lgvq_fast._C")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _check(op, name, t, dtypes, ndim, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {name} must be a CUDA tensor for impl='cuda', got a tensor on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other tensors are on {device}")
    if t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype in ({names}), got {_dtype_name(t.dtype)}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _row_stride(op, name, t):
    """Element stride between rows of a 2-D tensor whose rows are contiguous."""
    rows, cols = t.shape
    if cols > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have contiguous rows (stride 1 along the last dim), "
                         f"got strides {tuple(t.stride())}")
    if rows > 1 and t.stride(0) < cols:
        raise ValueError(f"{op}: {name} rows overlap (strides {tuple(t.stride())} for shape {tuple(t.shape)})")
    return t.stride(0) if rows > 1 else cols


def _check_contiguous(op, name, t):
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {tuple(t.stride())}")


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def nearest_code(z2d, codebook, metric="l2", precision="exact"):
    """``(indices int64 [N], distances fp32 [N])`` for ``z2d [N, D]`` and ``codebook [K, D]`` on one GPU.

    ``precision``: "exact" (split-bf16 tensor-core products), "fast" (bf16
    products), "fast_tma" (the same products through TMA loads and wgmma: sm_90,
    D <= 512; extra memory (N + K) * Dp * 2 bytes, Dp = ``_C.tma_padded_dim(D)``
    (16, 32, or D rounded up to 64), plus (N + K) floats) or "scalar" (fp32 FMA
    loop, for validation). "fast" runs "fast_tma" where it can when
    ``LGVQ_FAST_NN_FAST_KERNEL=tma``.
    """
    op = "nearest_code"
    _check(op, "z", z2d, tuple(DTYPE_CODES), 2)
    _check(op, "codebook", codebook, tuple(DTYPE_CODES), 2, device=z2d.device)
    N, D = z2d.shape
    K = codebook.shape[0]
    if D == 0:
        raise ValueError(f"{op}: z must have a non-empty last dim, got shape {tuple(z2d.shape)}")
    if codebook.shape[1] != D:
        raise ValueError(f"{op}: codebook must have shape [K, {D}] to match z, got {tuple(codebook.shape)}")
    if K == 0:
        raise ValueError(f"{op}: codebook must hold at least one code, got shape {tuple(codebook.shape)}")
    if metric not in METRIC_CODES:
        raise ValueError(f"{op}: metric must be one of {tuple(METRIC_CODES)}, got {metric!r}")
    if precision not in PRECISION_CODES:
        raise ValueError(f"{op}: precision must be one of {tuple(PRECISION_CODES)}, got {precision!r}")
    stride = _row_stride(op, "z", z2d)
    ext = _ext()
    device = z2d.device
    if (precision == "fast" and nn_fast_kernel(device) == "tma" and N < 2**31
            and ext.nearest_code_tma_supported(D, device.index)):
        precision = "fast_tma"  # beyond tma_max_dim() (or 2^31 rows) the mma.sync kernel runs
    if precision == "fast_tma" and not ext.nearest_code_tma_supported(D, device.index):
        raise RuntimeError(f"{op}: precision 'fast_tma' needs an sm_90 GPU and D <= {ext.tma_max_dim()}; "
                           f"{torch.cuda.get_device_name(device)}, D = {D}")
    tma = precision == "fast_tma"
    cb = codebook.to(torch.float32).contiguous()
    dp = ext.tma_padded_dim(D) if tma else ext.padded_dim(D)
    e_norm2 = torch.empty(K, dtype=torch.float32, device=device)
    e_hi = torch.empty((K, dp), dtype=torch.bfloat16, device=device) if precision != "scalar" else None
    e_lo = torch.empty((K, dp), dtype=torch.bfloat16, device=device) if precision == "exact" else None
    z_hi = torch.empty((N, dp), dtype=torch.bfloat16, device=device) if tma else None
    z_aux = torch.empty((N,), dtype=torch.float32, device=device) if tma else None
    indices = _alloc.empty((N,), torch.int64, device)
    distances = _alloc.empty((N,), torch.float32, device)
    ext.nearest_code(
        _ptr(z2d), DTYPE_CODES[z2d.dtype], N, D, stride, _ptr(cb), K, _ptr(e_hi), _ptr(e_lo), _ptr(e_norm2),
        _ptr(indices), _ptr(distances), METRIC_CODES[metric], PRECISION_CODES[precision], COS_EPS,
        device.index, _stream(device), _ptr(z_hi), _ptr(z_aux),
    )
    return indices, distances


def ema_update_(cluster_size, embed_avg, embed, z2d, indices, decay, eps):
    """In-place EMA codebook update on one GPU (deterministic; two kernel launches after a stable sort).

    ``cluster_size [K]``, ``embed_avg [K, D]`` fp32 and ``embed [K, D]`` fp32/bf16/fp16, contiguous;
    ``z2d [N, D]`` fp32/bf16/fp16 with contiguous rows; ``indices [N]`` int64/int32.
    Indices outside ``[0, K)`` are ignored.
    """
    op = "ema_update_"
    _check(op, "cluster_size", cluster_size, (torch.float32,), 1)
    device = cluster_size.device
    _check(op, "embed_avg", embed_avg, (torch.float32,), 2, device=device)
    _check(op, "embed", embed, tuple(DTYPE_CODES), 2, device=device)
    _check(op, "z", z2d, tuple(DTYPE_CODES), 2, device=device)
    _check(op, "indices", indices, (torch.int64, torch.int32), 1, device=device)
    K = cluster_size.shape[0]
    N, D = z2d.shape
    if K == 0:
        raise ValueError(f"{op}: cluster_size must hold at least one code, got shape {tuple(cluster_size.shape)}")
    if D == 0:
        raise ValueError(f"{op}: z must have a non-empty last dim, got shape {tuple(z2d.shape)}")
    if tuple(embed_avg.shape) != (K, D):
        raise ValueError(f"{op}: embed_avg must have shape {(K, D)}, got {tuple(embed_avg.shape)}")
    if tuple(embed.shape) != (K, D):
        raise ValueError(f"{op}: embed must have shape {(K, D)}, got {tuple(embed.shape)}")
    if indices.shape[0] != N:
        raise ValueError(f"{op}: indices must have shape ({N},) to match z, got {tuple(indices.shape)}")
    for name, t in (("cluster_size", cluster_size), ("embed_avg", embed_avg), ("embed", embed)):
        _check_contiguous(op, name, t)
    decay = float(decay)
    eps = float(eps)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay}")
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    stride = _row_stride(op, "z", z2d)
    ext = _ext()
    # A stable sort groups the rows of each code in row order; searchsorted gives
    # each code's segment, so the kernel sums every segment in a fixed order.
    sorted_idx, perm = torch.sort(indices, stable=True)
    codes = torch.arange(K + 1, dtype=sorted_idx.dtype, device=device)
    offsets = torch.searchsorted(sorted_idx, codes).to(torch.int64)
    ext.ema_update(
        _ptr(cluster_size), _ptr(embed_avg), _ptr(embed), DTYPE_CODES[embed.dtype], K, D,
        _ptr(z2d), DTYPE_CODES[z2d.dtype], N, stride, _ptr(perm), _ptr(offsets), decay, eps, device.index, _stream(device),
    )


def info():
    """Build facts of the extension (for tests and benchmark headers)."""
    ext = _ext()
    return {
        "compiled_archs": list(ext.compiled_archs()),
        "cuda_runtime_version": int(ext.cuda_runtime_version()),
        "module_file": ext.__file__,
    }
