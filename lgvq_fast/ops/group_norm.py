"""Public GroupNorm with an optional fused SiLU: checks, backend choice, ``lgvq_fast::group_norm_*`` custom ops.

``group_norm(x, weight, bias, num_groups, *, eps=1e-6, act=False, impl="auto") -> y``

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias,   then  y * sigmoid(y)  when ``act``

as ``torch.nn.functional.group_norm`` (+ ``F.silu``), with statistics and arithmetic in fp32 and ``y`` in x's
dtype and memory format. ``x`` is ``[N, C, *]`` of fp32/bf16/fp16; ``weight``/``bias`` are ``[C]`` or None.
Gradients flow to x, weight and bias (weight/bias gradients are fp32 sums, cast to the parameters' dtype).

Why it exists: in the VQGAN every GroupNorm is followed by a SiLU, and PyTorch's CUDA GroupNorm only has an
NCHW kernel, so a channels_last network pays a layout conversion on both sides of every norm, plus a separate
SiLU kernel each way and, under autocast, fp32 outputs or weight casts. The Triton kernels read either layout
through strides, write the output in the input's layout and dtype, read fp32 weights directly and apply the
SiLU in the same pass (and its derivative in the backward).

Backends: ``reference`` (``lgvq_fast.reference.group_norm``: PyTorch in fp32, autograd backward) and
``triton`` (``kernels/group_norm.py``: three launches forward, three and a sum backward, deterministic).
There is no compiled-extension kernel: ``impl="cuda"`` raises. ``auto`` picks triton for CUDA tensors when
triton imports and the shape fits (C * G small enough for the one-hot group map, see ``TRITON_MAX_C_TIMES_G``),
else the reference.

Not accepted: N = 0 or no spatial positions (a mean over zero elements), C not divisible by ``num_groups``.
NaN/inf inputs are not checked (a check costs a device sync); they give NaN outputs, as PyTorch's does.
"""
import numbers

import torch

from lgvq_fast._backend import resolve_no_cuda_kernel
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, foldable_hw
from lgvq_fast.reference import group_norm as _ref

DEFAULT_EPS = 1e-6
# the kernels map channels to groups with a [next_pow2(C), next_pow2(G)] one-hot tile held in registers
TRITON_MAX_C_TIMES_G = 32768


@torch.library.custom_op("lgvq_fast::group_norm_fwd", mutates_args=())
def _group_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, act: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lgvq_fast.kernels.group_norm import group_norm_fwd

    return group_norm_fwd(x, weight, bias, num_groups, eps, act)


@_group_norm_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps, act):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("lgvq_fast::group_norm_bwd", mutates_args=())
def _group_norm_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, num_groups: int, act: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from lgvq_fast.kernels.group_norm import group_norm_bwd

    return group_norm_bwd(foldable_hw(grad), x, weight, bias, mean, rstd, num_groups, act)


@_group_norm_bwd_op.register_fake
def _(grad, x, weight, bias, mean, rstd, num_groups, act):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    # dwb: [2, C] fp32, (dweight, dbias) in one output (two outputs may not alias)
    dx, dwb = _group_norm_bwd_op(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    return dx, dwb[0].to(weight.dtype), dwb[1].to(bias.dtype), None, None, None


_group_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class GroupNormFunction(torch.autograd.Function):
    """The same two kernels behind a plain ``autograd.Function``, for eager calls.

    Per-call overhead (STYLE #4), measured on CPU with the kernels replaced by empty allocations, [2, 32, 4, 4],
    forward+backward, best of 5 x 2000 calls (torch 2.13.0, 2-core CPU): the registered op with
    ``register_autograd`` 230 us, this Function 95 us (native ``F.group_norm`` + ``F.silu`` computing the
    same: 91 us). The VQGAN calls it about 70 times a step, so eager calls take this path (about 9 ms of host
    time a step saved on that CPU) and torch.compile, which needs the registered op, the other.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, act):
        from lgvq_fast.kernels.group_norm import group_norm_fwd

        y, mean, rstd = group_norm_fwd(x, weight, bias, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.act = num_groups, act
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' gradient has no graph of its own, so a second derivative would
            # silently miss this op's terms
            raise RuntimeError("group_norm(impl='triton'): higher-order gradients (create_graph=True) are not "
                               "supported; use impl='reference'")
        from lgvq_fast.kernels.group_norm import group_norm_bwd

        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dwb = group_norm_bwd(foldable_hw(grad_y), x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
        return dx, dwb[0].to(weight.dtype), dwb[1].to(bias.dtype), None, None, None


def group_norm_triton(x, weight, bias, num_groups, eps, act):
    """The Triton path without argument checks, for callers that guarantee them (the VQGAN GroupNorm module):
    x [N >= 1, C, H, W] on CUDA (or CPU under TRITON_INTERPRET), weight and bias [C], C divisible by num_groups
    and ``triton_supports(C, num_groups)``."""
    x = foldable_hw(x)
    if torch.compiler.is_compiling():
        return _group_norm_fwd_op(x, weight, bias, num_groups, eps, act)[0]
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps, act)


def _check(x, weight, bias, num_groups, eps):
    op = "group_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise ValueError(f"{op}: num_groups must be an integer >= 1, got {num_groups!r}")
    N, C = x.shape[:2]
    if C == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}: no channels (C=0) to normalise")
    if C % num_groups:
        raise ValueError(f"{op}: x has C={C} channels (shape {tuple(x.shape)}), not divisible by "
                         f"num_groups={num_groups}")
    if N == 0 or x[0, 0].numel() == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; a group needs at least one element to normalise")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=1)
            if t.shape[0] != C:
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [C={C}] like x {tuple(x.shape)}")
    check_same_device(op, x=x, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0.0:
        raise ValueError(f"{op}: eps must be a real number > 0, got {eps!r}")
    return float(eps)


def triton_supports(C, num_groups):
    return C * num_groups <= TRITON_MAX_C_TIMES_G


def _resolve(impl, device, C, num_groups):
    op = "group_norm"
    backend = resolve_no_cuda_kernel(op, impl, device, "GroupNorm")
    if backend == "triton" and not triton_supports(C, num_groups):
        if impl == "triton":
            raise ValueError(f"{op}: impl='triton' supports C * num_groups <= {TRITON_MAX_C_TIMES_G}, "
                             f"got C={C}, num_groups={num_groups}")
        backend = "reference"
    return backend


def group_norm(x, weight, bias, num_groups, *, eps=DEFAULT_EPS, act=False, impl="auto"):
    """GroupNorm (+ SiLU when ``act``) of ``x [N, C, *]``; see the module docstring.

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when an explicit ``impl``
    cannot run here.
    """
    eps = _check(x, weight, bias, num_groups, eps)
    N, C = x.shape[:2]
    backend = _resolve(impl, x.device, C, num_groups)
    if backend == "reference":
        return _ref.group_norm(x, weight, bias, num_groups, eps, act)
    shape = x.shape
    x4 = foldable_hw(x if x.dim() == 4 else x.reshape(N, C, -1, 1))
    w = weight.contiguous() if weight is not None else torch.ones(C, device=x.device, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else torch.zeros(C, device=x.device, dtype=torch.float32)
    y = group_norm_triton(x4, w, b, int(num_groups), eps, bool(act))
    return y if x.dim() == 4 else y.reshape(shape)
