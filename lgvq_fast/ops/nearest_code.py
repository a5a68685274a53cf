"""Public nearest-code search: checks, backend choice, the ``lgvq_fast::nearest_code`` custom op.

``nearest_code(z, codebook, metric="l2", precision="exact", impl="auto")``
returns ``(indices, distances)`` for ``z [..., D]`` and ``codebook [K, D]``:
``indices`` int64 of shape ``z.shape[:-1]``, ``distances`` fp32 of the same
shape (squared L2, or ``1 - cosine similarity`` with vectors normalised as
``x / max(||x||, 1e-12)`` so zero vectors give distance 1, not NaN). Ties in the
computed distances go to the lowest index. Codes that are equal in exact arithmetic
(duplicate rows, or positive multiples under ``cos``) are only computed as ties when
the products are exact, as with small integers: a matrix product may round the same
dot product differently in different output columns, so among near-identical codes
any one of them can be returned (each is within fp32 rounding of the best).

Backends (``impl``): ``reference`` (chunked PyTorch, fp32 products, any device;
it ignores ``precision``), ``triton`` (fused kernel, CUDA or the CPU
interpreter), ``cuda`` (``lgvq_fast._cuda``, needs the compiled extension),
``auto`` = cuda -> triton -> reference on CUDA tensors, reference elsewhere.

Precision:
- ``exact``: the indices equal the argmin of float64 distances except where two
  codes are tied within fp32 rounding (Triton: split-precision ``tf32x3``
  products of fp32 operands).
  ``LGVQ_FAST_NN_EXACT_KERNEL=certified`` runs a stricter candidate for this mode
  instead (``lgvq_fast.kernels.nearest_code_certified``, Triton, for both GPU
  backends), measured on CPU only so far: float64's own argmin, from one fp16 pass
  that proves most rows with a rigorous error bound and float64 for the rest,
  without a host sync (``bench/nn_search.py`` row "triton exact certified";
  derivation in NOTES.md). The default (``auto``) stays the split-precision kernels
  until GPU timings choose.
- ``fast``: bf16 operands with fp32 accumulation; ``||e||^2``, ``||z||^2`` and
  the reported distance stay fp32. Measured mismatch rate against float64
  (tie-aware) in the Triton CPU interpreter, which performs the same bf16
  operand rounding: 0.2-0.3 % of rows for Gaussian z and codebook with N=2000,
  K=1000, D=77 or 256 (l2 and cos). A plain bf16 PyTorch search (bf16 output
  too) disagrees on 4-6 % at similar shapes. The GPU rate at real shapes is
  measured and printed by ``python bench/nn_search.py``. The reported distance
  is that of the chosen code with bf16-rounded products (relative error
  about 2^-8 of the summed magnitudes). ``LGVQ_FAST_NN_FAST_KERNEL`` picks the
  kernels: ``tiles`` (the default, ``auto``) rounds tiles to bf16 as it loads them
  (Triton) or stages them per block (CUDA, mma.sync); ``tma`` (sm_90) makes bf16
  copies of ``z`` and the codebook once per call and reads them through TMA:
  Triton's ``kernels/nearest_code_tma.py`` (``(N + K) * D * 2`` bytes, D rounded up
  to 8) and the extension's wgmma kernel ``csrc/nearest_code_sm90.cu`` (D padded
  to 16, 32 or a multiple of 64, D <= 512; beyond it the mma.sync kernel runs). Triton's TMA kernel may
  compare scores with their last 7 significand bits cleared (its packed
  reduction, NOTES.md), far below the bf16 rounding.

dtypes: ``z`` and ``codebook`` may be fp32, bf16 or fp16 (mixed is fine); they
are upcast to fp32 (exact) or rounded to bf16 (fast) inside the kernels.
float64 is rejected here; ``lgvq_fast.reference.nearest_code.nearest_code``
takes float64 inputs for testing.

Non-finite values and overflow -- one rule, the same on every backend and
precision, computed by the kernels' own compares (no check, no device sync):

- A score that is not finite never wins. Scores are ``||e||^2 - 2 z.e`` (l2) and
  ``-cos`` (cos), in fp32 (float64 in the reference for float64 inputs); NaN,
  +inf and -inf all lose to any finite score, and ties (among finite scores)
  go to the lowest index.
- So a code holding a NaN or an inf is never chosen, and a row of ``z`` holding
  a NaN or an inf has no finite score at all.
- A row with no finite score gets index 0 and distance NaN: a row holding NaN or
  inf, or every row when every code is excluded.
- ``cos`` takes norms without squaring into overflow (two sums of squares, of
  ``x`` and of ``x * 2^-64``), so norms of 1e19 and far beyond normalise
  correctly, as do norms below ``eps`` (clamped as documented above). A vector
  whose norm reaches 2^126 (about 8.5e37, a quarter of the fp32 range) counts as
  non-finite: such a code is never chosen, such a row gets index 0 and NaN.
- ``l2`` works on the values as given (its distance would overflow anyway): a
  code whose ``||e||^2`` overflows fp32 (``||e|| >~ 1.8e19``) scores +inf and is
  never chosen; a row whose ``||z||^2`` overflows still gets the argmin of its
  finite scores and distance +inf (the true distance is beyond fp32 too); a code
  whose ``2 z.e`` overflows (``||z|| ||e|| >~ 1.7e38``) scores +-inf and is not
  chosen.
- Near these thresholds backends may differ in which scores overflow, as they
  differ in rounding. Derivation and costs: ``NOTES.md`` beside this file.

Gradients: none. Both outputs are returned detached; a quantizer computes its
straight-through estimate and distances-based losses outside this op.
"""
import torch

from lgvq_fast import _alloc
from lgvq_fast._backend import nn_exact_kernel, resolve_impl, triton_available, triton_import_error
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from lgvq_fast.reference import nearest_code as _ref

METRICS = ("l2", "cos")
PRECISIONS = ("exact", "fast")


@torch.library.custom_op("lgvq_fast::nearest_code", mutates_args=())
def _nearest_code_op(
    z: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    N = z.shape[0]
    if impl in ("triton", "cuda") and precision == "exact" and nn_exact_kernel() == "certified":
        if not triton_available():
            raise RuntimeError("nearest_code: LGVQ_FAST_NN_EXACT_KERNEL=certified runs Triton kernels, and triton "
                               f"does not import here ({triton_import_error()}); unset it or install triton")
        from lgvq_fast.kernels.nearest_code_certified import nearest_code_certified

        return nearest_code_certified(z, codebook, metric)
    if impl == "triton":
        from lgvq_fast.kernels.nearest_code import nearest_code_fwd

        return nearest_code_fwd(z, codebook, metric, precision)
    if impl == "cuda":
        from lgvq_fast import _cuda

        return _cuda.nearest_code(z.contiguous(), codebook.contiguous(), metric, precision)
    indices = _alloc.empty((N,), torch.int64, z.device)
    distances = _alloc.empty((N,), torch.float32, z.device)
    if N:
        idx, dist = _ref.nearest_code(z, codebook, metric)
        indices.copy_(idx)
        distances.copy_(dist)
    return indices, distances


@_nearest_code_op.register_fake
def _(z, codebook, metric, precision, impl):
    N = z.shape[0]
    return z.new_empty((N,), dtype=torch.int64), z.new_empty((N,), dtype=torch.float32)


def _check(z, codebook, metric, precision):
    op = "nearest_code"
    check_tensor(op, "z", z, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(op, "codebook", codebook, dtypes=FLOAT_DTYPES, ndim=2)
    check_same_device(op, z=z, codebook=codebook)
    if codebook.shape[1] != z.shape[-1]:
        raise ValueError(f"{op}: codebook has D={codebook.shape[1]} but z has D={z.shape[-1]}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook is empty (K=0); it needs at least one code")
    if z.shape[-1] == 0:
        raise ValueError(f"{op}: z has D=0; vectors need at least one component")
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {PRECISIONS}, got {precision!r}")


def nearest_code(z, codebook, metric="l2", precision="exact", impl="auto"):
    """Nearest code of every row of ``z [..., D]`` in ``codebook [K, D]``.

    Returns ``(indices int64 z.shape[:-1], distances fp32 z.shape[:-1])``; see the
    module docstring for metrics, precision, backends and the rule for NaN, inf and
    overflow (a non-finite score never wins; a row with no finite score gets index 0 and
    distance NaN). Raises ValueError for bad arguments (naming the argument) and
    RuntimeError when an explicit ``impl`` cannot run here.
    """
    _check(z, codebook, metric, precision)
    backend = resolve_impl("nearest_code", impl, z.device)
    lead = z.shape[:-1]
    z2d = z.detach().reshape(-1, z.shape[-1])
    indices, distances = _nearest_code_op(z2d, codebook.detach(), metric, precision, backend)
    return indices.reshape(lead), distances.reshape(lead)
