"""Reference codebook EMA update (the executable spec of ``lgvq_fast.ops.ema_update_``).

Three stages, so that a distributed caller can all-reduce between the first and the last:

1. ``ema_counts_sums``: ``counts[k] = #{n: indices[n] == k}``, ``sums[k] = sum of z[n] with indices[n] == k``
   (bincount / index_add_, never a one-hot N x K matrix);
2. (all-reduce ``counts`` and ``sums`` across ranks, done by the caller);
3. ``ema_finish_``: ``cluster_size = decay*cluster_size + (1-decay)*counts``,
   ``embed_avg = decay*embed_avg + (1-decay)*sums``, Laplace smoothing
   ``s = (cluster_size + eps) / (n + K*eps) * n`` with ``n = cluster_size.sum()``,
   ``embed = embed_avg / s[:, None]``; where ``s`` is 0 (only when ``n = 0``: nothing assigned yet) ``embed``
   keeps its value instead of becoming 0/0.

Works in the buffers' dtype (float64 buffers give a float64 reference). Plain PyTorch, any device.
On CUDA ``index_add_`` uses float atomics, so this path is not bitwise deterministic there.
"""
import torch


def ema_counts_sums(z, indices, K, dtype=None):
    """Per-code counts ``[K]`` and sums ``[K, D]`` of the rows of ``z [N, D]`` assigned by ``indices [N]``."""
    dtype = dtype or torch.promote_types(z.dtype, torch.float32)
    indices = indices.reshape(-1).long()
    counts = torch.bincount(indices, minlength=K).to(dtype)
    sums = torch.zeros((K, z.shape[-1]), dtype=dtype, device=z.device)
    sums.index_add_(0, indices, z.reshape(-1, z.shape[-1]).to(dtype))
    return counts, sums


def ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps):
    """Decay, Laplace smoothing and normalisation, in place on the three buffers."""
    K = cluster_size.shape[0]
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1.0 - decay)
    embed_avg.mul_(decay).add_(sums.to(embed_avg.dtype), alpha=1.0 - decay)
    n = cluster_size.sum()
    smoothed = ((cluster_size + eps) / (n + K * eps) * n).to(embed_avg.dtype)[:, None]
    # n = 0 (no code has any mass yet) makes every smoothed size 0: keep the codebook instead of writing 0/0
    embed.copy_(torch.where(smoothed > 0, embed_avg / smoothed, embed.to(embed_avg.dtype)))


def ema_update_(cluster_size, embed_avg, embed, z, indices, decay, eps):
    """Single-process EMA update of ``cluster_size [K]``, ``embed_avg [K, D]``, ``embed [K, D]`` in place."""
    counts, sums = ema_counts_sums(z, indices, cluster_size.shape[0], dtype=embed_avg.dtype)
    ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)


def ema_update_onehot_(cluster_size, embed_avg, embed, z, indices, decay, eps):
    """The textbook one-hot formulation (N x K matrix); used only as the benchmark baseline."""
    K = cluster_size.shape[0]
    onehot = torch.nn.functional.one_hot(indices.reshape(-1).long(), K).to(embed_avg.dtype)
    counts = onehot.sum(0)
    sums = onehot.t() @ z.reshape(-1, z.shape[-1]).to(embed_avg.dtype)
    ema_finish_(cluster_size, embed_avg, embed, counts, sums, decay, eps)
