"""``VectorQuantizer``: a drop-in vector quantizer built on the fused ops.

Vocabulary follows vector-quantize-pytorch (``codebook_size``, ``decay``, ``eps``,
``commitment_weight``, ``threshold_ema_dead_code``, ``use_cosine_sim``; buffers
``embed``, ``embed_avg``, ``cluster_size``; ``forward`` returns
``(quantize, indices, loss)``). The nearest-code search is
``lgvq_fast.ops.nearest_code`` (never an N x K matrix) and the EMA codebook
update is ``lgvq_fast.ops.ema_update_``.

The helpers at the bottom (layout, checks, straight-through, DDP sync) are shared
with ``lgvq_fast.quantize_cvq``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lgvq_fast import ops
from lgvq_fast._backend import IMPLS
from lgvq_fast.ops._checks import FLOAT_DTYPES

PRECISIONS = ("exact", "fast")


class CodeLookup:
    """Index -> code lookups shared by the quantizers (they define ``codebook``, ``codebook_size``, ``channel_last``)."""

    def get_codes_from_indices(self, indices):
        """Codes for integer ``indices`` of any shape: ``[*indices.shape, D]`` (fp32)."""
        _check_indices(f"{type(self).__name__}.get_codes_from_indices", indices, self.codebook_size)
        return self.codebook[indices]

    def get_output_from_indices(self, indices):
        """Codes in this quantizer's layout: channel-first ``[B, D, ...]`` when ``channel_last=False``."""
        codes = self.get_codes_from_indices(indices)
        return codes if self.channel_last else codes.movedim(-1, 1)


class VectorQuantizer(CodeLookup, nn.Module):
    """Nearest-code quantizer with a straight-through gradient.

    Args:
        dim: vector size D.
        codebook_size: number of codes K.
        commitment_weight: the beta of the VQ loss (see *Loss*).
        legacy: reproduce the taming-transformers ``VectorQuantizer2(legacy=True)``
            weighting (see *Loss*).
        use_cosine_sim: search by cosine similarity. Inputs and codes are
            l2-normalised (``F.normalize``, eps 1e-12); ``quantize`` is the
            normalised code and the losses compare normalised vectors.
        ema_update: keep the codebook as EMA buffers updated by
            ``ops.ema_update_`` in training mode, instead of a learned parameter.
        decay, eps: EMA decay (default 0.99) and Laplace-smoothing epsilon (default
            1e-5). They only exist for the EMA codebook: passing either with
            ``ema_update=False`` raises ValueError (a learned codebook would ignore them).
        threshold_ema_dead_code: with ``ema_update``, after each training step the
            codes whose ``cluster_size`` is below this value are restarted from random
            distinct rows of the current batch, one row per code: when the batch has
            fewer distinct rows than there are dead codes, a random subset of the dead
            codes (as many as there are distinct rows) is restarted and the others wait
            for a later batch. A restarted code's ``cluster_size`` is reset to the
            threshold and its ``embed_avg`` to ``new_code * threshold``. 0 disables it.
            The restart reads the number of dead codes on the host (a sync per step).
        channel_last: input ``[..., D]`` (True) or channel-first ``[B, D, ...]``
            (False, any rank >= 2, e.g. ``[B, D, H, W]``). Outputs use the same layout;
            ``indices`` has the input shape without the channel dim.
        precision, impl: forwarded to ``ops.nearest_code`` (``"exact"``/``"fast"``;
            ``"auto"``/``"reference"``/``"triton"``/``"cuda"``).
        sync_codebook: keep the EMA codebook identical on every rank: counts and sums
            are all-reduced inside ``ema_update_`` (the buffers equal a single-process
            update on the union of the ranks' batches) and dead-code replacements are
            drawn on the lowest rank with a non-empty batch (rank 0 normally) and
            broadcast. ``None`` (default) syncs when ``torch.distributed`` is
            initialised with world size > 1. Every rank must call ``forward`` the
            same number of times in training mode (the sync is collective); an empty
            batch on some rank is fine.
        process_group: group to sync over (default: the world group).
        check_finite: raise ValueError when the input holds NaN or inf (one
            reduction and a host sync per call, so off by default).

    Codebook:
        ``embed [K, D]`` fp32. Without EMA it is an ``nn.Parameter`` initialised
        U(-1/K, 1/K) like taming-transformers. With EMA it is a buffer initialised by
        ``kaiming_uniform_`` over ``[K, D]``, i.e. U(-sqrt(6/D), sqrt(6/D)).
        vector-quantize-pytorch applies ``kaiming_uniform_`` to a ``[1, K, D]`` tensor,
        whose fan-in is K*D: U(-sqrt(6/(K*D)), sqrt(6/(K*D))), sqrt(K) times narrower
        (``lgvq_fast.compat.VectorQuantize`` reproduces that one). Beside it, buffers
        ``embed_avg = embed.clone()`` and
        ``cluster_size = ones(K)``, so that ``embed == embed_avg / cluster_size``
        holds from the start and an unused code stays put instead of being divided
        by the tiny smoothed count of an all-zero ``cluster_size``.

    Loss (``mse`` = mean over all elements, ``sg`` = stop-gradient, ``z_q`` = the
    selected codes, ``beta = commitment_weight``; computed in fp32 in train and eval):
        - default: ``beta * mse(z, sg z_q) + mse(sg z, z_q)`` (textbook / paper form);
        - ``legacy=True``: ``mse(sg z_q, z) + beta * mse(z_q, sg z)`` (taming legacy:
          commitment weight 1, codebook weight beta);
        - with ``ema_update`` the codebook term is dropped (the codebook has no
          gradient): ``beta * mse(z, sg z_q)``, or ``mse(sg z_q, z)`` when legacy.

    Straight-through: ``quantize = sg(z_q) + (z - sg z)``: its value is exactly the
    code (in the input dtype) and its gradient with respect to ``z`` is the identity
    (in cosine mode too, with respect to the unnormalised input).

    Empty input (no vectors) returns empty ``quantize``/``indices`` and a zero loss
    and skips the EMA update (under DDP sync it still joins the collectives).
    """

    def __init__(
        self,
        dim,
        codebook_size,
        *,
        commitment_weight=0.25,
        legacy=False,
        use_cosine_sim=False,
        ema_update=False,
        decay=None,
        eps=None,
        threshold_ema_dead_code=0.0,
        channel_last=True,
        precision="exact",
        impl="auto",
        sync_codebook=None,
        process_group=None,
        check_finite=False,
    ):
        super().__init__()
        _check_sizes("VectorQuantizer", dim, codebook_size)
        _check_common("VectorQuantizer", commitment_weight, precision, impl)
        for arg, value in (("decay", decay), ("eps", eps)):
            if value is not None and not ema_update:
                raise ValueError(
                    f"VectorQuantizer: {arg}={value} only applies to the EMA codebook; pass ema_update=True, "
                    f"or leave {arg} out for a learned codebook"
                )
        decay = 0.99 if decay is None else decay
        eps = 1e-5 if eps is None else eps
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        if not float(eps) > 0.0:
            raise ValueError(f"VectorQuantizer: eps must be > 0, got {eps}")
        if float(threshold_ema_dead_code) < 0.0:
            raise ValueError(f"VectorQuantizer: threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        if threshold_ema_dead_code > 0 and not ema_update:
            raise ValueError(
                "VectorQuantizer: threshold_ema_dead_code > 0 needs ema_update=True "
                "(dead codes are found from the EMA cluster_size)"
            )
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.commitment_weight = float(commitment_weight)
        self.legacy = bool(legacy)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.ema_update = bool(ema_update)
        self.decay = float(decay)
        self.eps = float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.channel_last = bool(channel_last)
        self.precision = precision
        self.impl = impl
        self.sync_codebook = sync_codebook
        self.process_group = process_group
        self.check_finite = bool(check_finite)
        K, D = self.codebook_size, self.dim
        if self.ema_update:
            embed = nn.init.kaiming_uniform_(torch.empty(K, D))
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
            self.register_buffer("cluster_size", torch.ones(K))
        else:
            self.embed = nn.Parameter(torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K))

    @property
    def metric(self):
        return "cos" if self.use_cosine_sim else "l2"

    @property
    def codebook(self):
        """The codes the search and lookup use, ``[K, D]`` (l2-normalised in cosine mode)."""
        return F.normalize(self.embed, dim=-1) if self.use_cosine_sim else self.embed

    def extra_repr(self):
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, commitment_weight={self.commitment_weight}, "
            f"legacy={self.legacy}, use_cosine_sim={self.use_cosine_sim}, ema_update={self.ema_update}, "
            f"decay={self.decay}, threshold_ema_dead_code={self.threshold_ema_dead_code}, "
            f"channel_last={self.channel_last}, precision={self.precision!r}"
        )

    def forward(self, z):
        """Quantize ``z``; returns ``(quantize, indices, loss)`` (see the class docstring)."""
        name = "VectorQuantizer"
        flat, restore = flatten_input(name, z, self.dim, self.channel_last, self.check_finite)
        device_type = flat.device.type
        with torch.autocast(device_type, enabled=False):
            zf = F.normalize(flat.float(), dim=-1) if self.use_cosine_sim else flat
            codes = self.codebook
            indices, _ = ops.nearest_code(zf.detach(), codes.detach(), self.metric, self.precision, self.impl)
            # [N, D]; a gather, so the codebook term's gradient reaches only the chosen rows
            z_q = codes[indices]
            loss = self._loss(zf.float(), z_q, flat.shape[0])
            quantize = straight_through(flat, z_q)
            if self.training and self.ema_update:
                self._update_ema(zf.detach(), indices)
        return restore(quantize), restore(indices, channel=False), loss

    def _loss(self, zl, z_q, n):
        learned = not self.ema_update
        if n == 0:
            # mse over no elements is NaN; a zero that stays attached to the graph keeps backward() working
            zero = zl.sum() * 0.0
            return zero + self.embed.sum() * 0.0 if learned else zero
        commit = F.mse_loss(zl, z_q.detach())
        w_commit, w_code = (1.0, self.commitment_weight) if self.legacy else (self.commitment_weight, 1.0)
        loss = w_commit * commit
        if learned:
            loss = loss + w_code * F.mse_loss(zl.detach(), z_q)
        return loss

    @torch.no_grad()
    def _update_ema(self, zf, indices):
        group = resolve_sync_group(self.sync_codebook, self.process_group)
        if zf.shape[0] == 0 and group is None:
            return
        ops.ema_update_(
            self.cluster_size, self.embed_avg, self.embed, zf, indices, self.decay, self.eps,
            process_group=group, check_indices=False, impl=self.impl,
        )
        if self.threshold_ema_dead_code > 0:
            self._restart_dead_codes(zf, group)

    def _restart_dead_codes(self, zf, group):
        dead = self.cluster_size < self.threshold_ema_dead_code
        # cluster_size is identical on every rank under sync, so every rank takes the same branch
        if not bool(dead.any()):
            return
        restart = sample_restarts(zf, dead.nonzero().squeeze(1), group, self.embed.dtype)
        if restart is None:
            return
        slots, new = restart
        thr = self.threshold_ema_dead_code
        self.embed[slots] = new
        self.cluster_size[slots] = thr
        self.embed_avg[slots] = new * thr


def _check_sizes(name, dim, codebook_size):
    for arg, v in (("dim", dim), ("codebook_size", codebook_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")


def _check_common(name, commitment_weight, precision, impl):
    if not float(commitment_weight) >= 0.0:
        raise ValueError(f"{name}: commitment_weight must be >= 0, got {commitment_weight}")
    if precision not in PRECISIONS:
        raise ValueError(f"{name}: precision must be one of {PRECISIONS}, got {precision!r}")
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")


def _check_indices(name, indices, K):
    if (not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex()
            or indices.dtype == torch.bool):  # a bool tensor would index as a mask
        got = getattr(indices, "dtype", type(indices))
        raise ValueError(f"{name}: indices must be an integer tensor, got {got}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{name}: indices must lie in [0, {K}), got range [{lo}, {hi}]")


def flatten_input(name, z, dim, channel_last, check_finite):
    """Validate ``z`` and return ``(flat [N, D], restore)``; ``restore(t, channel=True)`` undoes the layout."""
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"{name}: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        got = str(z.dtype).replace("torch.", "")
        raise ValueError(f"{name}: z must be float32, bfloat16 or float16, got {got}")
    if channel_last:
        if z.dim() < 1 or z.shape[-1] != dim:
            raise ValueError(f"{name}: z must have last dim D={dim} (channel_last=True), got {tuple(z.shape)}")
        zl = z
    else:
        if z.dim() < 2 or z.shape[1] != dim:
            raise ValueError(f"{name}: z must have dim 1 of size D={dim} (channel_last=False), got {tuple(z.shape)}")
        zl = z.movedim(1, -1)
    if check_finite and z.numel() and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name}: z contains NaN or inf")
    lead = zl.shape[:-1]
    flat = zl.reshape(-1, dim)

    def restore(t, channel=True):
        if not channel:
            return t.reshape(lead)
        out = t.reshape(*lead, dim)
        return out if channel_last else out.movedim(-1, 1)

    return flat, restore


def straight_through(z, z_q):
    """Value ``z_q`` (exactly, cast to ``z.dtype``), gradient identity with respect to ``z``."""
    # z - sg(z) is exactly 0, so unlike z + sg(z_q - z) the value is not rounded
    return z_q.detach().to(z.dtype) + (z - z.detach())


def code_counts(indices, codebook_size):
    """int64 ``[codebook_size]``: how often each code occurs in ``indices`` (any shape, values in
    ``[0, codebook_size)``). No host synchronisation: ``torch.bincount`` reads the largest index back to the host
    to size its output, which stalls a CUDA step (and cannot be captured in a CUDA graph)."""
    flat = indices.reshape(-1)
    return torch.zeros(codebook_size, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def resolve_sync_group(sync, process_group):
    """The process group to sync codebook statistics over, or None for no sync."""
    if sync is False:
        return None
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if sync:
            raise RuntimeError("sync_codebook=True needs an initialised torch.distributed process group")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if sync is None and dist.get_world_size(group) <= 1:
        return None
    return group


def source_rank(n, group, device):
    """Rank that provides data for a broadcast: ``(src, is_me)``, or None when no rank has rows.

    Without ``group`` it is this process when ``n > 0``. Under ``group`` it is the
    lowest rank whose batch is not empty (one tiny all-reduce), so every rank agrees.
    """
    if group is None:
        return (None, True) if n > 0 else None
    dist = torch.distributed
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    flag = torch.tensor([me if n > 0 else world], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    src = int(flag)
    if src == world:
        return None
    return dist.get_global_rank(group, src), src == me


def sample_restarts(x, slots, group, dtype):
    """New codes for the dead-code ``slots`` (int64 ``[S]``, identical on every rank) from the rows of ``x [N, D]``.

    Returns ``(slots [k], rows [k, D])`` with ``k = min(S, distinct rows drawn)``: ``min(S, N)`` rows are
    drawn without replacement and repeated values among them are dropped, so no two restarted codes get the
    same vector. When ``k < S`` a random subset of the slots is restarted. Under ``group`` the draw is made on
    :func:`source_rank` and broadcast, so every rank restarts the same codes with the same rows. Returns None
    when no rank has any row.
    """
    source = source_rank(x.shape[0], group, x.device)
    if source is None:
        return None
    src, take = source
    S, D = slots.shape[0], x.shape[1]
    rows = torch.empty(S, D, dtype=dtype, device=x.device)
    # the restarted slots, padded with -1 past k (so that the other ranks learn k from the broadcast)
    chosen = torch.full((S,), -1, dtype=torch.int64, device=x.device)
    if take:
        pick = torch.randperm(x.shape[0], device=x.device)[:S]
        distinct = torch.unique(x[pick].to(dtype), dim=0)
        k = distinct.shape[0]
        rows[:k] = distinct
        chosen[:k] = slots if k == S else slots[torch.randperm(S, device=x.device)[:k]]
    if group is not None:
        torch.distributed.broadcast(rows, src=src, group=group)
        torch.distributed.broadcast(chosen, src=src, group=group)
        k = int((chosen >= 0).sum())
    return chosen[:k], rows[:k]
