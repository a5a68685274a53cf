"""Tests of lgvq_fast.VectorQuantizer and lgvq_fast.quantize_cvq.CVQVectorQuantizer (single process)."""
import pytest
import torch
import torch.nn.functional as F

from lgvq_fast import VectorQuantizer
from lgvq_fast.quantize_cvq import CVQVectorQuantizer
from lgvq_fast.reference.nearest_code import tie_aware_mismatch

D, K = 13, 37


def _z(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).mul(0.5).to(dtype).requires_grad_(True)


def _loss_weights(legacy, beta):
    return (1.0, beta) if legacy else (beta, 1.0)


def _spread_codebook(vq):
    # U(-1/K, 1/K) codes sit near the origin; spread them so that several codes win
    with torch.no_grad():
        vq.embed.copy_(torch.randn_like(vq.embed) * 0.5)


@pytest.mark.parametrize("legacy", [False, True], ids=["textbook", "legacy"])
@pytest.mark.parametrize("ema", [False, True], ids=["learned", "ema"])
def test_vector_quantizer_forward_loss_and_gradients(legacy, ema):
    beta = 0.3
    vq = VectorQuantizer(D, K, commitment_weight=beta, legacy=legacy, ema_update=ema).eval()
    _spread_codebook(vq)
    z = _z(3, 19, D)
    quantize, indices, loss = vq(z)
    assert indices.shape == (3, 19) and indices.dtype == torch.int64
    assert tie_aware_mismatch(z.detach(), vq.embed.detach(), indices) == 0.0
    assert torch.equal(quantize, vq.embed.detach()[indices])

    z64, e64 = z.detach().double(), vq.embed.detach().double()
    diff = z64 - e64[indices]
    w_commit, w_code = _loss_weights(legacy, beta)
    expected = w_commit * diff.pow(2).mean() + (0.0 if ema else w_code * diff.pow(2).mean())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)

    loss.backward()
    torch.testing.assert_close(z.grad.double(), w_commit * 2.0 * diff / diff.numel(), rtol=1e-5, atol=1e-8)
    if ema:
        assert not vq.embed.requires_grad
    else:
        per_row = (-2.0 * diff / diff.numel()).reshape(-1, D)
        expected_e = torch.zeros_like(e64).index_add_(0, indices.reshape(-1), per_row)
        torch.testing.assert_close(vq.embed.grad.double(), w_code * expected_e, rtol=1e-5, atol=1e-8)

    z.grad = None
    quantize, _, _ = vq(z)
    quantize.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_vector_quantizer_cosine_mode():
    vq = VectorQuantizer(D, K, use_cosine_sim=True).eval()
    z = _z(41, D)
    quantize, indices, loss = vq(z)
    codes = F.normalize(vq.embed.detach().double(), dim=-1)
    assert tie_aware_mismatch(z.detach(), vq.embed.detach(), indices, metric="cos") == 0.0
    torch.testing.assert_close(quantize.double(), codes[indices], rtol=1e-6, atol=1e-7)
    zn = F.normalize(z.detach().double(), dim=-1)
    torch.testing.assert_close(loss.double(), 1.25 * (zn - codes[indices]).pow(2).mean(), rtol=1e-5, atol=1e-7)
    quantize.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_vector_quantizer_channel_first_matches_channel_last():
    last = VectorQuantizer(D, K)
    _spread_codebook(last)
    first = VectorQuantizer(D, K, channel_last=False)
    first.load_state_dict(last.state_dict())
    z_first = _z(2, D, 5, 3)
    q_first, i_first, l_first = first(z_first)
    z_last = z_first.detach().movedim(1, -1).requires_grad_(True)
    q_last, i_last, l_last = last(z_last)
    assert q_first.shape == z_first.shape and i_first.shape == (2, 5, 3)
    assert torch.equal(q_first, q_last.movedim(-1, 1))
    assert torch.equal(i_first, i_last)
    torch.testing.assert_close(l_first, l_last)
    assert torch.equal(first.get_output_from_indices(i_first), last.get_codes_from_indices(i_last).movedim(-1, 1))
    w = torch.randn_like(q_last)
    (q_first * w.movedim(-1, 1) + l_first).sum().backward()
    (q_last * w + l_last).sum().backward()
    torch.testing.assert_close(z_first.grad.movedim(1, -1), z_last.grad)
    torch.testing.assert_close(first.embed.grad, last.embed.grad)


def _ema_hand(cs, ea, z, idx, decay, eps):
    cs, ea, z = cs.double(), ea.double(), z.double()
    counts = torch.bincount(idx, minlength=cs.shape[0]).double()
    sums = torch.zeros_like(ea).index_add_(0, idx, z)
    cs = decay * cs + (1 - decay) * counts
    ea = decay * ea + (1 - decay) * sums
    n = cs.sum()
    s = (cs + eps) / (n + cs.shape[0] * eps) * n
    return cs, ea, ea / s[:, None]


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_vector_quantizer_ema_step_matches_float64(cosine):
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizer(D, K, ema_update=True, decay=decay, eps=eps, use_cosine_sim=cosine).train()
    cs0, ea0, e0 = vq.cluster_size.clone(), vq.embed_avg.clone(), vq.embed.clone()
    z = _z(5, 23, D)
    _, indices, _ = vq(z)
    metric = "cos" if cosine else "l2"
    assert tie_aware_mismatch(z.detach(), e0, indices, metric=metric) == 0.0
    zf = F.normalize(z.detach(), dim=-1) if cosine else z.detach()
    cs, ea, e = _ema_hand(cs0, ea0, zf.reshape(-1, D), indices.reshape(-1), decay, eps)
    torch.testing.assert_close(vq.cluster_size.double(), cs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(vq.embed_avg.double(), ea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embed.double(), e, rtol=1e-5, atol=1e-6)

    vq.eval()
    before = [t.clone() for t in (vq.cluster_size, vq.embed_avg, vq.embed)]
    vq(z)
    for a, b in zip(before, (vq.cluster_size, vq.embed_avg, vq.embed)):
        assert torch.equal(a, b)


def test_vector_quantizer_dead_code_restart_replaces_exactly_dead_codes():
    decay, eps, thr = 0.9, 1e-5, 0.95
    vq = VectorQuantizer(D, K, ema_update=True, decay=decay, eps=eps, threshold_ema_dead_code=thr).train()
    cs0, ea0 = vq.cluster_size.clone(), vq.embed_avg.clone()
    z = _z(29, D)
    _, indices, _ = vq(z)
    cs, ea, e = _ema_hand(cs0, ea0, z.detach(), indices, decay, eps)
    # cluster_size starts at 1: after one step it is 0.9 for an unused code and >= 1 for a used one
    dead = cs < thr
    assert torch.equal(dead, torch.bincount(indices, minlength=K) == 0) and 0 < int(dead.sum()) < K
    alive = ~dead
    torch.testing.assert_close(vq.embed[alive].double(), e[alive], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.cluster_size[alive].double(), cs[alive], rtol=1e-6, atol=1e-7)
    new = vq.embed[dead]
    # every restarted code is a row of the batch, and distinct rows were drawn (N >= number dead)
    match = (new[:, None, :] == z.detach()[None]).all(-1)
    assert match.any(1).all()
    assert len(set(match.float().argmax(1).tolist())) == int(dead.sum())
    assert torch.all(vq.cluster_size[dead] == thr)
    torch.testing.assert_close(vq.embed_avg[dead], new * thr)


@pytest.mark.parametrize("quantizer", ["vq", "vq-ema", "cvq"])
def test_quantizers_empty_batch(quantizer):
    if quantizer == "cvq":
        vq = CVQVectorQuantizer(D, K).train()
    else:
        vq = VectorQuantizer(D, K, ema_update=quantizer == "vq-ema", threshold_ema_dead_code=0.0).train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    z = _z(0, 4, D)
    quantize, indices, loss = vq(z)
    assert quantize.shape == (0, 4, D) and indices.shape == (0, 4)
    assert loss.item() == 0.0
    loss.backward()
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_quantizers_reject_bad_input():
    vq = VectorQuantizer(D, K, check_finite=True)
    with pytest.raises(ValueError, match="z must have last dim"):
        vq(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="z must be float"):
        vq(torch.randint(0, 3, (4, D)))
    with pytest.raises(ValueError, match="z contains NaN"):
        vq(torch.full((2, D), float("nan")))
    with pytest.raises(ValueError, match="z must be a torch.Tensor"):
        vq([[0.0] * D])
    first = VectorQuantizer(D, K, channel_last=False)
    with pytest.raises(ValueError, match="z must have dim 1"):
        first(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="z must have dim 1"):
        first(torch.randn(D))
    with pytest.raises(ValueError, match="indices must lie in"):
        vq.get_codes_from_indices(torch.tensor([0, K]))
    with pytest.raises(ValueError, match="indices must be an integer"):
        vq.get_codes_from_indices(torch.tensor([0.0]))
    bad_args = [
        ({"dim": 0}, "dim"), ({"codebook_size": 0}, "codebook_size"), ({"decay": 1.0}, "decay"),
        ({"eps": 0.0}, "eps"), ({"precision": "half"}, "precision"), ({"impl": "gpu"}, "impl"),
        ({"commitment_weight": -1.0}, "commitment_weight"),
        ({"threshold_ema_dead_code": 1.0}, "threshold_ema_dead_code"),
    ]
    for kwargs, name in bad_args:
        args = {"dim": D, "codebook_size": K, **kwargs}
        with pytest.raises(ValueError, match=name):
            VectorQuantizer(args.pop("dim"), args.pop("codebook_size"), **args)
    with pytest.raises(ValueError, match="anchor"):
        CVQVectorQuantizer(D, K, anchor="pool")
    with pytest.raises(ValueError, match="z must have last dim"):
        CVQVectorQuantizer(D, K)(torch.randn(3, D - 1))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-input", "bf16-autocast"])
def test_vector_quantizer_bf16(autocast):
    vq = VectorQuantizer(D, K, ema_update=True).train()
    z = _z(3, 17, D, dtype=torch.bfloat16)
    e0 = vq.embed.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        quantize, indices, loss = vq(z)
    assert quantize.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert tie_aware_mismatch(z.detach().float(), e0, indices) == 0.0
    assert torch.equal(quantize, e0[indices].to(torch.bfloat16))
    expected = 0.25 * (z.detach().double() - e0.double()[indices]).pow(2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    quantize.float().sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert torch.isfinite(vq.embed).all()


def _cvq(**kw):
    cvq = CVQVectorQuantizer(D, K, **kw)
    with torch.no_grad():
        cvq.embed.copy_(torch.randn_like(cvq.embed) * 0.5)
    return cvq


def test_cvq_vq_loss_and_straight_through():
    cvq = _cvq(channel_last=False).eval()
    z = _z(2, D, 4, 5)
    quantize, indices, loss = cvq(z)
    zl = z.detach().movedim(1, -1)
    assert tie_aware_mismatch(zl, cvq.embed.detach(), indices) == 0.0
    e64 = cvq.embed.detach().double()
    diff = zl.double() - e64[indices]
    torch.testing.assert_close(loss.double(), 1.25 * diff.pow(2).mean(), rtol=1e-5, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(z.grad.double().movedim(1, -1), 0.25 * 2 * diff / diff.numel(), rtol=1e-5, atol=1e-8)
    expected_e = torch.zeros_like(e64).index_add_(0, indices.reshape(-1), (-2 * diff / diff.numel()).reshape(-1, D))
    torch.testing.assert_close(cvq.embed.grad.double(), expected_e, rtol=1e-5, atol=1e-8)
    z.grad = None
    quantize, _, _ = cvq(z)
    quantize.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def _contrastive_hand(z, e, temperature=0.07):
    # float64, full sorts, as the spec states it
    d = -(z[:, None, :] - e[None]).pow(2).sum(-1)  # [N, K]
    s, _ = d.sort(dim=0)
    N, Kc = d.shape
    pos = s[-max(1, N // Kc):].mean(0, keepdim=True)
    neg = s[: N // 2]
    logits = torch.cat([pos, neg], 0).T / temperature
    return F.cross_entropy(logits, torch.zeros(Kc, dtype=torch.long))


@pytest.mark.parametrize("N", [97, 5], ids=["N97", "N5"])
def test_cvq_contrastive_loss_and_gradient_match_float64(N, monkeypatch):
    import lgvq_fast.quantize_cvq as cvq_mod

    # several code chunks, so the chunked pass is exercised
    monkeypatch.setattr(cvq_mod, "CHUNK_ELEMENTS", N * 8)
    cvq = _cvq(anchor="closest").train()
    e0 = cvq.embed.detach().clone()
    z = _z(N, D)
    _, indices, loss = cvq(z)
    e64 = e0.double().requires_grad_(True)
    contrastive = _contrastive_hand(z.detach().double(), e64)
    vq_part = 1.25 * (z.detach().double() - e0.double()[indices]).pow(2).mean()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), vq_part + contrastive.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    contrastive.backward()
    diff = z.detach().double() - e0.double()[indices]
    vq_grad = torch.zeros_like(e64).index_add_(0, indices, -2 * diff / diff.numel())
    torch.testing.assert_close(cvq.embed.grad.double(), vq_grad + e64.grad, rtol=1e-4, atol=1e-6)


def test_cvq_usage_ema_and_reinit_closest_match_float64():
    decay = 0.99
    cvq = _cvq(anchor="closest", contrastive=False).train()
    with torch.no_grad():
        cvq.embed_prob.copy_(torch.rand(K) * 2e-5)
    p0, e0 = cvq.embed_prob.clone().double(), cvq.embed.detach().clone().double()
    z = _z(61, D)
    _, indices, _ = cvq(z)
    p = decay * p0 + (1 - decay) * torch.bincount(indices, minlength=K).double() / 61
    torch.testing.assert_close(cvq.embed_prob.double(), p, rtol=1e-6, atol=1e-9)
    d = -(z.detach().double()[:, None] - e0[None]).pow(2).sum(-1)
    anchors = z.detach().double()[d.argmax(0)]
    alpha = torch.exp(-p * K * 10 / (1 - decay) - 1e-3)[:, None]
    torch.testing.assert_close(cvq.embed.detach().double(), (1 - alpha) * e0 + alpha * anchors, rtol=1e-5, atol=1e-6)


def test_cvq_probrandom_reinit_moves_unused_codes_and_keeps_used_ones():
    cvq = _cvq(contrastive=False).train()
    with torch.no_grad():
        # far from every feature: these codes are surely unused
        cvq.embed[:9] += 30.0
    z = _z(300, D)
    e0 = cvq.embed.detach().clone()
    cvq(z)
    # one step: unused codes get alpha = exp(-0.001); used ones have p >= 0.01/300 -> alpha < exp(-3.4)
    used = cvq.embed_prob > 0
    assert 0 < int(used.sum()) <= K - 9
    unused = ~used
    rows = z.detach()
    alpha = torch.exp(torch.tensor(-1e-3))
    anchors = (cvq.embed.detach()[unused] - (1 - alpha) * e0[unused]) / alpha
    dist_to_rows = (anchors[:, None] - rows[None]).pow(2).sum(-1).min(1).values
    assert torch.all(dist_to_rows < 1e-8), dist_to_rows.max()
    assert torch.all((cvq.embed.detach()[unused] - e0[unused]).norm(dim=1) > 0.1)
    # repeated steps on the same data: codes that stay in use barely move
    for _ in range(20):
        cvq(z)
    well_used = cvq.embed_prob > 1e-3
    assert well_used.any()
    before = cvq.embed.detach().clone()
    cvq(z)
    moved = (cvq.embed.detach() - before).norm(dim=1)
    assert torch.all(moved[well_used] < 1e-6 * (1 + before[well_used].norm(dim=1)))


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_vector_quantizer_triton_impl_matches_reference(cosine):
    pytest.importorskip("triton")
    ref = VectorQuantizer(D, K, ema_update=True, use_cosine_sim=cosine, impl="reference").train()
    tri = VectorQuantizer(D, K, ema_update=True, use_cosine_sim=cosine, impl="triton").train()
    tri.load_state_dict(ref.state_dict())
    z = _z(2, 21, D)
    e0 = ref.embed.clone()
    q_ref, i_ref, l_ref = ref(z)
    q_tri, i_tri, l_tri = tri(z)
    assert tie_aware_mismatch(z.detach(), e0, i_tri, metric="cos" if cosine else "l2") == 0.0
    # random inputs: no two codes within fp32 rounding of each other, so both pick the same codes
    assert torch.equal(i_tri, i_ref)
    torch.testing.assert_close(q_tri, q_ref)
    torch.testing.assert_close(l_tri, l_ref)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(tri.state_dict()[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_cvq_probrandom_anchor_distribution_is_softmax_of_negated_distance():
    from lgvq_fast.quantize_cvq import scan_codes

    # 4000 copies of one code: each draws its anchor independently from the same distribution
    zd = torch.randn(5, 3) * 0.6
    e = torch.randn(1, 3).expand(4000, 3).contiguous()
    anchors, _, _ = scan_codes(zd, e, "probrandom", False, False, 0.07)
    picks = (anchors[:, None, :] == zd[None]).all(-1).float().argmax(1)
    freq = torch.bincount(picks, minlength=5).double() / 4000
    prob = torch.softmax(-(zd.double() - e[0].double()).pow(2).sum(1), 0)
    # 5 sigma of a binomial proportion over 4000 draws
    assert torch.all((freq - prob).abs() < 5 * (prob * (1 - prob) / 4000).sqrt() + 1e-3), (freq, prob)


def test_vector_quantizer_decay_and_eps_belong_to_the_ema_codebook():
    for arg, value in (("decay", 0.9), ("eps", 1e-3)):
        with pytest.raises(ValueError, match=f"{arg}={value} only applies to the EMA codebook"):
            VectorQuantizer(D, K, **{arg: value})
        vq = VectorQuantizer(D, K, ema_update=True, **{arg: value})
        assert getattr(vq, arg) == value
    vq = VectorQuantizer(D, K, ema_update=True)
    assert (vq.decay, vq.eps) == (0.99, 1e-5)


def test_vector_quantizer_ema_initialisation_range():
    # kaiming_uniform_ over [K, D]: U(-sqrt(6 / D), sqrt(6 / D)), as the class docstring says
    vq = VectorQuantizer(D, 400, ema_update=True)
    bound = (6.0 / D) ** 0.5
    assert vq.embed.abs().max() <= bound and vq.embed.abs().max() > 0.95 * bound
    assert torch.equal(vq.embed_avg, vq.embed) and torch.equal(vq.cluster_size, torch.ones(400))


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_vector_quantizer_dead_code_restart_never_duplicates_codes(cosine):
    # cluster_size starts at 1: after one step with decay 0.5 every code not chosen is at 0.5 < 0.9 (dead)
    Kbig, thr = 211, 0.9
    vq = VectorQuantizer(D, Kbig, ema_update=True, decay=0.5, threshold_ema_dead_code=thr,
                         use_cosine_sim=cosine).train()
    rows = torch.randn(4, D)
    # 19 rows, 4 distinct values: at most 4 codes may be restarted, each from a different row
    z = rows[torch.randint(4, (19,))]
    z[:4] = rows
    before = vq.embed.clone()
    _, indices, _ = vq(z)
    used = torch.zeros(Kbig, dtype=torch.bool)
    used[indices] = True
    restarted = vq.cluster_size == thr
    assert int(restarted.sum()) == 4 and not (restarted & used).any()
    new = vq.embed[restarted]
    source = F.normalize(rows, dim=-1) if cosine else rows
    match = (new[:, None, :] == source[None]).all(-1)
    assert match.any(1).all() and torch.equal(match.sum(0), torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(vq.embed_avg[restarted], new * thr)
    # the other dead codes wait for a later batch: only the EMA's Laplace smoothing moves them (by ~1e-5)
    waiting = ~used & ~restarted
    assert int(waiting.sum()) == Kbig - int(used.sum()) - 4 and (vq.cluster_size[waiting] < thr).all()
    torch.testing.assert_close(vq.embed[waiting], before[waiting], rtol=1e-4, atol=1e-6)
    # a batch with as many distinct rows as dead codes restarts them all, with distinct codes
    z = torch.randn(300, D)
    vq(z)
    assert not (vq.cluster_size < thr).any()
    assert torch.unique(vq.embed, dim=0).shape[0] == Kbig
