"""Public relationship-alignment loss: checks, backend choice, ``lgvq_fast::relation_loss`` custom ops.

``relation_loss(text_feats, vision_tokens, codes, pad_mask, *, eps=1e-6, impl="auto") -> fp32 scalar``
is LG-VQ spec section 4 with an epsilon in every normalisation (``x / max(||x||, eps)``):

    Tn = normalize(text_feats [B, L, C]);  Vn = normalize(vision_tokens [B, T, C]);  S = Tn Vn^T
    a = max_T S;  p = argmax_T S (ties -> lowest index);  G = codes[b, p]  [B, L, C]
    C_hat = normalize(a * G) * pad;  R_c = C_hat C_hat^T;  R_t = (Tn * pad)(Tn * pad)^T
    loss = mean over all B*L*L entries of (R_c - R_t)^2

``pad_mask [B, L]`` is bool or float (1 = valid word, 0 = padding); a float mask with any other value
(2, -1, 0.5, NaN) is rejected: ValueError for a CPU mask, and for a CUDA mask a device-side assert at
the next sync (checking it on the host would cost a sync per call and cannot run inside CUDA-graph
capture; see ``lgvq_fast.ops._checks.check_binary_mask``). A bool mask needs no check and costs nothing,
which is what the model passes. Inputs may be fp32/bf16/fp16 with any strides; everything is computed
in fp32.

Gradients: to ``codes`` only. ``text_feats`` is detached by definition (R_t is a target), and the
gradient to ``vision_tokens`` (which only select token positions, and scale by ``a``, which the
normalisation cancels up to sign) is exactly zero wherever ``|a| * ||G|| > eps``, so ``None`` is
returned for it; see ``NOTES.md`` beside this file for the derivation.

Not accepted: an empty batch (B = 0), no words (L = 0), no vision tokens (T = 0) or C = 0 -- each
raises ValueError (a mean over zero entries has no value). NaN/inf inputs are not checked (a check
costs a device sync); they give a NaN loss.

Backends: ``reference`` (vectorised PyTorch, forward and an analytic backward), ``triton`` (fused launches
over batch elements and tiles of tokens, words or channels, and a one-program sum; L <= 128, CLIP's context of
77 included: the L x L relation matrices are computed in 32-row tiles of words). There is no compiled-extension
kernel for this op: ``impl="cuda"`` raises, and ``auto`` picks triton -> reference on CUDA tensors (reference
for L > 128) and reference elsewhere.

Autograd overhead (STYLE #4), measured with ``impl="reference"`` on CPU at B=2, L=5, T=7, C=16,
forward+backward through the custom op, best of 6 medians of 1000 calls (torch 2.13.0, 2-core CPU):
``register_autograd`` 888 us per call, an outer ``torch.autograd.Function`` around the same two
custom ops 903 us -- no measurable difference (run-to-run noise is ~30 %), so the registered form,
which ``opcheck`` and ``torch.compile`` understand, is kept.
"""
import numbers

import torch

from lgvq_fast import _alloc
from lgvq_fast._backend import resolve_no_cuda_kernel
from lgvq_fast.ops._checks import FLOAT_DTYPES, check_binary_mask, check_same_device, check_tensor
from lgvq_fast.reference import relation as _ref

DEFAULT_EPS = 1e-6
TRITON_MAX_L = 128
PAD_DTYPES = (torch.bool,) + FLOAT_DTYPES


@torch.library.custom_op("lgvq_fast::relation_loss", mutates_args=())
def _relation_loss_op(
    text_feats: torch.Tensor,
    vision_tokens: torch.Tensor,
    codes: torch.Tensor,
    pad: torch.Tensor,
    eps: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "triton":
        from lgvq_fast.kernels.relation import relation_loss_fwd

        return relation_loss_fwd(text_feats, vision_tokens, codes, pad, eps)
    B, L, _ = text_feats.shape
    loss = _alloc.empty((), torch.float32, text_feats.device)
    p = _alloc.empty((B, L), torch.int64, text_feats.device)
    a = _alloc.empty((B, L), torch.float32, text_feats.device)
    a_ref, p_ref = _ref.relation_match(text_feats, vision_tokens, eps)
    loss.copy_(_ref.relation_loss_from_match(text_feats, codes, pad, a_ref, p_ref, eps))
    p.copy_(p_ref)
    a.copy_(a_ref)
    return loss, p, a


@_relation_loss_op.register_fake
def _(text_feats, vision_tokens, codes, pad, eps, impl):
    B, L, _ = text_feats.shape
    return (
        text_feats.new_empty((), dtype=torch.float32),
        text_feats.new_empty((B, L), dtype=torch.int64),
        text_feats.new_empty((B, L), dtype=torch.float32),
    )


@torch.library.custom_op("lgvq_fast::relation_loss_bwd", mutates_args=())
def _relation_loss_bwd_op(
    grad: torch.Tensor,
    text_feats: torch.Tensor,
    codes: torch.Tensor,
    pad: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    eps: float,
    impl: str,
) -> torch.Tensor:
    if impl == "triton":
        from lgvq_fast.kernels.relation import relation_loss_bwd

        return relation_loss_bwd(grad.to(torch.float32).contiguous(), text_feats, codes, pad, p, a, eps)
    dcodes = _alloc.empty(codes.shape, codes.dtype, codes.device)
    dcodes.copy_(_ref.relation_loss_codes_grad(text_feats, codes, pad, a, p, grad, eps))
    return dcodes


@_relation_loss_bwd_op.register_fake
def _(grad, text_feats, codes, pad, p, a, eps, impl):
    return torch.empty_like(codes)


def _setup_context(ctx, inputs, output):
    text_feats, _, codes, pad, eps, impl = inputs
    _, p, a = output
    ctx.save_for_backward(text_feats, codes, pad, p, a)
    ctx.eps = eps
    ctx.impl = impl


def _backward(ctx, grad_loss, grad_p, grad_a):
    text_feats, codes, pad, p, a = ctx.saved_tensors
    dcodes = None
    if ctx.needs_input_grad[2]:
        dcodes = _relation_loss_bwd_op(grad_loss, text_feats, codes, pad, p, a, ctx.eps, ctx.impl)
    return None, None, dcodes, None, None, None


_relation_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check(text_feats, vision_tokens, codes, pad_mask, eps):
    op = "relation_loss"
    check_tensor(op, "text_feats", text_feats, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor(op, "vision_tokens", vision_tokens, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor(op, "codes", codes, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor(op, "pad_mask", pad_mask, dtypes=PAD_DTYPES, ndim=2)
    check_same_device(op, text_feats=text_feats, vision_tokens=vision_tokens, codes=codes, pad_mask=pad_mask)
    B, L, C = text_feats.shape
    if B == 0:
        raise ValueError(f"{op}: empty batch (text_feats has B=0); the mean over B*L*L entries has no value")
    if L == 0:
        raise ValueError(f"{op}: text_feats has L=0 words; the mean over B*L*L entries has no value")
    if C == 0:
        raise ValueError(f"{op}: text_feats has C=0; feature vectors need at least one component")
    if vision_tokens.shape[0] != B or vision_tokens.shape[2] != C:
        raise ValueError(
            f"{op}: vision_tokens has shape {tuple(vision_tokens.shape)}, expected [B={B}, T, C={C}] "
            f"like text_feats {tuple(text_feats.shape)}"
        )
    T = vision_tokens.shape[1]
    if T == 0:
        raise ValueError(f"{op}: vision_tokens has T=0 tokens; every word needs a token to match")
    if tuple(codes.shape) != (B, T, C):
        raise ValueError(f"{op}: codes has shape {tuple(codes.shape)}, expected [B={B}, T={T}, C={C}]")
    if tuple(pad_mask.shape) != (B, L):
        raise ValueError(f"{op}: pad_mask has shape {tuple(pad_mask.shape)}, expected [B={B}, L={L}]")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0.0:
        raise ValueError(f"{op}: eps must be a real number > 0, got {eps!r}")
    check_binary_mask(op, "pad_mask", pad_mask)
    return float(eps)


def _resolve(impl, device, L):
    op = "relation_loss"
    backend = resolve_no_cuda_kernel(op, impl, device, "relation-loss")
    if backend == "triton" and L > TRITON_MAX_L:
        if impl == "triton":
            raise ValueError(f"{op}: impl='triton' supports L <= {TRITON_MAX_L} words, got L={L}")
        backend = "reference"
    return backend


def relation_loss(text_feats, vision_tokens, codes, pad_mask, *, eps=DEFAULT_EPS, impl="auto"):
    """Relationship-alignment loss (fp32 scalar, differentiable in ``codes``); see the module docstring.

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when an explicit
    ``impl`` cannot run here.
    """
    eps = _check(text_feats, vision_tokens, codes, pad_mask, eps)
    backend = _resolve(impl, text_feats.device, text_feats.shape[1])
    pad = pad_mask.detach().to(torch.float32).contiguous()
    loss, _, _ = _relation_loss_op(
        text_feats.detach().contiguous(),
        vision_tokens.detach().contiguous(),
        codes.contiguous(),
        pad,
        eps,
        backend,
    )
    return loss
