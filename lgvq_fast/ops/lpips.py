"""Public LPIPS distance of one feature layer: checks, backend choice, ``lgvq_fast::lpips_*`` custom ops.

``lpips_distance(fx, fy, weight, *, eps=1e-10, impl="auto") -> [n] fp32``

    u = fx / (||fx|| + eps),  v = fy / (||fy|| + eps)   (norms over channels, per pixel)
    d[i] = mean over pixels of sum_c weight_c (u_c - v_c)^2

for the two batches' features ``fx, fy [n, C, H, W]`` at one VGG layer and that layer's linear head
``weight`` (``[C]`` or the 1x1 conv's ``[1, C, 1, 1]``). Inputs may be fp32/bf16/fp16 in NCHW or
channels_last; everything is computed in fp32. Gradients flow to whichever of fx, fy and weight require them.

Why it exists: written in PyTorch, each LPIPS layer squares, sums, takes the root, divides, subtracts,
squares, applies the head and averages, and the backward does as many passes again, each over a feature map
that at 256x256 is the size of the VGG's first layer (for batch 8: 8 x 64 x 256 x 256 per batch). The Triton
kernels read the features once forward and once backward.

Backends: ``reference`` (``lgvq_fast.reference.lpips``, autograd backward) and ``triton``
(``kernels/lpips.py``, deterministic). ``impl="cuda"`` raises (no compiled-extension kernel); ``auto`` picks
triton for CUDA tensors when triton imports, else the reference.

Not accepted: fx and fy of different shapes, an empty batch, no pixels, no channels, eps <= 0.
"""
import numbers

import torch

from lgvq_fast._backend import resolve_no_cuda_kernel
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, foldable_hw
from lgvq_fast.reference import lpips as _ref

DEFAULT_EPS = _ref.DEFAULT_EPS


@torch.library.custom_op("lgvq_fast::lpips_fwd", mutates_args=())
def _lpips_fwd_op(fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from lgvq_fast.kernels.lpips import lpips_fwd

    return lpips_fwd(fx, fy, weight, eps)


@_lpips_fwd_op.register_fake
def _(fx, fy, weight, eps):
    return fx.new_empty((fx.shape[0],), dtype=torch.float32)


@torch.library.custom_op("lgvq_fast::lpips_bwd", mutates_args=())
def _lpips_bwd_op(
    grad: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lgvq_fast.kernels.lpips import lpips_bwd

    return lpips_bwd(grad.to(torch.float32).contiguous(), fx, fy, weight, eps, True, True, True)


@_lpips_bwd_op.register_fake
def _(grad, fx, fy, weight, eps):
    return torch.empty_like(fx), torch.empty_like(fy), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    fx, fy, weight, eps = inputs
    ctx.save_for_backward(fx, fy, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    fx, fy, weight = ctx.saved_tensors
    dfx, dfy, dweight = _lpips_bwd_op(grad, fx, fy, weight, ctx.eps)
    return dfx, dfy, dweight.to(weight.dtype), None


_lpips_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class LpipsFunction(torch.autograd.Function):
    """The same kernels behind a plain ``autograd.Function`` for eager calls (less per-call overhead than the
    registered op, as measured for ``group_norm``); it also skips the gradients nobody asked for (the real
    images' features need none). torch.compile takes the registered op."""

    @staticmethod
    def forward(ctx, fx, fy, weight, eps):
        from lgvq_fast.kernels.lpips import lpips_fwd

        ctx.save_for_backward(fx, fy, weight)
        ctx.eps = eps
        return lpips_fwd(fx, fy, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' gradient has no graph of its own, so a second derivative would
            # silently miss this op's terms
            raise RuntimeError("lpips_distance(impl='triton'): higher-order gradients (create_graph=True) are not "
                               "supported; use impl='reference'")
        from lgvq_fast.kernels.lpips import lpips_bwd

        fx, fy, weight = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        dfx, dfy, dweight = lpips_bwd(grad.to(torch.float32).contiguous(), fx, fy, weight, ctx.eps,
                                      need_x, need_y, need_w)
        return dfx, dfy, dweight.to(weight.dtype) if need_w else None, None


def _check(fx, fy, weight, eps):
    op = "lpips_distance"
    check_tensor(op, "fx", fx, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "fy", fy, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES)
    check_same_device(op, fx=fx, fy=fy, weight=weight)
    if fx.shape != fy.shape:
        raise ValueError(f"{op}: fx has shape {tuple(fx.shape)} but fy has {tuple(fy.shape)}; they must match")
    n, C, H, W = fx.shape
    if n == 0:
        raise ValueError(f"{op}: empty batch (fx has shape {tuple(fx.shape)})")
    if C == 0 or H * W == 0:
        raise ValueError(f"{op}: fx has shape {tuple(fx.shape)}; it needs channels and pixels")
    if weight.numel() != C or (weight.dim() != 1 and tuple(weight.shape) != (1, C, 1, 1)):
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}, expected [C={C}] or [1, {C}, 1, 1]")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0.0:
        raise ValueError(f"{op}: eps must be a real number > 0, got {eps!r}")
    return float(eps)


def lpips_distance(fx, fy, weight, *, eps=DEFAULT_EPS, impl="auto"):
    """Per-pair LPIPS distance of one layer (fp32 ``[n]``); see the module docstring.

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when an explicit ``impl``
    cannot run here.
    """
    eps = _check(fx, fy, weight, eps)
    w = weight.reshape(-1)
    if resolve_no_cuda_kernel("lpips_distance", impl, fx.device, "LPIPS") == "reference":
        return _ref.lpips_distance(fx, fy, w, eps)
    fx, fy, w = foldable_hw(fx), foldable_hw(fy), w.contiguous()
    if torch.compiler.is_compiling():
        return _lpips_fwd_op(fx, fy, w, eps)
    return LpipsFunction.apply(fx, fy, w, eps)
