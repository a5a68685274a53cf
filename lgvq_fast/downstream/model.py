"""CodeTransformer: a decoder-only transformer over a frozen tokenizer's image codes and caption tokens.

One row of the sequence is ``prefix`` (P tokens of one modality, padded where ``prefix_mask`` is False), a learned
start token of the target modality, then the target tokens fed back (teacher forcing; the last one is never fed).
The outputs at the start token and after it predict the T target tokens. Image codes and text tokens have their
own embedding tables and output heads in one shared width ``d_model``; a modality (segment) embedding marks the
prefix tokens' kind. Padding is invisible: no token attends to a padded one, and positions count real tokens only,
so a row's outputs do not depend on how wide its batch was padded.

Classifier-free guidance: while training, each row's prefix is replaced with probability ``p_uncond`` by the
learned null prefix (one real token); ``generate(cfg_scale=s)`` runs a null-prefix copy of every row and samples
from ``uncond + s * (cond - uncond)``.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgvq_fast.downstream.sampling import check_sampling, pick
from lgvq_fast.errors import ConfigError

IMAGE, TEXT = 0, 1
MODALITIES = ("image", "text")
# task -> (prefix modality, target modality)
TASKS = {"caption": (IMAGE, TEXT), "t2i": (TEXT, IMAGE)}


@dataclass
class CodeTransformerConfig:
    image_vocab_size: int = 1024
    text_vocab_size: int = 30522
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0
    max_image_tokens: int = 256
    max_text_tokens: int = 32
    # codes per row of the tokenizer's grid: image tokens then also get a row and a column embedding, so the model
    # starts out knowing which codes are neighbours (0: positions along the sequence only)
    image_width: int = 0
    # probability that a training row sees the null prefix instead of its own (classifier-free guidance)
    p_uncond: float = 0.1
    mlp_ratio: int = 4

    def vocab_size(self, modality: int) -> int:
        return (self.image_vocab_size, self.text_vocab_size)[modality]

    def max_tokens(self, modality: int) -> int:
        return (self.max_image_tokens, self.max_text_tokens)[modality]

    def validate(self) -> "CodeTransformerConfig":
        """``ConfigError`` (a ValueError) naming the field no model can use; returns ``self``."""
        for name in ("image_vocab_size", "text_vocab_size", "n_layer", "n_head", "d_model", "max_image_tokens",
                     "max_text_tokens", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CodeTransformerConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.image_width, bool) or not isinstance(self.image_width, int) or self.image_width < 0 \
                or (self.image_width and self.max_image_tokens % self.image_width):
            raise ConfigError(f"CodeTransformerConfig.image_width must be 0 or an integer dividing max_image_tokens "
                              f"({self.max_image_tokens}), got {self.image_width!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"CodeTransformerConfig.d_model ({self.d_model}) must be divisible by "
                              f"n_head ({self.n_head})")
        for name in ("dropout", "p_uncond"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"CodeTransformerConfig.{name} must be a number in [0, 1), got {value!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodeTransformerConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown CodeTransformerConfig keys: {sorted(unknown)}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer for the rows being generated, ``[n_layer, B, n_head, max_len, head_dim]``
    each, written in place as the sequence grows."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, *, device, dtype):
        self.k = torch.zeros(n_layer, batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``, ``v`` ``[B, H, n, hd]`` at positions ``start:start + n``; return keys and values of
        positions ``0:start + n``."""
        end = start + k.shape[2]
        assert end <= self.k.shape[3], f"KV cache of {self.k.shape[3]} positions written up to {end}"
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: CodeTransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, allowed, cache=None, layer=0, start=0):
        """x [B, n, d] at positions ``start:start + n``; ``allowed`` bool [B, 1, n, start + n] (True = attend)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: CodeTransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        hidden = cfg.mlp_ratio * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, allowed, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln_1(x), allowed, cache, layer, start)
        return x + self.mlp(self.ln_2(x))


def attention_mask(real: torch.Tensor, start: int = 0) -> torch.Tensor:
    """bool [B, 1, S - start, S]: query ``i`` (position ``start + i``) attends to the real keys at or before it,
    and always to itself, so a padded query's row is never empty (an empty row gives NaN in SDPA)."""
    n_keys = real.shape[1]
    q = torch.arange(start, n_keys, device=real.device)[:, None]
    k = torch.arange(n_keys, device=real.device)[None, :]
    allowed = ((k <= q) & real[:, None, :]) | (k == q)  # [B, Q, S]
    return allowed[:, None]


def _describe(x) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else type(x).__name__


class CodeTransformer(nn.Module):
    """Decoder-only transformer shared by the ``caption`` and ``t2i`` tasks (see the module docstring)."""

    def __init__(self, cfg: CodeTransformerConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.d_model
        self.tok_emb = nn.ModuleList([nn.Embedding(cfg.image_vocab_size, d), nn.Embedding(cfg.text_vocab_size, d)])
        self.mod_emb = nn.Embedding(2, d)
        # the start token of each target modality, and the null prefix of classifier-free guidance
        self.start_emb = nn.Parameter(torch.zeros(2, d))
        self.null_emb = nn.Parameter(torch.zeros(d))
        # positions count real tokens: prefix (<= one maximum) + start + target inputs (<= the other maximum - 1)
        self.pos_emb = nn.Embedding(cfg.max_image_tokens + cfg.max_text_tokens, d)
        if cfg.image_width:
            self.row_emb = nn.Embedding(cfg.max_image_tokens // cfg.image_width, d)
            self.col_emb = nn.Embedding(cfg.image_width, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleList([nn.Linear(d, cfg.image_vocab_size, bias=False),
                                    nn.Linear(d, cfg.text_vocab_size, bias=False)])
        self._init_weights()

    def _init_weights(self):
        # GPT-2 / nanoGPT: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if p.ndim >= 2 or name in ("start_emb", "null_emb"):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("attn.proj.weight", "mlp.2.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def device(self) -> torch.device:
        return self.pos_emb.weight.device

    def _task(self, task):
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        return TASKS[task]

    def _check_tokens(self, name, ids, mask, modality):
        """(ids int64, mask bool) of ``name`` [B, N] ids of ``modality``, or a ValueError naming the argument."""
        kind, vocab, max_len = MODALITIES[modality], self.cfg.vocab_size(modality), self.cfg.max_tokens(modality)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise ValueError(f"{name} must be [B, N] {kind} token ids, got {_describe(ids)}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{name} must hold integer {kind} token ids, got {_describe(ids)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"{name} is empty ({_describe(ids)}): give at least one row of at least one token")
        if ids.shape[1] > max_len:
            raise ValueError(f"{name} has {ids.shape[1]} {kind} tokens, more than max_{kind}_tokens={max_len}")
        if ids.device != self.device:
            raise ValueError(f"{name} is on {ids.device}, the model on {self.device}")
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape \
                or mask.device != ids.device:
            raise ValueError(f"{name}_mask must be a bool tensor of {name}'s shape {tuple(ids.shape)} on {ids.device}, "
                             f"got {_describe(mask)}")
        # one host read for the three checks
        lo, hi, rows = torch.stack([ids.min().long(), ids.max().long(), mask.any(1).all().long()]).tolist()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} ids must lie in [0, {vocab}) ({kind}_vocab_size={vocab}), got values in "
                             f"[{lo}, {hi}]")
        if name == "prefix" and not rows:
            raise ValueError("prefix_mask has a row without any real token")
        return ids.long(), mask

    def _embed(self, ids, modality, first=0):
        """Embeddings [B, n, d] of ``ids`` [B, n], the tokens ``first:first + n`` of their modality's sequence (an
        image's codes in raster order get their row and column embeddings when ``cfg.image_width`` is set)."""
        h = self.tok_emb[modality](ids) + self.mod_emb.weight[modality]
        if modality == IMAGE and self.cfg.image_width:
            at = torch.arange(first, first + ids.shape[1], device=ids.device)
            h = h + self.row_emb(at // self.cfg.image_width) + self.col_emb(at % self.cfg.image_width)
        return h

    def _embed_prefix(self, prefix, prefix_mask, modality, drop=None):
        """Prefix embeddings [B, P, d] and key mask [B, P]; rows where ``drop`` (bool [B]) is True get the null
        prefix: the null token at the first position, every other position padding."""
        h = self._embed(prefix, modality)
        if drop is None:
            return h, prefix_mask
        first = torch.zeros_like(prefix_mask)
        first[:, 0] = True
        h = torch.where(drop[:, None, None], self.null_emb.expand_as(h), h)
        return h, torch.where(drop[:, None], first, prefix_mask)

    def _trunk(self, h, real, cache=None, start=0):
        """Final hidden states [B, n, d] of the tokens ``h`` [B, n, d] at positions ``start:start + n``; ``real``
        bool [B, start + n] marks the real (non-padding) tokens of the whole sequence so far."""
        pos = (real.long().cumsum(1) - 1).clamp_min(0)[:, start:]
        x = self.drop(h + self.pos_emb(pos))
        allowed = attention_mask(real, start)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, cache, i, start)
        return self.ln_f(x)

    def forward(self, prefix, target, target_mask=None, *, task, prefix_mask=None):
        """Teacher forcing: (logits [B, T, V_target], loss). The loss is the mean cross-entropy over the target
        tokens where ``target_mask`` is True (all when None; padding goes at the end of a row, where no real token
        sees it); ``task`` picks the prefix and target modalities.
        In training mode each row's prefix is dropped to the null prefix with probability ``cfg.p_uncond``."""
        pre_mod, tgt_mod = self._task(task)
        prefix, prefix_mask = self._check_tokens("prefix", prefix, prefix_mask, pre_mod)
        target, target_mask = self._check_tokens("target", target, target_mask, tgt_mod)
        b = prefix.shape[0]
        if target.shape[0] != b:
            raise ValueError(f"target has {target.shape[0]} rows, prefix {b}")
        drop = None
        if self.training and self.cfg.p_uncond > 0:
            drop = torch.rand(b, device=prefix.device) < self.cfg.p_uncond
        h_pre, real_pre = self._embed_prefix(prefix, prefix_mask, pre_mod, drop)
        start = self.start_emb[tgt_mod].expand(b, 1, -1)
        h = torch.cat([h_pre, start, self._embed(target[:, :-1], tgt_mod)], 1)
        # target_mask weights the loss only: a target token is an input to the next prediction whatever its mask,
        # and trailing padding is seen by no real token anyway (causal mask)
        real = torch.cat([real_pre, real_pre.new_ones(b, target.shape[1])], 1)
        logits = self.heads[tgt_mod](self._trunk(h, real)[:, prefix.shape[1]:])  # [B, T, V]
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(wide.flatten(0, 1), target.flatten(), reduction="none")
        weight = target_mask.flatten().to(ce.dtype)
        return logits, (ce * weight).sum() / weight.sum().clamp_min(1.0)

    def _check_generate(self, n_new, tgt_mod, eos_id, pad_id, cfg_scale):
        kind, vocab, max_len = MODALITIES[tgt_mod], self.cfg.vocab_size(tgt_mod), self.cfg.max_tokens(tgt_mod)
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new <= max_len:
            raise ValueError(f"n_new must be an integer in [1, max_{kind}_tokens={max_len}], got {n_new!r}")
        for name, value, optional in (("eos_id", eos_id, True), ("pad_id", pad_id, False)):
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                        or not 0 <= value < vocab):
                what = "None or a" if optional else "a"
                raise ValueError(f"{name} must be {what} {kind} token id in [0, {vocab}), got {value!r}")
        if cfg_scale is not None:
            if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
                raise ValueError(f"cfg_scale must be None or a finite number, got {cfg_scale!r}")
            if self.cfg.p_uncond == 0:
                raise ValueError("cfg_scale needs a model trained with p_uncond > 0 (its null prefix is untrained)")

    def _next_logits(self, h_new, real, cache, start, tgt_mod, cfg_scale):
        """Logits [B, V] for the next target token after the new embeddings ``h_new`` at ``start`` (the whole
        sequence with ``start`` 0 when there is no cache); with guidance the batch holds the cond rows then the
        null-prefix rows."""
        logits = self.heads[tgt_mod](self._trunk(h_new, real, cache, start)[:, -1])
        if cfg_scale is None:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @torch.no_grad()
    def generate(self, prefix, n_new, *, task, prefix_mask=None, greedy=False, temperature=1.0, top_k=None,
                 top_p=None, generator=None, eos_id=None, pad_id=0, cfg_scale=None, use_cache=True,
                 return_logits=False):
        """``n_new`` target tokens after ``prefix``: int64 [B, n_new]; after a row's ``eos_id`` its tokens are
        ``pad_id`` (and generation stops when every row has ended). ``use_cache=False`` recomputes the whole
        sequence at each step (the reference of the KV-cache path). With ``return_logits`` also the (guided)
        logits of each step, [B, steps, V]. Call ``eval()`` first: dropout would act on each step."""
        pre_mod, tgt_mod = self._task(task)
        prefix, prefix_mask = self._check_tokens("prefix", prefix, prefix_mask, pre_mod)
        self._check_generate(n_new, tgt_mod, eos_id, pad_id, cfg_scale)
        check_sampling(greedy, temperature, top_k, top_p, self.cfg.vocab_size(tgt_mod))
        b, reps = prefix.shape[0], 1 if cfg_scale is None else 2
        drop = None
        if cfg_scale is not None:
            prefix, prefix_mask = prefix.repeat(2, 1), prefix_mask.repeat(2, 1)
            drop = torch.arange(2 * b, device=prefix.device) >= b
        h, real = self._embed_prefix(prefix, prefix_mask, pre_mod, drop)
        h = torch.cat([h, self.start_emb[tgt_mod].expand(reps * b, 1, -1)], 1)
        real = torch.cat([real, real.new_ones(reps * b, 1)], 1)
        cache = None
        if use_cache:
            cache = KVCache(self.cfg.n_layer, reps * b, self.cfg.n_head, h.shape[1] + n_new - 1,
                            self.cfg.d_model // self.cfg.n_head, device=h.device, dtype=h.dtype)
        tokens = torch.full((b, n_new), pad_id, dtype=torch.long, device=prefix.device)
        done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
        steps, new, start = [], h, 0
        for t in range(n_new):
            logits = self._next_logits(new, real, cache, start, tgt_mod, cfg_scale) if use_cache else \
                self._next_logits(h, real, None, 0, tgt_mod, cfg_scale)
            steps.append(logits)
            nxt = pick(logits, greedy, temperature, top_k, top_p, generator).masked_fill(done, pad_id)
            tokens[:, t] = nxt
            if eos_id is not None:
                done |= nxt == eos_id
            # one host read per step, and only when there is an end token to wait for
            if t + 1 == n_new or (eos_id is not None and bool(done.all())):
                break
            start, new = real.shape[1], self._embed(nxt.repeat(reps)[:, None], tgt_mod, first=t)
            real = torch.cat([real, real.new_ones(reps * b, 1)], 1)
            if not use_cache:
                h = torch.cat([h, new], 1)
        return (tokens, torch.stack(steps, 1)) if return_logits else tokens
