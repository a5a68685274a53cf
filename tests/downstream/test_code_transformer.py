"""CodeTransformer (``lgvq_fast.downstream.model``) and the task plumbing (``lgvq_fast.downstream.tasks``): shapes of
both tasks, the causal and padding masks, KV-cache sampling against full recomputation, classifier-free guidance,
overfitting one batch, and the errors for bad inputs."""
import pytest
import torch
from _fixtures import one_thread  # noqa: F401 (autouse)

from lgvq_fast.downstream import (
    CodeTransformer,
    CodeTransformerConfig,
    codes_to_tokens,
    decode_captions,
    generate_captions,
    generate_codes,
    make_batch,
    tokens_to_codes,
)
from lgvq_fast.errors import ConfigError
from lgvq_fast.models import TextEncoder

# a 3x5 grid of a 37-code tokenizer; captions of at most 13 tokens of a 101-word vocabulary (the tiny text encoder)
GRID = (3, 5)
IMAGE_VOCAB, TEXT_VOCAB, MAX_TEXT = 37, 101, 13
CAPTIONS = ["a large red circle left of a small blue square", "a small green cross", "a large white diamond"]


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder.tiny_random(vocab_size=TEXT_VOCAB, hidden=32, layers=1, seed=1, max_len=MAX_TEXT)


def _model(dtype=torch.float64, **overrides):
    kw = dict(image_vocab_size=IMAGE_VOCAB, text_vocab_size=TEXT_VOCAB, n_layer=2, n_head=2, d_model=32,
              max_image_tokens=GRID[0] * GRID[1], max_text_tokens=MAX_TEXT, p_uncond=0.0)
    return CodeTransformer(CodeTransformerConfig(**{**kw, **overrides})).to(dtype).eval()


def _codes(b=3):
    return torch.randint(0, IMAGE_VOCAB, (b, *GRID))


def _text_ids(b, n, pad_from=None):
    """Random caption ids [b, n] and a mask whose rows end with padding from the given columns."""
    ids = torch.randint(0, TEXT_VOCAB, (b, n))
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, start in enumerate(pad_from or []):
        mask[row, start:] = False
    return ids, mask


def _seed():
    return int(torch.randint(2**31 - 1, ()))


@pytest.mark.parametrize("task", ["caption", "t2i"])
def test_forward_shapes_and_gradients(task, tiny_text):
    model = _model(torch.float32).train()
    batch = make_batch(task, _codes(), tiny_text.tokenize(CAPTIONS))
    logits, loss = model(**batch.inputs())
    vocab = TEXT_VOCAB if task == "caption" else IMAGE_VOCAB
    assert logits.shape == (3, batch.target.shape[1], vocab) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_make_batch_layout(tiny_text):
    codes, text = _codes(), tiny_text.tokenize(CAPTIONS)
    cap = make_batch("caption", codes, text)
    assert torch.equal(cap.prefix, codes.reshape(3, -1)) and bool(cap.prefix_mask.all())
    assert torch.equal(cap.target, text.input_ids[:, 1:]) and torch.equal(cap.target_mask, text.pad_mask[:, 1:])
    t2i = make_batch("t2i", codes, text)
    assert torch.equal(t2i.prefix, text.input_ids) and torch.equal(t2i.prefix_mask, text.pad_mask)
    assert torch.equal(tokens_to_codes(t2i.target, GRID), codes) and bool(t2i.target_mask.all())
    assert torch.equal(tokens_to_codes(codes_to_tokens(codes), GRID), codes)


def test_decode_captions_inverts_the_caption_target(tiny_text):
    cap = make_batch("caption", _codes(), tiny_text.tokenize(CAPTIONS))
    assert decode_captions(cap.target, tiny_text) == CAPTIONS


def test_causal_mask_future_target_token():
    model = _model()
    prefix = codes_to_tokens(_codes(2))
    target, _ = _text_ids(2, 9)
    logits, _ = model(prefix, target, task="caption")
    j = 4
    changed = target.clone()
    changed[:, j] = (changed[:, j] + 1) % TEXT_VOCAB
    logits2, _ = model(prefix, changed, task="caption")
    # logits at i predict target i from target[:i]: target j is seen from position j + 1 on
    torch.testing.assert_close(logits2[:, :j + 1], logits[:, :j + 1], rtol=0, atol=1e-12)
    assert (logits2[:, j + 1:] - logits[:, j + 1:]).abs().amax() > 1e-6


def test_padded_prefix_is_invisible():
    model = _model()
    prefix, mask = _text_ids(3, 8, pad_from=[8, 5, 3])
    target = codes_to_tokens(_codes(3))
    logits, _ = model(prefix, target, task="t2i", prefix_mask=mask)
    other = torch.where(mask, prefix, torch.randint(0, TEXT_VOCAB, prefix.shape))
    assert not torch.equal(other, prefix)
    logits2, _ = model(other, target, task="t2i", prefix_mask=mask)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-12)
    # a batch padded wider: positions count real tokens, so nothing changes
    wide = torch.cat([prefix, torch.randint(0, TEXT_VOCAB, (3, 3))], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], 1)
    logits3, _ = model(wide, target, task="t2i", prefix_mask=wide_mask)
    torch.testing.assert_close(logits3, logits, rtol=1e-12, atol=1e-12)
    real = prefix.clone()
    real[1, 2] = (real[1, 2] + 1) % TEXT_VOCAB
    assert (model(real, target, task="t2i", prefix_mask=mask)[0][1] - logits[1]).abs().amax() > 1e-6


def test_padded_target_tokens_change_no_real_logit_or_loss():
    model = _model()
    prefix = codes_to_tokens(_codes(3))
    target, mask = _text_ids(3, 9, pad_from=[9, 6, 2])
    logits, loss = model(prefix, target, mask, task="caption")
    other = torch.where(mask, target, torch.randint(0, TEXT_VOCAB, target.shape))
    assert not torch.equal(other, target)
    logits2, loss2 = model(prefix, other, mask, task="caption")
    torch.testing.assert_close(logits2[mask], logits[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-12)
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    torch.testing.assert_close(loss, ce, rtol=1e-12, atol=0)


SAMPLING = {
    "greedy": dict(greedy=True),
    "top_k": dict(top_k=5, temperature=0.8),
    "top_p": dict(top_p=0.9, temperature=1.3),
    "top_k-cfg": dict(top_k=7, cfg_scale=2.5),
}


def _generate_both(model, prefix, n_new, task, prefix_mask=None, **kw):
    seed = _seed()
    runs = [model.generate(prefix, n_new, task=task, prefix_mask=prefix_mask, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(seed), return_logits=True, **kw)
            for use_cache in (True, False)]
    return runs


@pytest.mark.parametrize("width", [0, GRID[1]], ids=["positions", "rows_and_columns"])
@pytest.mark.parametrize("task", ["caption", "t2i"])
@pytest.mark.parametrize("sampling", list(SAMPLING), ids=list(SAMPLING))
def test_kv_cache_sampling_equals_full_recomputation(task, sampling, width):
    model = _model(p_uncond=0.1, image_width=width)
    if task == "caption":
        prefix, mask, n_new = codes_to_tokens(_codes(3)), None, MAX_TEXT
    else:
        (prefix, mask), n_new = _text_ids(3, 7, pad_from=[7, 4, 2]), GRID[0] * GRID[1]
    (tokens, logits), (ref_tokens, ref_logits) = _generate_both(model, prefix, n_new, task, mask,
                                                                **SAMPLING[sampling])
    assert tokens.shape == (3, n_new) and logits.shape[:2] == (3, n_new)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    if "cfg_scale" not in SAMPLING[sampling]:
        # each step's logits are the teacher-forced logits of the generated sequence
        full, _ = model(prefix, tokens, task=task, prefix_mask=mask)
        torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


def test_row_and_column_embeddings_follow_the_grid():
    """With ``image_width`` an image token's embedding depends on its (row, column): the same code at two cells of
    one row differs only by their column embeddings."""
    model = _model(image_width=GRID[1])
    ids = torch.full((1, GRID[0] * GRID[1]), 3)
    h = model._embed(ids, 0)
    torch.testing.assert_close(h[0, 1] - h[0, 0], model.col_emb.weight[1] - model.col_emb.weight[0])
    torch.testing.assert_close(h[0, GRID[1]] - h[0, 0], model.row_emb.weight[1] - model.row_emb.weight[0])
    one = model._embed(ids[:, 7:8], 0, first=7)
    torch.testing.assert_close(one[0, 0], h[0, 7])
    with pytest.raises(ConfigError, match="image_width"):
        _model(image_width=4)


def test_generation_stops_at_eos():
    model = _model()
    prefix = codes_to_tokens(_codes(3))
    first = model.generate(prefix, MAX_TEXT, task="caption", greedy=True)
    eos, pad = int(first[0, 0]), (int(first[0, 0]) + 1) % TEXT_VOCAB
    tokens, logits = model.generate(prefix, MAX_TEXT, task="caption", greedy=True, eos_id=eos, pad_id=pad,
                                    return_logits=True)
    ref = model.generate(prefix, MAX_TEXT, task="caption", greedy=True, eos_id=eos, pad_id=pad, use_cache=False)
    assert torch.equal(tokens, ref)
    for row in tokens.tolist():
        if eos in row:
            assert all(t == pad for t in row[row.index(eos) + 1:])
        else:
            assert pad not in row
    assert tokens[0, 0] == eos and logits.shape[1] <= MAX_TEXT


@pytest.mark.parametrize("sampling", ["greedy", "top_k"])
def test_cfg_scale_one_equals_the_conditional_model(sampling):
    model = _model(p_uncond=0.1)
    prefix, mask = _text_ids(3, 6, pad_from=[6, 3, 1])
    kw = dict(greedy=True) if sampling == "greedy" else dict(top_k=6)
    seed, n = _seed(), GRID[0] * GRID[1]
    runs = {scale: model.generate(prefix, n, task="t2i", prefix_mask=mask, cfg_scale=scale, return_logits=True,
                                  generator=torch.Generator().manual_seed(seed), **kw) for scale in (None, 1.0, 3.0)}
    assert torch.equal(runs[1.0][0], runs[None][0])
    torch.testing.assert_close(runs[1.0][1], runs[None][1], rtol=1e-10, atol=1e-10)
    assert (runs[3.0][1][:, 0] - runs[None][1][:, 0]).abs().amax() > 1e-6


def test_training_drops_the_prefix_to_the_null_prefix():
    # p_uncond near 1: (almost surely) every training row sees the null prefix, whatever its own
    model = _model(p_uncond=1 - 1e-9)
    prefix = codes_to_tokens(_codes(2))
    target, _ = _text_ids(2, 5)
    uncond = model.generate(prefix, 1, task="caption", greedy=True, cfg_scale=0.0, return_logits=True)[1][:, 0]
    model.train()
    for p in (prefix, torch.randint(0, IMAGE_VOCAB, prefix.shape)):
        torch.testing.assert_close(model(p, target, task="caption")[0][:, 0], uncond, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("task", ["caption", "t2i"])
def test_loss_decreases_when_overfitting_one_batch(task, tiny_text):
    model = _model(torch.float32, p_uncond=0.1).train()
    batch = make_batch(task, _codes(), tiny_text.tokenize(CAPTIONS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        _, loss = model(**batch.inputs())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_task_helpers_generate(tiny_text):
    text = tiny_text.tokenize(CAPTIONS)
    model = _model(torch.float32, p_uncond=0.1)
    captions = generate_captions(model, _codes(), tiny_text, top_k=5, generator=torch.Generator().manual_seed(0))
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    codes = generate_codes(model, text, GRID, cfg_scale=2.0, greedy=True)
    assert codes.shape == (3, *GRID) and codes.dtype == torch.long and 0 <= codes.min() <= codes.max() < IMAGE_VOCAB


def _bad_calls():
    m, m_cfg = _model(torch.float32), _model(torch.float32, p_uncond=0.1)
    img = torch.randint(0, IMAGE_VOCAB, (2, 6))
    txt = torch.randint(0, TEXT_VOCAB, (2, 4))
    return {
        "float prefix": (lambda: m(img.float(), txt, task="caption"), "prefix must hold integer"),
        "1-d prefix": (lambda: m(img[0], txt, task="caption"), "prefix must be"),
        "empty batch": (lambda: m(img[:0], txt[:0], task="caption"), "prefix is empty"),
        "prefix id out of range": (lambda: m(img + IMAGE_VOCAB, txt, task="caption"), "prefix ids must lie"),
        "negative target id": (lambda: m(img, txt - TEXT_VOCAB, task="caption"), "target ids must lie"),
        "prefix too long": (lambda: m(torch.zeros(2, 16, dtype=torch.long), txt, task="caption"),
                            "max_image_tokens=15"),
        "target too long": (lambda: m(img, torch.zeros(2, 14, dtype=torch.long), task="caption"),
                            "max_text_tokens=13"),
        "prefix_mask dtype": (lambda: m(txt, img, task="t2i", prefix_mask=torch.ones(2, 4)), "prefix_mask must"),
        "target_mask shape": (lambda: m(img, txt, torch.ones(2, 3, dtype=torch.bool), task="caption"),
                              "target_mask must"),
        "empty prefix row": (lambda: m(txt, img, task="t2i", prefix_mask=torch.tensor([[1, 0, 0, 0], [0] * 4]).bool()),
                             "prefix_mask has a row"),
        "batch mismatch": (lambda: m(img, txt[:1], task="caption"), "target has 1 rows"),
        "unknown task": (lambda: m(img, txt, task="vqa"), "task must be one of"),
        "n_new zero": (lambda: m.generate(img, 0, task="caption"), "n_new must"),
        "n_new too many": (lambda: m.generate(txt, 16, task="t2i"), "max_image_tokens=15"),
        "top_k": (lambda: m.generate(img, 3, task="caption", top_k=0), "top_k must"),
        "top_p": (lambda: m.generate(img, 3, task="caption", top_p=1.5), "top_p must"),
        "temperature": (lambda: m.generate(img, 3, task="caption", temperature=0.0), "temperature must"),
        "eos_id": (lambda: m.generate(img, 3, task="caption", eos_id=TEXT_VOCAB), "eos_id must"),
        "cfg untrained": (lambda: m.generate(img, 3, task="caption", cfg_scale=2.0), "cfg_scale needs"),
        "cfg nan": (lambda: m_cfg.generate(img, 3, task="caption", cfg_scale=float("nan")), "cfg_scale must"),
        "config heads": (lambda: CodeTransformerConfig(d_model=30, n_head=4).validate(), "d_model"),
        "config p_uncond": (lambda: CodeTransformerConfig(p_uncond=1.0).validate(), "p_uncond"),
        "codes 2-d": (lambda: codes_to_tokens(img), "codes must be"),
        "tokens for grid": (lambda: tokens_to_codes(img, GRID), "tokens must be"),
        "text batch size": (lambda: make_batch("t2i", _codes(3), _FakeText(txt, txt > -1)), "text has 2 captions"),
    }


class _FakeText:
    def __init__(self, input_ids, pad_mask):
        self.input_ids, self.pad_mask = input_ids, pad_mask


_BAD = list(_bad_calls())


@pytest.mark.parametrize("case", _BAD, ids=_BAD)
def test_bad_inputs_raise_one_line_naming_the_argument(case):
    call, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    if case.startswith("config"):
        assert isinstance(info.value, ConfigError)
