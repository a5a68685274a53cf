"""Reference LPIPS distance of one feature layer: the executable spec of ``lgvq_fast.ops.lpips_distance``.

For the features ``fx, fy [n, C, H, W]`` of two image batches and the layer's head weights ``w [C]``:

    u = fx / (||fx||_C + eps),   v = fy / (||fy||_C + eps)     (norms over channels, per pixel)
    d[i] = mean over (H, W) of  sum_c w_c (u_c - v_c)^2                      -> [n]

which is LPIPS' ``lin_k(normalize(f_x) - normalize(f_y))^2`` averaged over the pixels, in ``compute_dtype``
(fp32 by default, float64 for the tests' ground truth). At a zero feature vector the norm's gradient is taken
as 0 (LPIPS' ``sqrt(sum(f^2))`` has a NaN gradient there), so the gradient there is ``r / eps``.
"""
import torch

DEFAULT_EPS = 1e-10


def _unit(f, eps):
    # vector_norm's gradient is 0 at a zero vector; sqrt(sum(f^2)) would give 0 * inf = NaN there
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


def lpips_distance(fx, fy, weight, eps=DEFAULT_EPS, compute_dtype=torch.float32):
    dtype = torch.promote_types(compute_dtype, torch.float32)
    d = (_unit(fx.to(dtype), eps) - _unit(fy.to(dtype), eps)).square() * weight.to(dtype).view(1, -1, 1, 1)
    return d.sum(dim=1).mean(dim=(1, 2))
