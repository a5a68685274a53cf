"""The LG-VQ model (lgvq_fast.models.lgvq): forward and backward through every part, presets, parameter counts,
the CVQ quantizer, bf16 autocast, input checks."""
import pytest
import torch

from _captions import CAPTIONS
from lgvq_fast.models import LGVQ, build_model, preset


def _tiny_cfg(**kw):
    base = dict(max_text_len=13, codebook_size=77, mtp_ffn_hidden=40, disc_ndf=16, disc_layers=2)
    base.update(kw)
    return preset("tiny-cpu", **base)


def _small_cfg(**kw):
    # 16x16 images, f = 4 → 4x4 grid: the cheapest model that still has every part
    return _tiny_cfg(resolution=16, ch=32, z_channels=16, embed_dim=16, **kw)


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


def test_lgvq_cvq_quantizer(tiny_text):
    model, _ = build_model(_small_cfg(quantizer="cvq"), tiny_text)
    x, text = _batch(tiny_text, n=3, res=16)
    out = model(x, text, tiny_text.encode(text))
    (out["q_loss"] + sum(out["text_losses"].values())).backward()
    assert torch.isfinite(out["q_loss"])


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
