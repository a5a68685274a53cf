"""From a batch of codes and captions to the model's inputs for each task, and from generated tokens back.

Image codes ``[B, h, w]`` (the indices ``LGVQ.encode`` returns) become ``h * w`` tokens in row-major order.
Captions are the ``TextBatch`` of the tokenizer's text encoder: start token, words, end token, then padding
(``pad_mask`` False).

* ``caption``: prefix = the codes; target = the caption without its start token (the model's own start token
  stands in for it), so the target ends with the end token, where generation stops; padding is masked out.
* ``t2i``: prefix = the whole caption (start and end tokens included, padding masked); target = the codes.
"""
import dataclasses
from dataclasses import dataclass

import torch

from lgvq_fast.downstream.model import TASKS, CodeTransformer, CodeTransformerConfig


class TextVocab:
    """The text tokens a downstream model knows: the token ids of its training captions (plus the text encoder's
    start, end and padding ids), renumbered 0..n-1, and one more id, ``unknown``, for any other token. A model over
    a 30k-49k-token text encoder thus gets embedding and output tables of the captions' own size (a few dozen rows
    on the shapes data). ``encode`` maps text-encoder ids to the model's, ``decode`` back."""

    def __init__(self, ids, unk_id: int = 0):
        self.ids = sorted({int(i) for i in ids})
        if not self.ids or self.ids[0] < 0:
            raise ValueError(f"TextVocab needs non-negative token ids, got {ids!r}")
        self.unknown, self.unk_id = len(self.ids), int(unk_id)
        self._lut = torch.full((self.ids[-1] + 1,), self.unknown, dtype=torch.long)
        self._lut[torch.tensor(self.ids)] = torch.arange(len(self.ids))
        self._table = torch.tensor(self.ids + [self.unk_id], dtype=torch.long)

    def __len__(self):
        return len(self.ids) + 1

    def id(self, token_id: int) -> int:
        """The model's id of text-encoder token ``token_id`` (``unknown`` when it is not in the vocabulary)."""
        return int(self._lut[token_id]) if 0 <= token_id < len(self._lut) else self.unknown

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        lut = self._lut.to(ids.device)
        inside = (ids >= 0) & (ids < len(lut))
        return torch.where(inside, lut[ids.clamp(0, len(lut) - 1)], torch.full_like(ids, self.unknown))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self._table.to(ids.device)[ids]

    def encode_text(self, text):
        """``text`` (a TextBatch) with its input ids in the model's numbering."""
        return dataclasses.replace(text, input_ids=self.encode(text.input_ids))


@dataclass
class TaskBatch:
    """One task's inputs; ``model(**batch.inputs())`` returns (logits, loss)."""

    task: str
    prefix: torch.Tensor  # [B, P] int64
    prefix_mask: torch.Tensor  # [B, P] bool, True = real token
    target: torch.Tensor  # [B, T] int64
    target_mask: torch.Tensor  # [B, T] bool, True = token of the loss

    def inputs(self) -> dict:
        return dict(prefix=self.prefix, target=self.target, target_mask=self.target_mask, task=self.task,
                    prefix_mask=self.prefix_mask)

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        return TaskBatch(self.task, *(t.to(device, non_blocking=non_blocking)
                                      for t in (self.prefix, self.prefix_mask, self.target, self.target_mask)))


def _check_codes(name, codes):
    if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.dtype == torch.bool \
            or codes.is_floating_point() or codes.is_complex():
        got = f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"{name} must be [B, h, w] integer code indices (as LGVQ.encode returns them), got {got}")
    if codes.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(codes.shape)}")


def codes_to_tokens(codes: torch.Tensor) -> torch.Tensor:
    """[B, h, w] code indices → int64 [B, h * w] tokens, row-major (the raster order the model generates in)."""
    _check_codes("codes", codes)
    return codes.reshape(codes.shape[0], -1).long()


def tokens_to_codes(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """int64 [B, h * w] tokens → [B, h, w] code indices for ``LGVQ.decode_indices``."""
    h, w = grid
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != h * w:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be [B, {h * w}] for a {h}x{w} grid, got {got}")
    return tokens.reshape(tokens.shape[0], h, w)


def _check_text(text, batch_size):
    ids, pad = getattr(text, "input_ids", None), getattr(text, "pad_mask", None)
    if not isinstance(ids, torch.Tensor) or not isinstance(pad, torch.Tensor) or ids.ndim != 2 \
            or pad.shape != ids.shape or pad.dtype != torch.bool:
        raise ValueError("text must be a TextBatch (input_ids [B, L], bool pad_mask [B, L]), got "
                         f"{type(text).__name__}")
    if ids.shape[0] != batch_size:
        raise ValueError(f"text has {ids.shape[0]} captions for {batch_size} images")
    if ids.shape[1] < 2:
        raise ValueError(f"text must have a start token and at least one more, got length {ids.shape[1]}")
    return ids.long(), pad


def make_batch(task: str, codes: torch.Tensor, text) -> TaskBatch:
    """The ``task``'s inputs from image ``codes`` [B, h, w] and the tokenised captions ``text`` (a TextBatch)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    image = codes_to_tokens(codes)
    ids, pad = _check_text(text, image.shape[0])
    image_mask = torch.ones(image.shape, dtype=torch.bool, device=image.device)
    if task == "t2i":
        return TaskBatch(task, ids, pad, image, image_mask)
    if not bool(pad[:, 0].all()) or not bool((ids[:, 0] == ids[0, 0]).all()):
        raise ValueError("text: every caption must begin with the tokenizer's start token (the caption task drops "
                         "it for the model's own)")
    return TaskBatch(task, image, image_mask, ids[:, 1:], pad[:, 1:])


def config_for(lgvq, text_encoder, vocab: TextVocab | None = None, **overrides) -> CodeTransformerConfig:
    """A CodeTransformerConfig sized for a tokenizer (``LGVQ``: its codebook and grid) and its text encoder (its
    ``max_len``, and its vocabulary unless a ``TextVocab`` is given); ``overrides`` set the other fields."""
    h, w = lgvq.cfg.grid
    sizes = dict(image_vocab_size=int(lgvq.quantizer.codebook_size), max_image_tokens=h * w, image_width=w,
                 text_vocab_size=len(vocab) if vocab is not None else int(text_encoder.vocab_size),
                 max_text_tokens=int(text_encoder.max_len))
    return CodeTransformerConfig(**{**sizes, **overrides}).validate()


def decode_captions(tokens: torch.Tensor, text_encoder, vocab: TextVocab | None = None) -> list[str]:
    """Generated caption tokens [B, n] (in ``vocab``'s numbering when given) → strings: each row up to its first
    end token, special tokens dropped."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be [B, n] caption token ids, got {got}")
    if vocab is not None:
        tokens = vocab.decode(tokens)
    eos = text_encoder.eos_token_id
    out = []
    for row in tokens.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        out.append(text_encoder.tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def generate_captions(model: CodeTransformer, codes: torch.Tensor, text_encoder, max_new: int | None = None,
                      vocab: TextVocab | None = None, **sampling) -> list[str]:
    """Captions of the images whose ``codes`` [B, h, w] are given, by a model over ``vocab`` (None: the text
    encoder's own ids); ``sampling``: ``CodeTransformer.generate``'s options (greedy, temperature, top_k, top_p,
    generator, cfg_scale). At most ``max_new`` tokens (default: the text encoder's ``max_len`` - 1, the caption
    task's target length)."""
    max_new = min(text_encoder.max_len - 1, model.cfg.max_text_tokens) if max_new is None else max_new
    eos, pad = text_encoder.eos_token_id, text_encoder.pad_token_id
    if vocab is not None:
        eos, pad = (None if eos is None else vocab.id(eos)), vocab.id(pad)
    tokens = model.generate(codes_to_tokens(codes).to(model.device), max_new, task="caption", eos_id=eos, pad_id=pad,
                            **sampling)
    return decode_captions(tokens, text_encoder, vocab)


def generate_codes(model: CodeTransformer, text, grid: tuple[int, int], vocab: TextVocab | None = None,
                   **sampling) -> torch.Tensor:
    """Code indices [B, h, w] generated from the tokenised captions ``text`` (a TextBatch of text-encoder ids,
    mapped to ``vocab``'s when given); ``LGVQ.decode_indices`` turns them into images. ``sampling`` as in
    ``generate_captions``."""
    if vocab is not None:
        text = vocab.encode_text(text)
    ids, pad = _check_text(text, len(text.input_ids))
    h, w = grid
    tokens = model.generate(ids.to(model.device), h * w, task="t2i", prefix_mask=pad.to(model.device), **sampling)
    return tokens_to_codes(tokens, grid)
