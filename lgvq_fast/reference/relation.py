"""Reference relationship-alignment loss (the executable spec of ``lgvq_fast.ops.relation_loss``).

LG-VQ spec section 4, vectorised (one gather, no loop over words), with an epsilon in every
normalisation (``x / max(||x||, eps)``, as ``torch.nn.functional.normalize``) so zero vectors give
no NaN:

    Tn = normalize(text_feats [B, L, C]);  Vn = normalize(vision_tokens [B, T, C])
    S = Tn Vn^T [B, L, T];  a = max_T S;  p = argmax_T S (ties -> lowest index)
    G = codes[b, p] [B, L, C];  C_hat = normalize(G * a) * pad;  R_c = C_hat C_hat^T
    R_t = (Tn * pad)(Tn * pad)^T (detached);  loss = mean over B*L*L of (R_c - R_t)^2

Computes in the promoted dtype of the inputs and at least fp32 (float64 inputs give a float64
reference). Autograd flows to ``codes`` and, through ``a``, to ``vision_tokens`` (that path is zero
wherever ``|a| * ||G|| > eps``, see ``lgvq_fast/ops/NOTES.md``).
"""
import torch

DEFAULT_EPS = 1e-6


def _normalize(x, eps):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _compute_dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def relation_match(text_feats, vision_tokens, eps=DEFAULT_EPS):
    """Word -> vision-token match: ``(a [B, L], p [B, L] int64)``, max cosine similarity and its argmax."""
    dtype = _compute_dtype(text_feats, vision_tokens)
    tn = _normalize(text_feats.to(dtype), eps)
    vn = _normalize(vision_tokens.to(dtype), eps)
    sim = tn @ vn.transpose(1, 2)  # [B, L, T]
    # torch.max over a dim returns the first maximal index on CPU and CUDA.
    a, p = sim.max(dim=-1)
    return a, p


def relation_loss_from_match(text_feats, codes, pad_mask, a, p, eps=DEFAULT_EPS):
    """Loss given the match ``(a, p)``; differentiable in ``codes`` (and in ``a``)."""
    dtype = _compute_dtype(text_feats, codes, a)
    B, L, _ = text_feats.shape
    m = pad_mask.to(dtype).reshape(B, L, 1)
    gathered = codes.to(dtype).gather(1, p.unsqueeze(-1).expand(B, L, codes.shape[-1]))  # [B, L, C]
    c_hat = _normalize(gathered * a.to(dtype).unsqueeze(-1), eps) * m
    t_hat = (_normalize(text_feats.to(dtype), eps) * m).detach()
    r_c = c_hat @ c_hat.transpose(1, 2)
    r_t = t_hat @ t_hat.transpose(1, 2)
    return ((r_c - r_t) ** 2).mean()


def relation_loss(text_feats, vision_tokens, codes, pad_mask, eps=DEFAULT_EPS):
    """Scalar loss of spec section 4 (with eps); see the module docstring."""
    a, p = relation_match(text_feats, vision_tokens, eps)
    return relation_loss_from_match(text_feats.detach(), codes, pad_mask, a, p, eps)


def relation_loss_codes_grad(text_feats, codes, pad_mask, a, p, grad_out, eps=DEFAULT_EPS):
    """Analytic gradient of the loss with respect to ``codes`` (derivation in ops/NOTES.md)."""
    dtype = _compute_dtype(text_feats, codes, a)
    B, L, C = text_feats.shape
    m = pad_mask.to(dtype).reshape(B, L, 1)
    index = p.unsqueeze(-1).expand(B, L, C)
    a = a.to(dtype).unsqueeze(-1)
    w = codes.to(dtype).gather(1, index) * a  # [B, L, C]
    w_norm = w.norm(dim=-1, keepdim=True)
    big = w_norm > eps
    u = w / w_norm.clamp_min(eps)
    c_hat = u * m
    t_hat = _normalize(text_feats.to(dtype), eps) * m
    err = c_hat @ c_hat.transpose(1, 2) - t_hat @ t_hat.transpose(1, 2)  # [B, L, L]
    scale = torch.as_tensor(grad_out, dtype=dtype, device=codes.device) * (4.0 / (B * L * L))
    g_u = (err @ c_hat) * m * scale
    radial = (g_u * u).sum(-1, keepdim=True)
    g_w = torch.where(big, (g_u - radial * u) / w_norm.clamp_min(eps), g_u / eps)
    grad = torch.zeros(codes.shape, dtype=dtype, device=codes.device)
    return grad.scatter_add_(1, index, g_w * a).to(codes.dtype)
