"""Semantic alignment (lgvq_fast.models.sam): the GSA loss, label-smoothed cross-entropy and masked-token
prediction (MTP) against their formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lgvq_fast.models import TextBatch
from lgvq_fast.models import sam as sam_mod
from lgvq_fast.models.sam import SemanticAlignment, gsa_loss, label_smoothed_ce


def test_gsa_matches_float64_formula():
    v, t = torch.randn(7, 19), torch.randn(7, 19)
    got = gsa_loss(v, t)
    v64, t64 = v.double(), t.double()
    u = v64 / v64.norm(dim=1, keepdim=True)
    w = t64 / t64.norm(dim=1, keepdim=True)
    ref = sum(-(u[i] @ w[i]) + torch.log(sum(torch.exp(u[i] @ w[j]) for j in range(7)) + 1e-6) for i in range(7)) / 7
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_label_smoothed_ce_matches_formula():
    logits, target = torch.randn(11, 37), torch.randint(0, 37, (11,))
    got = label_smoothed_ce(logits, target, 0.1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    ref = 0.9 * -logp.gather(1, target[:, None]).squeeze(1) + 0.1 * -logp.mean(dim=1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def _sam(c_text=24, vocab=53, length=9, grid=(3, 5)):
    emb = torch.randn(vocab, c_text)
    return SemanticAlignment(embed_dim=16, text_embedding=emb, grid=grid, max_text_len=length,
                             mtp_ffn_hidden=20, mtp_dropout=0.0).eval()


def test_mtp_loss_counts_only_masked_positions():
    sam = _sam()
    b, length = 4, 9
    vt_out = sam.visual(torch.randn(b, 15, 16), (3, 5))
    feats = torch.randn(b, length, 24)
    pad = torch.arange(length)[None, :] < torch.tensor([9, 6, 4, 7])[:, None]
    mlm = (torch.rand(b, length) < 0.4) & pad
    mlm[0, 2] = True
    ids = torch.randint(0, 53, (b, length))
    batch = TextBatch(ids, pad, mlm)
    loss, acc = sam.mtp(vt_out, feats, batch)
    x = torch.where(mlm[..., None], sam.mask_vectors[:length], feats) * pad[..., None]
    h = sam.decoder(x, vt_out, pad)
    # logits at every position, to compare with the gathered path
    logits = sam.mlm_head(h)
    per = label_smoothed_ce(logits.reshape(-1, 53), ids.reshape(-1)).reshape(b, length)
    ref = (per * mlm).sum() / (mlm.sum() + 5e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    ref_acc = (logits.argmax(-1) == ids)[mlm].float().mean()
    torch.testing.assert_close(acc, ref_acc)
    other = torch.where(mlm, ids, torch.randint(0, 53, ids.shape))
    loss2, _ = sam.mtp(vt_out, feats, TextBatch(other, pad, mlm))
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("masked", ["some", "none", "all"])
def test_mtp_fixed_size_batch_matches_the_plain_one(masked, monkeypatch):
    """fixed_size() pads the predict index to B * L with weight-0 fillers: same loss, accuracy and gradients (the
    matrix products see more rows, so fp32 rounding may differ: held to float64 within twice the plain batch's
    own fp32 error)."""
    sam = _sam()
    b, length = 4, 9
    vt_in = torch.randn(b, 15, 16, requires_grad=True)
    feats = torch.randn(b, length, 24)
    pad = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1))
    mlm = {"some": torch.rand(b, length) < 0.4, "none": torch.zeros(b, length, dtype=torch.bool),
           "all": torch.ones(b, length, dtype=torch.bool)}[masked] & pad
    batch = TextBatch(torch.randint(0, 53, (b, length)), pad, mlm)
    fixed = batch.fixed_size()
    m = int(mlm.sum())
    assert fixed.predict_index().shape == (b * length,) and fixed.predict_weight().shape == (b * length,)
    assert torch.equal(fixed.predict_index()[:m], batch.predict_index())
    assert torch.equal(fixed.predict_weight(), (torch.arange(b * length) < m).float())
    assert batch.predict_weight() is None
    moved = fixed.to("meta")
    assert moved.predict_weight().device.type == "meta" and moved.predict_index().shape == (b * length,)
    def run(module, tb, dtype):
        leaf = vt_in.detach().to(dtype).requires_grad_()
        module.zero_grad(set_to_none=True)
        loss, acc = module.mtp(module.visual(leaf, (3, 5)), feats.to(dtype), tb)
        loss.backward()
        grads = [leaf.grad] + [p.grad for p in module.parameters() if p.grad is not None]
        return [loss.detach().double()] + [g.double() for g in grads], acc

    plain, acc_plain = run(sam, batch, torch.float32)
    padded, acc_padded = run(sam, fixed, torch.float32)
    # float64 reference of the plain batch (the loss computes its cross-entropy in fp32: keep it in float64 here)
    monkeypatch.setattr(sam_mod, "label_smoothed_ce", lambda logits, target, smoothing: F.cross_entropy(
        logits.double(), target, reduction="none", label_smoothing=smoothing))
    truth, _ = run(copy.deepcopy(sam).double(), batch, torch.float64)
    assert torch.equal(acc_padded, acc_plain)
    assert len(padded) == len(plain) == len(truth)
    for name, got, same, want in zip(["loss", "vt_in"] + [n for n, p in sam.named_parameters() if p.grad is not None],
                                     padded, plain, truth):
        tol = 2 * (same - want).abs().max().item() + 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= tol, f"{name}: |padded - float64| {err:.3e} > {tol:.3e}"


def test_mtp_masked_feature_values_are_ignored():
    sam = _sam()
    vt_out = sam.visual(torch.randn(2, 15, 16), (3, 5))
    feats = torch.randn(2, 9, 24)
    pad = torch.ones(2, 9, dtype=torch.bool)
    mlm = torch.zeros(2, 9, dtype=torch.bool)
    mlm[:, 3] = True
    batch = TextBatch(torch.randint(0, 53, (2, 9)), pad, mlm)
    changed = feats.clone()
    changed[:, 3] = torch.randn(2, 24)
    torch.testing.assert_close(sam.mtp(vt_out, feats, batch)[0], sam.mtp(vt_out, changed, batch)[0])
