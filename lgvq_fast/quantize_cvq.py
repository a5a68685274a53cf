"""``CVQVectorQuantizer``: the online-clustered codebook quantizer of LG-CVQ (spec section 1.3).

Same behaviour as the CVQ quantiser the spec describes, computed without its
dense N x K temporaries where they are not needed:
- the nearest code is ``ops.nearest_code`` (argmin, not a full sort along K);
- ``z_q`` is a row gather (not a one-hot [N, K] matmul);
- the anchors and the contrastive loss share one pass over code chunks of the
  (negated) distance matrix ``d [kc, N]`` (``topk`` instead of full sorts along N;
  anchors by Gumbel-max instead of softmax + multinomial); the contrastive loss's
  gradient with respect to the codebook is formed in that same pass, so backward
  keeps only a [K, D] tensor.

Cost per training step: two N x K x D products (scores, gradient) and a ``topk`` of
N/2 along N for every code; peak extra memory a few ``chunk x N`` fp32 tensors with
``chunk = max(1, 2**22 // N)`` codes (the whole [2048, 1024] matrix at the paper
shape). Evaluation mode only runs the search, the gather and the VQ loss.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lgvq_fast import ops
from lgvq_fast.quantize import (
    CodeLookup,
    code_counts,
    _check_common,
    _check_sizes,
    flatten_input,
    resolve_sync_group,
    source_rank,
    straight_through,
)

ANCHORS = ("probrandom", "closest")
CHUNK_ELEMENTS = 1 << 22


class CVQVectorQuantizer(CodeLookup, nn.Module):
    """Online clustered codebook quantizer (CVQ), ``forward(z) -> (quantize, indices, loss)``.

    Args:
        dim, codebook_size: D and K.
        commitment_weight: beta (0.25 in LG-CVQ).
        decay: usage EMA decay (0.99).
        anchor: ``"probrandom"`` (spec default: for code k draw feature n with
            probability softmax_n(d[n, k])) or ``"closest"`` (the nearest feature).
        contrastive: add the contrastive codebook loss (training only).
        temperature: contrastive temperature (0.07).
        channel_last, precision, impl, sync_codebook, process_group, check_finite:
            as for :class:`lgvq_fast.VectorQuantizer`.

    With ``d[n, k] = -||sg z_n - e_k||^2`` (features detached), in training mode:
        - loss = ``beta * mse(z, sg z_q) + mse(sg z, z_q)`` (+ contrastive loss);
        - usage EMA buffer ``embed_prob`` (init 0): ``p <- decay p + (1 - decay) counts / N``;
        - re-initialisation every step, in place without gradient:
          ``alpha_k = exp(-p_k K 10 / (1 - decay) - 0.001)``,
          ``e_k <- (1 - alpha_k) e_k + alpha_k A_k`` with ``A_k`` the anchor feature of
          code k (drawn from d before the update);
        - contrastive loss: for each code, positive = mean of the ``max(1, N // K)``
          largest ``d[:, k]`` (nearest features), negatives = the ``N // 2`` smallest
          (farthest); cross-entropy of ``[pos, negs] / temperature`` with target 0,
          averaged over the K codes. It only moves the codebook.

    The codebook ``embed [K, D]`` is an ``nn.Parameter`` initialised U(-1/K, 1/K). The
    re-initialisation uses the codebook before this step's optimizer update, as the
    losses do, and is applied after the losses are formed (their gradients refer to
    the codebook the forward saw).

    Under DDP (``sync_codebook``): the usage counts and N are all-reduced, so
    ``embed_prob`` is the global usage; anchors are drawn on the lowest rank with a
    non-empty batch (rank 0 normally) from its own features and broadcast. With
    identical parameters and optimizer states, every rank keeps the same codebook.
    The contrastive loss uses each rank's own features (its gradient is averaged by
    DDP like any other).
    """

    def __init__(
        self,
        dim,
        codebook_size,
        *,
        commitment_weight=0.25,
        decay=0.99,
        anchor="probrandom",
        contrastive=True,
        temperature=0.07,
        channel_last=True,
        precision="exact",
        impl="auto",
        sync_codebook=None,
        process_group=None,
        check_finite=False,
    ):
        super().__init__()
        name = "CVQVectorQuantizer"
        _check_sizes(name, dim, codebook_size)
        _check_common(name, commitment_weight, precision, impl)
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"{name}: decay must be in [0, 1), got {decay}")
        if anchor not in ANCHORS:
            raise ValueError(f"{name}: anchor must be one of {ANCHORS}, got {anchor!r}")
        if not float(temperature) > 0.0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.commitment_weight = float(commitment_weight)
        self.decay = float(decay)
        self.anchor = anchor
        self.contrastive = bool(contrastive)
        self.temperature = float(temperature)
        self.channel_last = bool(channel_last)
        self.precision = precision
        self.impl = impl
        self.sync_codebook = sync_codebook
        self.process_group = process_group
        self.check_finite = bool(check_finite)
        K = self.codebook_size
        self.embed = nn.Parameter(torch.empty(K, self.dim).uniform_(-1.0 / K, 1.0 / K))
        self.register_buffer("embed_prob", torch.zeros(K))

    @property
    def codebook(self):
        return self.embed

    def extra_repr(self):
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, commitment_weight={self.commitment_weight}, "
            f"decay={self.decay}, anchor={self.anchor!r}, contrastive={self.contrastive}, "
            f"temperature={self.temperature}, channel_last={self.channel_last}"
        )

    def forward(self, z):
        flat, restore = flatten_input("CVQVectorQuantizer", z, self.dim, self.channel_last, self.check_finite)
        N = flat.shape[0]
        with torch.autocast(flat.device.type, enabled=False):
            zd = flat.detach().float()
            indices, _ = ops.nearest_code(zd, self.embed.detach(), "l2", self.precision, self.impl)
            z_q = self.embed[indices]
            if N:
                loss = self.commitment_weight * F.mse_loss(flat.float(), z_q.detach()) + F.mse_loss(zd, z_q)
            else:
                # mse over no elements is NaN; keep a zero attached to the graph
                loss = flat.float().sum() * 0.0 + self.embed.sum() * 0.0
            quantize = straight_through(flat, z_q)
            if self.training:
                loss = loss + self._train_step(zd, indices)
        return restore(quantize), restore(indices, channel=False), loss

    def _train_step(self, zd, indices):
        group = resolve_sync_group(self.sync_codebook, self.process_group)
        K = self.codebook_size
        with torch.no_grad():
            counts = code_counts(indices, K).float()
            if group is None:
                if zd.shape[0] > 0:
                    self.embed_prob.mul_(self.decay).add_(counts / zd.shape[0], alpha=1.0 - self.decay)
            else:
                n = torch.tensor([float(zd.shape[0])], device=zd.device)
                torch.distributed.all_reduce(counts, group=group)
                torch.distributed.all_reduce(n, group=group)
                # no host read of n: the update is selected on the device (all ranks empty: unchanged)
                upd = self.embed_prob * self.decay
                upd.add_(counts / n.clamp_min(1.0), alpha=1.0 - self.decay)
                self.embed_prob.copy_(torch.where(n > 0, upd, self.embed_prob))
            source = source_rank(zd.shape[0], group, zd.device)
            draw = source is not None and source[1]
        e = self.embed.detach()
        want_grad = self.contrastive and self.embed.requires_grad and torch.is_grad_enabled()
        anchors, value, grad = scan_codes(
            zd, e, self.anchor if draw else None, self.contrastive, want_grad, self.temperature
        )
        with torch.no_grad():
            if source is not None:
                if anchors is None:
                    anchors = torch.empty_like(e)
                if group is not None:
                    torch.distributed.broadcast(anchors, src=source[0], group=group)
                alpha = torch.exp(-self.embed_prob * (K * 10.0 / (1.0 - self.decay)) - 1e-3)[:, None]
                self.embed.mul_(1.0 - alpha).add_(alpha * anchors)
        if not self.contrastive or value is None:
            return zd.new_zeros(())
        if want_grad:
            return _PrecomputedGrad.apply(self.embed, value, grad)
        return value


class _PrecomputedGrad(torch.autograd.Function):
    """A scalar whose gradient with respect to ``embed`` was computed in the forward pass."""

    @staticmethod
    def forward(ctx, embed, value, grad):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


@torch.no_grad()
def scan_codes(zd, e, anchor, contrastive, want_grad, temperature):
    """One pass over code chunks of the negated squared distances ``d[k, n] = -||zd_n - e_k||^2``.

    Returns ``(anchors [K, D] or None, contrastive loss scalar or None,
    its gradient w.r.t. e [K, D] or None)``. ``anchor`` None skips the anchors.
    """
    N, D = zd.shape
    K = e.shape[0]
    if N == 0:
        return None, None, None
    P = max(1, N // K)
    M = N // 2
    chunk = max(1, CHUNK_ELEMENTS // N)
    z_sq = zd.pow(2).sum(1)  # [N]
    anchors = torch.empty_like(e) if anchor is not None else None
    grad = torch.empty_like(e) if want_grad else None
    total = zd.new_zeros(())
    for k0 in range(0, K, chunk):
        ec = e[k0:k0 + chunk]  # [kc, D]
        # codes along rows, so every per-code reduction runs over the contiguous last dim
        d = torch.addmm(-ec.pow(2).sum(1)[:, None] - z_sq[None], ec, zd.T, alpha=2.0)  # [kc, N]
        if anchor == "probrandom":
            # Gumbel-max: argmax_n(d - log E), E ~ Exp(1), draws n with probability softmax_n(d[k, n])
            pick = (d - torch.empty_like(d).exponential_().log()).argmax(1)
            anchors[k0:k0 + chunk] = zd[pick]
        elif anchor == "closest":
            anchors[k0:k0 + chunk] = zd[d.argmax(1)]
        if not contrastive:
            continue
        pos_val, pos_idx = d.topk(P, dim=1)  # [kc, P]
        neg_val, neg_idx = d.topk(M, dim=1, largest=False)  # [kc, M]
        logits = torch.cat([pos_val.mean(1, keepdim=True), neg_val], 1) / temperature  # [kc, 1+M]
        total += (logits.logsumexp(1) - logits[:, 0]).sum()
        if want_grad:
            g = logits.softmax(1)
            g[:, 0] -= 1.0
            g /= K * temperature
            # weight of every d[k, n] in the loss; d d[k, n] / d e_k = 2 (z_n - e_k)
            w = torch.zeros_like(d)  # [kc, N]
            w.scatter_add_(1, pos_idx, (g[:, :1] / P).expand(-1, P))
            w.scatter_add_(1, neg_idx, g[:, 1:])
            grad[k0:k0 + chunk] = 2.0 * (w @ zd - w.sum(1, keepdim=True) * ec)
    value = total / K if contrastive else None
    return anchors, value, grad
