"""Public codebook EMA update: checks, backend choice, the ``lgvq_fast::ema_update_`` custom op.

``ema_update_(cluster_size, embed_avg, embed, z, indices, decay, eps, *, process_group=None,
deterministic=True, check_indices=True, impl="auto") -> None`` updates, in place,

    cluster_size = decay*cluster_size + (1-decay)*counts          counts[k] = #{n: indices[n] == k}
    embed_avg    = decay*embed_avg    + (1-decay)*sums            sums[k]   = sum of z[n] with indices[n] == k
    n = cluster_size.sum();  s = (cluster_size + eps) / (n + K*eps) * n;  embed = embed_avg / s[:, None]

Buffers: ``cluster_size [K]`` fp32, ``embed_avg [K, D]`` fp32, ``embed [K, D]`` fp32/bf16/fp16, all
contiguous (they are written in place). ``z [..., D]`` fp32/bf16/fp16 with any strides (accumulated in
fp32), ``indices`` int64/int32 of shape ``z.shape[:-1]`` with values in ``[0, K)``. An empty ``z``
(N = 0) still decays and renormalises. When ``n = 0`` (no code has received any row yet, e.g. zero
initial buffers and an empty first batch) every ``s`` is 0 and ``embed`` keeps its value, on every
backend, instead of becoming 0/0 = NaN.

``check_indices=True`` checks the index range with one min/max reduction; on a GPU that is a
device-to-host sync per call, so a caller that produced ``indices`` itself (e.g. from
``nearest_code``) can pass ``check_indices=False``. Out-of-range indices are then undefined behaviour.

Backends: ``reference`` (bincount/index_add_; on CUDA ``index_add_`` uses float atomics),
``triton`` (sort + two launches, bitwise deterministic; ``LGVQ_FAST_EMA_METHOD=scan`` picks the chunked
segmented-scan path of ``lgvq_fast.kernels.ema``, which does not serialise a code holding most rows;
``deterministic=False`` scatters with float atomics instead), ``cuda`` (``lgvq_fast._cuda.ema_update_``, needs the compiled extension; it
ignores ``deterministic``). ``auto`` = cuda -> triton -> reference on CUDA tensors, reference elsewhere.

``process_group`` (a ``torch.distributed`` ProcessGroup): counts and sums are all-reduced (SUM)
across the group before the decay, so every rank ends with the same buffers, equal to a
single-process update on the concatenated data. That path runs eagerly as three stages (counts and
sums, all-reduce, finish) outside the custom op; with ``impl="cuda"`` the two local stages run on
the Triton kernels (the reference where triton is missing), because the compiled kernel has no
point at which to all-reduce.
"""
import numbers

import torch

from lgvq_fast._backend import resolve_impl, triton_available
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from lgvq_fast.reference import ema as _ref

INDEX_DTYPES = (torch.int64, torch.int32)


@torch.library.custom_op("lgvq_fast::ema_update_", mutates_args=("cluster_size", "embed_avg", "embed"))
def _ema_update_op(
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    embed: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    eps: float,
    deterministic: bool,
    impl: str,
) -> None:
    if impl == "triton":
        from lgvq_fast.kernels.ema import ema_update_fwd

        ema_update_fwd(cluster_size, embed_avg, embed, z, indices, decay, eps, deterministic)
    elif impl == "cuda":
        from lgvq_fast import _cuda

        _cuda.ema_update_(cluster_size, embed_avg, embed, z, indices, decay, eps)
    else:
        _ref.ema_update_(cluster_size, embed_avg, embed, z, indices, decay, eps)


@_ema_update_op.register_fake
def _(cluster_size, embed_avg, embed, z, indices, decay, eps, deterministic, impl):
    return None


def _check_number(op, name, value, lo, hi, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{op}: {name} must be in {bounds}, got {value}")
    return value


def _check(cluster_size, embed_avg, embed, z, indices, decay, eps, check_indices):
    op = "ema_update_"
    check_tensor(op, "cluster_size", cluster_size, dtypes=(torch.float32,), ndim=1)
    check_tensor(op, "embed_avg", embed_avg, dtypes=(torch.float32,), ndim=2)
    check_tensor(op, "embed", embed, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "z", z, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(op, "indices", indices, dtypes=INDEX_DTYPES)
    check_same_device(op, cluster_size=cluster_size, embed_avg=embed_avg, embed=embed, z=z, indices=indices)
    K = cluster_size.shape[0]
    if K == 0:
        raise ValueError(f"{op}: cluster_size is empty (K=0); the codebook needs at least one code")
    D = embed_avg.shape[1]
    if embed_avg.shape[0] != K:
        raise ValueError(f"{op}: embed_avg has shape {tuple(embed_avg.shape)}, expected [{K}, D] (K from cluster_size)")
    if tuple(embed.shape) != tuple(embed_avg.shape):
        raise ValueError(
            f"{op}: embed has shape {tuple(embed.shape)}, expected {tuple(embed_avg.shape)} like embed_avg"
        )
    if D == 0:
        raise ValueError(f"{op}: embed_avg has D=0; code vectors need at least one component")
    for name, t in (("cluster_size", cluster_size), ("embed_avg", embed_avg), ("embed", embed)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place), got strides {t.stride()}")
    if z.shape[-1] != D:
        raise ValueError(f"{op}: z has D={z.shape[-1]} but embed_avg has D={D}")
    if tuple(indices.shape) != tuple(z.shape[:-1]):
        raise ValueError(
            f"{op}: indices has shape {tuple(indices.shape)}, expected z.shape[:-1] = {tuple(z.shape[:-1])}"
        )
    decay = _check_number(op, "decay", decay, 0.0, 1.0)
    eps = _check_number(op, "eps", eps, 0.0, float("inf"), lo_open=True)
    if check_indices and indices.numel():
        lo, hi = torch.aminmax(indices)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= K:
            raise ValueError(f"{op}: indices out of range [0, {K}): min={lo}, max={hi}")
    return decay, eps


def _staged_update(cluster_size, embed_avg, embed, z2d, idx, decay, eps, deterministic, backend, process_group):
    import torch.distributed as dist

    K = cluster_size.shape[0]
    if backend == "cuda":
        backend = "triton" if triton_available() else "reference"
    if backend == "triton":
        from lgvq_fast.kernels import ema as _tri

        counts, sums = _tri.ema_counts_sums(z2d, idx, K, deterministic)
    else:
        counts, sums = _ref.ema_counts_sums(z2d, idx, K, dtype=torch.float32)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    if backend == "triton":
        _tri.ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)
    else:
        _ref.ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)


def ema_update_(
    cluster_size,
    embed_avg,
    embed,
    z,
    indices,
    decay,
    eps,
    *,
    process_group=None,
    deterministic=True,
    check_indices=True,
    impl="auto",
):
    """EMA codebook update in place; see the module docstring. Returns None.

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when an explicit
    ``impl`` cannot run here.
    """
    decay, eps = _check(cluster_size, embed_avg, embed, z, indices, decay, eps, check_indices)
    backend = resolve_impl("ema_update_", impl, z.device)
    D = embed_avg.shape[1]
    z2d = z.detach().reshape(-1, D).contiguous()
    if not torch.compiler.is_compiling() and z2d.untyped_storage().data_ptr() in {
            t.untyped_storage().data_ptr() for t in (cluster_size, embed_avg, embed)}:
        # z shares memory with a buffer the update writes (e.g. z is the codebook itself): read a copy, or the
        # kernels would read rows other programs have already updated
        z2d = z2d.clone()
    idx = indices.reshape(-1).contiguous()
    if process_group is not None:
        _staged_update(
            cluster_size, embed_avg, embed, z2d, idx, decay, eps, bool(deterministic), backend, process_group
        )
        return None
    _ema_update_op(cluster_size, embed_avg, embed, z2d, idx, decay, eps, bool(deterministic), backend)
    return None
