"""lgvq_fast.compat.VectorQuantizer2 against taming-transformers' own class, bit for bit.

Both are built under one seed (equal codebooks), then trained with SGD for several steps on the same
inputs: indices, z_q, loss, the input gradient and the codebook gradient must be identical (torch.equal).
Inputs lie near codes, so that the nearest code wins by far more than fp32 rounding (the two searches
round differently; see lgvq_fast/compat/taming.py); one test uses taming's own U(-1/K, 1/K) codebook and
Gaussian inputs and accepts a differing index only on a float64 near-tie.
"""
import numpy as np
import pytest
import torch

from lgvq_fast.compat import VectorQuantizer2
from lgvq_fast.reference.nearest_code import tie_tolerance

taming_quantize = pytest.importorskip(
    "taming.modules.vqvae.quantize",
    reason="taming-transformers (PyPI: taming-transformers-rom1504, installed with --no-deps) is a test dependency")
Taming = taming_quantize.VectorQuantizer2

N_E, E_DIM, BETA = 37, 13, 0.3
SHAPE = (3, E_DIM, 5, 7)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    theirs = Taming(N_E, E_DIM, BETA, **kw)
    torch.manual_seed(seed)
    ours = VectorQuantizer2(N_E, E_DIM, BETA, **kw)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    return theirs, ours


def _near_codes(weight, sigma=0.2):
    codes = weight.detach()[torch.randint(N_E, (SHAPE[0] * SHAPE[2] * SHAPE[3],))]
    z = codes + sigma * torch.randn_like(codes)
    return z.reshape(SHAPE[0], SHAPE[2], SHAPE[3], E_DIM).permute(0, 3, 1, 2).contiguous()


def _tied(z, weight, a, b):
    z2 = z.permute(0, 2, 3, 1).reshape(-1, E_DIM).double()
    e = weight.detach().double()
    a, b = a.reshape(-1), b.reshape(-1)
    gap = ((z2 - e[a]).pow(2).sum(-1) - (z2 - e[b]).pow(2).sum(-1)).abs()
    return bool((gap <= tie_tolerance(z2, e)).all())


def _step(theirs, ours, z, lr=0.1):
    """One SGD step of both; True when compared bit for bit, False on an accepted near-tie (then resynced)."""
    zt, zo = z.clone().requires_grad_(), z.clone().requires_grad_()
    qt, lt, (pt, mt, it) = theirs(zt)
    qo, lo, (po, mo, io) = ours(zo)
    assert po is None and mo is None and pt is None and mt is None
    if not torch.equal(it, io):
        assert _tied(z, theirs.embedding.weight, it, io), "an index differs from taming's away from a tie"
        ours.load_state_dict(theirs.state_dict())
        return False
    w = torch.randn_like(qt)
    ((qt * w).sum() + lt).backward()
    ((qo * w).sum() + lo).backward()
    assert torch.equal(qt, qo) and torch.equal(lt, lo)
    assert torch.equal(zt.grad, zo.grad)
    gt, go = theirs.embedding.weight.grad, ours.embedding.weight.grad
    assert torch.equal(gt, go)
    with torch.no_grad():
        theirs.embedding.weight -= lr * gt
        ours.embedding.weight -= lr * go
    theirs.embedding.weight.grad = ours.embedding.weight.grad = None
    return True


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "fixed"])
@pytest.mark.parametrize("sane_index_shape", [False, True], ids=["flat-indices", "sane-indices"])
def test_vector_quantizer2_matches_taming_bit_for_bit(legacy, sane_index_shape):
    theirs, ours = _pair(legacy=legacy, sane_index_shape=sane_index_shape)
    with torch.no_grad():
        theirs.embedding.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    exact = sum(_step(theirs, ours, _near_codes(theirs.embedding.weight)) for _ in range(4))
    assert exact >= 3
    z = _near_codes(theirs.embedding.weight)
    _, _, (_, _, idx) = ours(z)
    want = (SHAPE[0], SHAPE[2], SHAPE[3]) if sane_index_shape else (SHAPE[0] * SHAPE[2] * SHAPE[3],)
    assert idx.shape == want
    shape = (SHAPE[0], SHAPE[2], SHAPE[3], E_DIM)
    flat = idx.reshape(-1)
    assert torch.equal(ours.get_codebook_entry(flat, shape), theirs.get_codebook_entry(flat, shape))
    assert torch.equal(ours.get_codebook_entry(idx.reshape(-1), None), ours.embedding.weight[idx.reshape(-1)])


def test_vector_quantizer2_taming_initialisation_and_gaussian_inputs():
    theirs, ours = _pair(seed=5)
    assert ours.embedding.weight.abs().max() <= 1.0 / N_E
    exact = sum(_step(theirs, ours, torch.randn(SHAPE)) for _ in range(4))
    assert exact >= 3


@pytest.mark.parametrize("unknown_index", ["random", "extra", 0])
def test_vector_quantizer2_remap(tmp_path, unknown_index):
    used = np.sort(np.random.default_rng(int(torch.randint(1 << 30, ()))).choice(N_E, 11, replace=False))
    path = tmp_path / "used.npy"
    np.save(path, used)
    theirs, ours = _pair(remap=str(path), unknown_index=unknown_index, sane_index_shape=True)
    with torch.no_grad():
        theirs.embedding.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    z = _near_codes(theirs.embedding.weight)
    torch.manual_seed(1)
    qt, lt, (_, _, it) = theirs(z)
    torch.manual_seed(1)
    qo, lo, (_, _, io) = ours(z)
    assert torch.equal(qt, qo) and torch.equal(lt, lo) and torch.equal(it, io)
    assert ours.re_embed == theirs.re_embed and "used" in ours.state_dict()
    shape = (SHAPE[0], SHAPE[2], SHAPE[3], E_DIM)
    assert torch.equal(ours.get_codebook_entry(io.clone(), shape), theirs.get_codebook_entry(it.clone(), shape))


def test_vector_quantizer2_loads_a_taming_checkpoint_and_rejects_bad_input():
    theirs = Taming(N_E, E_DIM, BETA)
    ours = VectorQuantizer2(N_E, E_DIM, BETA)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    for call, match in [
        (lambda: ours(torch.randn(2, E_DIM + 1, 3, 3)), "e_dim"),
        (lambda: ours(torch.randn(2, E_DIM, 3)), "e_dim"),
        (lambda: ours(torch.randn(2, E_DIM, 3, 3), temp=0.5), "temp"),
        (lambda: VectorQuantizer2(0, E_DIM, BETA), "n_e"),
        (lambda: VectorQuantizer2(N_E, E_DIM, BETA, impl="gpu"), "impl"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
