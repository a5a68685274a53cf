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

import pytest
import torch

from lgvq_fast import _backend
from lgvq_fast.compat import VectorQuantize

# tests/compat/ is on sys.path (pytest's default import mode puts the folder of a test module there)
from _compat_peer import _quiet  # noqa: F401  (an autouse fixture: it must be in this module)
from _compat_peer import B, DIM, K, N, TRAINING, Peer, _close, _inputs, _pair, _spread, _train, _train_step


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


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
def test_vector_quantize_triton_impl_matches_reference():
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


