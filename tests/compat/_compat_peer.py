"""Shared by the compat tests: the installed vector-quantize-pytorch, a peer/ours pair built under one seed, inputs
near codes, and one training step compared in full (see tests/compat/test_compat_vq.py for the method)."""
import warnings

import pytest
import torch

from lgvq_fast.compat import LossBreakdown, VectorQuantize
from lgvq_fast.compat import _vq_math as vm
from lgvq_fast.reference.nearest_code import tie_tolerance

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")
Peer = vqp.VectorQuantize

DIM, K, B, N = 19, 37, 2, 41
STEPS = 4


@pytest.fixture(autouse=True)
def _quiet():
    # the peer's masked loss broadcasts (a UserWarning) and its k-means logs a warning for small batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _close(ours, peer, what, rtol=1e-5):
    assert ours.shape == peer.shape, (what, ours.shape, peer.shape)
    scale = max(float(peer.detach().double().abs().max()) if peer.numel() else 0.0, 1e-6)
    err = float((ours.detach().double() - peer.detach().double()).abs().max()) if peer.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max |ours - peer| = {err:.3g} > {rtol} * {scale:.3g}"


def _pair(seed=0, **kw):
    """Peer and ours built under one seed: same state_dict keys, shapes and values."""
    kw = {"dim": DIM, "codebook_size": K, **kw}
    torch.manual_seed(seed)
    peer = Peer(**kw)
    torch.manual_seed(seed)
    ours = VectorQuantize(**kw)
    sp, so = peer.state_dict(), ours.state_dict()
    assert list(sp) == list(so)
    for key in sp:
        assert torch.equal(sp[key], so[key]), key
    assert [n for n, _ in peer.named_parameters()] == [n for n, _ in ours.named_parameters()]
    return peer, ours


def _spread(peer, ours):
    """Codes ~ N(0, 1) (unit-norm for cosine): kaiming's codes crowd the origin. A projection gets orthonormal
    rows, so that inputs built through its right inverse are not much longer than their projections (a
    random Linear's pseudo-inverse stretches them ~15x, and each rounding difference with them)."""
    cb = peer._codebook
    with torch.no_grad():
        if peer.has_projections and isinstance(peer.project_in, torch.nn.Linear):
            torch.nn.init.orthogonal_(peer.project_in.weight)
        cb.embed.normal_()
        if peer.use_cosine_sim:
            cb.embed.copy_(torch.nn.functional.normalize(cb.embed, dim=-1))
        cb.embed_avg.copy_(cb.embed)
    ours.load_state_dict(peer.state_dict())


def _inputs(peer, n=N, sigma=0.25, centers=None, fmap=None):
    """``[B, n, dim]`` inputs whose codebook-space vectors lie within ``sigma`` per coordinate of a code."""
    heads, sep = peer.heads, peer.separate_codebook_per_head
    book = peer._codebook.embed.detach().double() if centers is None else centers
    book = book[torch.arange(heads) if sep else torch.zeros(heads, dtype=torch.long)]  # [heads, K', d]
    choice = torch.randint(book.shape[1], (B, n, heads))
    t = book[torch.arange(heads), choice]  # [B, n, heads, d]
    t = (t + sigma * torch.randn_like(t)).reshape(B, n, -1)
    if peer.has_projections:
        lin = peer.project_in
        # a right inverse of project_in: project_in(x) = t up to rounding
        t = (t - lin.bias.detach().double()) @ torch.linalg.pinv(lin.weight.detach().double()).T
    x = t.float()
    if fmap is not None:
        return x.transpose(1, 2).reshape(B, -1, *fmap)
    return x if peer.channel_last else x.transpose(1, 2)


def _codebook_space(vq, x):
    """The vectors the codebook compares (after layout, projection, head split and normalisation)."""
    with torch.no_grad():
        t, spatial = vm.to_tokens(x, vq.accept_image_fmap, vq.accept_3d_fmap)
        if spatial is None and not vq.channel_last:
            t = t.transpose(1, 2)
        t = vq._codebook_input(t).float()
        return t if t.ndim == 4 else t[None]


def _tied(vq, x, ours_idx, peer_idx, codes):
    """True when every differing index is tied with the peer's within fp32 rounding (float64 distances)."""
    z = _codebook_space(vq, x).double()  # [h, b', n, d]
    h = z.shape[0]
    io = ours_idx.reshape(-1, h) if vq.separate_codebook_per_head else ours_idx.reshape(1, -1)
    ip = peer_idx.reshape(-1, h) if vq.separate_codebook_per_head else peer_idx.reshape(1, -1)
    if vq.separate_codebook_per_head:
        io, ip = io.T, ip.T
    z = z.reshape(h, -1, z.shape[-1])
    for head in range(h):
        e = codes[head].double()
        if vq.use_cosine_sim:
            e = torch.nn.functional.normalize(e, dim=-1)
        zz = z[head]
        d_o = (zz - e[io[head]]).pow(2).sum(-1)
        d_p = (zz - e[ip[head]]).pow(2).sum(-1)
        tol = tie_tolerance(zz, e, "cos" if vq.use_cosine_sim else "l2")
        if ((d_o - d_p).abs() > tol).any():
            return False
    return True


def _train_step(peer, ours, x, seed, lr=0.05, **fwd):
    """One step of both; returns True when it was compared exactly, False when a tie forced a resync."""
    codes = peer._codebook.embed.detach().clone()
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    qp, ip, lp, bp = peer(xp, return_loss_breakdown=True, **fwd)
    torch.manual_seed(seed)
    qo, io, lo, bo = ours(xo, return_loss_breakdown=True, **fwd)
    if not torch.equal(ip, io):
        assert ip.shape == io.shape
        assert _tied(ours, x, io, ip, codes), "an index differs from the peer's away from a tie"
        ours.load_state_dict(peer.state_dict())
        return False
    # a downstream loss of unit scale, and small SGD steps: training stays smooth, so rounding differences
    # are not amplified from step to step the way a diverging run would amplify them
    w = torch.randn_like(qp) / qp.numel() ** 0.5
    ((qp * w).sum() + lp).backward()
    ((qo * w).sum() + lo).backward()
    _close(qo, qp, "quantize")
    _close(lo, lp, "loss")
    for name, a, b in zip(LossBreakdown._fields, bo, bp):
        _close(a, b, name)
    _close(xo.grad, xp.grad, "input gradient")
    params_p, params_o = dict(peer.named_parameters()), dict(ours.named_parameters())
    for name, p in params_p.items():
        o = params_o[name]
        assert (p.grad is None) == (o.grad is None), name
        if p.grad is not None:
            _close(o.grad, p.grad, f"{name}.grad")
            with torch.no_grad():
                p -= lr * p.grad
                o -= lr * o.grad
            p.grad = o.grad = None
    sp, so = peer.state_dict(), ours.state_dict()
    for key in sp:
        _close(so[key], sp[key], f"{key} after the step")
    return True


def _train(peer, ours, make_x, steps=STEPS, **fwd):
    exact = sum(_train_step(peer, ours, make_x(step), 1000 + step, **fwd) for step in range(steps))
    # a resync is for a rare near-tie: most steps must be compared in full
    assert exact >= steps - 1, f"only {exact} of {steps} steps compared exactly"


TRAINING = {
    "ema-l2-rotation": {},
    "ema-l2-straight-through": {"rotation_trick": False},
    "ema-cos-rotation": {"use_cosine_sim": True},
    "ema-cos-straight-through": {"use_cosine_sim": True, "rotation_trick": False},
    "learned-rotation": {"learnable_codebook": True, "ema_update": False},
    "learned-straight-through": {"learnable_codebook": True, "ema_update": False, "rotation_trick": False},
    "codebook-dim": {"codebook_dim": 7},
    "heads-separate": {"codebook_dim": 5, "heads": 3, "separate_codebook_per_head": True},
    "heads-shared": {"codebook_dim": 5, "heads": 3},
    "heads-no-projection": {"dim": 18, "codebook_dim": 6, "heads": 3, "separate_codebook_per_head": True},
    "heads-shared-learned": {"codebook_dim": 5, "heads": 3, "learnable_codebook": True, "ema_update": False},
    "dead-codes-ema": {"threshold_ema_dead_code": 2},
    "dead-codes-cos": {"threshold_ema_dead_code": 2, "use_cosine_sim": True},
    "dead-codes-no-ema": {"threshold_ema_dead_code": 2, "learnable_codebook": True, "ema_update": False},
    "orthogonal": {"orthogonal_reg_weight": 5.0, "orthogonal_reg_max_codes": 20},
    "orthogonal-active-cos": {"orthogonal_reg_weight": 5.0, "orthogonal_reg_active_codes_only": True,
                              "use_cosine_sim": True},
    "stochastic": {"stochastic_sample_codes": True, "sample_codebook_temp": 0.3},
    "gumbel-straight-through": {"straight_through": True, "rotation_trick": False, "sample_codebook_temp": 0.5,
                                "route_gradients_to_input": False},
    "gumbel-straight-through-routed": {"straight_through": True, "rotation_trick": False},
    "ce-commitment": {"commitment_use_cross_entropy_loss": True},
    "diversity": {"codebook_diversity_loss_weight": 0.3, "codebook_diversity_temperature": 3.0},
    "directional-reparam": {"directional_reparam": True, "threshold_ema_dead_code": 1},
    "sync-update-v": {"learnable_codebook": True, "ema_update": False, "sync_update_v": 0.5},
    "layernorm-projection": {"codebook_dim": 7, "layernorm_after_project_in": True},
    "channel-first": {"channel_last": False},
    "commitment-weight": {"commitment_weight": 0.37, "decay": 0.9, "eps": 1e-3},
    "frozen": {"freeze_codebook": True},
    "manual-ema-update": {"manual_ema_update": True, "threshold_ema_dead_code": 2},
}


