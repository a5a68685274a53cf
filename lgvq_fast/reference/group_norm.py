"""Reference GroupNorm with an optional SiLU: the executable spec of ``lgvq_fast.ops.group_norm``.

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias     (mean_g, var_g over a group's C/G channels
                                                              and all H*W positions; biased variance)
    y = y * sigmoid(y)                                        when act

computed in ``compute_dtype`` (fp32 by default, float64 for the tests' ground truth) and returned in x's dtype.
"""
import torch
import torch.nn.functional as F


def group_norm(x, weight, bias, num_groups, eps=1e-6, act=False, compute_dtype=torch.float32):
    dtype = torch.promote_types(compute_dtype, torch.float32)
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # F.group_norm's backward fails with a bias but no weight; a weight of ones is the same function
    if w is None and b is not None:
        w = torch.ones_like(b)
    y = F.group_norm(x.to(dtype), num_groups, w, b, eps)
    if act:
        y = F.silu(y)
    return y.to(x.dtype)
