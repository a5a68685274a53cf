"""Multi-process row sampling for ``lgvq_fast.compat.VectorQuantize`` (``sync_codebook=True``).

vector-quantize-pytorch draws the k-means seeds and the dead-code restarts across ranks this way: the
number of rows each rank contributes is a multinomial draw on rank 0 (proportional to each rank's row
count), each rank samples that many of its own rows, and every rank gathers all of them. We keep the
scheme (and its draws) so that a synced run behaves as the peer's; the counts and sums of the EMA
update are all-reduced inside ``ops.ema_update_``.
"""
import torch
import torch.distributed as dist


def _sample_rows(samples, num):
    n = samples.shape[0]
    if n >= num:
        return samples[torch.randperm(n, device=samples.device)[:num]]
    return samples[torch.randint(0, n, (num,), device=samples.device)]


def sample_multinomial(total_count, probs):
    """How many of ``total_count`` draws land on each rank (sequential binomials on the CPU, as the peer)."""
    device = probs.device
    probs = probs.cpu()
    total = probs.new_full((), total_count)
    remainder = probs.new_ones(())
    sample = torch.empty_like(probs, dtype=torch.long)
    for i, prob in enumerate(probs):
        s = torch.binomial(total, prob / remainder) if i < len(probs) - 1 else total
        sample[i] = s
        total -= s
        remainder -= prob
    return sample.to(device)


def sample_vectors_distributed(local_samples, num):
    """``num`` rows drawn over every rank's ``local_samples [n, d]``; every rank returns the same rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor(local_samples.shape[0], dtype=torch.long, device=local_samples.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = torch.stack(sizes)
    if rank == 0:
        per_rank = sample_multinomial(num, sizes / sizes.sum())
    else:
        per_rank = torch.empty_like(sizes)
    dist.broadcast(per_rank, src=0)
    per_rank = per_rank.tolist()
    mine = _sample_rows(local_samples, per_rank[rank])
    gathered = []
    for i, count in enumerate(per_rank):
        t = mine if i == rank else mine.new_empty(count, *mine.shape[1:])
        dist.broadcast(t, src=i)
        gathered.append(t)
    return torch.cat(gathered, dim=0)
