"""Semantic Alignment Module (spec §3): visual-token transformer, global alignment, masked text prediction.

* ``VisualTokenTransformer`` (f_vt): quantized tokens + a class token + learned positions sized from the
  actual latent grid (interpolated when a different grid comes in) → ln_pre → CLIP residual attention
  blocks (pre-LN, QuickGELU MLP) → ln_post on every token → projection to the text width.
* ``gsa_loss``: one-direction (image→text) InfoNCE with τ = 1, batch mean, as the official code.
* ``MTPDecoder`` + ``MLMHead``: post-LN decoder (self-attention with the padding mask, cross-attention to all
  f_vt outputs, FFN), and an MLM head tied to the frozen input-embedding table of the text encoder.
  Logits are computed only at the masked positions (gathered first), not at every position (spec §9).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * mlp_ratio))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * mlp_ratio, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisualTokenTransformer(nn.Module):
    """[B, T, width] tokens of an (h, w) grid → [B, T + 1, out_dim]; row 0 is the class token."""

    def __init__(self, width: int, out_dim: int, grid: tuple[int, int], layers: int = 2, heads: int = 1,
                 mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"vt width {width} must be divisible by vt_heads {heads}")
        self.grid = tuple(grid)
        self.class_embedding = nn.Parameter(0.01 * torch.randn(width))
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(grid[0] * grid[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(0.01 * torch.randn(width, out_dim))
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)

    def _positions(self, grid):
        pos = self.positional_embedding
        if tuple(grid) == self.grid:
            return pos
        h0, w0 = self.grid
        grid_pos = pos[1:].reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)

    def forward(self, tokens, grid):
        b, t, _ = tokens.shape
        if t != grid[0] * grid[1]:
            raise ValueError(f"tokens has {t} positions but grid is {tuple(grid)}")
        cls = self.class_embedding.to(tokens.dtype).expand(b, 1, -1)
        x = torch.cat([cls, tokens], dim=1) + self._positions(grid).to(tokens.dtype)
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_post(x) @ self.proj


def gsa_loss(vt_cls: torch.Tensor, global_feat: torch.Tensor) -> torch.Tensor:
    """L = mean_i[-s_ii + log(sum_j exp(s_ij) + 1e-6)], s = cosine(vt_cls_i, text_j), τ = 1 (spec §3.2)."""
    u = F.normalize(vt_cls.float(), dim=-1, eps=NORM_EPS)
    t = F.normalize(global_feat.detach().float(), dim=-1, eps=NORM_EPS)
    s = u @ t.t()  # [B, B]
    return (-s.diagonal() + torch.log(s.exp().sum(dim=1) + 1e-6)).mean()


class _Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"mtp d_model {d_model} must be divisible by mtp_heads {heads}")
        self.heads = heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_out = nn.Linear(d_model, d_model)

    def _split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, q, kv, bias=None):
        b, n, d = q.shape
        q, k, v = self._split(self.w_q(q)), self._split(self.w_k(kv)), self._split(self.w_v(kv))
        # under autocast the projections may come out in a different dtype than the layer input
        bias = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias)
        return self.w_out(out.transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.self_attn = _Attention(d_model, heads)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-12)
        self.cross_attn = _Attention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_hidden, d_model))
        self.norm3 = nn.LayerNorm(d_model, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, self_bias):
        x = self.norm1(x + self.drop(self.self_attn(x, x, self_bias)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory)))
        return self.norm3(x + self.drop(self.ffn(x)))


class MTPDecoder(nn.Module):
    """Post-LN transformer decoder over text features, cross-attending to the f_vt outputs (spec §3.3)."""

    def __init__(self, d_model: int, layers: int = 2, heads: int = 1, ffn_hidden: int | None = None,
                 dropout: float = 0.1, init: str = "official"):
        super().__init__()
        ffn_hidden = d_model if ffn_hidden is None else ffn_hidden
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, ffn_hidden, dropout) for _ in range(layers))
        if init == "official":
            # the official decoder's init: the weights of q, k, v, out and both FFN layers drawn from
            # N(0, std = d_model^-1/2); biases keep PyTorch's default
            for layer in self.layers:
                for lin in (*(getattr(a, n) for a in (layer.self_attn, layer.cross_attn)
                              for n in ("w_q", "w_k", "w_v", "w_out")), layer.ffn[0], layer.ffn[3]):
                    nn.init.normal_(lin.weight, std=d_model ** -0.5)
        elif init != "torch":
            raise ValueError(f"mtp init must be 'official' or 'torch', got {init!r}")

    def forward(self, x, memory, pad_mask):
        # scores of pairs with a padding token get -10000 before the softmax, as the official decoder
        pair = pad_mask.unsqueeze(2) & pad_mask.unsqueeze(1)  # [B, L, L]
        bias = torch.zeros(pair.shape, dtype=x.dtype, device=x.device).masked_fill_(~pair, -10000.0)
        bias = bias.unsqueeze(1)
        for layer in self.layers:
            x = layer(x, memory, bias)
        return x


class MLMHead(nn.Module):
    """logits = LN(GELU(W h + b)) @ E^T + bias_vocab, E the text encoder's frozen input embeddings."""

    def __init__(self, text_embedding: torch.Tensor):
        super().__init__()
        vocab, width = text_embedding.shape
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.register_buffer("embedding", text_embedding.detach().clone().float(), persistent=False)

    def forward(self, h):
        h = self.norm(F.gelu(self.dense(h)))
        return h @ self.embedding.to(h.dtype).t() + self.bias.to(h.dtype)


def label_smoothed_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Per-row (1 - ε)(-log p_y) + ε·mean_v(-log p_v), computed in fp32. [M, V], [M] → [M]."""
    return F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=smoothing)


class SemanticAlignment(nn.Module):
    """f_vt + per-position mask vectors + MTP decoder + MLM head."""

    def __init__(self, *, embed_dim: int, text_embedding: torch.Tensor, grid: tuple[int, int], max_text_len: int,
                 vt_layers: int = 2, vt_heads: int = 1, vt_mlp_ratio: int = 4, mtp_layers: int = 2,
                 mtp_heads: int = 1, mtp_ffn_hidden: int | None = None, mtp_dropout: float = 0.1,
                 label_smoothing: float = 0.1, mtp_init: str = "official"):
        super().__init__()
        c_text = text_embedding.shape[1]
        self.c_text = c_text
        self.max_text_len = max_text_len
        self.label_smoothing = label_smoothing
        self.vt = VisualTokenTransformer(embed_dim, c_text, grid, vt_layers, vt_heads, vt_mlp_ratio)
        self.mask_vectors = nn.Parameter(0.01 * torch.randn(max_text_len, c_text))
        self.decoder = MTPDecoder(c_text, mtp_layers, mtp_heads, mtp_ffn_hidden, mtp_dropout, mtp_init)
        self.mlm_head = MLMHead(text_embedding)

    def visual(self, tokens, grid):
        return self.vt(tokens, grid)

    def mtp_hidden(self, vt_out, token_feats, batch):
        """The decoder's output [B, L, C] for the caption with its masked positions replaced by the mask vectors."""
        b, length, c = token_feats.shape
        if length > self.max_text_len:
            raise ValueError(f"text length {length} exceeds max_text_len {self.max_text_len}")
        if c != self.c_text:
            raise ValueError(f"text_feats width {c} != text embedding width {self.c_text}")
        pad = batch.pad_mask
        sel = batch.mlm_mask & pad  # [B, L]
        x = torch.where(sel.unsqueeze(-1), self.mask_vectors[:length].to(token_feats.dtype), token_feats)
        x = x * pad.unsqueeze(-1).to(x.dtype)
        return self.decoder(x.to(vt_out.dtype), vt_out, pad)

    @torch.no_grad()
    def predict_masked(self, vt_out, token_feats, batch):
        """The most likely token id at each masked, non-padding position ([B, L]; -1 elsewhere)."""
        h = self.mtp_hidden(vt_out, token_feats, batch)
        ids = self.mlm_head(h).argmax(-1)
        return ids.masked_fill(~(batch.mlm_mask & batch.pad_mask), -1)

    def mtp(self, vt_out, token_feats, batch):
        """Masked-text loss and accuracy over the masked, non-padding positions of the batch."""
        h = self.mtp_hidden(vt_out, token_feats, batch)
        sel = batch.mlm_mask & batch.pad_mask
        # one index list for both gathers (found on the CPU before the batch moved: no host sync)
        flat_idx = batch.predict_index()
        h_sel = h.flatten(0, 1).index_select(0, flat_idx)  # [M, C]
        target = batch.input_ids.flatten().index_select(0, flat_idx)
        logits = self.mlm_head(h_sel)  # [M, V]
        per_pos = label_smoothed_ce(logits, target, self.label_smoothing)
        hit = (logits.detach().argmax(-1) == target).float()
        weight = batch.predict_weight()  # fixed_size() batches: filler entries weigh 0
        if weight is not None:
            per_pos, hit = per_pos * weight, hit * weight
        count = sel.sum()
        loss = per_pos.sum() / (count + 5e-6)
        acc = hit.sum() / count.clamp_min(1)
        return loss, acc
