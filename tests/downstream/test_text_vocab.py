"""TextVocab: a downstream model's compact text numbering (its training captions' tokens), and the caption checks of
the sampler that rest on it."""
import pytest
import torch
from _fixtures import one_thread  # noqa: F401 (autouse)

from lgvq_fast.downstream import CodeTransformer, CodeTransformerConfig, TextVocab, generate_captions
from lgvq_fast.downstream.state import check_captions, text_vocab, unknown_words
from lgvq_fast.models import TextEncoder


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.tiny_random(vocab_size=101, hidden=32, layers=1, seed=1, max_len=13)


def test_encode_decode_round_trip_and_unknown_ids():
    known = sorted(torch.randperm(500)[:40].tolist())
    vocab = TextVocab(known + known[:5], unk_id=1)  # duplicates are ignored
    assert len(vocab) == 41 and vocab.unknown == 40
    ids = torch.tensor(known)[torch.randint(0, 40, (6, 9))]
    enc = vocab.encode(ids)
    assert enc.min() >= 0 and enc.max() < 40
    assert torch.equal(vocab.decode(enc), ids)
    outside = torch.tensor([[max(known) + 1, 10_000, -1]] + [[i for i in range(500) if i not in known][:3]])
    assert bool((vocab.encode(outside) == vocab.unknown).all())
    assert bool((vocab.decode(vocab.encode(outside)) == 1).all())
    assert vocab.id(known[3]) == 3 and vocab.id(10**6) == vocab.unknown
    with pytest.raises(ValueError):
        TextVocab([])


def test_generated_captions_decode_through_the_vocabulary(text_encoder):
    caption = "a large red circle"
    batch = text_encoder.tokenize([caption], 13)
    real = batch.input_ids[batch.pad_mask].tolist()
    vocab = text_vocab(real + [text_encoder.pad_token_id], text_encoder)
    cfg = CodeTransformerConfig(image_vocab_size=7, text_vocab_size=len(vocab), n_layer=1, n_head=2, d_model=16,
                                max_image_tokens=4, max_text_tokens=13, p_uncond=0.0)
    model = CodeTransformer(cfg).eval()
    # make the model emit the caption's body then the end token, whatever the image: bias the head towards them
    target = vocab.encode(batch.input_ids[:, 1:])[0]
    with torch.no_grad():
        model.heads[1].weight.zero_()
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
    step = {"i": 0}
    original = model._next_logits

    def forced(*args, **kwargs):
        logits = original(*args, **kwargs)
        out = torch.full_like(logits, -1e9)
        out[:, target[min(step["i"], len(target) - 1)]] = 0
        step["i"] += 1
        return out

    model._next_logits = forced
    got = generate_captions(model, torch.randint(0, 7, (1, 2, 2)), text_encoder, vocab=vocab, greedy=True)
    assert got == [caption]


def test_caption_checks_name_unknown_words_and_length(text_encoder):
    train = text_encoder.tokenize(["a large red circle left of a small blue square"], 13)
    vocabulary = sorted(set(train.input_ids[train.pad_mask].tolist()))
    ok = check_captions(["A small red square"], text_encoder, vocabulary, 13)
    assert ok.input_ids.shape == (1, 13)
    assert unknown_words(["a small red square"], vocabulary, text_encoder) == []
    assert unknown_words(["a zebra and a green square"], vocabulary, text_encoder) == ["zebra", "and", "green"]
    with pytest.raises(ValueError, match="'green'"):
        check_captions(["a small green square"], text_encoder, vocabulary, 13)
    with pytest.raises(ValueError, match="at most 13"):
        check_captions([" ".join(["a large red circle"] * 5)], text_encoder, vocabulary, 13)
    with pytest.raises(ValueError, match="empty"):
        check_captions(["  "], text_encoder, vocabulary, 13)
