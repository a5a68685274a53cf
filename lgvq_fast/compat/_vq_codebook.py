"""``Codebook``: the codebook module inside ``lgvq_fast.compat.VectorQuantize``.

It is vector-quantize-pytorch's ``Codebook`` (release 1.32) with the same buffers (``initted``,
``cluster_size [h, K]``, ``embed_avg [h, K, D]``, ``embed [h, K, D]``), the same arithmetic where the
result is observable, and the search and the EMA update on our ops:

- the nearest code is ``ops.nearest_code`` (no N x K matrix). The peer takes the argmax of
  ``-sqrt(max(|x|^2 + |e|^2 - 2 x.e, 1e-8))`` (or of ``x.e`` in cosine mode); ours rounds differently,
  so on a near-tie (two codes within fp32 rounding of each other) either of the two may be chosen.
  Cosine mode searches with ``metric="cos"`` while the codes are EMA-kept (unit-norm); a learned codebook
  (``learnable_codebook``, or the orthogonal regulariser) drifts off the sphere, and there the peer's
  ``argmax x.e`` is computed as an L2 search over codes padded to equal length;
- the EMA update is ``ops.ema_update_``: one fused call per codebook when the step has no
  ``ema_update_weight`` and nothing accumulated; otherwise counts and sums come from the op with
  ``decay=0``, are blended with the peer's ``lerp_``, and the codes are recomputed by the op with
  ``decay=1`` on no rows (Laplace smoothing and ``embed = embed_avg / smoothed count``).
  Where every code count is 0 the op keeps ``embed`` (the peer writes 0/0 = NaN there);
- stochastic sampling (``stochastic_sample_codes`` in training with a positive temperature), the Gumbel
  straight-through and the losses that need every distance (cross-entropy commitment, codebook
  diversity, ``indices=``) build the peer's N x K distance matrix with its formula, as the peer
  does: a sample from ``softmax(-d / T)`` needs every distance. The sampled indices then equal the
  peer's draw for draw.

Random draws (k-means seeding, dead-code restarts, Gumbel noise) are made with the same calls in the
same order as the peer, so under the same seed the same codes are drawn.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lgvq_fast import ops
from lgvq_fast.compat import _vq_dist


def l2norm(t, dim=-1, eps=1e-6):
    return F.normalize(t, p=2, dim=dim, eps=eps)


def _identity(t):
    return t


def _log(t, eps=1e-20):
    return torch.log(t.clamp(min=eps))


def gumbel_noise(t):
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -_log(-_log(noise))


def cdist(x, y, eps=1e-8):
    """The peer's batched Euclidean distance ``[h, n, c]`` between ``x [h, n, d]`` and ``y [h, c, d]``."""
    x2 = (x ** 2).sum(-1)
    y2 = (y ** 2).sum(-1)
    xy = torch.einsum("bid,bjd->bij", x, y) * -2
    return (x2[:, :, None] + y2[:, None, :] + xy).clamp(min=eps).sqrt()


def sample_vectors(samples, num):
    """``num`` rows of ``samples [n, d]``, without replacement when ``n >= num`` (the peer's draws)."""
    n = samples.shape[0]
    if n >= num:
        pick = torch.randperm(n, device=samples.device)[:num]
    else:
        pick = torch.randint(0, n, (num,), device=samples.device)
    return samples[pick]


def repeat_mask(mask, codebooks, rows):
    """``mask [b, n]`` -> ``[codebooks, rows]`` in the ``(b, heads, n)`` row order of the flattened input."""
    b, n = mask.shape
    per_head = rows // (b * n)
    return mask[:, None, :].expand(b, per_head, n).reshape(1, -1).expand(codebooks, -1)


def _max_inner_product(z, e, precision, impl):
    # argmax z.e as an L2 search: append sqrt(M^2 - |e|^2) to each code and 0 to each query, so that
    # |z' - e'|^2 = |z|^2 + M^2 - 2 z.e for every code (M = the largest code norm)
    sq = e.pow(2).sum(-1)
    extra = (sq.max() - sq).clamp_min(0.0).sqrt()
    e_aug = torch.cat([e, extra[:, None]], dim=1)
    z_aug = F.pad(z, (0, 1))
    return ops.nearest_code(z_aug, e_aug, "l2", precision, impl)[0]


class Codebook(nn.Module):
    """vector-quantize-pytorch's ``Codebook`` on ``ops.nearest_code`` and ``ops.ema_update_`` (module docstring)."""

    def __init__(
        self, dim, codebook_size, num_codebooks=1, kmeans_init=False, kmeans_iters=10, sync_kmeans=True, decay=0.8,
        eps=1e-5, threshold_ema_dead_code=2, reset_cluster_size=None, use_ddp=False, learnable_codebook=False,
        sample_codebook_temp=1.0, stochastic_sample_codes=False, straight_through=False, ema_update=True,
        manual_ema_update=False, use_cosine_sim=False, vq_bridge=None, precision="exact", impl="auto",
    ):
        super().__init__()
        self.transform_input = l2norm if use_cosine_sim else _identity
        self.decay = decay
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            # kaiming_uniform_ over [h, K, D]: fan_in = K * D, so U(+-sqrt(6 / (K * D))) as the peer
            embed = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim))
            if use_cosine_sim:
                embed = l2norm(embed)
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.has_dead_code_replacement = threshold_ema_dead_code > 0
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.sample_codebook_temp = sample_codebook_temp
        self.stochastic_sample_codes = stochastic_sample_codes
        self.straight_through = straight_through
        self.use_ddp = use_ddp
        self.sync_kmeans = sync_kmeans
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.learnable_codebook = learnable_codebook
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.use_cosine_sim = use_cosine_sim
        self.vq_bridge = vq_bridge
        self.precision = precision
        self.impl = impl
        # per-code counts and sums gathered with accum_ema_update=True, folded into the next update
        # (the peer keeps them in the buffers' .grad)
        self._pending = None
        # once `initted` has been read as True it stays so until a state_dict is loaded: later calls skip
        # the host read of the flag (the peer reads it on every forward)
        self._initted_seen = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._initted_seen = False
        super()._load_from_state_dict(*args, **kwargs)

    def _group(self):
        return torch.distributed.group.WORLD if self.use_ddp else None

    def _search(self, flatten, embed):
        """Nearest code of every row, per codebook: ``[h, n]`` int64."""
        out = []
        for z, e in zip(flatten.detach().unbind(0), embed.detach().unbind(0)):
            if not self.use_cosine_sim:
                idx = ops.nearest_code(z, e, "l2", self.precision, self.impl)[0]
            elif self.learnable_codebook:
                # the peer ranks by x.e with the codes as they are; a learned codebook drifts off the sphere
                idx = _max_inner_product(z, e, self.precision, self.impl)
            else:
                # EMA codes are kept unit-norm, where max x.e is the cosine search
                idx = ops.nearest_code(z, e, "cos", self.precision, self.impl)[0]
            out.append(idx)
        return torch.stack(out)

    def dense_logits(self, flatten, embed):
        """The peer's ``dist`` ``[h, n, K]``: ``x.e`` (cosine) or ``-cdist`` (L2), with gradients."""
        if self.use_cosine_sim:
            return torch.einsum("hnd,hcd->hnc", flatten, embed)
        return -cdist(flatten, embed)

    def forward(self, x, sample_codebook_temp=None, mask=None, freeze_codebook=False, ema_update_weight=None,
                accum_ema_update=False, ema_update=None, update_usage=True, need_dist=False):
        ema_update = self.ema_update if ema_update is None else ema_update
        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        squeeze = x.ndim < 4
        x = x.float()
        if squeeze:
            x = x[None]
        shape = x.shape
        flatten = x.reshape(shape[0], -1, shape[-1])  # [h, n, d]
        if mask is not None:
            mask = repeat_mask(mask, flatten.shape[0], flatten.shape[1])
        self.init_embed_(flatten, mask=mask)
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        embed = embed.to(flatten.dtype)
        if self.vq_bridge is not None:
            embed = self.vq_bridge(embed)
        sample = self.training and self.stochastic_sample_codes and temp > 0
        gumbel_st = self.training and self.straight_through and temp > 0
        dist = self.dense_logits(flatten, embed) if (sample or gumbel_st or need_dist) else None
        if sample:
            ind = (dist / temp + gumbel_noise(dist)).argmax(dim=-1)
        else:
            ind = self._search(flatten, embed)
        # [h, n, d]; a gather, so a learned codebook gets its gradient in the chosen rows only
        quantize = embed.gather(1, ind[:, :, None].expand(-1, -1, embed.shape[-1]))
        if gumbel_st:
            # value + 0 exactly, gradient of the softmax as in the peer's one-hot straight-through
            probs = (dist / temp).softmax(dim=-1)
            quantize = quantize + torch.einsum("hnc,hcd->hnd", probs - probs.detach(), embed)
        if self.training and update_usage and not freeze_codebook:
            self.update_codebook(flatten, ind, mask, ema_update_weight, accum_ema_update, ema_update)
        quantize = quantize.reshape(shape)
        ind = ind.reshape(shape[:-1])
        if squeeze:
            quantize, ind = quantize[0], ind[0]
        if dist is not None:
            dist = dist.reshape(*shape[:-1], -1)
        return quantize, ind, dist

    @torch.no_grad()
    def init_embed_(self, data, mask=None):
        if self._initted_seen or bool(self.initted):
            self._initted_seen = True
            return
        if mask is not None:
            data = data[mask].reshape(data.shape[0], -1, data.shape[-1])
        if data.shape[-2] < self.codebook_size:
            warnings.warn(f"k-means init received {data.shape[-2]} vectors for a codebook of {self.codebook_size}"
                          " - duplicates will be sampled", stacklevel=3)
        embed, bins = self._kmeans(data)
        self.embed_avg.data.copy_(embed * bins[..., None])
        self.cluster_size.data.copy_(bins)
        self.update_ema()
        self.initted.data.copy_(torch.tensor(True))

    def _kmeans(self, samples):
        """The peer's k-means (seeds drawn the same way); assignments by ``nearest_code``, sums by ``ema_update_``."""
        group = self._group() if self.sync_kmeans else None
        sample = _vq_dist.sample_vectors_distributed if group is not None else sample_vectors
        means = torch.stack([sample(s, self.codebook_size) for s in samples.unbind(0)])
        bins = None
        for _ in range(self.kmeans_iters):
            buckets = self._search(samples, means)
            counts, sums = self._counts_sums(list(zip(samples.unbind(0), buckets.unbind(0))), group)
            bins = counts.long()
            empty = bins == 0
            new_means = sums / bins.masked_fill(empty, 1)[..., None]
            if self.use_cosine_sim:
                new_means = l2norm(new_means)
            means = torch.where(empty[..., None], means, new_means)
        return means, bins

    def _counts_sums(self, rows, group):
        """Per-code counts ``[h, K]`` and sums ``[h, K, D]`` of ``rows = [(z [n, D], idx [n]), ...]``."""
        h, K, D = self.embed_avg.shape
        counts = self.cluster_size.new_zeros(h, K)
        sums = self.embed_avg.new_zeros(h, K, D)
        scratch = self.embed_avg.new_empty(K, D)
        for i, (z, idx) in enumerate(rows):
            # decay 0 turns the EMA op into plain counts and sums (exact counts, deterministic sums)
            ops.ema_update_(counts[i], sums[i], scratch, z, idx, 0.0, self.eps, process_group=group,
                            check_indices=False, impl=self.impl)
        return counts, sums

    @torch.no_grad()
    def update_ema(self):
        """Recompute the codes from ``embed_avg`` and the Laplace-smoothed ``cluster_size``."""
        D = self.embed_avg.shape[-1]
        no_rows = self.embed_avg.new_empty(0, D)
        no_idx = torch.empty(0, dtype=torch.long, device=no_rows.device)
        for i in range(self.num_codebooks):
            # decay 1 on no rows leaves the statistics as they are and only renormalises
            ops.ema_update_(self.cluster_size.data[i], self.embed_avg.data[i], self.embed.data[i], no_rows, no_idx,
                            1.0, self.eps, check_indices=False, impl=self.impl)
        if self.use_cosine_sim:
            self.embed.data.copy_(l2norm(self.embed.data))

    def _weight(self, weight):
        if weight is None:
            return 1.0
        if not torch.is_tensor(weight):
            return float(weight)
        if weight.ndim == 1:
            weight = weight[None]
        if tuple(weight.shape) != tuple(self.cluster_size.shape):
            raise ValueError(f"VectorQuantize: ema_update_weight must have shape [codebook_size] or "
                             f"{list(self.cluster_size.shape)}, got {list(weight.shape)}")
        return weight.to(self.cluster_size)

    @torch.no_grad()
    def track_cluster_size_and_embed_avg(self, flatten, ind, mask=None, ema_update_weight=None,
                                         accum_ema_update=False, refresh=False):
        group = self._group()
        rows = list(zip(flatten.unbind(0), ind.unbind(0)))
        if mask is not None:
            # padded rows count for nothing (the peer zeroes their one-hot rows)
            rows = [(z[m], i[m]) for (z, i), m in zip(rows, mask.unbind(0))]
        if ema_update_weight is None and not accum_ema_update and self._pending is None:
            scratch = None if refresh else self.embed_avg.new_empty(self.embed_avg.shape[1:])
            for i, (z, idx) in enumerate(rows):
                ops.ema_update_(self.cluster_size.data[i], self.embed_avg.data[i],
                                self.embed.data[i] if refresh else scratch, z, idx, self.decay, self.eps,
                                process_group=group, check_indices=False, impl=self.impl)
            if refresh and self.use_cosine_sim:
                self.embed.data.copy_(l2norm(self.embed.data))
            return
        counts, sums = self._counts_sums(rows, group)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(sums, counts)
        if accum_ema_update:
            if self._pending is None:
                self._pending = (counts, sums)
            else:
                self._pending[0].add_(counts)
                self._pending[1].add_(sums)
            return
        if self._pending is not None:
            counts, sums = counts + self._pending[0], sums + self._pending[1]
            self._pending = None
        w = self._weight(ema_update_weight)
        rate = (1.0 - self.decay) * w
        self.cluster_size.data.lerp_(counts, rate)
        self.embed_avg.data.lerp_(sums, rate[..., None] if torch.is_tensor(rate) else rate)
        if refresh:
            self.update_ema()

    @torch.no_grad()
    def update_codebook(self, flatten, ind, mask=None, ema_update_weight=None, accum_ema_update=False,
                        ema_update=None):
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.track_cluster_size_and_embed_avg(flatten, ind, mask, ema_update_weight, accum_ema_update,
                                              refresh=ema_update and not self.manual_ema_update)
        if accum_ema_update:
            return
        self.expire_codes_(flatten, seq_mask=mask)

    @torch.no_grad()
    def update_indices(self, x, embed_ind, mask=None, ema_update_weight=None, accum_ema_update=False,
                       ema_update=None):
        x = x.float()
        if x.ndim < 4:
            x, embed_ind = x[None], embed_ind[None]
        flatten = x.reshape(x.shape[0], -1, x.shape[-1])
        if mask is not None:
            mask = repeat_mask(mask, flatten.shape[0], flatten.shape[1])
        embed_ind = embed_ind.reshape(flatten.shape[0], -1)
        embed_ind = embed_ind.masked_fill(embed_ind == -1, 0)
        self.update_codebook(flatten, embed_ind, mask, ema_update_weight, accum_ema_update, ema_update)

    update_ema_indices = update_indices

    @torch.no_grad()
    def expire_codes_(self, batch_samples, seq_mask=None):
        if not self.has_dead_code_replacement or not self.training:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not torch.any(expired):
            return
        batch_samples = batch_samples.reshape(batch_samples.shape[0], -1, batch_samples.shape[-1])
        self.replace(batch_samples, expired, seq_mask)

    @torch.no_grad()
    def replace(self, batch_samples, batch_mask, seq_mask=None):
        """Restart the dead codes ``batch_mask [h, K]`` from random rows (at most one code per row)."""
        if self.use_cosine_sim:
            batch_samples = l2norm(batch_samples)
        for i, (samples, dead) in enumerate(zip(batch_samples, batch_mask)):
            if seq_mask is not None:
                samples = samples[seq_mask[i]]
            if samples.numel() == 0:
                continue
            n, num_dead = samples.shape[0], int(dead.sum())
            if not self.use_ddp and num_dead > n:
                # more dead codes than rows: restart a random subset now (drawing with replacement would
                # give several codes the same row) and leave the others to later batches
                slots = dead.nonzero(as_tuple=True)[0]
                slots = slots[torch.randperm(num_dead, device=samples.device)[:n]]
                dead = torch.zeros_like(dead)
                dead[slots] = True
                num_dead = n
            sample = _vq_dist.sample_vectors_distributed if self.use_ddp else sample_vectors
            sampled = sample(samples, num_dead).to(self.embed.data)
            self.embed.data[i][dead] = sampled
            self.cluster_size.data[i][dead] = self.reset_cluster_size
            self.embed_avg.data[i][dead] = sampled * self.reset_cluster_size
