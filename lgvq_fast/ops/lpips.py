"""Public LPIPS distance of one feature layer: checks, backend choice, ``lgvq_fast::lpips_*`` custom ops.

``lpips_distance(feats, weight, *, eps=1e-10, impl="auto") -> [n] fp32``

    u = f[:n] / (||f[:n]|| + eps),  v = f[n:] / (||f[n:]|| + eps)   (norms over channels, per pixel)
    d[i] = mean over pixels of sum_c weight_c (u_c - v_c)^2

for ``feats [2n, C, H, W]`` (the x batch's features, then the y batch's: LPIPS runs the VGG once on
``cat([x, y])``) and the layer's linear head ``weight`` (``[C]`` or the 1x1 conv's ``[1, C, 1, 1]``). Inputs
may be fp32/bf16/fp16 in NCHW or channels_last; everything is computed in fp32. Gradients flow to feats and,
when it requires grad, to weight.

Why it exists: written in PyTorch, each LPIPS layer squares, sums, takes the root, divides, subtracts,
squares, applies the head and averages, and the backward does as many passes again, each over a feature map
that at 256x256 is the size of the VGG's first layer (for batch 8: 16 x 64 x 256 x 256). The Triton kernels
read the features once forward and once backward.

Backends: ``reference`` (``lgvq_fast.reference.lpips``, autograd backward) and ``triton``
(``kernels/lpips.py``, deterministic). ``impl="cuda"`` raises (no compiled-extension kernel); ``auto`` picks
triton for CUDA tensors when triton imports, else the reference.

Not accepted: an odd or zero batch (the two halves must pair up), no pixels, no channels, eps <= 0.
"""
import numbers

import torch

from lgvq_fast._backend import resolve_impl, triton_available
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from lgvq_fast.reference import lpips as _ref

DEFAULT_EPS = _ref.DEFAULT_EPS


@torch.library.custom_op("lgvq_fast::lpips_fwd", mutates_args=())
def _lpips_fwd_op(feats: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from lgvq_fast.kernels.lpips import lpips_fwd

    return lpips_fwd(feats, weight, eps)


@_lpips_fwd_op.register_fake
def _(feats, weight, eps):
    return feats.new_empty((feats.shape[0] // 2,), dtype=torch.float32)


@torch.library.custom_op("lgvq_fast::lpips_bwd", mutates_args=())
def _lpips_bwd_op(
    grad: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, eps: float, wgrad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from lgvq_fast.kernels.lpips import lpips_bwd

    dfeats, dweight = lpips_bwd(grad.to(torch.float32).contiguous(), feats, weight, eps, wgrad)
    return dfeats, dweight if dweight is not None else weight.new_zeros(weight.shape, dtype=torch.float32)


@_lpips_bwd_op.register_fake
def _(grad, feats, weight, eps, wgrad):
    return torch.empty_like(feats), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    feats, weight, eps = inputs
    ctx.save_for_backward(feats, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    feats, weight = ctx.saved_tensors
    wgrad = ctx.needs_input_grad[1]
    dfeats, dweight = _lpips_bwd_op(grad, feats, weight, ctx.eps, wgrad)
    return dfeats, dweight.to(weight.dtype) if wgrad else None, None


_lpips_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class LpipsFunction(torch.autograd.Function):
    """The same kernels behind a plain ``autograd.Function`` for eager calls (less per-call overhead than the
    registered op, as measured for ``group_norm``); torch.compile takes the registered op."""

    @staticmethod
    def forward(ctx, feats, weight, eps):
        from lgvq_fast.kernels.lpips import lpips_fwd

        ctx.save_for_backward(feats, weight)
        ctx.eps = eps
        return lpips_fwd(feats, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        from lgvq_fast.kernels.lpips import lpips_bwd

        feats, weight = ctx.saved_tensors
        wgrad = ctx.needs_input_grad[1]
        dfeats, dweight = lpips_bwd(grad.to(torch.float32).contiguous(), feats, weight, ctx.eps, wgrad)
        return dfeats, dweight.to(weight.dtype) if wgrad else None, None


def _foldable(t):
    if t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3):
        return t
    return t.contiguous()


def _check(feats, weight, eps):
    op = "lpips_distance"
    check_tensor(op, "feats", feats, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES)
    check_same_device(op, feats=feats, weight=weight)
    N2, C, H, W = feats.shape
    if N2 == 0 or N2 % 2:
        raise ValueError(f"{op}: feats has batch {N2}; it must stack two equal non-empty batches (x then y)")
    if C == 0 or H * W == 0:
        raise ValueError(f"{op}: feats has shape {tuple(feats.shape)}; it needs channels and pixels")
    if weight.numel() != C or (weight.dim() != 1 and tuple(weight.shape) != (1, C, 1, 1)):
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}, expected [C={C}] or [1, {C}, 1, 1]")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0.0:
        raise ValueError(f"{op}: eps must be a real number > 0, got {eps!r}")
    return float(eps)


def _resolve(impl, device):
    op = "lpips_distance"
    if impl == "cuda":
        raise RuntimeError(f"{op}: impl='cuda' is not available: the compiled extension has no LPIPS kernel; "
                           "use impl='triton' (or 'auto')")
    backend = resolve_impl(op, impl, device)
    if backend == "cuda":
        backend = "triton" if triton_available() else "reference"
    return backend


def lpips_distance(feats, weight, *, eps=DEFAULT_EPS, impl="auto"):
    """Per-pair LPIPS distance of one layer (fp32 ``[n]``); see the module docstring.

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when an explicit ``impl``
    cannot run here.
    """
    eps = _check(feats, weight, eps)
    w = weight.reshape(-1)
    if _resolve(impl, feats.device) == "reference":
        return _ref.lpips_distance(feats, w, eps)
    feats = _foldable(feats)
    w = w.contiguous()
    if torch.compiler.is_compiling():
        return _lpips_fwd_op(feats, w, eps)
    return LpipsFunction.apply(feats, w, eps)
