"""lgvq_fast.compat.VectorQuantize against the installed vector-quantize-pytorch (same state, same draws).

Each comparison builds the peer and ours under one seed (the weights must come out equal), then trains
both for several steps on the same inputs with the same random draws: indices equal, and quantize,
losses, input and parameter gradients, and every buffer after the update within 1e-5 of the peer's
(relative to the tensor's largest magnitude).

Inputs lie near codes (codebook-space targets mapped back through ``project_in``), so that the nearest
code wins by far more than fp32 rounding. The two searches round differently (the peer's
``sqrt(|x|^2 + |e|^2 - 2 x.e)`` against ``nearest_code``'s ``|e|^2 - 2 x.e``), so an index may differ only
on a near-tie; the step check accepts such a difference only when float64 says the two codes are tied
within rounding, and then copies the peer's state before going on.
"""
import os
import subprocess
import sys
import textwrap
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


@pytest.mark.parametrize("kw", TRAINING.values(), ids=TRAINING.keys())
def test_vector_quantize_trains_like_the_peer(kw):
    peer, ours = _pair(**kw)
    _spread(peer, ours)
    if kw.get("layernorm_after_project_in"):
        # project_in has no right inverse through a LayerNorm: plain Gaussian inputs
        _train(peer, ours, lambda step: torch.randn(B, N, peer.dim))
        return
    # fewer rows in a later step than dead codes: the peer restarts only as many codes as rows
    _train(peer, ours, lambda step: _inputs(peer, n=N if step < 2 else 5))


def test_vector_quantize_generic_inputs_and_peer_initialisation():
    # the peer's own codebook (kaiming over [1, K, D]: all codes near the origin) and Gaussian inputs
    for kw in ({}, {"use_cosine_sim": True}, {"threshold_ema_dead_code": 2, "codebook_dim": 8}):
        peer, ours = _pair(seed=3, **kw)
        _train(peer, ours, lambda step: torch.randn(B, N, DIM))


@pytest.mark.parametrize("fmap", [(5, 3), (2, 3, 4)], ids=["image", "3d"])
def test_vector_quantize_feature_maps(fmap):
    key = "accept_image_fmap" if len(fmap) == 2 else "accept_3d_fmap"
    peer, ours = _pair(**{key: True, "codebook_dim": 6, "heads": 2, "separate_codebook_per_head": True})
    _spread(peer, ours)
    n = torch.Size(fmap).numel()
    _train(peer, ours, lambda step: _inputs(peer, n=n, fmap=fmap))
    x = _inputs(peer, n=n, fmap=fmap)
    for vq in (peer, ours):
        vq.eval()
    qp, ip, _ = peer(x)
    qo, io, _ = ours(x)
    assert io.shape == (B, *fmap, 2) and qo.shape == x.shape and torch.equal(io, ip)
    _close(qo, qp, "eval quantize")
    # the peer's get_output_from_indices fails here (project_out on a spatial dim); ours gives its eval output
    _close(ours.get_output_from_indices(io), qp, "get_output_from_indices")
    _close(ours.get_codes_from_indices(io), peer.get_codes_from_indices(ip), "get_codes_from_indices")


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_vector_quantize_kmeans_init(cosine):
    peer, ours = _pair(kmeans_init=True, kmeans_iters=4, use_cosine_sim=cosine)
    centers = torch.randn(1, 2 * K, DIM, dtype=torch.float64)
    assert not bool(ours._codebook.initted)
    # the first batch has fewer rows than codes: seeds repeat, and a repeated seed's cluster stays empty
    _train(peer, ours, lambda step: _inputs(peer, n=15 if step == 0 else N, centers=centers))
    assert bool(ours._codebook.initted)


def test_vector_quantize_cosine_learned_codebook_ranks_by_dot_product():
    # the orthogonal regulariser makes the codebook a learned parameter; off the unit sphere the peer ranks
    # codes by x.e (not by cosine), and so must we: codes of very different lengths make the two differ
    peer, ours = _pair(use_cosine_sim=True, orthogonal_reg_weight=1.0, ema_update=False)
    with torch.no_grad():
        peer._codebook.embed.mul_(torch.empty(1, K, 1).uniform_(0.2, 3.0))
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(B, N, DIM)
    _, ip, _ = peer(x)
    _, io, _ = ours(x)
    cosine_pick = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(ours.codebook, dim=-1).T
    assert torch.equal(io, ip) and not torch.equal(io, cosine_pick.argmax(-1))
    _train(peer, ours, lambda step: torch.randn(B, N, DIM))


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_vector_quantize_mask_and_lens(cosine):
    peer, ours = _pair(use_cosine_sim=cosine, threshold_ema_dead_code=2)
    _spread(peer, ours)
    lens = torch.tensor([N - 7, 13])
    _train(peer, ours, lambda step: _inputs(peer), lens=lens)
    mask = torch.rand(B, N) < 0.6
    _train(peer, ours, lambda step: _inputs(peer), mask=mask)
    x = _inputs(peer)
    q, idx, _ = ours(x, lens=lens)
    assert (q[1, 13:] == 0).all() and (idx[1, 13:] == -1).all() and (idx[1, :13] >= 0).all()
    keep = VectorQuantize(DIM, K, return_zeros_for_masked_padding=False, use_cosine_sim=cosine)
    keep.load_state_dict(ours.state_dict())
    q, _, _ = keep(x, lens=lens)
    assert torch.equal(q[1, 13:], x[1, 13:])


def test_vector_quantize_ema_update_weight_and_accumulation():
    peer, ours = _pair(codebook_dim=8)
    _spread(peer, ours)
    weight = torch.rand(K)
    _train(peer, ours, lambda step: _inputs(peer), steps=2, ema_update_weight=weight)
    _train(peer, ours, lambda step: _inputs(peer), steps=2, ema_update_weight=lambda sums, counts: counts > 1)
    before = ours.codebook.clone()
    _train(peer, ours, lambda step: _inputs(peer), steps=2, accum_ema_update=True)
    assert torch.equal(ours.codebook, before)
    # the next ordinary step folds both accumulated batches in
    _train(peer, ours, lambda step: _inputs(peer), steps=2)
    assert not torch.equal(ours.codebook, before)
    with pytest.raises(ValueError, match="ema_update_weight"):
        ours(_inputs(peer), ema_update_weight=torch.ones(K + 1))


def test_vector_quantize_per_call_switches():
    peer, ours = _pair(threshold_ema_dead_code=2)
    _spread(peer, ours)
    x = _inputs(peer)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _train_step(peer, ours, x, 1, freeze_codebook=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    # ema_update=False per call: statistics tracked and dead codes restarted, codes not re-averaged
    _train(peer, ours, lambda step: _inputs(peer), steps=2, ema_update=False)
    _train(peer, ours, lambda step: _inputs(peer), steps=2, sample_codebook_temp=0.0)


def test_vector_quantize_eval_mode_and_lookups():
    peer, ours = _pair(codebook_dim=6, heads=3, separate_codebook_per_head=True, channel_last=False)
    _spread(peer, ours)
    peer.eval()
    ours.eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = _inputs(peer).requires_grad_()
    qp, ip, _ = peer(x)
    qo, io, lo = ours(x)
    assert torch.equal(io, ip) and io.shape == (B, N, 3) and qo.shape == x.shape
    _close(qo, qp, "eval quantize")
    # eval mode: the code itself, no straight-through path back to the input, no loss
    assert float(lo) == 0.0 and torch.autograd.grad(qo.sum(), x, allow_unused=True)[0] is None
    _close(ours.get_output_from_indices(io), qo, "get_output_from_indices")
    _close(ours.get_codes_from_indices(io), peer.get_codes_from_indices(ip), "get_codes_from_indices")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key
    # the codebook property and its setter
    new = torch.randn(3, K, 6)
    ours.codebook = new
    peer.codebook = new
    assert torch.equal(ours.codebook, peer.codebook) and torch.equal(ours._codebook.embed, new)
    single = _pair(seed=4)[1]
    codes = torch.randn(K, DIM)
    single.codebook = codes
    assert torch.equal(single._codebook.embed[0], codes) and single.codebook.shape == (K, DIM)
    # heads sharing one codebook: the peer returns the codes per head, unmerged
    peer, ours = _pair(codebook_dim=5, heads=3)
    idx = torch.randint(K, (B, 4, 3))
    assert torch.equal(ours.get_codes_from_indices(idx), peer.get_codes_from_indices(idx))


@pytest.mark.parametrize("heads", [1, 3])
def test_vector_quantize_cross_entropy_on_given_indices(heads):
    kw = {"codebook_dim": 6, "heads": heads, "separate_codebook_per_head": True} if heads > 1 else {}
    peer, ours = _pair(**kw)
    _spread(peer, ours)
    x = _inputs(peer)
    target = torch.randint(K, (B, N, heads) if heads > 1 else (B, N))
    target[0, :3] = -1
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    qp, lp = peer(xp, indices=target)
    qo, lo = ours(xo, indices=target)
    _close(qo, qp, "quantize")
    _close(lo, lp, "cross-entropy")
    lp.backward()
    lo.backward()
    _close(xo.grad, xp.grad, "input gradient")


def test_vector_quantize_one_token_and_public_updates():
    peer, ours = _pair()
    _spread(peer, ours)
    _train(peer, ours, lambda step: _inputs(peer, n=1)[:, 0])
    x = _inputs(peer)
    with torch.no_grad():
        _, idx, _ = ours.eval()(x)
    peer.train()
    ours.train()
    peer.update_indices(x, idx)
    ours.update_indices(x, idx)
    for key, value in peer.state_dict().items():
        _close(ours.state_dict()[key], value, key)


def test_vector_quantize_manual_ema_update_and_vq_bridge():
    peer, ours = _pair(manual_ema_update=True)
    _spread(peer, ours)
    codes = ours.codebook.clone()
    _train(peer, ours, lambda step: _inputs(peer), steps=2)
    assert torch.equal(ours.codebook, codes)
    peer._codebook.update_ema()
    ours._codebook.update_ema()
    assert not torch.equal(ours.codebook, codes)
    _close(ours.codebook, peer.codebook, "codebook after update_ema")
    models = []
    for cls in (Peer, VectorQuantize):
        torch.manual_seed(2)
        bridge = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.Tanh())
        models.append(cls(DIM, K, vq_bridge=bridge, learnable_codebook=True, ema_update=False))
    peer, ours = models
    assert list(peer.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(peer.state_dict())
    _train(peer, ours, lambda step: torch.randn(B, N, DIM))


def test_vector_quantize_in_place_optimizer():
    kw = {"learnable_codebook": True, "ema_update": False,
          "in_place_codebook_optimizer": lambda params: torch.optim.SGD(params, lr=0.5)}
    peer, ours = _pair(**kw)
    _spread(peer, ours)
    _train(peer, ours, lambda step: _inputs(peer, sigma=0.1))


def test_vector_quantize_triton_impl_matches_reference():
    triton_ok = pytest.importorskip("lgvq_fast._backend").triton_available()
    if not triton_ok:
        pytest.skip("triton is not installed")
    ref = VectorQuantize(DIM, K, threshold_ema_dead_code=2, impl="reference")
    tri = VectorQuantize(DIM, K, threshold_ema_dead_code=2, impl="triton")
    tri.load_state_dict(ref.state_dict())
    for step in range(2):
        x = torch.randn(B, 23, DIM)
        torch.manual_seed(step)
        qr, ir, _ = ref(x)
        torch.manual_seed(step)
        qt, it, _ = tri(x)
        assert torch.equal(ir, it)
        _close(qt, qr, "quantize")
        for key, value in ref.state_dict().items():
            _close(tri.state_dict()[key], value, key)


def test_vector_quantize_initialisation_is_the_peers():
    # kaiming_uniform_ over [h, K, D]: U(+-sqrt(6 / (K * D)))
    K_big, D = 300, 40
    vq = VectorQuantize(D, K_big)
    bound = (6.0 / (K_big * D)) ** 0.5
    codes = vq.codebook
    assert codes.abs().max() <= bound and codes.abs().max() > 0.95 * bound
    assert torch.equal(vq._codebook.embed_avg, vq._codebook.embed) and torch.equal(
        vq._codebook.cluster_size, torch.ones(1, K_big))
    cos = VectorQuantize(D, K_big, use_cosine_sim=True, kmeans_init=True)
    assert not bool(cos._codebook.initted) and torch.equal(cos.codebook, torch.zeros(K_big, D))
    for kw in ({"heads": 2, "codebook_dim": 8, "separate_codebook_per_head": True}, {"use_cosine_sim": True},
               {"learnable_codebook": True, "ema_update": False}, {"kmeans_init": True}):
        peer, ours = _pair(**kw)
        peer.load_state_dict(ours.state_dict())
        assert ours.ema_update == peer.ema_update and ours.rotation_trick == peer.rotation_trick


def test_vector_quantize_rejects_bad_arguments():
    bad = [
        ({"dim": 0}, "dim"), ({"codebook_size": 2.5}, "codebook_size"), ({"heads": 0}, "heads"),
        ({"decay": 1.5}, "decay"), ({"eps": 0.0}, "eps"), ({"threshold_ema_dead_code": -1}, "threshold"),
        ({"use_cosine_sim": True, "learnable_codebook": True, "ema_update": False}, "use_cosine_sim"),
        ({"learnable_codebook": True}, "ema_update=False"),
        ({"straight_through": True}, "rotation_trick"),
        ({"directional_reparam": True}, "threshold_ema_dead_code"),
        ({"kmeans_init": True, "kmeans_iters": 0}, "kmeans_iters"),
        ({"affine_param": True}, "affine_param"), ({"impl": "gpu"}, "impl"), ({"precision": "half"}, "precision"),
        ({"accept_image_fmap": True, "accept_3d_fmap": True}, "accept_3d_fmap"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            VectorQuantize(**{"dim": DIM, "codebook_size": K, **kwargs})
    vq = VectorQuantize(DIM, K)
    x = torch.randn(B, N, DIM)
    calls = [
        (lambda: vq(x, topk=2), "topk"), (lambda: vq(x, codebook_transform_fn=lambda e: e), "codebook_transform_fn"),
        (lambda: vq(torch.randn(B, N, DIM - 1)), "dim=19"), (lambda: vq(torch.randn(B, 2, N, DIM)), "x must be"),
        (lambda: vq(x.long()), "floating-point"), (lambda: vq(x, mask=torch.ones(B, N - 1, dtype=torch.bool)), "mask"),
        (lambda: vq(x, lens=torch.tensor([3.0, 4.0])), "lens"),
        (lambda: vq(x, lens=torch.tensor([3, 4]), mask=torch.ones(B, N, dtype=torch.bool)), "not both"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    heads = VectorQuantize(DIM, K, codebook_dim=5, heads=2)
    with pytest.raises(ValueError, match="mask/lens cannot be used"):
        heads(x, lens=torch.tensor([3, 4]))


def test_compat_runs_without_the_peers_and_triton():
    # the peers, their helpers and triton blocked: both classes still import and run (reference search)
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = ("vector_quantize_pytorch", "taming", "triton", "einops", "einx")
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked for this test")
        sys.meta_path.insert(0, Blocker())
        for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
            del sys.modules[name]
        import torch
        from lgvq_fast.compat import VectorQuantize, VectorQuantizer2
        q, i, loss = VectorQuantize(6, 5, threshold_ema_dead_code=1)(torch.randn(2, 7, 6))
        assert q.shape == (2, 7, 6) and i.shape == (2, 7)
        q, loss, (_, _, i) = VectorQuantizer2(5, 6, 0.25)(torch.randn(2, 6, 3, 2))
        assert q.shape == (2, 6, 3, 2) and i.shape == (12,)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def _ddp_worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        warnings.simplefilter("ignore")
        # sync_codebook left at None: on, as in the peer, because several processes run
        kw = {"dim": DIM, "codebook_size": K, "kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": 1.5}
        torch.manual_seed(0)
        peer = Peer(**kw)
        torch.manual_seed(0)
        ours = VectorQuantize(**kw)
        assert ours._codebook.use_ddp and peer._codebook.use_ddp
        centers = torch.randn(2 * K, DIM, generator=torch.Generator().manual_seed(7))
        data = torch.Generator().manual_seed(100 + rank)
        results = []
        for step in range(3):
            n = (30, 7, 19)[step] + 5 * rank
            x = centers[torch.randint(2 * K, (B, n), generator=data)] + 0.2 * torch.randn(B, n, DIM, generator=data)
            out = []
            for vq in (peer, ours):
                # the same draws on every rank (the multinomial split is drawn on rank 0 and broadcast)
                torch.manual_seed(500 + step)
                _, idx, loss = vq(x)
                out.append((idx, loss.detach(), {k: v.clone() for k, v in vq.state_dict().items()}))
            results.append(out)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vector_quantize_sync_codebook_across_processes_like_the_peer(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.spawn(_ddp_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rank, results in enumerate(ranks):
        for step, ((ip, lp, sp), (io, lo, so)) in enumerate(results):
            assert torch.equal(io, ip), (rank, step)
            _close(lo, lp, f"loss rank {rank} step {step}")
            for key in sp:
                _close(so[key], sp[key], f"{key} rank {rank} step {step}")
                # the codebook is the same on every rank
                assert torch.equal(so[key], ranks[0][step][1][2][key]), (key, rank, step)


def test_vector_quantize_bf16_input_like_the_peer():
    # no projection: a bf16 input through the fp32 project_in fails in the peer too
    peer, ours = _pair(threshold_ema_dead_code=2)
    _spread(peer, ours)
    x = _inputs(peer).bfloat16()
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    qp, ip, lp = peer(xp)
    torch.manual_seed(1)
    qo, io, lo = ours(xo)
    assert qo.dtype == torch.bfloat16 and torch.equal(io, ip) and torch.equal(qo, qp)
    _close(lo.float(), lp.float(), "loss")
    (qp.float().sum() + lp).backward()
    (qo.float().sum() + lo).backward()
    _close(xo.grad.float(), xp.grad.float(), "input gradient", rtol=1e-2)
    for key, value in peer.state_dict().items():
        _close(ours.state_dict()[key], value, key)


def test_tie_check_accepts_only_near_ties():
    # the gate that lets an index differ from the peer's: a swap between codes within rounding passes,
    # a swap between distinct codes does not
    peer, ours = _pair()
    _spread(peer, ours)
    codes = ours._codebook.embed.detach().clone()
    codes[0, 1] = codes[0, 0] * (1 + 1e-7)
    x = _inputs(peer)
    x[0, :5] = codes[0, 0] + 0.01 * torch.randn(5, DIM)
    on_pair = (torch.arange(N) < 5)[None].expand(B, N) & (torch.arange(B) == 0)[:, None]
    theirs = torch.where(on_pair, 0, torch.randint(2, K, (B, N)))
    assert _tied(ours, x, torch.where(on_pair, 1, theirs), theirs, codes)
    assert not _tied(ours, x, torch.where(on_pair, 2, theirs), theirs, codes)
