"""Reference GroupNorm with an optional SiLU: the executable spec of ``lgvq_fast.ops.group_norm``.

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias     (mean_g, var_g over a group's C/G channels
                                                              and all H*W positions; biased variance)
    y = y * sigmoid(y)                                        when act

computed in ``compute_dtype`` (fp32 by default, float64 for the tests' ground truth) and returned in x's dtype
and memory format.

The statistics are taken on a contiguous (NCHW) copy: PyTorch's CPU GroupNorm for channels-last input takes the
variance as E[x^2] - E[x]^2, which loses every digit when a group's mean is large against its spread (a mean of
100 and a spread of 0.01 gave errors of 36 in fp32 and 4e-7 in float64 with torch 2.13), while its NCHW path
centres first.
"""
import torch
import torch.nn.functional as F


def channels_last_only(x):
    """``x`` is [N, C, H, W] laid out channels-last and not also NCHW-contiguous (C = 1 or H = W = 1 is both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def centred_group_norm(x, num_groups, weight, bias, eps):
    """``F.group_norm`` with the statistics taken on an NCHW copy of channels-last input (see the module docstring);
    the result keeps x's memory format."""
    if not channels_last_only(x):
        return F.group_norm(x, num_groups, weight, bias, eps)
    y = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
    return y.contiguous(memory_format=torch.channels_last)


def group_norm(x, weight, bias, num_groups, eps=1e-6, act=False, compute_dtype=torch.float32):
    dtype = torch.promote_types(compute_dtype, torch.float32)
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # F.group_norm's backward fails with a bias but no weight; a weight of ones is the same function
    if w is None and b is not None:
        w = torch.ones_like(b)
    y = centred_group_norm(x.to(dtype), num_groups, w, b, eps)
    if act:
        y = F.silu(y)
    return y.to(x.dtype)
