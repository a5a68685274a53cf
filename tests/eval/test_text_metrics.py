"""evaluate's text metrics: code_word_mse (Table 4) and masked-word recall in our protocol and the paper's (Table 3)."""
import math

import numpy as np
import pytest
import torch

from lgvq_fast.eval import code_word_mse, evaluate, mask_k_words
from lgvq_fast.models import LGVQ, LGVQConfig, TextEncoder
from lgvq_fast.models.text import TextFeatures

CAPTIONS = [
    "a red circle left of a blue square", "a small green cross", "a white star above a big yellow triangle",
    "a tiny pink ellipse", "a black diamond next to a gray rectangle", "circle", "an orange shape on the left",
    "two blue squares and a red star",
]


def _model(use_text_losses=True, mask_input=True):
    enc = TextEncoder.tiny_random(max_len=12)
    cfg = LGVQConfig(resolution=16, ch=32, ch_mult=(1, 1), z_channels=8, embed_dim=8, codebook_size=24,
                     mtp_ffn_hidden=16, max_text_len=12, use_text_losses=use_text_losses, mask_input=mask_input)
    torch.manual_seed(0)
    model = LGVQ(cfg, enc.input_embeddings if use_text_losses else None).eval()
    return model, enc


def _batches(enc, size=4):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(0, len(CAPTIONS), size):
        caps = CAPTIONS[i:i + size]
        images = torch.rand(len(caps), 3, 16, 16, generator=g) * 2 - 1
        out.append({"image": images, "captions": caps, "text": enc.tokenize(caps, 12, generator=g)})
    return out


def _code_word_numpy(t, v, z, words):
    """Per-caption MSE by explicit loops in float64 (an independent implementation of code_word_mse)."""
    t, v, z, words = (np.asarray(a, dtype=np.float64) for a in (t, v, z, words))
    result = []
    for b in range(t.shape[0]):
        idx = [i for i in range(t.shape[1]) if words[b, i]]
        if len(idx) < 2:
            result.append(None)
            continue
        unit = lambda a: a / np.linalg.norm(a)
        code = {i: unit(z[b, int(np.argmax([unit(t[b, i]) @ unit(v[b, p]) for p in range(v.shape[1])]))])
                for i in idx}
        errs = [(code[i] @ code[j] - unit(t[b, i]) @ unit(t[b, j])) ** 2 for i in idx for j in idx if i != j]
        result.append(sum(errs) / len(errs))
    return result


def test_code_word_mse_hand_example():
    # caption 0: SOT, w1, w2, EOT, PAD; words (1, 0) and (0, 1) (similarity 0) match v0 and v1, whose codes
    # (2, 0) and (3, 3) have cosine 1/sqrt(2): the 2 ordered pairs give (1/sqrt(2) - 0)^2 = 0.5.
    # caption 1: one word, no pair. caption 2: words (1, 0), (1, 0), (-1, -1) match v0, v0, v2 (codes (2, 0), (2, 0),
    # (0, -1)): pair (1, 2) error (1 - 1)^2 = 0; pairs (1, 3), (2, 3) error (0 - (-1/sqrt(2)))^2 = 0.5, each twice:
    # 2 / 6 = 1/3. SOT, EOT and padding have features that would change the values if they counted.
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).expand(3, 3, 2)
    z = torch.tensor([[2.0, 0.0], [3.0, 3.0], [0.0, -1.0]]).expand(3, 3, 2)
    t = torch.tensor([
        [[1.0, 0.5], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.3, -1.0]],
        [[1.0, 0.5], [0.0, 1.0], [-1.0, 0.2], [0.3, -1.0], [0.3, -1.0]],
        [[1.0, 0.5], [1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [-1.0, 0.2]],
    ])
    words = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    mse, pairs = code_word_mse(t.double(), v.double(), z.double(), words)
    assert mse.dtype == torch.float64 and pairs.tolist() == [2, 0, 6]
    assert mse[0].item() == pytest.approx(0.5, abs=1e-12) and mse[2].item() == pytest.approx(1 / 3, abs=1e-12)
    assert mse[1].item() == 0.0
    # counting SOT/EOT/padding (as the training loss does) would give another value
    mse_all, _ = code_word_mse(t.double(), v.double(), z.double(), torch.ones_like(words))
    assert mse_all[0].item() != pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_code_word_mse_against_loops(dtype):
    g = torch.Generator().manual_seed(3)
    b, length, c, t_pos, d = 3, 13, 7, 11, 5
    t = torch.randn(b, length, c, generator=g, dtype=torch.float64)
    v = torch.randn(b, t_pos, c, generator=g, dtype=torch.float64)
    z = torch.randn(b, t_pos, d, generator=g, dtype=torch.float64)
    words = torch.rand(b, length, generator=g) < 0.6
    words[2] = False
    words[2, 4] = True  # a caption with one word: no pair
    mse, pairs = code_word_mse(t.to(dtype), v.to(dtype), z.to(dtype), words)
    expected = _code_word_numpy(t, v, z, words)
    assert expected[2] is None and pairs[2] == 0
    for b_i in (0, 1):
        n = int(words[b_i].sum())
        assert pairs[b_i] == n * (n - 1)
        assert mse[b_i].item() == pytest.approx(expected[b_i], rel=1e-12 if dtype == torch.float64 else 1e-5)


def _old_masked_word_acc(model, enc, batches, k_values, mask_input, seed=0):
    """masked_word_acc@k as evaluate computed it before the paper protocol: one model forward per k, with
    ``enc.encode(masked caption, mask_input)``; the same generator draws (the batches carry their text)."""
    gen = torch.Generator().manual_seed(seed)
    hits = {k: [0.0, 0] for k in k_values}
    with torch.no_grad():
        for batch in batches:
            for k in k_values:
                tk = mask_k_words(batch["text"], k, gen)
                n = int(tk.mlm_mask.sum())
                o = model(batch["image"], tk, enc.encode(tk, mask_input=mask_input))
                hits[k][0] += float(o["mtp_acc"]) * n
                hits[k][1] += n
    return {k: h / n for k, (h, n) in hits.items()}


def test_evaluate_text_metrics_on_a_tiny_model():
    model, enc = _model()
    # make the MTP head's answers depend on the tokens: "a" wins wherever the decoder does not strongly prefer
    # another token, so the recalls are neither 0 nor 1
    model.sam.mlm_head.bias.data[enc.tokenizer.convert_tokens_to_ids("a")] = 3.0
    batches = _batches(enc)
    result = evaluate(model, batches, enc)
    # code_word_mse: the mean over captions of the per-caption MSE, by loops over the model's own pieces
    expected = []
    with torch.no_grad():
        for batch in batches:
            quant, _ = model.encode(batch["image"])
            b, d, h, w = quant.shape
            codes = quant.permute(0, 2, 3, 1).reshape(b, h * w, d)
            vt = model.sam.visual(codes, (h, w))[:, 1:]
            full = enc.encode(batch["text"], mask_input=False).token_feats_full
            pad = batch["text"].pad_mask
            words = pad.clone()
            words[:, 0] = False
            words[torch.arange(b), pad.sum(1) - 1] = False
            expected += [e for e in _code_word_numpy(full, vt, codes, words) if e is not None]
    assert len(expected) == len(CAPTIONS) - 1  # "circle" has one word: no pair
    assert result["code_word_mse"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # our protocol as before (one model forward per k), and the paper's as the model's forward with mask_input=False
    old = _old_masked_word_acc(model, enc, batches, (1, 3), mask_input=True)
    paper = _old_masked_word_acc(model, enc, batches, (1, 3), mask_input=False)
    for k in (1, 3):
        assert result[f"masked_word_acc@{k}"] == pytest.approx(old[k], abs=1e-12)
        assert result[f"mask{k}_recall_paper"] == pytest.approx(paper[k], abs=1e-12)
        assert 0 < result[f"mask{k}_recall_paper"] < 1 and 0 < result[f"masked_word_acc@{k}"] < 1
    # a model without text heads has none of the text metrics
    plain, _ = _model(use_text_losses=False)
    result = evaluate(plain, batches, enc)
    for key in ("code_word_mse", "masked_word_acc@1", "mask1_recall_paper", "mask3_recall_paper"):
        assert key in result and result[key] is None


class _PrevTokenEncoder:
    """A stand-in for a causal text encoder: channel 0 of the feature at position j is the id of the token at
    j - 1 as the encoder saw it (the mask id where ``mask_input`` replaced the token); the rest is noise."""

    def __init__(self, enc):
        self.enc = enc

    def tokenize(self, *args, **kwargs):
        return self.enc.tokenize(*args, **kwargs)

    def encode(self, batch, mask_input=True):
        g = torch.Generator().manual_seed(int(batch.input_ids.sum()))
        noise = torch.randn(*batch.input_ids.shape, self.enc.width, generator=g)
        glob = torch.randn(batch.input_ids.shape[0], self.enc.width, generator=g)

        def feats(ids):
            f = noise.clone()
            f[:, 1:, 0] = ids[:, :-1].float()
            return f

        seen = self.enc.masked_input_ids(batch) if mask_input else batch.input_ids
        return TextFeatures(feats(seen), glob, feats(batch.input_ids))


def _spy(calls, encode):
    def spy(batch, mask_input=True):
        calls.append(mask_input)
        return encode(batch, mask_input)

    return spy


def _read_previous_token(vt_out, token_feats, batch):
    """An oracle MTP: the masked token at i is read from channel 0 of the decoder-input feature at i + 1."""
    sel = batch.mlm_mask & batch.pad_mask
    guess = torch.full_like(batch.input_ids, -1)
    guess[:, :-1] = token_feats[:, 1:, 0].round().long()
    return torch.zeros(()), (guess == batch.input_ids)[sel].float().mean()


@pytest.mark.parametrize("mask_input", [True, False], ids=["mask_input", "official_input"])
def test_masked_word_recall_protocols_with_an_oracle(monkeypatch, mask_input):
    model, enc = _model(mask_input=mask_input)
    monkeypatch.setattr(model.sam, "mtp", _read_previous_token)
    calls = []
    leaky = _PrevTokenEncoder(enc)
    real_encode = leaky.encode
    monkeypatch.setattr(leaky, "encode", _spy(calls, real_encode))
    result = evaluate(model, _batches(enc), leaky)
    # the paper's protocol: the encoder saw the unmasked caption, so the oracle recovers every masked word
    assert result["mask1_recall_paper"] == 1.0 and result["mask3_recall_paper"] == 1.0
    # ours: with mask_input the encoder saw the mask id in place of each masked word, so the oracle finds none
    expected = 0.0 if mask_input else 1.0
    assert result["masked_word_acc@1"] == expected and result["masked_word_acc@3"] == expected
    assert set(calls) == {mask_input}
    assert math.isfinite(result["code_word_mse"])

